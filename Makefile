# Two entry points: `make demo` (the main job on embedded defaults) and `make test` (everything CI
# runs). Both install what they need; heavy things are cached outside the checkout.
CACHE ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/prefect-gpu-operator
# One virtualenv per checkout: an editable install points at exactly one source tree.
VENV  ?= $(CACHE)/venvs/$(shell pwd | sha1sum | cut -c1-12)
PY    := $(VENV)/bin/python
BIN   := $(VENV)/bin

.PHONY: demo test lint unit integration install tools clean-sandbox

install:
	@test -x $(PY) || { python3 -m venv $(VENV) && $(PY) -m pip install -q --upgrade pip; }
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'

tools: install
	@$(BIN)/prefect-gpu-operator sandbox install-tools >/dev/null

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check operator flows tests
	$(BIN)/mypy

unit: install
	$(PY) -m pytest tests/unit

integration: tools
	$(PY) -m pytest tests/integration

test: tools lint
	$(PY) -m pytest

demo: tools
	$(BIN)/prefect-gpu-operator demo
