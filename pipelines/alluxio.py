"""Alluxio 2.9 for the pipelines: a master and a worker on this host, under-storage on S3, ``alluxio://`` paths.

The jars come from Maven Central (``make alluxio-jars``, connectors/alluxio/pom.xml): the servers run
from connectors/alluxio/target/server, Spark loads the shaded client from connectors/alluxio/target/client.
The worker keeps blocks in memory (a directory in /dev/shm); the under-storage is an S3 bucket reached
through the endpoint given (the shaped moto S3 in the benchmark). Spark writes with the write type
given (``MUST_CACHE``: memory only, the peer of a flightcache server without persistence).

    with alluxio_cluster("s3://pipeline-data/alluxio", env) as master:   # "localhost:PORT"
        ...  # a stage with ALLUXIO_MASTER=master reads and writes alluxio://localhost:PORT/...
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from common import _wait_for_port, free_port

TARGET = Path(__file__).resolve().parent.parent / "connectors" / "alluxio" / "target"
# Alluxio 2.9 predates Java 17's strong encapsulation: its netty and its memory accounting reflect
# into the JDK's internals.
JAVA_OPENS = [
    f"--add-opens=java.base/{pkg}=ALL-UNNAMED"
    for pkg in ("java.lang", "java.lang.reflect", "java.nio", "java.util", "sun.nio.ch", "jdk.internal.misc")
] + ["-Dio.netty.tryReflectionSetAccessible=true"]


def client_jar() -> Path:
    """The shaded Alluxio client, or an error that says how to fetch it."""
    found = sorted((TARGET / "client").glob("alluxio-shaded-client-*.jar"))
    if not found or not any((TARGET / "server").glob("alluxio-core-server-master-*.jar")):
        raise RuntimeError(f"Alluxio is not in {TARGET}: fetch it with `make alluxio-jars` (Maven)")
    return found[0]


@contextmanager
def alluxio_cluster(ufs: str, env: dict[str, str], memory: str = "2GB") -> Iterator[str]:
    """A formatted Alluxio master and one worker whose root is mounted on ``ufs`` (``s3://bucket/prefix``),
    through the S3 endpoint and credentials of ``env``. Yields the master's ``host:port``."""
    client_jar()
    work = Path(tempfile.mkdtemp(prefix="alluxio-"))
    shm = Path(tempfile.mkdtemp(prefix="alluxio-worker-", dir="/dev/shm"))
    master_port, master_web, worker_port, worker_web = (free_port() for _ in range(4))
    props: dict[str, Any] = {
        "alluxio.home": work,
        "alluxio.conf.dir": work,
        "alluxio.logs.dir": work / "logs",
        "alluxio.master.hostname": "localhost",
        "alluxio.master.rpc.port": master_port,
        "alluxio.master.web.port": master_web,
        # the UFS journal on local disk: one master, no Raft quorum to start
        "alluxio.master.journal.type": "UFS",
        "alluxio.master.journal.folder": work / "journal",
        "alluxio.master.mount.table.root.ufs": ufs.replace("s3://", "s3a://", 1),
        "s3a.accessKeyId": env.get("AWS_ACCESS_KEY_ID", ""),
        "s3a.secretKey": env.get("AWS_SECRET_ACCESS_KEY", ""),
        "alluxio.underfs.s3.endpoint": env.get("AWS_ENDPOINT_URL", ""),
        "alluxio.underfs.s3.endpoint.region": env.get("AWS_REGION", "us-east-1"),
        "alluxio.underfs.s3.disable.dns.buckets": "true",  # path-style, as moto needs
        "alluxio.underfs.s3.inherit.acl": "false",
        "alluxio.security.authorization.permission.enabled": "false",
        "alluxio.worker.hostname": "localhost",
        "alluxio.worker.rpc.port": worker_port,
        "alluxio.worker.web.port": worker_web,
        "alluxio.worker.ramdisk.size": memory,
        "alluxio.worker.tieredstore.levels": "1",
        "alluxio.worker.tieredstore.level0.alias": "MEM",
        "alluxio.worker.tieredstore.level0.dirs.path": shm,
        "alluxio.worker.tieredstore.level0.dirs.mediumtype": "MEM",
        "alluxio.worker.tieredstore.level0.dirs.quota": memory,
    }
    java = [
        "java",
        "-Xmx1g",
        *JAVA_OPENS,
        *(f"-D{k}={v}" for k, v in props.items()),
        "-cp",
        str(TARGET / "server" / "*"),
    ]
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        stack.callback(shutil.rmtree, shm, ignore_errors=True)
        out = subprocess.run([*java, "alluxio.cli.Format", "master"], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"formatting the Alluxio master failed: {out.stdout[-2000:]}{out.stderr[-2000:]}")
        for main, port in (
            ("alluxio.master.AlluxioMaster", master_port),
            ("alluxio.worker.AlluxioWorker", worker_port),
        ):
            log = stack.enter_context(open(work / f"{main.rsplit('.', 1)[1]}.out", "w"))
            proc = subprocess.Popen([*java, main], stdout=log, stderr=subprocess.STDOUT)
            stack.callback(proc.wait, timeout=60)
            stack.callback(proc.terminate)
            try:
                _wait_for_port(port, timeout=180)
            except RuntimeError as e:
                raise RuntimeError(f"{main} did not start: {Path(log.name).read_text()[-2000:]}") from e
        _wait_for_worker(java, f"localhost:{master_port}")
        yield f"localhost:{master_port}"


def _wait_for_worker(java: list[str], master: str, timeout: float = 180) -> None:
    """Until the worker has registered with the master (its port opens before it has)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            [*java, "alluxio.cli.fsadmin.FileSystemAdminShell", "report", "capacity"], capture_output=True, text=True
        )
        if out.returncode == 0 and "localhost" in out.stdout.split("Worker Name", 1)[-1]:
            return
        time.sleep(2)
    raise RuntimeError(f"no Alluxio worker registered with {master} after {timeout}s")


def configure(builder: Any, master: str, write_type: str = "MUST_CACHE") -> Any:
    """``builder`` (a SparkSession builder, before the JVM starts) talking to ``master`` and writing with
    ``write_type``; the client jar (``client_jar()``) goes on the classpath with S3A's."""
    host, _, port = master.partition(":")
    return (
        builder.config("spark.hadoop.fs.alluxio.impl", "alluxio.hadoop.FileSystem")
        .config("spark.hadoop.alluxio.master.hostname", host)
        .config("spark.hadoop.alluxio.master.rpc.port", port)
        .config("spark.hadoop.alluxio.user.file.writetype.default", write_type)
    )
