# One target per habit; CI (.ci/run) and people call the same ones.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install serve test check bench

$(BIN)/lockgate: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# Tests only: the real OPA Go engine, in process, behind tests/fakes/opa_server.py. Its metadata
	# asks for Python 3.14 but it runs on 3.11, so it cannot be a dependency in pyproject.toml.
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python opa-golib-python-bindings==0.4.4
	touch $(BIN)/lockgate

install: $(BIN)/lockgate

serve: install
	$(BIN)/lockgate serve

test: install
	$(BIN)/python -m pytest

check: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python bench/bench.py
