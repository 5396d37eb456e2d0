# Two commands from a fresh clone: `make run` and `make test`. Each builds .venv as needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run example test lint clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,examples]'
	touch $@

run: $(INSTALLED)
	$(BIN)/clipprune serve

example: $(INSTALLED)
	$(BIN)/python examples/prune_digits.py

lint: $(INSTALLED)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build data .pytest_cache .ruff_cache
