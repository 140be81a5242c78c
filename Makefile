# The two set-up commands of the README. Each builds .venv the first time and reuses it after.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
CONFIG ?= configs/mrpc.toml

.PHONY: run test test-all bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)  ## the main job: MRPC on the packaged model, embedded simulation
	HF_HUB_OFFLINE=1 $(VENV)/bin/hlora run --config $(CONFIG)

test: $(STAMP)  ## the default (fast) test suite; never touches the network
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q

test-all: $(STAMP)  ## every test, slow ones included
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -q -m ''

lint: $(STAMP)  ## style (ruff) and the architecture: the import layers of pyproject.toml (lint-imports)
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(VENV)/bin/lint-imports

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
