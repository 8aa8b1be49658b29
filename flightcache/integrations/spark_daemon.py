"""Spark's Python daemon with pyarrow, pyspark's workers and flightcache imported before it forks.

Spark starts its Python workers, and the short-lived processes that plan and commit a Python data
source's reads and writes, by forking a daemon. Stock ``pyspark.daemon`` imports the worker module
and everything it needs after the fork, in every child: on this machine ~0.2 s of imports per
process and, summed over the data-source processes of a stage, seconds per pipeline. Run
this daemon instead and the children start with the imports done::

    SparkSession.builder.config("spark.python.daemon.module", "flightcache.integrations.spark_daemon")

Stock pyspark avoids importing before the fork because imports may start threads, and a forked
child has only the thread that forked. The threads these imports start are numpy's OpenBLAS pool
and jemalloc's background purger, which both reinitialise themselves in a forked child
(pthread_atfork); no gRPC object exists until a task makes a client, after the fork.
"""

from __future__ import annotations

import importlib
from contextlib import suppress

from pyspark import daemon

PRELOADED = (
    "pyarrow",
    "pyarrow.compute",
    "pyarrow.flight",
    "flightcache.integrations.spark",
    # the worker modules Spark names when it forks a child for a Python data source or a UDF
    "pyspark.worker",
    "pyspark.sql.worker.lookup_data_sources",
    "pyspark.sql.worker.create_data_source",
    "pyspark.sql.worker.plan_data_source_read",
    "pyspark.sql.worker.write_into_data_source",
    "pyspark.sql.worker.commit_data_source_write",
    "pyspark.sql.worker.data_source_pushdown_filters",
)

for _module in PRELOADED:
    with suppress(ImportError):  # another pyspark version: the child imports what it needs after the fork
        importlib.import_module(_module)

if __name__ == "__main__":
    daemon.manager()
