# `make demo` and `make test` work on a fresh machine with python3 (>= 3.11) and Java 17:
# each creates .venv when it is missing and installs the project with the extras it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) pipelines/demo.py

test: $(STAMP)
	$(PY) -m ruff check flightcache tests bench pipelines
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not spark"

lint: $(STAMP)
	$(PY) -m ruff check flightcache tests bench pipelines

bench: $(STAMP)
	$(PY) bench/flight_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .flightcache
