# `make demo` and `make test` work on a fresh machine with python3 (>= 3.11) and Java 17:
# each creates .venv when it is missing and installs the project with the extras it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test test-fast lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	@touch $(STAMP)

# The log pipeline, four Spark stages handing off through flightcache, moto S3 as the cloud.
demo: $(STAMP)
	$(PY) pipelines/logs.py run --handoff flightcache --rows 1000000

# Two plain-Python stages through a server: no Spark, a few seconds.
demo-quick: $(STAMP)
	$(PY) pipelines/two_stage.py

test: $(STAMP)
	$(PY) -m ruff check flightcache tests bench pipelines
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not spark"

lint: $(STAMP)
	$(PY) -m ruff check flightcache tests bench pipelines

bench: $(STAMP)
	$(PY) bench/flight_throughput.py
	$(PY) bench/storage.py
	$(PY) bench/sql.py
	$(PY) bench/pipeline.py --modes all
	$(PY) bench/load.py
	$(PY) bench/spark_read.py
	$(PY) bench/handoff.py
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .flightcache
