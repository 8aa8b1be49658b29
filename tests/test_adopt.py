"""Same-host puts by adoption: a real server, real files in its /dev/shm directory, real refusals."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pytest
from conftest import every_type_table, files_of, logs_table

import flightcache
from flightcache.errors import DatasetNotFoundError, InvalidRequestError, MemoryFullError, UnauthorizedError
from flightcache.protocol import AdoptRequest
from flightcache.server import adopt as adopt_module
from flightcache.server.auth import Auth
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer
from flightcache.shm import NONCE_KEY


def serve(memory_limit: int = 64 * 2**20, **kwargs: object) -> FlightcacheServer:
    kwargs.setdefault("shm", "on")
    return build_server(ServerConfig(memory_limit=memory_limit, retain_seconds=0, **kwargs))  # type: ignore[arg-type]


@pytest.fixture
def srv() -> Iterator[FlightcacheServer]:
    server = serve()
    yield server
    server.shutdown()


@pytest.fixture
def fc(srv: FlightcacheServer) -> Iterator[flightcache.Client]:
    with flightcache.connect(f"grpc://127.0.0.1:{srv.port}") as c:
        yield c


def streamed(srv: FlightcacheServer) -> int:
    """The puts that went through do_put (an adopted put makes two adopt actions instead)."""
    return sum(r["count"] for r in srv.stats()["requests"] if r["method"] == "do_put")


def ticket(fc: flightcache.Client, name: str = "t/x") -> dict[str, str]:
    return fc._action("adopt", AdoptRequest(name))


def write_ipc(path: str, table: pa.Table, nonce: str | None) -> None:
    metadata = {NONCE_KEY: nonce.encode()} if nonce is not None else None
    with pa.OSFile(path, "w") as sink, pa.ipc.new_file(sink, table.schema, metadata=metadata) as writer:
        writer.write_table(table)


def hand_over(fc: flightcache.Client, path: str, name: str = "t/x", **fields: object) -> dict[str, object]:
    return fc._action("adopt", AdoptRequest(name, path=path, **fields))  # type: ignore[arg-type]


def test_a_same_host_put_is_adopted_and_reads_back_identical(srv: FlightcacheServer, fc: flightcache.Client) -> None:
    """Every type (dictionaries aside) round-trips through an adopted file, mapped or streamed; no file is left over."""
    table = every_type_table().drop_columns(["dictionary", "list_of_dict"])
    result = fc.put("t/x", table)
    assert result["rows"] == table.num_rows and result["version"] == 1
    assert fc.get("t/x").equals(table)  # mapped from the adopted file
    with flightcache.connect(fc.uri, shm=False) as plain:
        assert plain.get("t/x").equals(table)  # do_get of the adopted batches
    assert fc.shared("t/x") is not None
    assert len(files_of(srv)) == 1 and not files_of(srv)[0].startswith("in-")
    assert srv.store.current("t/x").in_files  # type: ignore[union-attr]
    big = logs_table(200_000)  # several batches: sliced as a put slices them
    fc.put("t/big", big, mode="create")
    assert fc.get("t/big").equals(big) and fc.info("t/big")["rows"] == 200_000
    with flightcache.connect(fc.uri, batch_rows=1000) as small:  # batches of its own size: the file's are the version's
        small.put("t/small", big)
    shared = fc.shared("t/small")
    assert shared is not None and len(shared.batches) == 200 and shared.table().equals(big)
    assert streamed(srv) == 0 and int(srv.stats()["puts"]) == 3


def test_appends_transactions_and_dictionaries(srv: FlightcacheServer, fc: flightcache.Client) -> None:
    """An adopted append joins the held version; a transaction part is adopted and committed; dictionary
    columns are streamed instead (an IPC file holds one dictionary per column)."""
    a, b = logs_table(1000, seed=1), logs_table(500, seed=2)
    fc.put("t/x", a)
    fc.put("t/x", b, mode="append")
    assert fc.get("t/x").equals(pa.concat_tables([a, b]))
    part = fc.put("t/y", a, txn="tx1")
    assert part["txn"] == "tx1" and part["rows"] == 1000
    fc.commit("tx1", "t/y")
    assert fc.get("t/y").equals(a)
    fc.put("t/empty", a.slice(0, 0))  # a file of no batches
    assert fc.get("t/empty").equals(a.slice(0, 0))
    dictionary = pa.table({"d": pa.array(["x", "y", "x"]).dictionary_encode()})
    fc.put("t/d", dictionary)
    assert fc.get("t/d").equals(dictionary)
    assert streamed(srv) == 1 and int(srv.stats()["puts"]) == 5  # only the dictionary put was streamed
    assert all(not f.startswith("in-") for f in files_of(srv))


def test_shm_false_and_a_server_without_shared_memory_stream() -> None:
    """put(shm=False) streams; so does every put to a server with --shm off (no file is handed out)."""
    server = serve(shm="off")
    try:
        with flightcache.connect(f"grpc://127.0.0.1:{server.port}") as c:
            assert c._action("adopt", AdoptRequest("t/x")) == {"name": "t/x", "path": None, "enabled": False}
            c.put("t/x", logs_table(100))
            assert c.get("t/x").equals(logs_table(100))
            with pytest.raises(InvalidRequestError, match="keeps nothing in shared memory"):
                c._action("adopt", AdoptRequest("t/x", path="/dev/shm/in-" + "0" * 32 + ".arrow"))
    finally:
        server.shutdown()


def test_the_memory_limit_holds_for_adopted_puts(fc: flightcache.Client, srv: FlightcacheServer) -> None:
    """A table over the limit is refused before it is written; one that does not fit beside what is held
    is refused at hand-over; nothing is published and no file is left in shared memory."""
    small = pa.table({"x": pa.array(range(5 * 2**20), pa.int64())})  # 40 MiB
    with pytest.raises(MemoryFullError, match="larger than the server's memory limit"):
        fc.put("t/huge", pa.concat_tables([small, small]))
    fc.put("t/a", small)
    with pytest.raises(MemoryFullError):
        fc.put("t/b", small)
    with pytest.raises(DatasetNotFoundError):
        fc.info("t/b")
    assert len(files_of(srv)) == 1 and fc.get("t/a").equals(small)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "garbage", "no nonce", "wrong nonce", "wrong rows", "empty", "symlink", "hard link"],
)
def test_bad_files_are_refused_and_removed(
    srv: FlightcacheServer, fc: flightcache.Client, request: pytest.FixtureRequest, damage: str
) -> None:
    """Truncated, forged, unsigned, mis-counted, empty, linked files: a clear error, nothing published,
    the handed-out file gone, and a link's target untouched."""
    table = logs_table(1000)
    given = ticket(fc)
    path, nonce = given["path"], given["nonce"]
    target = Path(f"/dev/shm/flightcache-test-{os.getpid()}-{time.monotonic_ns()}.arrow")  # a hard link's: same fs
    write_ipc(str(target), table, nonce)
    request.addfinalizer(target.unlink)
    fields: dict[str, object] = {}
    expected = "not a complete, valid Arrow IPC file"
    if damage == "truncated":
        write_ipc(path, table, nonce)
        os.truncate(path, os.path.getsize(path) // 2)
    elif damage == "garbage":
        Path(path).write_bytes(os.urandom(4096))
    elif damage == "no nonce":
        write_ipc(path, table, None)
        expected = "lacks the nonce"
    elif damage == "wrong nonce":
        write_ipc(path, table, "0" * 32)
        expected = "lacks the nonce"
    elif damage == "wrong rows":
        write_ipc(path, table, nonce)
        fields["rows"] = 999
        expected = "holds 1000 rows, not the 999"
    elif damage == "empty":
        Path(path).touch()
        expected = "is empty"
    elif damage == "symlink":
        os.symlink(target, path)
        expected = "cannot open"
    else:
        os.link(target, path)
        expected = "single link"
    with pytest.raises(InvalidRequestError, match=expected):
        hand_over(fc, path, **fields)
    with pytest.raises(DatasetNotFoundError):
        fc.info("t/x")
    assert files_of(srv) == [] and target.stat().st_nlink == 1
    assert pa.ipc.open_file(str(target)).read_all().equals(table)
    assert srv.store.stats()["memory_used"] == 0


def test_only_handed_out_paths_are_adopted_and_only_once(
    srv: FlightcacheServer, fc: flightcache.Client, tmp_path: Path
) -> None:
    """A path outside the server's directory, a server file of a held dataset, a made-up name: refused
    and left alone; a path already adopted cannot be adopted again."""
    table = logs_table(100)
    outside = tmp_path / f"in-{'a' * 32}.arrow"
    write_ipc(str(outside), table, ticket(fc)["nonce"])
    for path in (str(outside), "/etc/passwd", str(srv.cache.shm.dir / "x.arrow")):  # type: ignore[union-attr]
        with pytest.raises(InvalidRequestError, match="not a file this server handed out"):
            hand_over(fc, path)
    assert outside.exists()
    fc.put("t/held", table)
    held = srv.cache.shm.dir / files_of(srv)[0]  # type: ignore[union-attr]
    with pytest.raises(InvalidRequestError, match="not a file this server handed out"):
        hand_over(fc, str(held))
    assert fc.get("t/held").equals(table)
    given = ticket(fc)
    write_ipc(given["path"], table, given["nonce"])
    assert hand_over(fc, given["path"])["rows"] == 100
    with pytest.raises(InvalidRequestError, match="no file at"):
        hand_over(fc, given["path"], name="t/again")
    with pytest.raises(InvalidRequestError, match="no file at"):  # never handed out
        hand_over(fc, str(srv.cache.shm.dir / f"in-{'b' * 32}.arrow"))  # type: ignore[union-attr]
    assert fc.get("t/x").equals(table) and len(files_of(srv)) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="making a file of another user needs root")
def test_another_users_file_is_not_adopted(srv: FlightcacheServer, fc: flightcache.Client) -> None:
    """A handed-out path holding a file of another user is refused and removed."""
    given = ticket(fc)
    write_ipc(given["path"], logs_table(10), given["nonce"])
    os.chown(given["path"], 65534, 65534)
    with pytest.raises(UnauthorizedError, match="belongs to user 65534"):
        hand_over(fc, given["path"])
    assert files_of(srv) == []


def test_a_read_only_token_cannot_adopt(tmp_path: Path) -> None:
    """Asking for a file and handing one over both need the write role, as a put does."""
    credentials = tmp_path / "credentials"
    credentials.write_text("write-token-0123456789abcdef\nread-token-0123456789abcdef read\n")
    credentials.chmod(0o600)
    server = serve(credentials=Auth.from_file(credentials))
    try:
        uri = f"grpc://127.0.0.1:{server.port}"
        with flightcache.connect(uri, token="read-token-0123456789abcdef") as reader:
            with pytest.raises(UnauthorizedError, match="put of dataset 't/x' needs the write role"):
                reader.put("t/x", logs_table(10))  # refused a file, then refused the stream
            with pytest.raises(UnauthorizedError, match="action 'adopt' needs the write role"):
                ticket(reader)
            with flightcache.connect(uri, token="write-token-0123456789abcdef") as writer:
                given = ticket(writer)
            write_ipc(given["path"], logs_table(10), given["nonce"])
            with pytest.raises(UnauthorizedError, match="needs the write role"):
                hand_over(reader, given["path"])
        assert server.store.list() == []
    finally:
        server.shutdown()


def test_orphaned_files_are_removed(srv: FlightcacheServer, fc: flightcache.Client) -> None:
    """A handed-out file whose writer never handed it over goes at a later hand-out, once old enough."""
    given = ticket(fc)
    write_ipc(given["path"], logs_table(10), given["nonce"])
    ticket(fc)
    assert os.path.exists(given["path"])  # fresh: its writer may still hand it over
    old = time.time() - adopt_module.ORPHAN_SECONDS - 1
    os.utime(given["path"], (old, old))
    ticket(fc)
    assert not os.path.exists(given["path"])
