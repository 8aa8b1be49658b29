"""The JVM Spark connector: ``format("flightcache")`` for PySpark, Scala, Java and Spark SQL.

The connector (``connectors/spark``, a Spark DataSource V2 over Arrow Flight) is built into a jar that
ships inside this package. Add it to a session and ``format("flightcache")`` runs on the JVM, with no
Python hop:

    from pyspark.sql import SparkSession
    import flightcache.integrations.spark_jvm

    spark = flightcache.integrations.spark_jvm.configure(SparkSession.builder).getOrCreate()
    logs = spark.read.format("flightcache").option("uri", "grpc://cache:8815").load("logs/raw")

Outside Python: ``spark-submit --jars $(python -m flightcache.integrations.spark_jvm)`` (prints the jar's path).
The Python data source (``flightcache.integrations.spark``) stays available as ``format("flightcache-python")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from ..errors import NotInstalledError

__all__ = ["FORMAT", "available", "configure", "jar_path"]

FORMAT = "flightcache"
JAR = Path(__file__).resolve().parents[1] / "jars" / "flightcache-spark.jar"  # package data of flightcache

B = TypeVar("B")


def available() -> bool:
    """Whether the connector's jar was built into this installation."""
    return JAR.is_file()


def jar_path() -> Path:
    """The connector's jar; NotInstalledError (with the build command) when it was not built."""
    if not available():
        raise NotInstalledError(
            f"the flightcache Spark connector jar is not built ({JAR} is missing): run 'make jar' in the "
            "project (Maven and Java 17), or use the Python data source, format('flightcache-python')"
        )
    return JAR


def configure(builder: B) -> B:
    """Add the connector's jar to a ``SparkSession.builder`` (keeping any ``spark.jars`` already set).

    Spark's launcher already opens the JDK modules Arrow needs (java.nio, sun.nio.ch) on Java 17, so
    the jar is all the connector needs.
    """
    options: dict[str, Any] = getattr(builder, "_options", {})
    jars = [j for j in str(options.get("spark.jars", "")).split(",") if j]
    jar = str(jar_path())
    if jar not in jars:
        jars.append(jar)
    return builder.config("spark.jars", ",".join(jars))  # type: ignore[attr-defined,no-any-return]


if __name__ == "__main__":
    print(jar_path())
