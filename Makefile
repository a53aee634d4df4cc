# The two commands a newcomer needs: `make demo` (the local stack with a demo rollout) and
# `make test` (lint, types, and the test suite). Both install everything into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint proto generate down clean browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/extproc demo

down: $(VENV)/.installed
	$(BIN)/extproc down

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint
	@# As root (CI, containers) the browser tests' Chromium is installed when missing; otherwise
	@# they skip unless EXTPROC_REQUIRE_BROWSER=1 (`make browser` installs it with sudo).
	@[ "$$(id -u)" != 0 ] || $(MAKE) --no-print-directory browser
	$(BIN)/pytest

# Chromium and its driver for the dashboard's browser tests (Debian packages; root or sudo). Without
# them those tests skip (or fail, with EXTPROC_REQUIRE_BROWSER=1 as in CI).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	$$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y chromium chromium-driver

# Regenerate the telemetry schema code after editing proto/ (a test checks it is current).
proto: $(VENV)/.installed
	PATH=$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --mypy_out=. \
		proto/extproc/telemetry/v1/event.proto

# Regenerate the Envoy configs and manifests derived from the example experiment (tests check them).
generate: $(VENV)/.installed
	$(BIN)/extproc envoy-config -o envoy/envoy.yaml
	$(BIN)/python deploy/generate.py

clean:
	rm -rf $(VENV) .extproc .mypy_cache .pytest_cache .ruff_cache
