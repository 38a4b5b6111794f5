import sys

from .plan import main

sys.exit(main())
