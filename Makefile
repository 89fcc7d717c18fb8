# The README's two commands: `make quickstart` and `make test`. Both set up .venv first.
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dgq-installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist): one per core by default. Whole files go to one process (loadfile), so
# a file's module-scoped fixtures (calibrations, exports) are built once. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= auto

.PHONY: setup quickstart test lint format

$(STAMP): pyproject.toml scripts/setup_env.sh
	bash scripts/setup_env.sh $(VENV)
	touch $@

setup: $(STAMP)

quickstart: $(STAMP)
	$(BIN)/dgq quickstart --out outputs/quickstart

# Lint and format check first (configuration in pyproject.toml), then the suite.
test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
