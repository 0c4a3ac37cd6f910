# The newcomer's commands (README): `make demo` runs the main job, `make test` runs every test.
# Both install what they need first (scripts/install-deps) and start the local stack.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
TRUSTCAP := $(VENV)/bin/trustcap
PYTEST   := $(VENV)/bin/pytest
# operator/ sits at the repo root (docs/design.md) and would shadow the standard library's `operator` module
# for any `python -m` started here: Python 3.11's safe-path mode keeps the working folder off sys.path.
export PYTHONSAFEPATH := 1

.PHONY: deps stack demo test unit e2e lint bench down clean

deps:
	@scripts/install-deps

stack: deps
	@$(TRUSTCAP) stack up

demo: stack
	@scripts/demo

lint: deps
	@$(VENV)/bin/ruff check .
	@scripts/typecheck

# One pytest run over the unit and end-to-end suites, so its closing line counts every test.
test: stack lint
	@$(PYTEST) tests e2e

unit: deps
	@$(PYTEST) tests

e2e: stack
	@$(PYTEST) e2e

bench: stack
	@scripts/bench

down:
	@$(TRUSTCAP) stack down

clean: down
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis
