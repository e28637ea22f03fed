# DR Appliance: every target bootstraps (Debian packages + .venv) idempotently first.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: bootstrap demo test test-fast bench lint clean

bootstrap:
	@scripts/bootstrap.sh

demo: bootstrap
	@scripts/demo.sh

test: bootstrap
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: bootstrap
	$(PY) -m pytest -q -p no:cacheprovider -m "not vm and not slow" tests

bench: bootstrap
	$(PY) -m bench

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

clean:
	rm -rf var/demo var/bench
