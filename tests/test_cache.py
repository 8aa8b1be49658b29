"""The two tiers through a real server: read-through, persistence modes, capacity, TTL, recovery."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import (
    READ_PATHS,
    MotoS3,
    check_read_path,
    logs_table,
    read_path_client,
    run_cli,
    start_server,
    stop_server,
    wait_until,
)

import flightcache
from flightcache.errors import InvalidRequestError, MemoryFullError, StorageError
from flightcache.server.arrays import buffer_sizes
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer


def _serve(
    storage_uri: str | None,
    memory_limit: int | None = None,
    persist: str = "none",
    read_path: str | None = None,
    **store_kwargs: object,
) -> tuple[FlightcacheServer, flightcache.Client]:
    """A server on ``storage_uri`` and a client that reads through ``read_path`` (None: the host's default)."""
    config = ServerConfig(
        memory_limit=memory_limit,
        storage=storage_uri,
        storage_retries=2,
        storage_backoff=0.01,
        persist=persist,
        shm="on" if read_path == "shm" else "auto",  # "on" fails loudly where there is no shared memory
        **store_kwargs,  # type: ignore[arg-type]
    )
    srv = build_server(config)
    return srv, read_path_client(f"grpc://127.0.0.1:{srv.port}", srv, read_path)


@pytest.fixture
def tiered(storage_uri: str, request: pytest.FixtureRequest) -> Iterator[tuple[FlightcacheServer, flightcache.Client]]:
    """A server with storage; parametrized with ``READ_PATHS`` (indirect), its client reads through that path."""
    read_path = getattr(request, "param", None)
    srv, client = _serve(storage_uri, read_path=read_path)
    yield srv, client
    check_read_path(srv, read_path)
    srv.shutdown()


both_read_paths = pytest.mark.parametrize("tiered", READ_PATHS, indirect=True)


def _wait(predicate: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def table_of(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"i": np.arange(rows), "x": rng.random(rows)})


# -- persistence modes -------------------------------------------------------------------------------


def test_persist_none_writes_nothing(tiered: tuple[FlightcacheServer, flightcache.Client]) -> None:
    srv, client = tiered
    client.put("a", logs_table(100), persist="none")
    assert client.info("a")["state"] == "memory-only"
    assert srv.cache.storage.manifest("a") is None  # type: ignore[union-attr]


def test_persist_sync_commits_before_returning(tiered: tuple[FlightcacheServer, flightcache.Client]) -> None:
    """Write-through: once put returns, the manifest is in storage and info says persisted."""
    srv, client = tiered
    table = logs_table(500)
    result = client.put("a", table, persist="sync")
    manifest = srv.cache.storage.manifest("a")  # type: ignore[union-attr]
    assert manifest is not None and manifest.version == result["version"] and manifest.rows == 500
    info = client.info("a")
    assert info["state"] == "persisted" and info["persisted_version"] == result["version"]
    assert info["counters"]["bytes_persisted"] == result["bytes"]


def test_persist_async_then_wait(tiered: tuple[FlightcacheServer, flightcache.Client]) -> None:
    """Write-back: put returns at once; persist(wait=True) returns once committed."""
    srv, client = tiered
    client.put("a", logs_table(2000), persist="async")
    info = client.persist("a", wait=True)
    assert info["state"] == "persisted"
    assert srv.cache.storage.manifest("a").rows == 2000  # type: ignore[union-attr]


def test_append_in_sync_mode_persists_all_rows(tiered: tuple[FlightcacheServer, flightcache.Client]) -> None:
    srv, client = tiered
    client.put("a", logs_table(100), persist="sync")
    client.put("a", logs_table(50, seed=1), mode="append", persist="sync")
    m = srv.cache.storage.manifest("a")  # type: ignore[union-attr]
    assert m.rows == 150 and m.version == 2  # type: ignore[union-attr]


def test_persist_needs_storage() -> None:
    srv, client = _serve(None)
    try:
        with pytest.raises(InvalidRequestError, match="--storage"):
            client.put("a", logs_table(10), persist="sync")
        assert client.list() == []
    finally:
        srv.shutdown()


# -- read-through ---------------------------------------------------------------------------------------


@both_read_paths
def test_read_through_after_evict(tiered: tuple[FlightcacheServer, flightcache.Client]) -> None:
    """An evicted dataset stays listed (in-storage-only) and loads transparently on the next get."""
    _, client = tiered
    table = logs_table(3000)
    client.put("a", table, persist="sync")
    assert client.evict("a")["state"] == "in-storage-only"
    assert client.stats()["memory_used"] == 0
    assert [d["state"] for d in client.list()] == ["in-storage-only"]
    assert client.get("a").equals(table)
    info = client.info("a")
    assert info["state"] == "persisted" and info["counters"]["misses"] == 1
    assert info["counters"]["bytes_loaded"] == info["bytes"]
    client.get("a")
    assert client.info("a")["counters"]["hits"] >= 1


@both_read_paths
def test_concurrent_readers_of_a_missing_dataset_load_it_once(
    tiered: tuple[FlightcacheServer, flightcache.Client],
) -> None:
    """Eight readers of an evicted dataset at once: one load from storage, eight misses, eight whole tables."""
    srv, client = tiered
    table = table_of(200_000)
    client.put("a", table, persist="sync")
    client.evict("a")
    calls = {"n": 0}
    real = srv.cache.storage.read_version  # type: ignore[union-attr]

    def counting(manifest, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        wait_until(lambda: srv.ops.in_flight >= 8, "all eight readers to be in a call")  # they overlap
        return real(manifest, **kw)

    srv.cache.storage.read_version = counting  # type: ignore[union-attr,method-assign]
    results: list[bool] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(flightcache.connect(client.uri, shm=client.shm).get("a").equals(table))
        )
        for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8
    assert calls["n"] == 1
    assert client.info("a")["counters"]["misses"] == 8


def test_append_to_in_storage_only_dataset_loads_it_first(
    tiered: tuple[FlightcacheServer, flightcache.Client],
) -> None:
    _, client = tiered
    client.put("a", logs_table(100), persist="sync")
    client.evict("a")
    client.put("a", logs_table(10, seed=2), mode="append")
    assert client.info("a")["rows"] == 110


def test_drop_removes_storage_too(tiered: tuple[FlightcacheServer, flightcache.Client]) -> None:
    srv, client = tiered
    client.put("a", logs_table(10), persist="sync")
    client.drop("a")
    assert srv.cache.storage.manifest("a") is None  # type: ignore[union-attr]
    assert client.list() == []


@pytest.mark.parametrize("read_path", READ_PATHS)
def test_load_external_parquet_with_progress(storage_uri: str, tmp_path: Path, read_path: str) -> None:
    """client.load reads an external Parquet directory on the server, reporting progress."""
    import pyarrow.parquet as pq

    srv, client = _serve(storage_uri, read_path=read_path)
    try:
        storage = srv.cache.storage
        assert storage is not None
        storage.fs.create_dir(f"{storage.root}/raw", recursive=True)
        table = logs_table(4000)
        for i in range(4):
            pq.write_table(table.slice(i * 1000, 1000), f"{storage.root}/raw/p{i}.parquet", filesystem=storage.fs)
        seen: list[tuple[int, int]] = []
        result = client.load("logs/raw", storage_uri.rstrip("/") + "/raw", progress=lambda d, t: seen.append((d, t)))
        assert result["rows"] == 4000
        assert sorted(seen) == [(1, 4), (2, 4), (3, 4), (4, 4)]
        assert client.get("logs/raw").sort_by("ts").equals(table.sort_by("ts"))
        with pytest.raises(StorageError, match="no Parquet files"):
            client.load("x", storage_uri.rstrip("/") + "/empty")
        check_read_path(srv, read_path)
    finally:
        srv.shutdown()


# -- capacity -------------------------------------------------------------------------------------------


def test_eviction_is_lru_respects_pins_and_spills(tmp_path: Path) -> None:
    """Under a small limit: pinned never leaves, LRU goes first, unpersisted data is spilled, never lost."""
    one = sum(buffer_sizes(table_of(50_000).to_batches()).values())
    srv, client = _serve(str(tmp_path / "s"), memory_limit=int(one * 3.5), batch_rows=8192)
    peak = {"bytes": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            s = srv.store.stats()
            peak["bytes"] = max(peak["bytes"], s["memory_used"] + s["memory_staged"])
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        client.put("pinned", table_of(50_000, 1), persist="sync")
        client.pin("pinned")
        client.put("old", table_of(50_000, 2), persist="sync")
        client.put("unpersisted", table_of(50_000, 3))  # memory-only
        client.get("old")  # now "unpersisted" is the least recently used
        client.put("new1", table_of(50_000, 4))
        states = {d["name"]: d["state"] for d in client.list()}
        assert states["pinned"] == "persisted"
        assert states["unpersisted"] == "in-storage-only"  # spilled, then evicted
        assert states["old"] == "persisted"
        client.put("new2", table_of(50_000, 5))
        states = {d["name"]: d["state"] for d in client.list()}
        assert states["old"] == "in-storage-only" and states["pinned"] == "persisted"
        assert client.get("unpersisted").equals(table_of(50_000, 3))  # nothing lost
        assert client.info("pinned")["counters"]["evictions"] == 0
    finally:
        stop.set()
        sampler.join()
        srv.shutdown()
    assert peak["bytes"] <= int(one * 3.5)


def test_memory_full_when_nothing_can_be_freed() -> None:
    """Without storage nothing unpersisted may be dropped: the put is refused, naming the holders."""
    one = sum(buffer_sizes(table_of(50_000).to_batches()).values())
    srv, client = _serve(None, memory_limit=int(one * 1.5))
    try:
        client.put("a", table_of(50_000))
        with pytest.raises(MemoryFullError, match=r"limit.*a \(.*memory-only"):
            client.put("b", table_of(50_000, 1))
        assert client.get("a").equals(table_of(50_000))
    finally:
        srv.shutdown()


def test_trim_returns_memory_once_enough_was_freed() -> None:
    """Trimming waits until the threshold's worth was put (receive buffers) or freed (drops), then resets."""
    srv, client = _serve(None, retain_seconds=0)
    try:
        client.put("a", table_of(50_000))
        assert not srv.cache.trim(threshold=1 << 40)  # nothing near a TiB freed yet
        assert srv.cache.trim(threshold=1)  # the put's receive buffers
        assert not srv.cache.trim(threshold=1)  # nothing freed since
        client.drop("a")
        assert srv.cache.trim(threshold=1)
    finally:
        srv.shutdown()


def test_pinned_datasets_are_never_evicted(tmp_path: Path) -> None:
    one = sum(buffer_sizes(table_of(50_000).to_batches()).values())
    srv, client = _serve(str(tmp_path / "s"), memory_limit=int(one * 1.5))
    try:
        client.put("a", table_of(50_000), persist="sync")
        client.pin("a")
        with pytest.raises(MemoryFullError, match="pinned"):
            client.put("b", table_of(50_000, 1))
        with pytest.raises(InvalidRequestError, match="pinned"):
            client.evict("a")
        client.unpin("a")
        client.put("b", table_of(50_000, 1))
        assert client.info("a")["state"] == "in-storage-only"
    finally:
        srv.shutdown()


def test_ttl_evicts_persisted_and_drops_memory_only(tmp_path: Path) -> None:
    srv, client = _serve(str(tmp_path / "s"))
    try:
        client.put("kept", logs_table(10), persist="sync", ttl=0.2)
        client.put("scratch", logs_table(10), ttl=0.2)
        client.put("stays", logs_table(10))
        _wait(lambda: {d["name"]: d["state"] for d in client.list()}.get("kept") == "in-storage-only")
        _wait(lambda: "scratch" not in {d["name"] for d in client.list()})
        assert client.info("stays")["state"] == "memory-only"
        assert client.get("kept").num_rows == 10
    finally:
        srv.shutdown()


# -- recovery -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("read_path", READ_PATHS)
def test_restart_after_clean_stop_recovers_catalog_and_flushes_async(storage_uri: str, read_path: str) -> None:
    """A clean shutdown flushes pending write-backs; a new server lists them and loads on first read."""
    srv, client = _serve(storage_uri)
    table = logs_table(5000)
    client.put("sync", table, persist="sync")
    client.put("async", table, persist="async")
    client.put("memory", table)
    srv.shutdown()
    srv2, client2 = _serve(storage_uri, read_path=read_path)
    try:
        states = {d["name"]: d["state"] for d in client2.list()}
        assert states == {"sync": "in-storage-only", "async": "in-storage-only"}
        assert client2.get("async").equals(table)
        check_read_path(srv2, read_path)
        v = client2.put("sync", table.slice(0, 10))["version"]
        assert v == 2  # versions keep counting from what storage holds
    finally:
        srv2.shutdown()


@pytest.mark.slow
def test_kill_9_keeps_sync_data_and_cleans_half_written(tmp_path: Path) -> None:
    """After kill -9, sync-persisted data comes back; a version with no manifest is removed."""
    storage_dir = tmp_path / "s"

    proc, uri = start_server("--storage", str(storage_dir))
    table = logs_table(2000)
    flightcache.connect(uri).put("durable", table, persist="sync")
    flightcache.connect(uri).put("volatile", table)
    half = storage_dir / "halfway" / "v1"
    half.mkdir(parents=True)
    (half / "part-00000.parquet").write_bytes(b"PAR1 torn")
    stop_server(proc, signal.SIGKILL)
    proc, uri = start_server("--storage", str(storage_dir), "--storage-grace", "0")  # the only writer
    try:
        c = flightcache.connect(uri)
        assert [d["name"] for d in c.list()] == ["durable"]
        assert c.get("durable").equals(table)
        assert not half.exists()
    finally:
        stop_server(proc)


def test_s3_stopped_mid_persist(moto_s3: MotoS3, s3_bucket: str) -> None:
    """S3 down: a sync put retries, then fails with nothing visible; async records persist-failed."""
    srv, client = _serve(f"s3://{s3_bucket}/cache")
    try:
        table = logs_table(1000)
        client.put("a", table, persist="sync")
        moto_s3.stop()
        try:
            with pytest.raises(StorageError, match=rf"s3://{s3_bucket}/cache"):
                client.put("a", logs_table(10, seed=1), persist="sync")
            assert client.info("a")["version"] == 1 and client.get("a").equals(table)
            assert client.stats()["memory_staged"] == 0
            client.put("b", table, persist="async")
            _wait(lambda: client.info("b")["state"] == "persist-failed")
            assert "after 3 attempts" in client.info("b")["persist_error"]
        finally:
            moto_s3.start()
        info = client.persist("b", wait=True)  # storage is back: persisting again works
        assert info["state"] == "persisted"
    finally:
        srv.shutdown()


def test_bucket_that_does_not_exist(s3_bucket: str) -> None:
    srv, client = _serve("s3://no-such-bucket-xyz/cache")
    try:
        with pytest.raises(StorageError, match="no-such-bucket-xyz"):
            client.put("a", logs_table(10), persist="sync")
        assert client.list() == []
    finally:
        srv.shutdown()


def test_cli_storage_commands(tmp_path: Path) -> None:
    """serve --storage/--persist, put --persist, persist, evict, pin, stats per dataset, load."""
    import pyarrow.parquet as pq

    proc, uri = start_server("--storage", str(tmp_path / "s"), "--persist", "async")
    try:
        src = tmp_path / "in.parquet"
        pq.write_table(logs_table(100), src)
        assert run_cli("put", "a", str(src), "--uri", uri, "--persist", "sync").returncode == 0
        r = run_cli("persist", "a", "--uri", uri)
        assert r.returncode == 0 and "persisted" in r.stdout
        assert "in-storage-only" in run_cli("evict", "a", "--uri", uri).stdout
        assert "pinned" in run_cli("pin", "a", "--uri", uri).stdout
        r = run_cli("load", "b", str(src), "--uri", uri)
        assert r.returncode == 0 and "100 rows" in r.stdout
        r = run_cli("stats", "--uri", uri)
        assert "MISSES" in r.stdout and "pending persists" in r.stdout
        r = run_cli("info", "a", "--uri", uri)
        assert "state:     persisted, pinned" in r.stdout
    finally:
        assert stop_server(proc) == 0
