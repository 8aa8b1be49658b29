"""What every example pipeline shares: the hand-off between stages, Spark sessions, the services.

A hand-off is where one stage leaves its output for the next:

* ``flightcache``: Arrow record batches into a flightcache server (format ``flightcache``);
* ``s3a``: Spark's own Parquet on ``s3a://`` paths, through Spark's S3 connector (pipelines/s3a.py),
  what Spark users on S3 run: the baseline the cache replaces;
* ``s3``: Parquet files in object storage, read and written through pyarrow's S3 filesystem
  (format ``arrow-parquet``, ``pipelines/arrow_parquet.py``), the baseline before S3A was set up here;
* ``local``: Spark's own Parquet on local disk;
* ``alluxio``: Spark's own Parquet on ``alluxio://`` paths, an Alluxio master and worker on this
  host (pipelines/alluxio.py).

Stages run in a process of their own (one Spark application per stage, as under a scheduler that
submits jobs, or all four in one, as on a running cluster) and learn where to hand off from the
environment (``Handoff.from_env``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import arrow_parquet
import s3a

HANDOFFS = ("flightcache", "s3a", "s3", "local", "alluxio")


@dataclass(frozen=True)
class Handoff:
    """Where stages hand data to each other."""

    mode: str
    cache_uri: str = ""  # grpc://host:port of the flightcache server
    s3_prefix: str = ""  # s3://bucket/prefix for the s3 hand-off (and the raw input)
    local_dir: str = ""  # a directory for the local hand-off
    persist: str = "none"  # persistence of flightcache hand-offs: none, sync or async
    alluxio_uri: str = ""  # alluxio://host:port for the alluxio hand-off

    def env(self) -> dict[str, str]:
        return {"PIPELINE_HANDOFF": json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> Handoff:
        return cls(**json.loads(os.environ["PIPELINE_HANDOFF"]))

    def write(self, df: Any, name: str) -> None:
        """Hand ``df`` off as ``name`` (replacing an earlier run's)."""
        if self.mode == "flightcache":
            (
                df.write.format(cache_format())
                .option("uri", self.cache_uri)
                .option("persist", self.persist)
                .mode("overwrite")
                .save(name)
            )
        elif self.mode == "s3a":
            df.write.mode("overwrite").parquet(self.s3a_path(name))
        elif self.mode == "alluxio":
            df.write.mode("overwrite").parquet(f"{self.alluxio_uri}/handoff/{name}")
        elif self.mode == "s3":
            df.write.format("arrow-parquet").mode("overwrite").save(f"{self.s3_prefix}/handoff/{name}")
        elif self.mode == "local":
            df.write.mode("overwrite").parquet(f"{self.local_dir}/{name}")
        else:
            raise ValueError(f"unknown hand-off {self.mode!r}: use one of {HANDOFFS}")

    def count(self, spark: Any, name: str) -> int:
        """Rows handed off as ``name``, from metadata (not by reading the data back)."""
        if self.mode == "flightcache":
            import flightcache

            with flightcache.connect(self.cache_uri) as fc:
                return int(fc.info(name)["rows"])
        if self.mode == "s3":
            import pyarrow.fs as pafs
            import pyarrow.parquet as pq

            from flightcache.server.storage import filesystem

            fs, root = filesystem(f"{self.s3_prefix}/handoff/{name}")
            files = [i.path for i in fs.get_file_info(pafs.FileSelector(root)) if i.base_name.endswith(".parquet")]
            return sum(pq.ParquetFile(fs.open_input_file(f)).metadata.num_rows for f in files)
        return int(self.read(spark, name).count())  # Spark's Parquet counts from footers

    def s3a_path(self, name: str) -> str:
        return s3a.to_s3a(f"{self.s3_prefix}/handoff/{name}")

    def read(self, spark: Any, name: str) -> Any:
        """The DataFrame an earlier stage handed off as ``name``."""
        if self.mode == "flightcache":
            return spark.read.format(cache_format()).option("uri", self.cache_uri).load(name)
        if self.mode == "s3a":
            return spark.read.parquet(self.s3a_path(name))
        if self.mode == "alluxio":
            return spark.read.parquet(f"{self.alluxio_uri}/handoff/{name}")
        if self.mode == "s3":
            return spark.read.format("arrow-parquet").load(f"{self.s3_prefix}/handoff/{name}")
        if self.mode == "local":
            return spark.read.parquet(f"{self.local_dir}/{name}")
        raise ValueError(f"unknown hand-off {self.mode!r}: use one of {HANDOFFS}")


def cache_format() -> str:
    """The JVM connector's format when its jar is built (spark_session adds it), else the Python data source's."""
    import flightcache.integrations.spark_jvm

    jvm = flightcache.integrations.spark_jvm
    return jvm.FORMAT if jvm.available() else "flightcache-python"


def spark_session(app: str, cores: int = 2) -> Any:
    """A local Spark application whose Python workers run this interpreter, with flightcache registered:
    format("flightcache") is the JVM connector when its jar is built, else the Python data source."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    import flightcache.integrations.spark
    import flightcache.integrations.spark_jvm

    builder = SparkSession.builder
    if flightcache.integrations.spark_jvm.available():
        builder = flightcache.integrations.spark_jvm.configure(builder)
    builder = (
        builder.master(f"local[{cores}]")
        .appName(app)
        .config("spark.ui.enabled", "false")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.shuffle.partitions", str(cores * 2))
        .config("spark.driver.memory", "2g")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config(
            "spark.python.daemon.module", os.environ.get("PIPELINE_DAEMON", "flightcache.integrations.spark_daemon")
        )
    )
    extra_jars = []
    if os.environ.get("ALLUXIO_MASTER"):  # the alluxio hand-off
        import alluxio

        builder = alluxio.configure(builder, os.environ["ALLUXIO_MASTER"])
        extra_jars.append(alluxio.client_jar())
    spark = s3a.configure(builder, extra_jars=extra_jars).getOrCreate()  # every stage reads its input with S3A
    spark.sparkContext.setLogLevel("ERROR")
    flightcache.integrations.spark.register(spark)
    arrow_parquet.register(spark)  # the pyarrow-S3 baseline of the s3 hand-off
    return spark


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


@contextmanager
def moto_s3(bucket: str) -> Iterator[dict[str, str]]:
    """A moto S3 server in its own process (in-process moto steals the GIL) with ``bucket`` created.

    Yields the AWS_* environment that points clients at it.
    """
    import boto3

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port)
        env = {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        }
        boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket=bucket)
        yield env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@dataclass(frozen=True)
class Server:
    uri: str
    pid: int


@contextmanager
def flightcache_server(*args: str, env: dict[str, str] | None = None) -> Iterator[Server]:
    """A ``flightcache serve`` process on a free port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flightcache.cli", "serve", "--port", "0", "--output", "json", *args],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while not lines or not lines[-1].startswith("}"):
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("flightcache serve exited before it was ready")
            lines.append(line)
        yield Server(json.loads("".join(lines))["uri"], proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        if proc.stdout is not None:
            proc.stdout.close()


def run_stage(script: Path, args: list[str], env: dict[str, str]) -> tuple[list[dict[str, Any]], float]:
    """Run stages in a process of their own, which prints their JSON summaries (a list) as its last line.

    Returns the summaries and the process's wall time.
    """
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env={**os.environ, **env}
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise RuntimeError(f"stage {' '.join(args)} failed with exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - started


def reset_dir(path: str | Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    Path(path).mkdir(parents=True, exist_ok=True)
