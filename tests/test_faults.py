"""Faults: clients killed mid-get, S3 stopped and restarted during persists, the server killed with kill -9
during a write-back. What was acknowledged survives; what was not is reported, never half-present.

(A client killed mid-put: tests/test_server.py::test_client_killed_mid_put_leaves_old_version.)
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pytest
from conftest import MotoS3, run_cli, shaping_proxy, start_server, stop_server

import flightcache
from flightcache.errors import DatasetNotFoundError, StorageError
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer
from flightcache.server.storage import Storage


def table_of(rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({"i": np.arange(rows), "x": rng.random(rows)})  # random floats: Parquet cannot shrink them


def _wait(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout} s"
        time.sleep(0.02)


# -- a client killed mid-get -------------------------------------------------------------------------------

GET_THEN_DIE = textwrap.dedent("""
    import sys
    import pyarrow.flight as flight
    client = flight.connect(sys.argv[1])
    info = client.get_flight_info(flight.FlightDescriptor.for_path("big"))
    reader = client.do_get(info.endpoints[0].ticket)
    reader.read_chunk()
    print("reading", flush=True)
    sys.stdin.readline()  # killed here, with the rest of the stream unread
""")


def test_clients_killed_mid_get() -> None:
    """Readers killed mid-stream leave nothing behind: the server keeps serving, the version they read can be
    replaced and dropped, and memory accounting comes back to zero."""
    srv = build_server(ServerConfig(retain_seconds=0.5, batch_rows=8192))
    uri = f"grpc://127.0.0.1:{srv.port}"
    try:
        client = flightcache.connect(uri)
        table = table_of(2_000_000)  # 32 MB in 245 batches: far more than a killed reader takes
        client.put("big", table)
        readers = [
            subprocess.Popen(
                [sys.executable, "-c", GET_THEN_DIE, uri], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
            )
            for _ in range(3)
        ]
        for proc in readers:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "reading"
        client.put("big", table.slice(0, 10))  # replaces the version the killed readers were streaming
        for proc in readers:
            proc.kill()
            assert proc.wait(timeout=30) == -signal.SIGKILL
            assert proc.stdout is not None and proc.stdin is not None
            proc.stdout.close()
            proc.stdin.close()
        assert client.get("big").equals(table.slice(0, 10))
        client.put("big", table)
        assert client.get("big").equals(table)
        stats = client.stats()
        assert stats["gets"] >= 5 and stats["pinned"] == 0 and stats["memory_staged"] == 0
        client.drop("big")
        _wait(lambda: client.stats()["retained_versions"] == 0, "retained versions released")
        assert client.stats()["memory_used"] == 0
    finally:
        srv.shutdown()


# -- S3 stopped and restarted while persists are in flight ----------------------------------------------------


@pytest.fixture
def s3_tiered(s3_bucket: str) -> Iterator[Callable[..., tuple[FlightcacheServer, flightcache.Client]]]:
    """Start in-process servers on the test's bucket (small parts: a write takes many requests)."""
    started: list[FlightcacheServer] = []

    def serve(**storage_options: float) -> tuple[FlightcacheServer, flightcache.Client]:
        options = {f"storage_{k.removesuffix('_seconds')}": v for k, v in storage_options.items()}
        config = ServerConfig(storage=f"s3://{s3_bucket}/cache", storage_part_bytes=64 * 1024, **options)  # type: ignore[arg-type]
        srv = build_server(config)
        started.append(srv)
        return srv, flightcache.connect(f"grpc://127.0.0.1:{srv.port}")

    yield serve
    for srv in started:
        srv.shutdown()


def _parts_written(moto_s3: MotoS3, bucket: str, prefix: str) -> bool:
    return moto_s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0) > 1


def _committed(uri: str) -> dict[str, int]:
    """What storage holds, as a fresh reader sees it: {name: committed version}, each read back whole."""
    storage = Storage(uri)
    versions = {}
    for m in storage.catalog():
        assert storage.read_version(m).num_rows == m.rows  # checksums verified on the way
        versions[m.name] = m.version
    return versions


def _sync_put_in_thread(client: flightcache.Client, name: str, table: pa.Table) -> tuple[threading.Thread, list]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(client.put(name, table, persist="sync"))
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


@pytest.mark.s3
@pytest.mark.slow
def test_s3_restarted_during_persists_retries_succeed(
    moto_s3: MotoS3,
    s3_bucket: str,
    s3_tiered: Callable[..., tuple[FlightcacheServer, flightcache.Client]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """S3 goes away mid-write and comes back while retries are still due: the sync put and the write-backs
    all commit, and storage holds exactly the acknowledged versions, whole."""
    _, client = s3_tiered(retries=10, backoff=0.05)  # ~25 s of backoff in all: outlasts the outage
    big = table_of(400_000)  # 6.4 MB in ~100 parts
    for name in ("a1", "a2"):
        client.put(name, table_of(100_000, seed=1), persist="async")
    thread, outcome = _sync_put_in_thread(client, "s", big)
    _wait(lambda: _parts_written(moto_s3, s3_bucket, "cache/s/v1-"), "sync put writing")
    caplog.set_level(logging.WARNING, logger="flightcache.storage")
    moto_s3.stop()
    try:
        _wait(lambda: any("/s/v1-" in r.getMessage() for r in caplog.records), "the sync put retrying")
    finally:
        moto_s3.start()
    thread.join(timeout=120)
    assert isinstance(outcome[0], dict) and outcome[0]["version"] == 1, outcome
    for name in ("a1", "a2"):
        assert client.persist(name, wait=True)["state"] == "persisted"
    assert client.info("s")["state"] == "persisted"
    assert _committed(f"s3://{s3_bucket}/cache") == {"a1": 1, "a2": 1, "s": 1}
    _, client2 = s3_tiered()
    assert client2.get("s").equals(big) and client2.get("a1").equals(table_of(100_000, seed=1))


@pytest.mark.s3
@pytest.mark.slow
def test_s3_down_during_persists_fails_cleanly(
    moto_s3: MotoS3, s3_bucket: str, s3_tiered: Callable[..., tuple[FlightcacheServer, flightcache.Client]]
) -> None:
    """S3 stays away past the retries: the sync put fails with a StorageError and publishes nothing, write-backs
    are reported persist-failed, memory loses nothing, and storage never shows the half-written version."""
    _, client = s3_tiered(retries=2, backoff=0.01)
    old, big = table_of(1000), table_of(400_000, seed=2)
    client.put("s", old, persist="sync")
    client.put("a", table_of(100_000, seed=3), persist="async")
    thread, outcome = _sync_put_in_thread(client, "s", big)
    _wait(lambda: _parts_written(moto_s3, s3_bucket, "cache/s/v2-"), "sync put writing")
    moto_s3.stop()
    try:
        thread.join(timeout=120)
        assert isinstance(outcome[0], StorageError), outcome
        assert f"s3://{s3_bucket}/cache" in str(outcome[0])
        assert client.info("s")["version"] == 1 and client.get("s").equals(old)
        _wait(lambda: client.info("a")["state"] in ("persisted", "persist-failed"), "write-back settled")
        assert client.stats()["memory_staged"] == 0
        assert client.get("a").equals(table_of(100_000, seed=3))  # in memory, whatever storage did
    finally:
        moto_s3.start()
    assert _committed(f"s3://{s3_bucket}/cache").get("s") == 1  # v2's parts are there, but no manifest
    assert client.persist("a", wait=True)["state"] == "persisted"  # storage is back: persisting again works
    _, client2 = s3_tiered(grace_seconds=0)  # a restart, the only writer: recovery on the same storage
    assert client2.get("s").equals(old) and client2.get("a").equals(table_of(100_000, seed=3))
    recovery = client2.stats()["recovery"]
    assert [(v["name"], v["version"]) for v in recovery["incomplete_versions"]] == [("s", 2)]
    assert not _parts_written(moto_s3, s3_bucket, "cache/s/v2-")  # removed at recovery


# -- the server killed with kill -9 during write-backs -----------------------------------------------------


@pytest.mark.s3
def test_recovery_reports_unfinished_versions(storage_uri: str) -> None:
    """At start, versions written in part (no manifest) newer than the committed one are reported and removed;
    a half-removed older version is cleaned silently; the committed version is served whole."""
    table = table_of(1000)
    storage = Storage(storage_uri)
    storage.write_version("r/kept", 1, table.schema, table.to_batches())
    storage.write_version("r/kept", 2, table.schema, table.to_batches())
    for unfinished in ("r/kept/v1", "r/kept/v3", "r/gone/v1"):  # v1: an old version whose removal was cut short
        storage.fs.create_dir(f"{storage.root}/{unfinished}")
        with storage.fs.open_output_stream(f"{storage.root}/{unfinished}/part-00000.parquet") as out:
            out.write(b"PAR1 torn")
    srv = build_server(ServerConfig(storage=storage_uri, storage_grace=0))  # the only writer
    try:
        client = flightcache.connect(f"grpc://127.0.0.1:{srv.port}")
        lost = client.stats()["recovery"]["incomplete_versions"]
        assert sorted((v["name"], v["version"]) for v in lost) == [("r/gone", 1), ("r/kept", 3)]
        shown = run_cli("stats", "--uri", f"grpc://127.0.0.1:{srv.port}").stdout
        assert "lost at the last start" in shown and "r/gone v1" in shown and "r/kept v3" in shown
        assert [(d["name"], d["version"]) for d in client.list()] == [("r/kept", 2)]
        assert client.get("r/kept").equals(table)
        with pytest.raises(DatasetNotFoundError):
            client.info("r/gone")
        assert storage.orphans() == []
    finally:
        srv.shutdown()


@pytest.fixture
def slow_s3(moto_s3: MotoS3) -> Iterator[str]:
    """The shaping proxy in front of moto at 1 MB/s per connection: a write-back of a few MB takes seconds."""
    with shaping_proxy(moto_s3.port, latency_ms=0, bandwidth_mbps=1) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.s3
@pytest.mark.slow
def test_kill_9_during_write_back(moto_s3: MotoS3, s3_bucket: str, slow_s3: str) -> None:
    """kill -9 while write-backs are under way: acknowledged versions (sync, or async confirmed with persist)
    come back identical; the unfinished ones are reported and never served, not even in part."""
    storage = f"s3://{s3_bucket}/cache"
    proc, uri = start_server("--storage", storage, "--s3-endpoint", slow_s3, "--persist", "async")
    try:
        client = flightcache.connect(uri)
        durable, confirmed, big = table_of(2000), table_of(3000, seed=1), table_of(500_000, seed=2)
        client.put("k9/sync", durable, persist="sync")
        client.put("k9/confirmed", confirmed)
        assert client.persist("k9/confirmed", wait=True)["state"] == "persisted"
        client.put("k9/sync", big)  # version 2, written back at 1 MB/s: 8 s
        client.put("k9/pending", big)
        for prefix in ("cache/k9/sync/v2-", "cache/k9/pending/v1-"):
            _wait(lambda p=prefix: _has_key(moto_s3, s3_bucket, p), f"write-back started under {prefix}")
        assert {d["name"]: d["state"] for d in client.list()}["k9/pending"] == "persisting"
        client.close()
    finally:
        assert stop_server(proc, signal.SIGKILL) == -signal.SIGKILL
    # straight to moto: recovery is not what is slow; the only writer: what is unfinished is removed at once
    proc, uri = start_server("--storage", storage, "--storage-grace", "0")
    try:
        client = flightcache.connect(uri)
        assert {d["name"]: d["version"] for d in client.list()} == {"k9/sync": 1, "k9/confirmed": 1}
        assert client.get("k9/sync").equals(durable)
        assert client.get("k9/confirmed").equals(confirmed)
        with pytest.raises(DatasetNotFoundError):
            client.get("k9/pending")
        lost = client.stats()["recovery"]["incomplete_versions"]
        assert sorted((v["name"], v["version"]) for v in lost) == [("k9/pending", 1), ("k9/sync", 2)]
        assert all(v["uri"].startswith(storage) for v in lost)
        assert not _has_key(moto_s3, s3_bucket, "cache/k9/pending/v1-")  # removed at recovery
    finally:
        assert stop_server(proc) == 0


def _has_key(moto_s3: MotoS3, bucket: str, prefix: str) -> bool:
    return moto_s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix).get("KeyCount", 0) > 0
