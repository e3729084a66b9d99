# make test: build .venv from nothing (pinned versions) and run the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv test clean proto demo bench

venv: $(STAMP)

$(STAMP): pyproject.toml constraints/test.txt scripts/system-deps.sh
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints/test.txt -e ".[airflow,agent,test]"
	touch $(STAMP)

test: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: venv  # a local federation trained by a real Airflow; Ctrl-C stops it (see scripts/demo.py)
	$(BIN)/python scripts/demo.py

bench: venv  # the benchmarks under bench/; rewrites bench/RESULTS.md (see bench/README.md)
	$(BIN)/python -m bench

proto: venv  # regenerate the gRPC code from flare_provider/wire/agent.proto
	$(BIN)/python -m flare_provider.wire.codegen

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
