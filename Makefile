# The two README commands:  `make figures` (install + main job)  and  `make test` (install + tests).
VENV ?= .venv
BIN := $(VENV)/bin
PYTHON ?= python3

.PHONY: install figures test bench lint

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0   # local CPU wheel first: a plain `torch` pulls CUDA
	$(BIN)/pip install --quiet -e ".[dev,notebooks]"
	touch $@

install: $(BIN)/.installed

figures: install          ## regenerate figures/ from the shipped checkpoints (small defaults)
	$(BIN)/ksync figures --out figures

test: install             ## the default test suite (slow checks are excluded, see `make bench`)
	$(BIN)/python -m pytest -q

bench: install            ## speed ratios against numpy and torch + the slow tests
	$(BIN)/ksync bench --json benchmarks/latest.json
	$(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check particles analysis tests
