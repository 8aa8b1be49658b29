# `make demo` and `make test` work on a fresh machine with python3 (>= 3.11) and Java 17:
# each creates .venv when it is missing and installs the project with the extras it needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test test-fast test-java lint bench clean jar

# The JVM Spark connector, compiled against the jars of the installed pyspark and placed in the package
# (flightcache/jars/, package data), where flightcache.spark_jvm.jar_path() finds it.
JAR := flightcache/jars/flightcache-spark.jar
PYSPARK_JARS = $(shell $(PY) -c "import os, pyspark; print(os.path.join(os.path.dirname(pyspark.__file__), 'jars'))")
MVN := mvn -q -B -f connectors/spark/pom.xml -Dpyspark.jars=$(PYSPARK_JARS) -Dflightcache.python=$(abspath $(PY))

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[all]'
	@touch $(STAMP)

$(JAR): $(STAMP) connectors/spark/pom.xml $(shell find connectors/spark/src/main -type f)
	$(MVN) package -Dmaven.test.skip=true
	@mkdir -p $(dir $(JAR))
	cp connectors/spark/target/flightcache-spark.jar $(JAR).tmp && mv $(JAR).tmp $(JAR)  # a new file: running JVMs keep theirs

jar: $(JAR)

# The log pipeline, four Spark stages handing off through flightcache, moto S3 as the cloud.
demo: $(STAMP) $(JAR)
	$(PY) pipelines/logs.py run --handoff flightcache --rows 1000000

# Two plain-Python stages through a server: no Spark, a few seconds.
demo-quick: $(STAMP)
	$(PY) pipelines/two_stage.py

test: $(STAMP) $(JAR)
	$(PY) -m ruff check flightcache tests bench pipelines
	$(MVN) test
	$(PY) -m pytest

test-java: $(STAMP) $(JAR)
	$(MVN) test

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not spark"

lint: $(STAMP)
	$(PY) -m ruff check flightcache tests bench pipelines

bench: $(STAMP) $(JAR)
	$(PY) bench/flight_throughput.py
	$(PY) bench/storage.py
	$(PY) bench/sql.py
	$(PY) bench/pipeline.py --modes all
	$(PY) bench/load.py
	$(PY) bench/spark_read.py
	$(PY) bench/spark_connector.py
	$(PY) bench/report.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .flightcache connectors/spark/target $(JAR)
