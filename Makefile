# One target per habit. `make run` and `make test` create .venv on first use (and
# again whenever pyproject.toml changes), so a fresh clone needs only Python 3.11+.
# The llama extra compiles llama.cpp the first time (about 5 minutes on 2 cores);
# pip caches the wheel after that.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "agentos needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,llama]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/agentos up -f examples/ -f policies/ --engine llama

test: lint
	$(BIN)/pytest

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

$(PEERS)/.installed:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet 'limits[redis]>=3.13,<6'
	touch $@

bench: $(STAMP) $(PEERS)/.installed
	@for f in bench/[!_]*.py; do echo "== $$f" >&2; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) $(PEERS) .mypy_cache .ruff_cache .pytest_cache .import_linter_cache
