# `make demo` and `make test` work on a fresh machine with python3 (>= 3.11), Java 17 and Maven (for
# Spark's S3 connector): each creates .venv when it is missing and installs the project with the extras it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test test-fast lint bench clean s3a-jars alluxio-jars

# Spark's S3 connector (hadoop-aws for pyspark's Hadoop, the AWS SDK bundle, the committer binding)
# from Maven Central into connectors/s3a/target/jars; the pipelines read S3 through it.
S3A_JARS := connectors/s3a/target/jars/.fetched
$(S3A_JARS): connectors/s3a/pom.xml
	rm -rf connectors/s3a/target/jars
	mvn -q -B -f connectors/s3a/pom.xml dependency:copy-dependencies
	@touch $@

s3a-jars: $(S3A_JARS)

# Alluxio 2.9's master, worker and shaded client, for the pipeline benchmark's alluxio mode.
ALLUXIO_JARS := connectors/alluxio/target/.fetched
$(ALLUXIO_JARS): connectors/alluxio/pom.xml
	rm -rf connectors/alluxio/target
	mvn -q -B -f connectors/alluxio/pom.xml package
	@touch $@

alluxio-jars: $(ALLUXIO_JARS)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	@touch $(STAMP)

# The log pipeline, four Spark stages handing off through flightcache, moto S3 as the cloud.
demo: $(STAMP) $(S3A_JARS)
	$(PY) pipelines/logs.py run --handoff flightcache --rows 1000000

# Two plain-Python stages through a server: no Spark, a few seconds.
demo-quick: $(STAMP)
	$(PY) pipelines/two_stage.py

test: $(STAMP) $(S3A_JARS) $(ALLUXIO_JARS)
	$(PY) -m ruff check flightcache tests bench pipelines
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not spark"

lint: $(STAMP)
	$(PY) -m ruff check flightcache tests bench pipelines

bench: $(STAMP) $(S3A_JARS) $(ALLUXIO_JARS)
	$(PY) bench/flight_throughput.py
	$(PY) bench/storage.py
	$(PY) bench/sql.py
	$(PY) bench/pipeline.py --modes all
	$(PY) bench/load.py
	$(PY) bench/spark_read.py
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .flightcache
