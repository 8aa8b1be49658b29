"""Same-host reads through shared memory: real servers, real files under /dev/shm, real mappings."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from conftest import every_type_table, files_of, logs_table, start_server, stop_server

import flightcache
from flightcache.errors import MemoryFullError
from flightcache.protocol import ShmRequest
from flightcache.server.arrays import buffer_sizes
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer
from flightcache.server.shm import SharedMemory
from flightcache.server.store import Store
from flightcache.shm import NONCE_KEY, read_shared

ROOT = Path("/dev/shm") / f"flightcache-{os.getuid()}"


def serve(memory_limit: int = 256 * 2**20, **kwargs: object) -> FlightcacheServer:
    kwargs.setdefault("shm", "on")
    return build_server(ServerConfig(memory_limit=memory_limit, **kwargs))  # type: ignore[arg-type]


@pytest.fixture
def srv() -> Iterator[FlightcacheServer]:
    server = serve()
    yield server
    server.shutdown()


@pytest.fixture
def fc(srv: FlightcacheServer) -> Iterator[flightcache.Client]:
    with flightcache.connect(f"grpc://127.0.0.1:{srv.port}") as c:
        yield c


def shm_reads(fc: flightcache.Client) -> int:
    return int(fc.stats()["shm_reads"])


def test_same_host_get_maps_identical_data(fc: flightcache.Client) -> None:
    """get, columns, filter, stream and to_pandas map the data and equal what do_get streams."""
    table = logs_table(150_000)
    fc.put("logs/raw", table)
    streamed = flightcache.connect(fc.uri, shm=False)
    before = shm_reads(fc)
    assert fc.get("logs/raw").equals(table)
    for columns, where in ((["status", "method"], None), (None, "status >= 500 and method == 'GET'")):
        assert fc.get("logs/raw", columns, where).equals(streamed.get("logs/raw", columns, where))
    assert pa.Table.from_batches(list(fc.stream("logs/raw", ["bytes"]))).equals(table.select(["bytes"]))
    assert fc.to_pandas("logs/raw").equals(table.to_pandas())
    assert shm_reads(fc) == before + 5
    assert streamed.get("logs/raw").equals(table) and shm_reads(fc) == before + 5  # shm=False streams


def test_files_are_private_random_and_carry_the_nonce(srv: FlightcacheServer, fc: flightcache.Client) -> None:
    """One 0600 file per put in a 0700 directory, 128-bit random names; the nonce handed out is in the file."""
    fc.put("a", logs_table(1000))
    fc.put("a", logs_table(1000, 1), mode="append")
    answer = fc._action("shm", ShmRequest("a"))
    assert answer["version"] == 2 and answer["rows"] == 2000 and len(answer["files"]) == 2
    assert srv.cache.shm is not None
    assert stat.S_IMODE(srv.cache.shm.dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(ROOT.stat().st_mode) == 0o700
    for f in answer["files"]:
        path = Path(f["path"])
        assert path.parent == srv.cache.shm.dir and len(path.stem) == 32
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert pa.ipc.open_file(pa.memory_map(str(path))).metadata[NONCE_KEY] == f["nonce"].encode()
    assert len({f["nonce"] for f in answer["files"]}) == 2
    mapped = read_shared(answer)
    assert mapped is not None and mapped.table().equals(pa.concat_tables([logs_table(1000), logs_table(1000, 1)]))


@pytest.mark.parametrize("damage", ["missing", "foreign", "not-arrow"])
def test_falls_back_to_do_get_when_the_file_cannot_be_used(fc: flightcache.Client, damage: str) -> None:
    """A missing file, another file at the path (another host's), or one that cannot be read: do_get."""
    table = logs_table(20_000)
    fc.put("a", table)
    path = fc._action("shm", ShmRequest("a"))["files"][0]["path"]
    os.unlink(path)  # the server's mapping keeps its pages
    if damage == "foreign":
        with pa.ipc.new_file(path, table.schema, metadata={NONCE_KEY: b"0" * 32}) as writer:
            writer.write_table(logs_table(20_000, 9))
    elif damage == "not-arrow":
        Path(path).write_bytes(b"not an arrow file")
    assert fc.shared("a") is None
    assert fc.get("a").equals(table)


def test_a_client_on_another_host_stops_asking(srv: FlightcacheServer, fc: flightcache.Client) -> None:
    """When the server's directory does not exist where the client runs, it streams from then on."""
    fc.put("a", logs_table(100))
    assert srv.cache.shm is not None
    home, away = srv.cache.shm.dir, srv.cache.shm.dir.with_name("elsewhere")
    home.rename(away)  # as a client on another host sees it; the server's mappings stay valid
    try:
        assert fc.shared("a") is None
    finally:
        away.rename(home)
    before = shm_reads(fc)
    assert fc.get("a").equals(logs_table(100)) and fc.shared("a") is None
    assert shm_reads(fc) == before and fc.stats()["gets"] > 0


def test_off_switches(srv: FlightcacheServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLIGHTCACHE_SHM=0 turns clients off (and survives pickling); --shm off serves nothing from /dev/shm."""
    monkeypatch.setenv("FLIGHTCACHE_SHM", "0")
    client = flightcache.connect(f"grpc://127.0.0.1:{srv.port}")
    assert client.shm is False and pickle.loads(pickle.dumps(client)).shm is False
    monkeypatch.delenv("FLIGHTCACHE_SHM")
    assert pickle.loads(pickle.dumps(flightcache.connect("grpc://h:1"))).shm is True
    off = serve(shm="off")
    try:
        assert off.cache.shm is None
        with flightcache.connect(f"grpc://127.0.0.1:{off.port}") as c:
            c.put("a", logs_table(100))
            assert c.shared("a") is None and c.get("a").equals(logs_table(100))
    finally:
        off.shutdown()


def test_dictionary_columns_stay_in_process_memory(srv: FlightcacheServer, fc: flightcache.Client) -> None:
    """An IPC file holds one dictionary per field, so such datasets are streamed, not mapped."""
    fc.put("t", every_type_table())
    assert fc._action("shm", ShmRequest("t"))["files"] is None and files_of(srv) == []
    assert fc.get("t").equals(every_type_table())


def test_a_mapped_version_stays_valid_while_replaced_and_dropped(
    srv: FlightcacheServer, fc: flightcache.Client
) -> None:
    """Snapshot reads: a reader that mapped version 1 keeps it through version 2 and a drop."""
    v1, v2 = logs_table(30_000), logs_table(30_000, 1)
    fc.put("a", v1)
    mapped = fc.get("a")
    fc.put("a", v2)
    assert fc.get("a").equals(v2)
    assert fc.get("a", version=1).equals(v1)  # retained: still handed out
    fc.drop("a")
    assert files_of(srv) == []
    assert mapped.equals(v1)


def test_files_go_with_retention_drop_eviction_and_shutdown(tmp_path: Path) -> None:
    """A file is unlinked when no version uses it: retention expiry, drop, eviction, shutdown."""
    server = serve(retain_seconds=0, storage=str(tmp_path / "storage"))
    fc = flightcache.connect(f"grpc://127.0.0.1:{server.port}")
    try:
        fc.put("a", logs_table(1000))
        first = files_of(server)
        fc.put("a", logs_table(1000, 1))  # replaced, no retention
        assert len(files_of(server)) == 1 and files_of(server) != first
        fc.put("b", logs_table(1000), persist="sync")
        fc.evict("b")
        assert len(files_of(server)) == 1
        assert fc.get("b").equals(logs_table(1000))  # read-through writes a new file
        assert len(files_of(server)) == 2
        fc.drop("a")
        assert len(files_of(server)) == 1
    finally:
        server.shutdown()
    assert server.cache.shm is not None and not server.cache.shm.dir.exists()


def test_memory_limit_holds_with_shared_memory() -> None:
    """Mapped pages count in the limit as buffers did: a put that does not fit fails and leaves no file."""
    one = sum(buffer_sizes(logs_table(50_000).to_batches()).values())
    server = serve(memory_limit=int(one * 1.5))
    fc = flightcache.connect(f"grpc://127.0.0.1:{server.port}")
    try:
        fc.put("a", logs_table(50_000))
        used = fc.stats()["memory_used"]
        assert one * 0.99 <= used <= int(one * 1.5)
        assert sum(os.path.getsize(server.cache.shm.dir / f) for f in files_of(server)) < used * 1.01  # type: ignore[union-attr]
        with pytest.raises(MemoryFullError, match=r"limit.*a \(.*memory-only"):
            fc.put("b", logs_table(50_000, 1))
        assert len(files_of(server)) == 1 and fc.stats()["memory_staged"] == 0
        assert fc.get("a").equals(logs_table(50_000))
    finally:
        server.shutdown()


def test_transaction_parts_not_chosen_are_removed(tmp_path: Path) -> None:
    """Each staged part has its own file; the commit keeps the chosen ones, abort removes the rest."""
    shm = SharedMemory(tmp_path)
    store = Store(files=shm)
    for i in range(3):
        staged = store.begin_put("t", logs_table(10).schema)
        staged.add(logs_table(10, i).to_batches()[0])
        staged.stage("txn")
    assert len(os.listdir(shm.dir)) == 3
    version = store.take_parts("txn", "t", parts=["000002", "000000"]).publish()
    assert (
        version.in_files
        and len(version.files) == 2
        and sorted(os.listdir(shm.dir)) == sorted(Path(f).name for f in version.files)
    )
    assert version.table().equals(pa.concat_tables([logs_table(10, 2), logs_table(10, 0)]))
    staged = store.begin_put("t", logs_table(10).schema)
    staged.add(logs_table(10).to_batches()[0])
    staged.stage("other")
    store.abort("other")
    assert len(os.listdir(shm.dir)) == 2
    shm.close()


def test_a_configured_group_may_read(tmp_path: Path) -> None:
    """--shm-group: directories 0710 and 0750, files 0640, all of that group."""
    shm = SharedMemory(tmp_path, group=str(os.getgid()))
    shared = shm.open("t", logs_table(10).schema)
    assert shared is not None
    shared.keep(logs_table(10).to_batches()[0])
    shared.finish()
    for path, mode in ((shm.dir.parent, 0o710), (shm.dir, 0o750), (Path(shared.token), 0o640)):
        assert stat.S_IMODE(path.stat().st_mode) == mode and path.stat().st_gid == os.getgid()
    shm.close()


def test_stale_directories_of_dead_servers_are_removed(tmp_path: Path) -> None:
    """At start, directories no running server holds are removed, whatever pid their name carries;
    a locked one is kept even when its pid means nothing here (a server in another pid namespace)."""
    base = tmp_path / f"flightcache-{os.getuid()}"
    base.mkdir(mode=0o700)
    dead = base / "999999999-1-deadbeef"
    reused = base / f"{os.getpid()}-1-deadbeef"  # our pid, another start time
    elsewhere = base / "999999998-1-cafecafe"  # a live server in another pid namespace
    making = base / ".0123456789abcdef"  # a server is making it right now
    for d in (dead, reused, elsewhere, making):
        d.mkdir()
        (d / "x.arrow").write_bytes(b"x")
    held = os.open(elsewhere, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        live = SharedMemory(tmp_path)
        assert not dead.exists() and not reused.exists() and live.dir.exists()
        assert elsewhere.exists() and making.exists()
        assert sorted(live.removed_stale) == sorted([str(dead), str(reused)])
        SharedMemory(tmp_path).close()
        assert live.dir.exists()  # a running server's directory is kept
        live.close()
    finally:
        os.close(held)
    os.utime(making, (time.time() - 120, time.time() - 120))  # left half-made by a crash long ago
    again = SharedMemory(tmp_path)
    assert sorted(again.removed_stale) == sorted([str(elsewhere), str(making)])
    again.close()


def test_kill_9_leaves_files_that_the_next_start_removes() -> None:
    """A crashed server's shared memory is removed by the next server of the same user."""
    proc, uri = start_server("--shm", "on", "--storage", "none", "--memory-limit", "64MiB")
    try:
        with flightcache.connect(uri) as fc:
            fc.put("a", logs_table(5000))
            path = Path(fc._action("shm", ShmRequest("a"))["files"][0]["path"])
        assert path.parent.name.startswith(f"{proc.pid}-")
    finally:
        stop_server(proc, signal.SIGKILL)
    assert path.exists()
    proc2, _ = start_server("--shm", "on", "--storage", "none", "--memory-limit", "64MiB")
    stop_server(proc2)
    assert not path.parent.exists()


def test_clean_shutdown_of_a_serve_process_removes_its_directory() -> None:
    """SIGTERM: the directory goes with the server; the start-up message names it."""
    proc, uri = start_server("--shm", "on", "--storage", "none", "--memory-limit", "64MiB")
    with flightcache.connect(uri) as fc:
        fc.put("a", logs_table(100))
        path = Path(fc._action("shm", ShmRequest("a"))["files"][0]["path"])
    assert stop_server(proc) == 0
    assert not path.parent.exists()


def test_shm_request_round_trip() -> None:
    for message in (ShmRequest("a"), ShmRequest("a/b", version=3)):
        assert ShmRequest.from_bytes(message.to_bytes()) == message
    assert json.loads(ShmRequest("a").to_bytes()) == {"v": 1, "name": "a"}


def test_duckdb_attach_reads_through_shared_memory(fc: flightcache.Client) -> None:
    """flightcache.integrations.duck scans map the data; the filter runs here with the same result."""
    from flightcache.integrations import duck

    table = logs_table(20_000)
    fc.put("logs/raw", table)
    con = duckdb.connect()
    duck.attach(con, fc)
    before = shm_reads(fc)
    got = con.sql("SELECT count(*) FROM \"logs/raw\" WHERE status >= 500 AND method = 'GET'").fetchall()
    expected = sum(
        s >= 500 and m == "GET" for s, m in zip(table["status"].to_pylist(), table["method"].to_pylist(), strict=True)
    )
    assert got == [(expected,)] and shm_reads(fc) > before


@pytest.mark.spark
def test_spark_reader_maps_partitions(spark: object, fc: flightcache.Client) -> None:
    """Spark's Python workers map their endpoint's batches; option shm=false streams; both equal."""
    table = logs_table(40_000)
    fc.put("logs/raw", table)
    from flightcache.integrations.spark import FORMAT  # the Python data source: it maps shared memory

    reader = spark.read.format(FORMAT).option("uri", fc.uri)  # type: ignore[attr-defined]
    before = shm_reads(fc)
    mapped = reader.option("filter", "status >= 500").load("logs/raw").toArrow()
    assert shm_reads(fc) > before
    before = shm_reads(fc)
    streamed = reader.option("filter", "status >= 500").option("shm", "false").load("logs/raw").toArrow()
    assert shm_reads(fc) == before
    assert mapped.sort_by("ts").equals(streamed.sort_by("ts")) and mapped.num_rows > 0
