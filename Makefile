# Two commands for a new user: `make quickstart` and `make test`.
# Everything goes into ./.venv. TORCH picks the PyTorch build: the default is the CPU build
# this project is developed on; on a CUDA machine use e.g. `make quickstart TORCH=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install quickstart test lint
install: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[test]"
	touch $@

quickstart: install
	$(BIN)/raypipe run pipelines/quickstart.yaml

lint: install
	$(BIN)/ruff check raypipe tests bench
	$(BIN)/ruff format --check raypipe tests bench

test: lint
	$(BIN)/python -m pytest
