"""Spark standalone beside a flightcache cluster: a master, and two workers bound to 127.0.0.2 and 127.0.0.3,
each beside a flightcache node on the same address. The JVM connector writes each task's part to the node of
its executor's host, and reads each part on the executor beside it: Spark's own REST API says where every
task ran and at which locality level.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import start_server_ready, stop_server, wait_until

import flightcache
from flightcache.integrations import spark_jvm
from flightcache.server.etcd import LocalEtcd

pytestmark = [pytest.mark.cluster, pytest.mark.spark, pytest.mark.slow]

HOSTS = ("127.0.0.2", "127.0.0.3")

# The driver: write a DataFrame of 4 partitions through the connector, read it back, and report from Spark's
# REST API (the driver's UI) each task's executor host and locality level, per stage.
DRIVER = """
import json, sys, urllib.request
from pyspark.sql import SparkSession
import flightcache.integrations.spark_jvm as jvm
master, uri, out = sys.argv[1], sys.argv[2], sys.argv[3]
spark = (jvm.configure(SparkSession.builder).master(master).appName("flightcache-locality")
         .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
         .config("spark.ui.port", "0").config("spark.executor.memory", "512m").config("spark.cores.max", "2")
         .config("spark.locality.wait", "10s").getOrCreate())
sc = spark.sparkContext
sc.setJobGroup("write", "write")
df = spark.range(0, 400_000, numPartitions=4).selectExpr("id", "id * 2 AS twice")
df.write.format("flightcache").option("uri", uri).mode("overwrite").save("spread")
sc.setJobGroup("read", "read")
total = spark.read.format("flightcache").option("uri", uri).load("spread").selectExpr("sum(twice)").first()[0]
base = sc.uiWebUrl + "/api/v1/applications/" + sc.applicationId
def get(path):
    return json.load(urllib.request.urlopen(base + path))
executors = {e["id"]: e["hostPort"].rsplit(":", 1)[0] for e in get("/allexecutors")}
jobs = {}
for job in get("/jobs"):
    for stage in sorted(job["stageIds"]):
        for attempt in get(f"/stages/{stage}"):
            if attempt["status"] == "SKIPPED":
                continue
            tasks = [{"host": t["host"], "locality": t["taskLocality"], "status": t["status"]}
                     for t in get(f"/stages/{stage}/{attempt['attemptId']}/taskList?length=1000")]
            jobs.setdefault(job.get("jobGroup", ""), []).append({"stage": stage, "tasks": tasks})
json.dump({"sum": total, "jobs": jobs, "executors": executors}, open(out, "w"))
spark.stop()
"""


def _spark_class() -> str:
    import pyspark

    return os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-class")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def standalone(tmp_path: Path) -> Iterator[str]:
    """A Spark standalone master on 127.0.0.1 and one worker (1 core) on each of HOSTS; the master URL."""
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    port = _free_port()
    logs = tmp_path / "spark-logs"
    logs.mkdir()
    procs = []
    master = f"spark://127.0.0.1:{port}"

    def start(name: str, *args: str, local_ip: str) -> None:
        with (logs / f"{name}.log").open("wb") as out:
            procs.append(
                subprocess.Popen(
                    [_spark_class(), *args],
                    env={**env, "SPARK_LOCAL_IP": local_ip, "SPARK_WORKER_DIR": str(tmp_path / name)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )

    start(
        "master",
        "org.apache.spark.deploy.master.Master",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--webui-port",
        "0",
        local_ip="127.0.0.1",
    )
    for i, host in enumerate(HOSTS):
        start(
            f"worker{i}",
            "org.apache.spark.deploy.worker.Worker",
            master,
            "--host",
            host,
            "--cores",
            "1",
            "--memory",
            "1g",
            "--webui-port",
            "0",
            local_ip=host,
        )
    try:
        wait_until(
            lambda: (
                sum(b"Successfully registered with master" in (logs / f"worker{i}.log").read_bytes() for i in range(2))
                == 2
            ),
            "both Spark workers to register with the master",
            timeout=120,
        )
        yield master
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_spark_standalone_writes_beside_and_reads_node_local(tmp_path: Path, standalone: str) -> None:
    """Each write task puts its part on the node of its own host; every read task runs NODE_LOCAL or better."""
    if not spark_jvm.available():
        pytest.fail("the JVM connector's jar is missing: run `make jar` (make test builds it)")
    etcd = LocalEtcd(str(tmp_path / "etcd")).start()
    nodes: list[tuple[subprocess.Popen[str], dict[str, Any]]] = []
    try:
        for host in HOSTS:
            nodes.append(
                start_server_ready("--host", host, "--cluster", etcd.url, "--lease-seconds", "2", "--storage", "none")
            )
        uri = nodes[0][1]["uri"]
        out = tmp_path / "driver.json"
        script = tmp_path / "driver.py"
        script.write_text(DRIVER)
        env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
        run = subprocess.run(
            [sys.executable, str(script), standalone, uri, str(out)],
            env=env,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert run.returncode == 0, run.stderr[-4000:]
        report = json.loads(out.read_text())
        assert report["sum"] == sum(2 * i for i in range(400_000))
        assert set(report["executors"].values()) - {"127.0.0.1"} == set(HOSTS), report["executors"]

        # Writes: as many parts on each node as write tasks ran on that node's host.
        write_tasks = [t for stage in report["jobs"]["write"] for t in stage["tasks"] if t["status"] == "SUCCESS"]
        tasks_per_host = {h: sum(t["host"] == h for t in write_tasks) for h in HOSTS}
        info = flightcache.connect(uri).info("spread")
        hosts_of_node = {n["id"]: n["host"] for n in flightcache.connect(uri).nodes()}
        parts_per_host = {h: sum(hosts_of_node[p["node"]] == h for p in info["parts"]) for h in HOSTS}
        assert info["rows"] == 400_000 and len(info["parts"]) == 4
        assert parts_per_host == tasks_per_host, (parts_per_host, tasks_per_host)
        assert all(n > 0 for n in parts_per_host.values()), "both nodes hold parts"

        # Reads: every task of the read job ran beside its data.
        scan = [t for t in min(report["jobs"]["read"], key=lambda s: s["stage"])["tasks"] if t["status"] == "SUCCESS"]
        assert len(scan) >= 4, scan  # one task per endpoint, at least one endpoint per part
        assert {t["locality"] for t in scan} <= {"PROCESS_LOCAL", "NODE_LOCAL"}, scan
    finally:
        for proc, _ in nodes:
            stop_server(proc)
        etcd.stop()
