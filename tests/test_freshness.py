"""Freshness: loaded datasets follow their Parquet files and Iceberg tables (moto S3, real servers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import MotoS3, run_cli

import flightcache
from flightcache.errors import InvalidRequestError, StorageError
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer
from flightcache.server.storage import filesystem

pytestmark = pytest.mark.s3


def part(start: int, rows: int = 1000) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + rows), pa.int64()), "value": pa.array([start] * rows)})


def write(uri: str, table: pa.Table) -> None:
    fs, path = filesystem(uri)
    with fs.open_output_stream(path) as f:
        pq.write_table(table, f)


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.delete_file(path)


def ids(table: pa.Table) -> list[int]:
    return sorted(table.column("id").to_pylist())


def wait_for(what: str, predicate: Callable[[], Any], deadline_s: float = 60) -> Any:
    """Poll ``predicate`` until it is truthy (the state, not a sleep, orders the test)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def prefix(s3_bucket: str) -> str:
    return f"s3://{s3_bucket}/lake/events"


def test_on_read_serves_new_files_and_shares_old_batches(
    server: FlightcacheServer, client: flightcache.Client, prefix: str
) -> None:
    """on-read: a read after a new file landed serves its rows, as a new version sharing the old batches."""
    write(f"{prefix}/part-0.parquet", part(0))
    write(f"{prefix}/part-1.parquet", part(1000))
    client.load("events", prefix, refresh="on-read", refresh_min_interval=0)
    assert client.get("events").num_rows == 2000
    before = server.store.current("events")
    assert before is not None
    write(f"{prefix}/part-2.parquet", part(2000))
    table = client.get("events")
    assert ids(table) == list(range(3000))
    after = server.store.current("events")
    assert after is not None and after.number == before.number + 1
    assert all(a is b for a, b in zip(before.batches, after.batches, strict=False))  # shared, not copied
    info = client.info("events")
    assert info["source"]["last_refresh"] == "incremental" and info["source"]["files"] == 3
    assert not info["source"]["stale"] and info["source"]["error"] is None
    stats = client.stats()
    assert stats["refreshes_incremental"] == 1 and stats["refreshes_full"] == 0
    assert part(2000).nbytes <= stats["refresh_bytes"] < 2 * part(2000).nbytes  # the new file only


def test_on_read_checks_at_most_once_per_min_interval(
    server: FlightcacheServer, client: flightcache.Client, prefix: str
) -> None:
    """on-read with a long min interval: the reads after the first check do not list the source again."""
    write(f"{prefix}/part-0.parquet", part(0))
    client.load("events", prefix, refresh="on-read", refresh_min_interval=3600)
    client.get("events")  # the first read checks (the load's listing is not a check)
    checks = client.stats()["source_checks"]
    write(f"{prefix}/part-1.parquet", part(1000))
    for _ in range(5):
        assert client.get("events").num_rows == 1000  # within the interval: the version held
    assert client.stats()["source_checks"] == checks
    assert client.refresh("events")["refreshed"] == "incremental"  # an explicit refresh checks at once
    assert client.get("events").num_rows == 2000


def test_concurrent_on_read_readers_share_one_check(
    server: FlightcacheServer, client: flightcache.Client, prefix: str
) -> None:
    """Readers arriving together share one check: no more checks than reads, every read sees the new rows."""
    write(f"{prefix}/part-0.parquet", part(0))
    client.load("events", prefix, refresh="on-read", refresh_min_interval=3600)
    write(f"{prefix}/part-1.parquet", part(1000))
    server.cache.sources._tracked["events"].check_started = 0.0  # the interval has passed
    rows: list[int] = []
    threads = [threading.Thread(target=lambda: rows.append(client.get("events").num_rows)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rows == [2000] * 8
    assert client.stats()["source_checks"] == 1  # one listing for eight readers


def test_period_refresh_in_the_background(client: flightcache.Client, prefix: str) -> None:
    """A period policy: new files are appended by the server's checker, with no read or refresh call."""
    write(f"{prefix}/part-0.parquet", part(0))
    client.load("events", prefix, refresh=0.2)
    assert client.info("events")["source"]["refresh"] == "every 0.2s"
    write(f"{prefix}/part-1.parquet", part(1000))
    wait_for("the background refresh", lambda: client.info("events")["rows"] == 2000)
    assert client.info("events")["source"]["last_refresh"] == "incremental"
    assert ids(client.get("events")) == list(range(2000))


def test_changed_file_reloads(client: flightcache.Client, prefix: str) -> None:
    """A file rewritten in place (new ETag, same size) makes the refresh reload the dataset whole."""
    write(f"{prefix}/part-0.parquet", part(0))
    write(f"{prefix}/part-1.parquet", part(1000))
    client.load("events", prefix)
    assert client.info("events")["source"]["refresh"] == "manual"
    write(f"{prefix}/part-1.parquet", part(5000))  # same shape: only the ETag tells
    result = client.refresh("events")
    assert result["refreshed"] == "full"
    assert ids(client.get("events")) == [*range(1000), *range(5000, 6000)]
    assert client.refresh("events")["refreshed"] == "none"


def test_deleted_file_reloads(client: flightcache.Client, prefix: str) -> None:
    """A file removed from the prefix makes the refresh reload without its rows."""
    for i in range(3):
        write(f"{prefix}/part-{i}.parquet", part(i * 1000))
    client.load("events", prefix)
    delete(f"{prefix}/part-1.parquet")
    assert client.refresh("events")["refreshed"] == "full"
    assert ids(client.get("events")) == [*range(1000), *range(2000, 3000)]
    assert client.info("events")["source"]["files"] == 2


def test_new_hive_partition_is_appended(client: flightcache.Client, prefix: str) -> None:
    """A new hive partition directory is new files: appended, its partition column filled from the path."""
    write(f"{prefix}/day=1/part-0.parquet", part(0))
    write(f"{prefix}/day=2/part-0.parquet", part(1000))
    client.load("events", prefix)
    write(f"{prefix}/day=3/part-0.parquet", part(2000))
    write(f"{prefix}/_SUCCESS", pa.table({"x": [1]}))  # hidden files are not data, as pyarrow's discovery says
    assert client.refresh("events")["refreshed"] == "incremental"
    table = client.get("events")
    assert table.num_rows == 3000
    days = dict(zip(table.column("id").to_pylist(), table.column("day").to_pylist(), strict=True))
    assert days[0] == 1 and days[1500] == 2 and days[2999] == 3


def test_readers_of_the_old_version_finish_on_it(
    server: FlightcacheServer, client: flightcache.Client, prefix: str
) -> None:
    """A reader holding a ticket for version N reads N whole while the refresh publishes N+1; concurrent
    readers see either version entire, never a mix."""
    write(f"{prefix}/part-0.parquet", part(0, 50_000))
    client.load("events", prefix)
    info = client.flight_info("events")
    old = server.store.current("events")
    assert old is not None
    write(f"{prefix}/part-0.parquet", part(100_000, 60_000))  # changed: a full reload
    seen: list[list[int]] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            t = client.get("events", columns=["id"])
            seen.append([t.num_rows, min(t.column("id").to_pylist())])

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert client.refresh("events")["refreshed"] == "full"
        wait_for("reads of the new version", lambda: [60_000, 100_000] in seen)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert all(s in ([50_000, 0], [60_000, 100_000]) for s in seen)
    held = pa.concat_tables(client.flight.do_get(e.ticket).read_all() for e in info.endpoints)  # old ticket
    assert ids(held) == list(range(50_000))


def test_storage_down_keeps_the_version_and_reports_staleness(
    server: FlightcacheServer, client: flightcache.Client, prefix: str, moto_s3: MotoS3
) -> None:
    """S3 unreachable during a check: reads go on with the version held, info and metrics say stale, and
    the next check after S3 is back refreshes."""
    write(f"{prefix}/part-0.parquet", part(0))
    client.load("events", prefix, refresh="on-read", refresh_min_interval=0)
    moto_s3.stop()
    try:
        assert client.get("events").num_rows == 1000  # never failed by the check
        source = client.info("events")["source"]
        assert source["stale"] and source["error"]
        stats = client.stats()
        assert stats["source_check_failures"] >= 1 and stats["sources_stale"] == 1
        assert stats["source_staleness_s_max"] >= 0
        with pytest.raises(StorageError):
            client.refresh("events")  # an explicit refresh reports its failure
    finally:
        moto_s3.start()
    write(f"{prefix}/part-1.parquet", part(1000))
    assert client.get("events").num_rows == 2000
    source = client.info("events")["source"]
    assert not source["stale"] and source["error"] is None
    assert client.stats()["sources_stale"] == 0


def test_bad_policies_and_sources_are_refused(client: flightcache.Client, prefix: str) -> None:
    """An unknown policy, a policy on an append load, a refresh of a put dataset: clear errors, nothing lost."""
    write(f"{prefix}/part-0.parquet", part(0))
    with pytest.raises(InvalidRequestError, match="refresh policy"):
        client.load("events", prefix, refresh="hourly")
    with pytest.raises(InvalidRequestError, match="needs mode 'overwrite'"):
        client.load("events", prefix, mode="append", refresh="on-read")
    client.put("plain", part(0))
    with pytest.raises(InvalidRequestError, match="no source"):
        client.refresh("plain")
    with pytest.raises(InvalidRequestError, match="iceberg://CATALOG"):
        client.load("ice", "iceberg://nocatalog")
    client.load("events", prefix)
    client.put("events", part(7))  # a put replaces the loaded rows: the dataset no longer follows the source
    assert client.info("events")["source"] is None
    assert client.get("events").num_rows == 1000


def test_cli_load_refresh_ls_on_a_local_directory(uri: str, tmp_path: Path) -> None:
    """The CLI: load --refresh on-read, ls shows source and freshness, refresh appends (local files: mtimes)."""
    data = tmp_path / "lake"
    data.mkdir()
    pq.write_table(part(0), data / "a.parquet")
    done = run_cli("load", "--uri", uri, "events", str(data), "--refresh", "on-read", "--refresh-min-interval", "60")
    assert done.returncode == 0, done.stderr
    ls = run_cli("ls", "--uri", uri)
    assert str(data) in ls.stdout and "yes (on-read)" in ls.stdout
    pq.write_table(part(1000), data / "b.parquet")
    refreshed = run_cli("refresh", "--uri", uri, "events")
    assert refreshed.returncode == 0 and "1 new file(s) appended" in refreshed.stdout
    info = run_cli("info", "--uri", uri, "events")
    assert "2,000" in info.stdout and "refresh on-read" in info.stdout


def test_prometheus_exports_the_freshness_metrics(server: FlightcacheServer, prefix: str) -> None:
    """/metrics has checks, refreshes, bytes reloaded and staleness from the same figures as stats()."""
    from flightcache.server.prometheus import _Collector

    names = {m.name for m in _Collector(server).collect()}
    assert {
        "flightcache_source_checks",
        "flightcache_refreshes_incremental",
        "flightcache_refreshes_full",
        "flightcache_refresh_bytes",
        "flightcache_source_staleness_seconds",
        "flightcache_sources_stale",
    } <= names


# -- Iceberg: pyiceberg with a Glue catalog on moto and the moto S3 server as the warehouse ----------


@pytest.fixture
def iceberg_catalog(moto_s3: MotoS3, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A pyiceberg catalog named 'lake', configured the pyiceberg way (environment variables)."""
    pytest.importorskip("pyiceberg")
    from pyiceberg.catalog import load_catalog

    props = {
        "type": "glue",
        "glue.endpoint": moto_s3.endpoint,
        "glue.region": "us-east-1",
        "s3.endpoint": moto_s3.endpoint,
        "s3.region": "us-east-1",
        "s3.access-key-id": "testing",
        "s3.secret-access-key": "testing",
        "warehouse": f"s3://{s3_bucket}/warehouse",
    }
    for key, value in props.items():  # PYICEBERG_CATALOG__LAKE__S3__ACCESS_KEY_ID is s3.access-key-id
        env = key.upper().replace(".", "__").replace("-", "_")
        monkeypatch.setenv(f"PYICEBERG_CATALOG__LAKE__{env}", value)
    catalog = load_catalog("lake", **props)
    namespace = f"ns_{s3_bucket.replace('-', '_')}"
    catalog.create_namespace(namespace)
    return catalog, namespace


def test_iceberg_appends_twice_then_overwrite(client: flightcache.Client, iceberg_catalog: Any) -> None:
    """An Iceberg table: each append snapshot appends only its data files; an overwrite reloads."""
    catalog, namespace = iceberg_catalog
    table = catalog.create_table(f"{namespace}.events", schema=part(0).schema)
    table.append(part(0))
    source = f"iceberg://lake/{namespace}.events"
    client.load("events", source)
    assert ids(client.get("events")) == list(range(1000))
    assert client.refresh("events")["refreshed"] == "none"
    table.append(part(1000))
    table.append(part(2000))
    result = client.refresh("events")
    assert result["refreshed"] == "incremental" and result["files_added"] == 2
    assert result["bytes_read"] < 3 * part(0).nbytes  # the two new data files, not the table
    assert ids(client.get("events")) == list(range(3000))
    table.append(part(3000))
    assert client.refresh("events")["refreshed"] == "incremental"
    info = client.info("events")
    assert info["source"]["snapshot"] == catalog.load_table(f"{namespace}.events").current_snapshot().snapshot_id
    catalog.load_table(f"{namespace}.events").overwrite(part(9000, 10))
    assert client.refresh("events")["refreshed"] == "full"
    assert ids(client.get("events")) == list(range(9000, 9010))


# -- Spark ---------------------------------------------------------------------------------------------


@pytest.mark.spark
@pytest.mark.slow
def test_spark_sees_new_rows_after_a_new_load(spark: Any, uri: str, client: flightcache.Client, prefix: str) -> None:
    """Spark reading a refreshed dataset: a new load() of the DataFrame sees the appended rows."""
    write(f"{prefix}/part-0.parquet", part(0))
    client.load("events", prefix, refresh="on-read", refresh_min_interval=0)
    reader = spark.read.format("flightcache").option("uri", uri)  # type: ignore[attr-defined]
    assert reader.load("events").count() == 1000
    write(f"{prefix}/part-1.parquet", part(1000))
    df = reader.load("events")
    assert df.count() == 2000
    assert df.agg({"id": "max"}).collect()[0][0] == 1999


def test_on_read_refresh_of_an_evicted_dataset(tmp_path: Path) -> None:
    """An on-read dataset evicted to the storage tier: the read's check brings it back, appends the new file
    and persists the new version (the check's own read of the dataset does not wait for itself)."""
    data = tmp_path / "lake"
    data.mkdir()
    pq.write_table(part(0), data / "a.parquet")
    srv = build_server(ServerConfig(storage=str(tmp_path / "storage")))
    try:
        with flightcache.connect(f"grpc://127.0.0.1:{srv.port}") as client:
            client.load("events", str(data), persist="sync", refresh="on-read", refresh_min_interval=0)
            client.evict("events")
            assert client.info("events")["state"] == "in-storage-only"
            pq.write_table(part(1000), data / "b.parquet")
            assert ids(client.get("events")) == list(range(2000))
            info = client.info("events")
            assert info["source"]["last_refresh"] == "incremental" and info["state"] == "persisted"
    finally:
        srv.shutdown()
