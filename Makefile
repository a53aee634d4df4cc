# The two commands a newcomer needs: `make demo` (the local stack with a demo rollout) and
# `make test` (lint, types, and the test suite). Both install everything into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast lint lock proto stubs generate down clean browser promtool

# constraints.txt pins every package the install resolves to, so CI and a newcomer get the versions
# the suite last passed with (a new release of a type-checked library can fail `mypy --strict`).
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,local]'
	touch $@

# Re-resolve pyproject.toml's ranges to the newest releases and pin them (then run `make test`).
lock:
	rm -rf $(VENV)-lock
	$(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet --upgrade pip
	$(VENV)-lock/bin/pip install --quiet -e '.[dev,local]'
	{ echo "# Pinned by \`make lock\` from pyproject.toml's ranges; do not edit by hand."; \
		$(VENV)-lock/bin/pip freeze --exclude-editable; } > constraints.txt
	rm -rf $(VENV)-lock

demo: $(VENV)/.installed
	$(BIN)/extproc demo

down: $(VENV)/.installed
	$(BIN)/extproc down

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: lint promtool
	@# As root (CI, containers) the browser tests' Chromium is installed when missing; otherwise
	@# they skip unless EXTPROC_REQUIRE_BROWSER=1 (`make browser` installs it with sudo).
	@[ "$$(id -u)" != 0 ] || $(MAKE) --no-print-directory browser
	@# Two workers, each test file's tests on one (they share its stack): a stack's processes
	@# wait on each other as much as they compute, so two at a time fill both cores.
	$(BIN)/pytest -n 2 --dist loadfile

# The unit and component tests only (no stack, no browser), on every core: the quick loop while
# working. `make test` runs everything, as CI does.
test-fast: $(VENV)/.installed
	$(BIN)/pytest -n auto -m "not integration" tests/unit tests/component

# Chromium and its driver for the dashboard's browser tests (Debian packages; root or sudo). Without
# them those tests skip (or fail, with EXTPROC_REQUIRE_BROWSER=1 as in CI).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	$$sudo apt-get update && $$sudo env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y chromium chromium-driver

# promtool, Prometheus's rule checker, for the monitoring tests: unpacked from Debian's package into
# the virtualenv (no service installed, no root needed once the package lists exist). Without it
# those tests skip (or fail, with EXTPROC_REQUIRE_TOOLS=1 as in CI).
promtool: $(BIN)/promtool
$(BIN)/promtool: | $(VENV)/.installed
	@tmp=$$(mktemp -d) && cd $$tmp && { apt-get download prometheus >/dev/null 2>&1 || \
		{ [ "$$(id -u)" = 0 ] && apt-get update >/dev/null && apt-get download prometheus >/dev/null; }; } && \
		dpkg -x prometheus_*.deb root && cp root/usr/bin/promtool $(CURDIR)/$@; \
		status=$$?; rm -rf $$tmp; \
		[ $$status = 0 ] || echo "promtool not installed: the monitoring tests will skip"

# Regenerate the telemetry schema code after editing proto/ (a test checks it is current).
proto: $(VENV)/.installed
	PATH=$(BIN):$$PATH $(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --mypy_out=. \
		proto/extproc/telemetry/v1/event.proto

# Regenerate the type stubs of the Envoy services the data plane serves (a test checks them).
stubs: $(VENV)/.installed
	rm -rf typings/envoy
	PATH=$(BIN):$$PATH $(BIN)/python typings/generate.py typings

# Regenerate the Envoy configs and manifests derived from the example experiment (tests check them).
generate: $(VENV)/.installed
	$(BIN)/extproc envoy-config -o envoy/envoy.yaml
	$(BIN)/extproc envoy-config --gateway extproc/data/gateway.yaml -o envoy/envoy-fleet.yaml
	$(BIN)/python deploy/generate.py

clean:
	rm -rf $(VENV) .extproc .mypy_cache .pytest_cache .ruff_cache
