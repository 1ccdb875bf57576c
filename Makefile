# One target per habit. `make run` and `make test` create .venv on first use (and
# again whenever pyproject.toml changes), so a fresh clone needs only Python 3.11+.
# The llama extra compiles llama.cpp the first time (about 5 minutes on 2 cores);
# pip caches the wheel after that.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama.cpp is compiled for portable AVX2, not -march=native: a native build on a host
# whose CPU reports AMX crashed (general protection fault in libggml-cpu) on these VMs.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON

.PHONY: install run run-models test test-unit lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "agentos needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e '.[dev,llama,server]'
	touch $(STAMP)

# One engine: the example agents and the operator on the daemon's own model (the real
# one: `up` picks llama when it is installed, as it is here).
run: $(STAMP)
	$(BIN)/agentos up -f examples/agents.yaml -f examples/operator/ -f policies/

# The two-model example (examples/models/): the daemon's model triages, a second model
# (an embedded llama.cpp server, stopped after its idleStop without calls) answers.
run-models: $(STAMP)
	$(BIN)/agentos up -f examples/models/ -f policies/

test: lint
	$(BIN)/pytest

# The pure tier alone (no server, no model): seconds, for the edit-test loop.
test-unit: $(STAMP)
	$(BIN)/pytest tests/unit

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Benchmark peers get their own venv, so their pins never reach agentos's.
PEERS := .venv-bench-peers

$(PEERS)/.installed: Makefile
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet 'limits[redis]>=3.13,<6' 'arq>=0.26,<0.29' 'openai>=1.50,<3'
	touch $@

bench: $(STAMP) $(PEERS)/.installed
	@for f in bench/[!_]*.py; do echo "== $$f" >&2; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) $(PEERS) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
