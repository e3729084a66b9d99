# make test: build .venv from nothing (pinned versions) and run the whole suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: venv test clean proto demo bench fuzz mlflow-server

venv: $(STAMP)

$(STAMP): pyproject.toml constraints/test.txt scripts/system-deps.sh
	bash scripts/system-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -c constraints/test.txt -e ".[airflow,agent,test]"
	touch $(STAMP)

test: venv mlflow-server
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The MLflow tracking server the tracking tests start: a virtualenv of its own (MLflow's pins
# conflict with Airflow 3's; the provider talks to the server over its REST API).
MLFLOW_VENV := $(VENV)/mlflow-server
mlflow-server: $(MLFLOW_VENV)/.installed-stamp

$(MLFLOW_VENV)/.installed-stamp: constraints/mlflow-server.txt
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install --quiet -r constraints/mlflow-server.txt
	touch $@

demo: venv  # a local federation trained by a real Airflow; Ctrl-C stops it (see scripts/demo.py)
	$(BIN)/python scripts/demo.py

bench: venv  # the benchmarks under bench/; rewrites bench/RESULTS.md (see bench/README.md)
	$(BIN)/python -m bench

FUZZ_SECONDS ?= 60
fuzz: venv  # coverage-guided fuzzing of the archive and safetensors readers, FUZZ_SECONDS per target (not in make test)
	$(BIN)/python -c "import atheris" 2>/dev/null || $(BIN)/pip install --quiet --no-build-isolation -c constraints/test.txt -e ".[fuzz]"
	$(BIN)/python -m fuzz --seconds $(FUZZ_SECONDS)

proto: venv  # regenerate the gRPC code from flare_provider/wire/agent.proto
	$(BIN)/python -m flare_provider.wire.codegen

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
