# The README's two commands: `make quickstart` and `make test`. Both set up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dgq-installed
PYTEST_ARGS ?=

.PHONY: setup quickstart test

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/dgq quickstart --out outputs/quickstart

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
