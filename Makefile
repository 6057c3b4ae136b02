# The two commands of the README: `make up` runs the platform, `make test` runs every check.
# Each creates the local virtualenv (.venv) from constraints.txt on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: up test lint typecheck unit unit-pure build bench lock clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

up: build
	$(BIN)/cityplane up

test: lint typecheck unit unit-pure

# The gateway's hot modules compiled with Cython into gateway/_compiled/ (ADR 15); a no-op in
# a fraction of a second when they match the sources. CITYPLANE_NO_EXTENSIONS=1 skips it.
build: $(STAMP)
	$(BIN)/python -m gateway.speedups build

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: build
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The pure-Python fallback of the compiled modules, judged by the HTTP/1.1 conformance suite, the
# inline exchanges and the upstream client once more (~60 s).
unit-pure: $(STAMP)
	CITYPLANE_NO_EXTENSIONS=1 $(BIN)/python -m pytest -q -p no:cacheprovider \
	  tests/gateway/test_http_conformance.py tests/gateway/test_inline_exchanges.py \
	  tests/gateway/test_h1_request_headers.py tests/gateway/test_h1_drain.py \
	  tests/gateway/test_upstream_head.py tests/gateway/test_upstream_client.py

bench: build
	$(BIN)/python -m bench

# Refresh constraints.txt after changing dependency ranges in pyproject.toml.
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install -q -e '.[dev]'
	.lock-venv/bin/python -m pip freeze --all --exclude-editable | grep -v -e '^-e' -e '^pip==' > constraints.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache gateway/_compiled
