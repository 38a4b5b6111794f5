PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo lint bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install -c constraints.txt -e ".[examples,dev]"
	touch $@

install: $(BIN)/.installed

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q tests

demo: $(BIN)/.installed
	$(BIN)/accelerate launch --num_processes 1 --cpu examples/train_timm.py --compare

lint: $(BIN)/.installed
	$(BIN)/ruff check hf_layer_freeze examples tests benchmarks
	$(BIN)/ruff format --check hf_layer_freeze examples tests benchmarks

bench: $(BIN)/.installed
	$(BIN)/python benchmarks/bench_freezing.py

clean:
	rm -rf $(VENV) build *.egg-info
