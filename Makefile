# `make demo` and `make test` work on a fresh machine with python3 (>= 3.11), Java 17 and Maven: each
# creates .venv when it is missing and installs the project with every extra, at the versions pinned in
# requirements.lock (the ones CI tested); Maven builds the JVM connector and fetches Spark's S3 connector.
# After changing dependencies in pyproject.toml, run `make lock` and commit requirements.lock with it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# Test processes (pytest-xdist): the suite mostly waits on servers it starts, so two halve it on two cores.
# Each test file runs whole in one process (module fixtures start once). PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2

.PHONY: demo demo-quick test test-fast test-java test-java-conformance lint typecheck lock bench clean jar s3a-jars alluxio-jars

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

# The JVM Spark connector, compiled against the jars of the installed pyspark and placed in the package
# (flightcache/jars/, package data), where flightcache.integrations.spark_jvm.jar_path() finds it.
JAR := flightcache/jars/flightcache-spark.jar
# Expanded when a recipe runs (after the venv exists), not when make reads this file.
PYSPARK_JARS = $(shell $(PY) -c "import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), 'jars'))")
MVN = mvn -q -B -f connectors/spark/pom.xml -Dpyspark.jars=$(PYSPARK_JARS) -Dflightcache.python=$(abspath $(PY))

# Reinstalls when pyproject.toml or the lock changes (tests/test_lock.py fails when pyproject.toml
# asks for something the lock does not pin).
$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet -r $(LOCK)
	$(PIP) install --quiet --no-deps -e .
	@touch $(STAMP)

# Resolve the "all" extra again (every extra but kedro-vineyard, a side venv of bench/kedro.py), for any
# platform and Python >= 3.11, to the newest versions allowed.
lock:
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m uv --version >/dev/null 2>&1 || $(PIP) install --quiet 'uv>=0.5'
	$(PY) -m uv pip compile pyproject.toml --extra all --universal --python-version 3.11 --quiet -o $(LOCK)

$(JAR): $(STAMP) connectors/spark/pom.xml $(shell find connectors/spark/src/main -type f)
	$(MVN) package -Dmaven.test.skip=true
	@mkdir -p $(dir $(JAR))
	cp connectors/spark/target/flightcache-spark.jar $(JAR).tmp && mv $(JAR).tmp $(JAR)  # a new file: running JVMs keep theirs

jar: $(JAR)

# The log pipeline, four Spark stages handing off through flightcache, moto S3 as the cloud.
demo: $(STAMP) $(JAR) $(S3A_JARS)
	$(PY) pipelines/logs.py run --handoff flightcache --rows 1000000

# Two plain-Python stages through a server: no Spark, a few seconds.
demo-quick: $(STAMP)
	$(PY) pipelines/two_stage.py

test: $(STAMP) $(JAR) $(S3A_JARS) test-java-conformance
	$(PY) -m ruff check flightcache tests bench pipelines
	$(PY) -m mypy
	$(MVN) test
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile --durations=15

test-java: $(STAMP) $(JAR)
	$(MVN) test

# docs/protocol.md from the JVM: a plain Arrow Flight Java client and the Flight SQL JDBC driver against a real
# `flightcache serve` of this venv. Dependencies come from Maven Central (MVN_FLAGS=-o once they are cached).
MVN_FLAGS ?=
test-java-conformance: $(STAMP)
	cd connectors/conformance && mvn -q -B $(MVN_FLAGS) test -Dflightcache.bin=$(abspath $(VENV))/bin/flightcache

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not spark"

lint: $(STAMP)
	$(PY) -m ruff check flightcache tests bench pipelines
	$(PY) -m mypy

typecheck: $(STAMP)
	$(PY) -m mypy

bench: $(STAMP) $(JAR) $(S3A_JARS) $(ALLUXIO_JARS)
	$(PY) bench/flight_throughput.py
	$(PY) bench/storage.py
	$(PY) bench/sql.py
	$(PY) bench/pipeline.py --modes all
	$(PY) bench/load.py
	$(PY) bench/spark_read.py
	$(PY) bench/handoff.py
	$(PY) bench/spark_connector.py
	$(PY) bench/cluster.py
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .flightcache connectors/conformance/target connectors/spark/target $(JAR)
