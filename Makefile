PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
# One process using every core (accelerate launch would otherwise pin CPU runs to one thread).
LAUNCH := --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no --num_cpu_threads_per_process $(shell nproc)

.PHONY: install test test-fast test-min demo lint bench clean

# The oldest versions pyproject.toml declares (constraints-min.txt), in a second environment.
MIN_VENV := .venv-min
# The version-sensitive tests: compile, DDP internals and multi-process training, the Trainer callback, resume,
# gradient checkpointing. (The examples' tests need the examples' extras, which pin no floor of the package.)
MIN_TESTS := tests/test_compile.py tests/test_multiprocess.py tests/test_callback.py tests/test_accelerate.py \
	tests/test_gradient_checkpointing.py tests/test_freezing.py tests/test_units.py tests/test_options.py tests/test_adaptive.py

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -c constraints.txt -e ".[examples,dev,finetune]"
	touch $@

install: $(BIN)/.installed

# One pytest-xdist worker per core, each with one torch thread: the tests' tiny models keep about one thread busy, and
# two threads per worker on shared cores spin.
test: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto -q --durations=10

# The inner loop: everything but the 2-process runs and the tests marked slow (under a minute on 2 cores).
test-fast: $(BIN)/.installed
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n auto -q -m "not slow and not multiprocess"

$(MIN_VENV)/bin/.installed: pyproject.toml constraints-min.txt
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install --quiet --upgrade pip
	$(MIN_VENV)/bin/pip install --quiet -c constraints-min.txt -e ".[dev]"
	touch $@

# The version-sensitive tests again, on the oldest declared torch, transformers, accelerate and timm.
test-min: $(MIN_VENV)/bin/.installed
	OMP_NUM_THREADS=1 $(MIN_VENV)/bin/python -m pytest -n auto -q --durations=5 $(MIN_TESTS)

demo: $(BIN)/.installed
	$(BIN)/accelerate launch $(LAUNCH) examples/train_timm.py

lint: $(BIN)/.installed
	$(BIN)/ruff check hf_layer_freeze examples tests benchmarks
	$(BIN)/ruff format --check hf_layer_freeze examples tests benchmarks

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_freezing.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_freezing.py --lora $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_end_to_end.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_options.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_ddp_comm.py
	$(BIN)/python benchmarks/bench_accuracy.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_finetune.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_cache.py --output benchmarks/results/cache.json

clean:
	rm -rf $(VENV) $(MIN_VENV) build *.egg-info
