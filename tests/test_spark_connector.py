"""The JVM Spark connector, format("flightcache"): reads, writes, pushdown, errors, TLS and Spark SQL.

A real server per test and one real local Spark session (conftest) with the connector's jar.
"""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import RecordingServer, every_type_table, logs_table
from test_security import READ_TOKEN, WRITE_TOKEN, self_signed

pytest.importorskip("pyspark")

from py4j.protocol import Py4JJavaError
from pyspark.errors import PySparkException
from pyspark.sql import DataFrame, SparkSession

import flightcache
import flightcache.integrations.spark as fs
import flightcache.integrations.spark_jvm as jvm
from flightcache.server.auth import Auth
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer

pytestmark = [
    pytest.mark.spark,
]


@pytest.fixture(autouse=True)
def _jar_built() -> None:
    """Never skipped: without the jar these tests fail, saying how to build it."""
    if not jvm.available():
        pytest.fail("the connector's jar is not built: run 'make jar' (make test builds it first)")

SparkError = (PySparkException, Py4JJavaError)


@pytest.fixture
def recording() -> Iterator[RecordingServer]:
    srv = build_server(ServerConfig(memory_limit=256 * 1024 * 1024), RecordingServer)
    yield srv
    srv.shutdown()


def _read(spark: SparkSession, uri: str, name: str, **options: str) -> DataFrame:
    return spark.read.format("flightcache").option("uri", uri).options(**options).load(name)


def _write(df: DataFrame, uri: str, name: str, mode: str = "overwrite", **options: str) -> None:
    df.write.format("flightcache").option("uri", uri).options(**options).mode(mode).save(name)


def _settled(server: FlightcacheServer, timeout: float = 15) -> dict[str, Any]:
    """Server stats once no staged data and no transaction is left (a cut stream is aborted async)."""
    deadline = time.monotonic() + timeout
    stats = server.stats()
    while (stats["memory_staged"] or stats["open_transactions"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        stats = server.stats()
    return stats


def _plan(df: DataFrame) -> str:
    return str(df._jdf.queryExecution().executedPlan().toString())


# -- packaging -----------------------------------------------------------------------------------------


def test_the_jvm_connector_owns_the_short_name(spark: SparkSession, uri: str, client: flightcache.Client) -> None:
    """format("flightcache") is the DataSource V2 from the jar; the Python source answers to its own name."""
    client.put("logs", logs_table(10))
    df = _read(spark, uri, "logs")
    assert "BatchScan flightcache:logs" in _plan(df)
    assert spark.read.format(fs.FORMAT).option("uri", uri).load("logs").count() == 10
    assert jvm.jar_path().name == "flightcache-spark.jar"


# -- reads ---------------------------------------------------------------------------------------------


# The Python source's type test (YEAR TO MONTH intervals have no pyarrow class: the server cannot hold them)
EVERY_SPARK_TYPE = """
    SELECT * FROM VALUES
      (true, 1Y, 2S, 3, 4L, 1.5F, 2.5D, 12345678901234567890.1234567890BD, 'ünïcode', X'00FF',
       DATE'2026-11-24', TIMESTAMP'2026-11-24 12:00:00+05:30', TIMESTAMP_NTZ'2026-11-24 12:00:00',
       TIME'12:34:56.123456', INTERVAL '1 02:03:04.5' DAY TO SECOND, array(1, NULL, 3),
       array(array('a'), array()), map('k', named_struct('x', 1, 'y', array(2.5D))),
       named_struct('a', 1, 'b', named_struct('c', 'd'))),
      (NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
       NULL)
    AS t(bool, byte, short, int, long, float, double, dec, str, bin, date, ts, ntz, time, interval, arr,
         nested_arr, map, struct)
"""
VARIANT = '{"a":[1,2]}'


# A task on the server's host reads the server's shared memory (shm true, the default) or streams (false).
READ_PATHS = pytest.mark.parametrize("shm", ["true", "false"])


@READ_PATHS
def test_every_spark_type_round_trips(spark: SparkSession, client: flightcache.Client, shm: str) -> None:
    """Every Spark type Arrow carries comes back as it went in, stored as the Python source stores it."""
    df = spark.sql(EVERY_SPARK_TYPE).selectExpr("*", f"if(int IS NULL, NULL, parse_json('{VARIANT}')) AS variant")
    spark.conf.set("spark.sql.session.timeZone", "America/Los_Angeles")  # timestamps are instants, stored in UTC
    try:
        _write(df, client.uri, "types")
    finally:
        spark.conf.set("spark.sql.session.timeZone", "UTC")
    back = _read(spark, client.uri, "types", shm=shm)
    assert back.schema == df.schema
    plain = [c for c in df.columns if c != "variant"]
    assert sorted(back.select(plain).collect(), key=str) == sorted(df.select(plain).collect(), key=str)
    assert back.selectExpr("to_json(variant) AS j").collect() == [(VARIANT,), (None,)]
    stored = client.get("types")
    assert stored.schema.equals(fs.arrow_schema(df.schema))  # what the Python data source writes
    # and the Python data source reads what the JVM connector wrote
    python = spark.read.format(fs.FORMAT).option("uri", client.uri).load("types")
    assert sorted(python.select(plain).collect(), key=str) == sorted(df.select(plain).collect(), key=str)


@READ_PATHS
def test_arrow_types_spark_lacks_read_as_the_python_source_reads_them(
    spark: SparkSession, client: flightcache.Client, shm: str
) -> None:
    """Unsigned, large, dictionary, fixed-size, zoned, ns/ms timestamps, time, duration, null: as the Python source."""
    table = every_type_table()
    client.put("arrow", table)
    with pytest.raises(SparkError, match=r"'decimal256'.*38 digits"):
        _read(spark, client.uri, "arrow", shm=shm)
    columns = ",".join(c for c in table.column_names if c != "decimal256")
    jvm_df = _read(spark, client.uri, "arrow", columns=columns, shm=shm)
    python_df = spark.read.format(fs.FORMAT).option("uri", client.uri).option("columns", columns).load("arrow")
    assert jvm_df.schema == python_df.schema
    assert jvm_df.collect() == python_df.collect()
    rows = jvm_df.collect()
    assert [r.uint64 for r in rows] == [0, 2**63, None, 1]
    assert [r.dictionary for r in rows] == ["red", "green", None, "red"]
    assert [r.list_of_dict for r in rows] == [["p", "q"], None, [], ["p"]]
    ns = jvm_df.selectExpr("unix_micros(ts_ns_utc) AS ns").collect()
    assert [r.ns for r in ns] == [0, None, 0, 0]  # nanoseconds truncated to Spark's microseconds


def test_a_task_on_the_servers_host_reads_its_shared_memory(
    spark: SparkSession, server: FlightcacheServer, uri: str
) -> None:
    """Unfiltered partitions are read from the server's shared memory (the server counts shm reads, streams
    none), pruned columns picked by the task; a filtered read streams, as the server applies the filter;
    shm=false streams everything. All give the same rows."""
    if server.cache.shm is None:
        pytest.fail("this machine has no usable /dev/shm: the shared-memory path cannot be tested")
    table = logs_table(300_000)
    with flightcache.connect(uri) as c:
        c.put("logs", pa.Table.from_batches(table.to_batches(max_chunksize=20_000)))
    before = server.stats()
    df = _read(spark, uri, "logs", partitions="4")
    assert df.count() == 300_000
    assert sorted(df.select("bytes", "status").collect()) == sorted(
        zip(table["bytes"].to_pylist(), table["status"].to_pylist(), strict=True)
    )
    mapped = server.stats()
    assert mapped["shm_reads"] - before["shm_reads"] >= 8  # two reads of 4+ partitions
    assert mapped["gets"] - before["gets"] == mapped["shm_reads"] - before["shm_reads"], "nothing was streamed"
    filtered = _read(spark, uri, "logs").where("status = 200").select("bytes")
    assert filtered.count() == table.filter(pc.field("status") == 200).num_rows
    streamed = server.stats()
    assert streamed["shm_reads"] == mapped["shm_reads"] and streamed["gets"] > mapped["gets"]
    assert _read(spark, uri, "logs", shm="false").count() == 300_000
    assert server.stats()["shm_reads"] == mapped["shm_reads"]


def test_pruning_and_pushdown_reach_the_server_and_show_in_the_plan(
    spark: SparkSession, recording: RecordingServer
) -> None:
    """Only the used columns and the exactly-translatable predicates reach the server; the rest stays with Spark."""
    uri = f"grpc://127.0.0.1:{recording.port}"
    table = logs_table(2000)
    with flightcache.connect(uri) as c:
        c.put("logs", table)
    df = _read(spark, uri, "logs").where("status >= 500 AND method = 'GET' AND latency_ms > 100").select("bytes")
    plan = _plan(df)
    # status and method are filtered by the server alone, so Spark does not even need them
    assert "columns=[bytes, latency_ms]" in plan
    assert "col('status') >= 500" in plan and "col('method') == 'GET'" in plan
    assert "latency_ms" not in plan.split("pushed=")[1].split("]")[0]  # float: Spark filters it
    got = sorted(r.bytes for r in df.collect())
    expected = sorted(
        b
        for s, m, lat, b in zip(
            table["status"].to_pylist(),
            table["method"].to_pylist(),
            table["latency_ms"].to_pylist(),
            table["bytes"].to_pylist(),
            strict=True,
        )
        if s >= 500 and m == "GET" and lat > 100
    )
    assert got == expected
    assert recording.tickets and all(t.filter and "col('status') >= 500" in t.filter for t in recording.tickets)
    assert all(t.columns == ["bytes", "latency_ms"] for t in recording.tickets)


@pytest.mark.parametrize(
    ("where", "pushed"),
    [
        ("status = 200", True),
        ("NOT (status = 200)", True),
        ("status <=> 404", True),
        ("NOT (status <=> 404)", True),
        ("status IN (404, 500)", True),
        ("NOT (status IN (404, 500))", False),  # NULL NOT IN (...) is NULL in SQL, true in Arrow
        ("status IS NULL OR method <> 'GET'", True),
        ("method LIKE 'G%'", False),
        ("latency_ms < 10", False),
        ("ts > TIMESTAMP'2026-11-24 00:10:00'", False),
    ],
)
def test_pushed_filters_keep_their_sql_meaning_with_nulls(
    spark: SparkSession, client: flightcache.Client, where: str, pushed: bool
) -> None:
    """Each predicate gives the rows Spark's own evaluation gives, NULLs included, pushed or not."""
    table = logs_table(300)
    status = [None if i % 7 == 0 else s for i, s in enumerate(table["status"].to_pylist())]
    table = table.set_column(1, "status", pa.array(status, pa.int32()))
    client.put("nulls", table)
    df = _read(spark, client.uri, "nulls").where(where)
    plan = _plan(df)
    assert (re.search(r"\bFilter\b", plan) is None) == pushed, plan  # Spark keeps a Filter for what the source left
    local = spark.createDataFrame(table.to_pandas()).where(where)
    assert sorted(df.collect(), key=str) == sorted(local.collect(), key=str)


def test_a_read_is_pinned_to_the_version_of_its_planning(spark: SparkSession, client: flightcache.Client) -> None:
    """Partitions planned before a new version is published still read the old one; a new query reads the new one."""
    client.put("pinned", pa.table({"x": pa.array([1, 2, 3], pa.int64())}))
    df = _read(spark, client.uri, "pinned")
    rdd = df._jdf.queryExecution().toRdd()  # plans the scan: get_flight_info now
    client.put("pinned", pa.table({"x": pa.array([7], pa.int64())}))
    assert rdd.count() == 3
    assert [r.x for r in _read(spark, client.uri, "pinned").collect()] == [7]


def test_a_read_stopped_early_releases_its_stream(spark: SparkSession) -> None:
    """LIMIT stops a partition's stream midway: the reader cancels it and frees its memory (the task would fail)."""
    srv = build_server(ServerConfig(batch_rows=1000))
    try:
        uri = f"grpc://127.0.0.1:{srv.port}"
        with flightcache.connect(uri) as c:
            c.put("many", logs_table(50_000))
        df = _read(spark, uri, "many", partitions="1")
        assert len(df.limit(3).collect()) == 3
        assert len(df.limit(1500).collect()) == 1500
        assert df.count() == 50_000
    finally:
        srv.shutdown()


def test_partitions_and_preferred_locations_follow_the_endpoints(spark: SparkSession) -> None:
    """One partition per endpoint, preferring its location's host (host only); no location: the uri's host."""
    srv = build_server(ServerConfig(batch_rows=1000), functools.partial(RecordingServer, endpoint_host="localhost"))
    try:
        uri = f"grpc://127.0.0.1:{srv.port}"
        with flightcache.connect(uri) as c:
            c.put("big", logs_table(20_000))
        df = _read(spark, uri, "big", partitions="4")
        scan = df._jdf.queryExecution().executedPlan().collectLeaves().head()
        rdd = scan.inputRDD()
        parts = rdd.partitions()
        with flightcache.connect(uri) as c:
            assert len(parts) == len(c.flight_info("big", endpoints=4).endpoints) > 1
        hosts = {rdd.preferredLocations(p).mkString(",") for p in parts}
        assert hosts == {"localhost"}
        assert df.count() == 20_000
        srv.endpoint_host = None
        df = _read(spark, uri, "big")
        scan = df._jdf.queryExecution().executedPlan().collectLeaves().head()
        rdd = scan.inputRDD()
        assert {rdd.preferredLocations(p).mkString(",") for p in rdd.partitions()} == {"127.0.0.1"}
    finally:
        srv.shutdown()


# -- writes --------------------------------------------------------------------------------------------


def test_overwrite_append_and_empty_publish_one_version_per_job(
    spark: SparkSession, client: flightcache.Client, server: FlightcacheServer
) -> None:
    """Each job publishes all its tasks' parts atomically as one version; append adds; an empty job keeps the schema."""
    df = spark.range(0, 1000, numPartitions=4).selectExpr("id", "cast(id % 10 as int) AS k", "uuid() AS u")
    _write(df, client.uri, "out", "overwrite")
    assert (client.info("out")["version"], client.info("out")["rows"]) == (1, 1000)
    assert server.stats()["puts"] == 4  # four tasks, four staged parts, one version
    _write(df, client.uri, "out", "append")
    assert (client.info("out")["version"], client.info("out")["rows"]) == (2, 2000)
    assert sorted(client.get("out")["id"].to_pylist()) == sorted(list(range(1000)) * 2)
    _write(df.where("false"), client.uri, "out", "overwrite")
    empty = client.get("out")
    assert client.info("out")["version"] == 3 and empty.num_rows == 0
    assert empty.schema.equals(fs.arrow_schema(df.schema))
    stats = _settled(server)
    assert stats["open_transactions"] == 0 and stats["memory_staged"] == 0


def test_options_persist_ttl_and_if_exists(spark: SparkSession, client: flightcache.Client, tmp_path: Path) -> None:
    """if_exists=error refuses an existing dataset, ignore keeps it, both create a new one; ttl reaches the server."""
    df = spark.range(5)
    _write(df, client.uri, "fresh", if_exists="error")
    assert client.info("fresh")["rows"] == 5
    with pytest.raises(SparkError, match=r"dataset 'fresh' already exists on the flightcache server at grpc://"):
        _write(df, client.uri, "fresh", if_exists="error")
    _write(spark.range(50), client.uri, "fresh", if_exists="ignore")
    assert client.info("fresh")["rows"] == 5 and client.info("fresh")["version"] == 1
    _write(df, client.uri, "brief", ttl="0.5")
    deadline = time.monotonic() + 15
    while "brief" in {d["name"] for d in client.list()} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "brief" not in {d["name"] for d in client.list()}  # memory-only and expired: dropped
    with pytest.raises(SparkError, match="option persist='often' for dataset 'x'"):
        _write(df, client.uri, "x", persist="often")


def test_a_task_failing_midway_leaves_the_previous_version(
    spark: SparkSession, client: flightcache.Client, server: FlightcacheServer
) -> None:
    """A task that fails after streaming part of its rows: nothing is published and nothing stays staged."""
    client.put("victim", pa.table({"id": pa.array([-1, -2], pa.int64())}))
    before = server.stats()
    # partition 2 streams a first batch of 131,072 rows, then fails at row 200,000 of its 300,000
    df = spark.range(0, 900_000, numPartitions=3).selectExpr(
        "CASE WHEN id = 800000 THEN raise_error('task failed midway') ELSE id END AS id"
    )
    with pytest.raises(SparkError, match="task failed midway"):
        _write(df, client.uri, "victim", "overwrite")
    deadline = time.monotonic() + 30
    while server.stats()["bytes_received"] == before["bytes_received"] and time.monotonic() < deadline:
        time.sleep(0.1)
    stats = _settled(server)
    assert stats["open_transactions"] == 0 and stats["memory_staged"] == 0
    assert client.info("victim")["version"] == 1
    assert client.get("victim")["id"].to_pylist() == [-1, -2]


# A driver of its own in local-cluster mode (the session fixture is local[2]: one JVM, and no task retries):
# a standalone master and two workers inside the driver's JVM, each with one executor JVM of its own.
# Every 65,536th row sleeps 300 ms, so each task streams for seconds and the kill lands mid-stream.
CLUSTER_WRITER = """
import sys
from pyspark.sql import SparkSession
import flightcache.integrations.spark_jvm as jvm
uri, name, rows, parts = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spark = (jvm.configure(SparkSession.builder).master("local-cluster[2,1,1024]")
         .config("spark.task.maxFailures", "4").config("spark.ui.enabled", "false").getOrCreate())
df = spark.range(0, rows, numPartitions=parts).selectExpr(
    "id", "sha2(cast(id AS string), 256) AS h",
    "CASE WHEN id % 65536 = 0 THEN reflect('java.lang.Thread', 'sleep', 300L) END AS pause")
df.write.format("flightcache").option("uri", uri).mode("overwrite").save(name)
spark.stop()
print("written")
"""


def _executor_pids(root: int) -> list[int]:
    """The executor JVMs (CoarseGrainedExecutorBackend) among the descendants of process `root`."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue  # not a process
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    descendants, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - descendants
        descendants |= frontier
    found = []
    for pid in descendants:
        try:
            if b"CoarseGrainedExecutorBackend" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return sorted(found)


@pytest.mark.slow
def test_a_killed_executor_is_retried_and_publishes_each_row_once(
    client: flightcache.Client, server: FlightcacheServer, tmp_path: Path
) -> None:
    """An executor JVM killed (SIGKILL) mid-write: its task reruns elsewhere and the job publishes one version with
    every row exactly once (the cut part is not in it); the old version reads until then; nothing stays staged."""
    client.put("victim", pa.table({"id": pa.array([-1, -2], pa.int64())}))
    rows, parts = 1_200_000, 4
    log = tmp_path / "driver.log"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYSPARK_DRIVER_PYTHON": sys.executable}
    with log.open("wb") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", CLUSTER_WRITER, client.uri, "victim", str(rows), str(parts)],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )
    try:
        deadline = time.monotonic() + 180
        while server.stats()["memory_staged"] == 0 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.stats()["memory_staged"] > 0, f"no task streamed: {log.read_text()[-3000:]}"
        executors = _executor_pids(driver.pid)
        assert len(executors) == 2, f"expected two executor JVMs, found {executors}"
        os.kill(executors[0], signal.SIGKILL)
        # mid-write: the job has not committed, readers still get the previous version
        assert client.info("victim")["version"] == 1
        assert client.get("victim")["id"].to_pylist() == [-1, -2]
        assert driver.poll() is None
        assert driver.wait(timeout=240) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    assert "written" in log.read_text()
    assert client.info("victim")["version"] == 2
    ids = client.get("victim")["id"].to_pylist()
    assert len(ids) == rows and sorted(ids) == list(range(rows))
    stats = _settled(server)
    # the killed task's cut stream was aborted; the put of v1 and the four parts' retried or first attempts stand
    assert stats["puts_aborted"] >= 1 and stats["puts"] == 1 + parts
    assert stats["open_transactions"] == 0 and stats["memory_staged"] == 0


# -- errors --------------------------------------------------------------------------------------------


def test_errors_name_the_dataset_and_the_server(spark: SparkSession, client: flightcache.Client) -> None:
    """Unknown dataset, unreachable server, unknown option, schema mismatch on append: each says what and where."""
    uri = client.uri
    with pytest.raises(SparkError) as missing:
        _read(spark, uri, "missing/one")
    assert "dataset 'missing/one' not found" in str(missing.value) and uri in str(missing.value)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"grpc://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(SparkError) as unreachable:
        _read(spark, closed, "logs/raw")
    message = str(unreachable.value)
    assert "cannot reach the flightcache server at " + closed in message and "'logs/raw'" in message
    assert "flightcache serve" in message

    with pytest.raises(SparkError, match=r"unknown option\(s\) \['colums'\]"):
        _read(spark, uri, "logs/raw", colums="a")

    _write(spark.range(3), uri, "typed")
    with pytest.raises(SparkError) as mismatch:
        _write(spark.range(3).selectExpr("cast(id AS string) AS id"), uri, "typed", "append")
    assert "SCHEMA_MISMATCH" in str(mismatch.value) or "schema" in str(mismatch.value).lower()
    assert "dataset 'typed'" in str(mismatch.value) and uri in str(mismatch.value)
    assert client.info("typed")["version"] == 1


def test_tokens(spark: SparkSession, tmp_path: Path) -> None:
    """The token option reaches planning and every task; a read token cannot write; a bad or missing one is refused."""
    server = build_server(
        ServerConfig(memory_limit=64 * 1024 * 1024, credentials=Auth({WRITE_TOKEN: "write", READ_TOKEN: "read"}))
    )
    uri = f"grpc://127.0.0.1:{server.port}"
    try:
        with flightcache.connect(uri, token=WRITE_TOKEN) as c:
            c.put("t/a", logs_table(100))
        df = _read(spark, uri, "t/a", token=READ_TOKEN)
        assert df.count() == 100
        _write(df, uri, "t/copy", token=WRITE_TOKEN)
        assert server.store.info("t/copy").num_rows == 100
        with pytest.raises(SparkError, match="needs the write role"):
            _write(df, uri, "t/x", "append", token=READ_TOKEN)
        with pytest.raises(SparkError) as bad:
            _read(spark, uri, "t/a", token="not-a-valid-token-at-all")
        assert "'t/a'" in str(bad.value) and uri in str(bad.value) and "UNAUTHENTICATED" in str(bad.value)
        with pytest.raises(SparkError, match=r"requires authentication|UNAUTHENTICATED"):
            _read(spark, uri, "t/a")
        assert "t/x" not in {i.name for i in server.store.list()}
    finally:
        server.shutdown()


def test_tls(spark: SparkSession, tmp_path: Path) -> None:
    """grpc+tls: reads and writes with the CA as a file or as PEM text; without it the error says TLS and the fix."""
    cert, key = self_signed(tmp_path)
    server = build_server(
        ServerConfig(memory_limit=64 * 1024 * 1024, tls_cert=cert.read_bytes(), tls_key=key.read_bytes())
    )
    uri = f"grpc+tls://127.0.0.1:{server.port}"
    try:
        _write(spark.range(10), uri, "t/tls", tls_ca=str(cert))
        assert _read(spark, uri, "t/tls", tls_ca=cert.read_text()).count() == 10
        with pytest.raises(SparkError) as untrusted:
            _read(spark, uri, "t/tls")
        assert "TLS" in str(untrusted.value) and "tls_ca" in str(untrusted.value)
    finally:
        server.shutdown()


# -- Spark SQL -----------------------------------------------------------------------------------------


def test_spark_sql_create_table_select_insert(spark: SparkSession, client: flightcache.Client) -> None:
    """CREATE TABLE ... USING flightcache, then SELECT, INSERT INTO (a new version) and INSERT OVERWRITE."""
    client.put("logs/clean", logs_table(100))
    spark.sql("DROP TABLE IF EXISTS fc_logs")
    spark.sql(f"CREATE TABLE fc_logs USING flightcache OPTIONS (uri '{client.uri}', dataset 'logs/clean')")
    try:
        assert spark.sql("SELECT count(*) AS n FROM fc_logs WHERE status >= 200").collect()[0].n == 100
        spark.sql("INSERT INTO fc_logs SELECT * FROM fc_logs WHERE status = 500")
        info = client.info("logs/clean")
        assert info["version"] == 2 and info["rows"] > 100
        spark.sql("INSERT OVERWRITE fc_logs SELECT * FROM fc_logs WHERE status = 404")
        assert set(client.get("logs/clean")["status"].to_pylist()) == {404}
        assert client.info("logs/clean")["version"] == 3
    finally:
        spark.sql("DROP TABLE IF EXISTS fc_logs")
    assert client.info("logs/clean")["rows"] > 0  # dropping the catalog entry leaves the dataset
