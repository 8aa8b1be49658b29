"""Security: every RPC authenticated, read and write roles, basic auth, SIGHUP reload, TLS, limits, names.

The servers are real (127.0.0.1, port 0) and the clients are plain ``pyarrow.flight`` where the point is
that any Flight client gets the same answer, ``flightcache.Client`` where it is the Python API.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import json
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from conftest import logs_table, run_cli, start_server, stop_server, wait_until

import flightcache
from flightcache import flightsql as fsql
from flightcache.errors import (
    InvalidNameError,
    InvalidRequestError,
    LimitExceededError,
    NotImplementedByServerError,
    ServerUnavailableError,
    UnauthenticatedError,
    UnauthorizedError,
)
from flightcache.protocol import ACTIONS, WRITE_ACTIONS, ReadRequest, encode_schema
from flightcache.server.auth import MAX_SESSIONS_PER_USER, Auth, Credentials, Limits
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer
from flightcache.server.storage import Storage

WRITE_TOKEN = "write-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"
CREDENTIALS = f"""\
# the test server's credentials
{WRITE_TOKEN}
{READ_TOKEN}   read
alice:alice-password read
bob:bob:password write
"""


def options(header: str | None = None) -> flight.FlightCallOptions:
    headers = [(b"authorization", header.encode())] if header is not None else []
    return flight.FlightCallOptions(headers=headers, timeout=60)


def bearer(token: str) -> flight.FlightCallOptions:
    return options(f"Bearer {token}")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- a server with authentication and a little of everything to act on ------------------------------


@dataclass
class Secured:
    server: FlightcacheServer
    uri: str
    ticket: bytes  # a do_get ticket of dataset t/a
    sql_ticket: bytes  # a started query, claimable once
    prepared: bytes  # a Flight SQL prepared statement handle
    external: Path  # Parquet that `load` can read

    def catalog(self) -> list[tuple[str, int, str, bool]]:
        """What a write would change: names, versions, states, pins, staged transaction parts."""
        return [(i.name, i.version, i.state, i.pinned) for i in self.server.store.list()] + [
            (t, len(txn.parts), "txn", False) for t, txn in self.server.store._txns.items()
        ]


def write_credentials(directory: Path) -> Path:
    path = directory / "credentials"
    path.write_text(CREDENTIALS)
    path.chmod(0o600)
    return path


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    return write_credentials(tmp_path)


@contextlib.contextmanager
def secured_server(directory: Path) -> Iterator[Secured]:
    """A server with the test credentials, storage, and a little of everything to act on."""
    server = build_server(
        ServerConfig(
            memory_limit=256 * 1024 * 1024,
            storage=str(directory / "storage"),
            credentials=Auth.from_file(write_credentials(directory)),
        )
    )
    uri = f"grpc://127.0.0.1:{server.port}"
    external = directory / "external.parquet"
    pq.write_table(logs_table(50), external)
    try:
        with flightcache.connect(uri, token=WRITE_TOKEN) as c:
            c.put("t/a", logs_table(100), persist="sync")
            c.put("t/b", logs_table(10))
            c.put("t/c", logs_table(5), txn="txn1")
            c.pin("t/b")
            lake = directory / "lake"  # a loaded dataset whose source has a new file: a refresh appends it
            lake.mkdir()
            pq.write_table(logs_table(20), lake / "a.parquet")
            c.load("t/lake", str(lake))
            pq.write_table(logs_table(20, seed=1), lake / "b.parquet")
            ticket = c.flight_info("t/a").endpoints[0].ticket.ticket
            query = fsql.SqlRequest('SELECT count(*) AS n FROM "t/a"').to_command()
            sql_info = c.flight.get_flight_info(flight.FlightDescriptor.for_command(query))
            request = fsql.pack(fsql.message("ActionCreatePreparedStatementRequest", query="SELECT ? AS p"))
            [created] = c.flight.do_action(flight.Action("CreatePreparedStatement", request))
            _, prepared = fsql.unpack(created.body.to_pybytes())
        yield Secured(
            server, uri, ticket, sql_info.endpoints[0].ticket.ticket, prepared.prepared_statement_handle, external
        )
    finally:
        server.shutdown()


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[Secured]:
    with secured_server(tmp_path) as s:
        yield s


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """One server for the many calls that must be refused (each test checks that nothing changed)."""
    with secured_server(tmp_path_factory.mktemp("refusing")) as s:
        yield s


def _action(kind: str, body: bytes | dict[str, object] | str = b"") -> Callable[..., object]:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body.encode() if isinstance(body, str) else body
    return lambda c, o, s: list(c.do_action(flight.Action(kind, raw), o))


def _adopt(c: flight.FlightClient, o: flight.FlightCallOptions) -> object:
    """A same-host put by adoption: ask for a file, write it, hand it over (flightcache.server.adopt)."""
    (answer,) = c.do_action(flight.Action("adopt", json.dumps({"name": "t/adopted"}).encode()), o)
    given = json.loads(answer.body.to_pybytes())
    table = logs_table(10)
    with pa.OSFile(given["path"], "w") as sink, pa.ipc.new_file(
        sink, table.schema, metadata={b"flightcache.nonce": given["nonce"].encode()}
    ) as writer:
        writer.write_table(table)
    body = json.dumps({"name": "t/adopted", "path": given["path"]}).encode()
    return list(c.do_action(flight.Action("adopt", body), o))


def _info(descriptor: flight.FlightDescriptor) -> Callable[..., object]:
    return lambda c, o, s: c.get_flight_info(descriptor, o)


def _put(c: flight.FlightClient, o: flight.FlightCallOptions, s: Secured) -> object:
    table = logs_table(20)
    writer, results = c.do_put(flight.FlightDescriptor.for_path("t/new"), table.schema, o)
    writer.write_table(table)
    writer.done_writing()
    answer = results.read()
    writer.close()
    return answer


def _bind_parameters(c: flight.FlightClient, o: flight.FlightCallOptions, s: Secured) -> object:
    command = fsql.pack(fsql.message("CommandPreparedStatementQuery", prepared_statement_handle=s.prepared))
    table = pa.table({"p": [7]})
    writer, results = c.do_put(flight.FlightDescriptor.for_command(command), table.schema, o)
    writer.write_table(table)
    writer.done_writing()
    answer = results.read()
    writer.close()
    return answer


def _exchange(c: flight.FlightClient, o: flight.FlightCallOptions, s: Secured) -> object:
    writer, reader = c.do_exchange(flight.FlightDescriptor.for_path("t/a"), o)
    writer.done_writing()
    return reader.read_all()


class _NoHandshake(flight.ClientAuthHandler):
    def authenticate(self, outgoing: flight.ClientAuthSender, incoming: flight.ClientAuthReader) -> None:
        pass

    def get_token(self) -> bytes:
        return b""


def _cancel_body(s: Secured) -> bytes:
    info = flight.FlightInfo(pa.schema([]), flight.FlightDescriptor.for_command(b"x"), [], -1, -1)
    return fsql.message("CancelFlightInfoRequest", info=info.serialize()).SerializeToString()


def _sql_query(text: str) -> Callable[..., object]:
    return _info(flight.FlightDescriptor.for_command(fsql.pack(fsql.message("CommandStatementQuery", query=text))))


# Every RPC the server answers, each flightcache action and each Flight SQL entry point: id -> call.
READS: dict[str, Callable[..., object]] = {
    "handshake": lambda c, o, s: c.authenticate(_NoHandshake(), o),
    "list_flights": lambda c, o, s: list(c.list_flights(b"", o)),
    "list_actions": lambda c, o, s: c.list_actions(o),
    "get_flight_info": _info(flight.FlightDescriptor.for_path("t/a")),
    "get_flight_info_read_command": _info(
        flight.FlightDescriptor.for_command(ReadRequest("t/a", columns=["status"], filter="status >= 500").to_bytes())
    ),
    "do_get": lambda c, o, s: c.do_get(flight.Ticket(s.ticket), o).read_all(),
    "action_info": _action("info", {"name": "t/a"}),
    "action_list": _action("list"),
    "action_stats": _action("stats"),
    "action_nodes": _action("nodes"),
    "action_healthcheck": _action("healthcheck"),
    "action_shm": _action("shm", {"name": "t/a"}),
    "sql_query": _info(flight.FlightDescriptor.for_command(fsql.SqlRequest('SELECT * FROM "t/a"').to_command())),
    "sql_do_get": lambda c, o, s: c.do_get(flight.Ticket(s.sql_ticket), o).read_all(),
    "flightsql_statement_query": _sql_query('SELECT count(*) FROM "t/b"'),
    "flightsql_get_tables": _info(
        flight.FlightDescriptor.for_command(fsql.pack(fsql.message("CommandGetTables", include_schema=True)))
    ),
    "flightsql_bind_parameters": _bind_parameters,
    "action_CreatePreparedStatement": _action(
        "CreatePreparedStatement",
        fsql.pack(fsql.message("ActionCreatePreparedStatementRequest", query="SELECT 1")),
    ),
    "action_ClosePreparedStatement": lambda c, o, s: list(
        c.do_action(
            flight.Action(
                "ClosePreparedStatement",
                fsql.pack(fsql.message("ActionClosePreparedStatementRequest", prepared_statement_handle=s.prepared)),
            ),
            o,
        )
    ),
    "action_CancelFlightInfo": lambda c, o, s: list(c.do_action(flight.Action("CancelFlightInfo", _cancel_body(s)), o)),
    "action_CancelQuery": lambda c, o, s: list(
        c.do_action(
            flight.Action(
                "CancelQuery",
                fsql.pack(
                    fsql.message(
                        "ActionCancelQueryRequest", info=fsql.parse("CancelFlightInfoRequest", _cancel_body(s)).info
                    )
                ),
            ),
            o,
        )
    ),
}
WRITES: dict[str, Callable[..., object]] = {
    "do_put": _put,
    "action_drop": _action("drop", {"name": "t/b"}),
    "action_drop_bare_name": _action("drop", "t/b"),
    "action_load": lambda c, o, s: list(
        c.do_action(flight.Action("load", json.dumps({"name": "t/ext", "uri": str(s.external)}).encode()), o)
    ),
    "action_persist": _action("persist", {"name": "t/b"}),
    "action_refresh": _action("refresh", {"name": "t/lake"}),
    "action_pin": _action("pin", {"name": "t/a"}),
    "action_unpin": _action("unpin", {"name": "t/b"}),
    "action_evict": _action("evict", {"name": "t/a"}),
    "action_commit": _action("commit", {"txn": "txn1", "name": "t/c"}),
    "action_abort": _action("abort", {"txn": "txn1"}),
    "action_sql_into": _action("sql", {"query": 'SELECT * FROM "t/a" LIMIT 3', "into": "t/q"}),
    "action_adopt": lambda c, o, s: _adopt(c, o),
}
EVERY_CALL = {**READS, **WRITES, "do_exchange": _exchange}  # GetSchema: see test_rpcs_not_served_...


def test_the_lists_cover_every_action() -> None:
    """Each flightcache and SQL action is exercised below, and the write ones are exactly WRITE_ACTIONS."""
    served = set(ACTIONS)
    covered = {k.removeprefix("action_").removesuffix("_bare_name").removesuffix("_into") for k in EVERY_CALL}
    assert served <= covered
    assert {k.removeprefix("action_").removesuffix("_bare_name").removesuffix("_into") for k in WRITES} == {
        *WRITE_ACTIONS,
        "do_put",
    }


@pytest.mark.parametrize("header", [None, f"Bearer {WRITE_TOKEN}x", "Bearer ", basic("alice", "wrong"), "Token x"])
@pytest.mark.parametrize("call", EVERY_CALL)
def test_every_call_without_valid_credentials_is_unauthenticated(
    refusing: Secured, call: str, header: str | None
) -> None:
    """No token, a wrong token, an empty one, a wrong password, an unknown scheme: refused before any work."""
    before = refusing.catalog()
    fc = flight.connect(refusing.uri)
    with pytest.raises(flight.FlightUnauthenticatedError) as raised:
        EVERY_CALL[call](fc, options(header), refusing)
    assert json.loads(raised.value.extra_info) == {"code": "UNAUTHENTICATED"}
    assert WRITE_TOKEN not in str(raised.value)
    assert refusing.catalog() == before


@pytest.mark.parametrize("call", WRITES)
def test_a_read_token_cannot_write(refusing: Secured, call: str) -> None:
    """Puts, drop, load, persist, pin, unpin, evict, commit, abort and SQL into= need the write role."""
    before = refusing.catalog()
    with pytest.raises(flight.FlightUnauthorizedError, match="needs the write role") as raised:
        WRITES[call](flight.connect(refusing.uri), bearer(READ_TOKEN), refusing)
    assert json.loads(raised.value.extra_info) == {"code": "UNAUTHORIZED"}
    assert refusing.catalog() == before


@pytest.mark.parametrize("call", WRITES)
def test_a_read_user_cannot_write(refusing: Secured, call: str) -> None:
    """Basic auth with a read role: the same refusal as a read token."""
    before = refusing.catalog()
    with pytest.raises(flight.FlightUnauthorizedError, match="user 'alice' has role read"):
        WRITES[call](flight.connect(refusing.uri), options(basic("alice", "alice-password")), refusing)
    assert refusing.catalog() == before


@pytest.mark.parametrize("call", READS)
def test_a_read_token_reads(secured: Secured, call: str) -> None:
    """Reads, listings, SQL queries and Flight SQL metadata work with the read role."""
    READS[call](flight.connect(secured.uri), bearer(READ_TOKEN), secured)


@pytest.mark.parametrize("call", {**READS, **WRITES})
def test_a_write_token_does_everything(secured: Secured, call: str) -> None:
    """The write role may make every call; a write changes the catalog."""
    before = secured.catalog()
    {**READS, **WRITES}[call](flight.connect(secured.uri), bearer(WRITE_TOKEN), secured)
    if call in WRITES:
        assert secured.catalog() != before


@pytest.mark.parametrize(
    "call",
    [_exchange, lambda c, o, s: c.get_schema(flight.FlightDescriptor.for_path("t/a"), o)],
    ids=["do_exchange", "get_schema"],
)
def test_rpcs_not_served_are_authenticated_first(secured: Secured, call: Callable[..., object]) -> None:
    """DoExchange and GetSchema are not implemented, and say so only to an authenticated caller."""
    fc = flight.connect(secured.uri)
    with pytest.raises(Exception, match=r"\[UNAUTHENTICATED\]"):  # GetSchema's client: OSError, not Flight's
        call(fc, options(), secured)
    with pytest.raises(NotImplementedError) as raised:
        call(fc, bearer(READ_TOKEN), secured)
    assert "UNAUTH" not in str(raised.value)


def test_refused_calls_are_counted_and_do_not_hold_up_a_stop(secured: Secured) -> None:
    """A call refused for its credentials is counted as UNAUTHENTICATED and never left 'in flight'."""
    fc = flight.connect(secured.uri)
    for _ in range(3):
        with pytest.raises(flight.FlightUnauthenticatedError):
            fc.list_actions(options())
    calls = {r["method"]: r["outcomes"] for r in secured.server.ops.requests.snapshot()}
    assert calls["list_actions"] == {"UNAUTHENTICATED": 3}
    assert secured.server.ops.in_flight == 0
    assert secured.server.drain(5)["cut"] == 0


def test_flightcache_middleware_keys_are_reserved() -> None:
    """A caller's middleware cannot silently replace authentication or the operations middleware."""
    with pytest.raises(ValueError, match="auth"):
        build_server(ServerConfig(middleware={"auth": flight.ServerMiddlewareFactory()}))


def test_client_raises_flightcache_errors(secured: Secured) -> None:
    """flightcache.Client maps the refusals to UnauthenticatedError and UnauthorizedError with clear messages."""
    with flightcache.connect(secured.uri) as c, pytest.raises(UnauthenticatedError, match=r"token=, --token"):
        c.list()
    with flightcache.connect(secured.uri, token="not-a-token-at-all") as c, pytest.raises(UnauthenticatedError):
        c.get("t/a")
    with flightcache.connect(secured.uri, token=READ_TOKEN) as c:
        assert c.get("t/a").num_rows == 100
        with pytest.raises(UnauthorizedError, match="put of dataset 't/x' needs the write role"):
            c.put("t/x", logs_table(3))
        with pytest.raises(UnauthorizedError, match="action 'sql' needs the write role"):
            c.sql('SELECT * FROM "t/a"', into="t/y")
        assert c.sql('SELECT count(*) AS n FROM "t/a"').to_pylist() == [{"n": 100}]
    assert isinstance(UnauthenticatedError("x"), PermissionError)


def test_token_from_the_environment_and_pickling(secured: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    """FLIGHTCACHE_TOKEN is the default token; a pickled client (a Spark worker's) keeps its credentials."""
    monkeypatch.setenv("FLIGHTCACHE_TOKEN", WRITE_TOKEN)
    c = flightcache.connect(secured.uri)
    c.put("t/env", logs_table(3))
    monkeypatch.delenv("FLIGHTCACHE_TOKEN")
    clone = pickle.loads(pickle.dumps(c))
    assert clone.get("t/env").num_rows == 3 and "token" not in repr(clone)
    assert clone.flight.do_get(flight.Ticket(secured.ticket)).read_all().num_rows == 100  # the raw client too


# -- basic auth --------------------------------------------------------------------------------------


def test_basic_auth_handshake_gives_a_session_token(secured: Secured) -> None:
    """The standard Flight handshake: Basic credentials in, a bearer session token out, used on later calls."""
    fc = flight.connect(secured.uri)
    header, value = fc.authenticate_basic_token("bob", "bob:password")
    assert header == b"authorization" and value.startswith(b"Bearer ")
    session = flight.FlightCallOptions(headers=[(header, value)])
    assert {i.descriptor.path[0] for i in fc.list_flights(b"", session)} >= {b"t/a", b"t/b"}
    list(fc.do_action(flight.Action("drop", b"t/b"), session))  # bob may write
    header, value = fc.authenticate_basic_token("alice", "alice-password")
    with pytest.raises(flight.FlightUnauthorizedError):
        list(fc.do_action(flight.Action("drop", b"t/a"), flight.FlightCallOptions(headers=[(header, value)])))
    for user, password in (("alice", "bob:password"), ("nobody", "alice-password"), ("alice", "")):
        with pytest.raises(flight.FlightUnauthenticatedError, match="wrong user or password"):
            fc.authenticate_basic_token(user, password)


def test_basic_auth_in_the_python_client(secured: Secured) -> None:
    with flightcache.connect(secured.uri, username="bob", password="bob:password") as c:
        c.put("t/bob", logs_table(3))
        assert pickle.loads(pickle.dumps(c)).get("t/bob").num_rows == 3  # a new connection handshakes again
    with pytest.raises(UnauthenticatedError, match="wrong user or password"):
        flightcache.connect(secured.uri, username="bob", password="nope").list()


def test_the_client_opens_an_ended_session_again() -> None:
    """A basic-auth client whose session expired handshakes again and retries once; credentials that no
    longer hold give the handshake's clear error."""
    now = [0.0]
    auth = Auth(users={"u": ("p", "write")}, session_seconds=10, clock=lambda: now[0])
    server = build_server(ServerConfig(credentials=auth, shm="off"))
    try:
        with flightcache.connect(f"grpc://127.0.0.1:{server.port}", username="u", password="p") as fc:
            fc.put("t", logs_table(3))
            now[0] = 11  # the session has expired
            assert fc.get("t").num_rows == 3 and [d["name"] for d in fc.list()] == ["t"]
            # A put that found its session gone must not resend what is left of a one-shot stream.
            table = logs_table(30_000)
            now[0] = 22
            fc.put("r", pa.RecordBatchReader.from_batches(table.schema, table.to_batches(max_chunksize=1000)))
            assert fc.get("r").equals(table)
            now[0] = 33
            fc.put("t", table)
            assert fc.get("t").equals(table)
            now[0] = 44
            assert sum(b.num_rows for b in fc.stream("t")) == 30_000
            auth._credentials = Credentials.parse(f"{WRITE_TOKEN}")  # the user left the file
            now[0] = 55
            with pytest.raises(UnauthenticatedError, match="wrong user or password"):
                fc.list()
    finally:
        server.shutdown()


def test_basic_auth_against_a_server_without_credentials(uri: str) -> None:
    with pytest.raises(NotImplementedByServerError, match="takes no credentials"):
        flightcache.connect(uri, username="bob", password="x").list()
    with pytest.raises(InvalidRequestError, match="give a password, and no token"):
        flightcache.connect(uri, username="bob", token=WRITE_TOKEN)


def test_sessions_end_when_the_user_leaves_the_file(secured: Secured, credentials: Path) -> None:
    fc = flight.connect(secured.uri)
    session = flight.FlightCallOptions(headers=[fc.authenticate_basic_token("alice", "alice-password")])
    fc.list_actions(session)
    credentials.write_text(f"{WRITE_TOKEN}\n")
    secured.server.auth.reload()  # type: ignore[union-attr]
    with pytest.raises(flight.FlightUnauthenticatedError, match="unknown or expired token"):
        fc.list_actions(session)


def test_sessions_expire() -> None:
    now = [0.0]
    auth = Auth(users={"u": ("p", "read")}, session_seconds=10, clock=lambda: now[0])
    session = auth.authenticate(basic("u", "p"), handshake=True).session
    assert session is not None and auth.authenticate(f"Bearer {session}").role == "read"
    now[0] = 11
    with pytest.raises(UnauthenticatedError):
        auth.authenticate(f"Bearer {session}")


def test_one_users_handshakes_do_not_end_anothers_sessions() -> None:
    """A user opening sessions in a loop ends only that user's oldest ones."""
    auth = Auth(users={"u": ("p", "read"), "v": ("q", "read")})
    kept = auth.authenticate(basic("v", "q"), handshake=True).session
    first = auth.authenticate(basic("u", "p"), handshake=True).session
    for _ in range(MAX_SESSIONS_PER_USER):
        latest = auth.authenticate(basic("u", "p"), handshake=True).session
    assert auth.authenticate(f"Bearer {kept}").user == "v"
    assert auth.authenticate(f"Bearer {latest}").user == "u"
    with pytest.raises(UnauthenticatedError):
        auth.authenticate(f"Bearer {first}")


def test_adbc_flight_sql_driver_with_basic_auth(secured: Secured) -> None:
    """What JDBC and ADBC Flight SQL clients do: username and password, then queries."""
    import adbc_driver_flightsql.dbapi as adbc

    kwargs = {"username": "alice", "password": "alice-password"}
    with adbc.connect(secured.uri, db_kwargs=kwargs, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute('SELECT count(*) AS n FROM "t/a"')
        assert cur.fetchall() == [(100,)]
    with (
        pytest.raises(adbc.Error, match=r"(?i)unauthenticated|wrong user"),
        adbc.connect(secured.uri, db_kwargs={**kwargs, "password": "x"}, autocommit=True) as conn,
        conn.cursor() as cur,
    ):
        cur.execute("SELECT 1")


def test_adbc_flight_sql_driver_with_a_bearer_token(secured: Secured) -> None:
    import adbc_driver_flightsql.dbapi as adbc

    kwargs = {"adbc.flight.sql.authorization_header": f"Bearer {READ_TOKEN}"}
    with adbc.connect(secured.uri, db_kwargs=kwargs, autocommit=True) as conn, conn.cursor() as cur:
        cur.execute('SELECT count(*) AS n FROM "t/b"')
        assert cur.fetchall() == [(10,)]


# -- the credentials file -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "holds no credentials"),
        ("# only a comment\n", "holds no credentials"),
        ("s3cret\n", "line 1: a token needs at least 16 characters"),
        (f"{WRITE_TOKEN} admin\n", "line 1: expected 'TOKEN"),
        (f"{WRITE_TOKEN} read extra\n", "line 1: expected 'TOKEN"),
        ("\n:s3cret read\n", "line 2: USER:PASSWORD needs both"),
        ("u:s3cret\nu:q\n", "line 2: user 'u' appears twice"),
    ],
)
def test_credentials_file_errors_name_the_line_not_the_secret(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as raised:
        Credentials.parse(text, "creds")
    assert "s3cret" not in str(raised.value) and "token-0123" not in str(raised.value)


def test_credentials_file_format() -> None:
    c = Credentials.parse(CREDENTIALS)
    assert c.tokens == ((WRITE_TOKEN.encode(), "write"), (READ_TOKEN.encode(), "read"))
    assert dict(c.users) == {"alice": (b"alice-password", "read"), "bob": (b"bob:password", "write")}


def test_reload_keeps_the_old_credentials_when_the_file_is_bad(credentials: Path) -> None:
    auth = Auth.from_file(credentials)
    credentials.write_text("too-short\n")
    with pytest.raises(ValueError, match="at least 16"):
        auth.reload()
    assert auth.authenticate(f"Bearer {WRITE_TOKEN}").role == "write"


def test_sighup_reloads_the_token_file(tmp_path: Path, credentials: Path) -> None:
    """flightcache serve re-reads --auth-token-file on SIGHUP; a bad file keeps the tokens in force."""
    log_file = tmp_path / "server.log"
    with log_file.open("w") as err:
        proc, uri = start_server("--storage", "none", "--auth-token-file", str(credentials), stderr=err)
    try:
        fc = flight.connect(uri)
        fc.list_actions(bearer(WRITE_TOKEN))
        new_token = "rotated-token-0123456789abcdef"
        credentials.write_text(f"{new_token} write\n")
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 30
        while True:
            try:
                fc.list_actions(bearer(WRITE_TOKEN))
            except flight.FlightUnauthenticatedError:
                break
            assert time.monotonic() < deadline, "the old token still works after SIGHUP"
            time.sleep(0.05)
        fc.list_actions(bearer(new_token))
        credentials.write_text("not a valid line at all\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "SIGHUP: keeping the previous credentials" in log_file.read_text(), "the bad file's SIGHUP")
        assert proc.poll() is None
        fc.list_actions(bearer(new_token))
    finally:
        assert stop_server(proc) == 0


# -- the command line -----------------------------------------------------------------------------


def test_cli_passes_the_token(tmp_path: Path, credentials: Path) -> None:
    """--token and $FLIGHTCACHE_TOKEN reach the server; without one the error is one clear line."""
    proc, uri = start_server("--storage", "none", "--auth-token-file", str(credentials))
    try:
        src = tmp_path / "in.parquet"
        pq.write_table(logs_table(30), src)
        r = run_cli("put", "t/cli", str(src), "--uri", uri, "--token", WRITE_TOKEN)
        assert r.returncode == 0, r.stderr
        r = run_cli("ls", "--uri", uri, env={"FLIGHTCACHE_TOKEN": READ_TOKEN})
        assert r.returncode == 0 and "t/cli" in r.stdout
        r = run_cli("drop", "t/cli", "--uri", uri, env={"FLIGHTCACHE_TOKEN": READ_TOKEN})
        assert r.returncode == 1 and "needs the write role" in r.stderr
        r = run_cli("ls", "--uri", uri, env={"FLIGHTCACHE_TOKEN": ""})
        assert r.returncode == 1 and "requires authentication" in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and WRITE_TOKEN not in r.stderr
    finally:
        assert stop_server(proc) == 0


def test_serve_refuses_to_start_with_a_bad_credentials_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("short\n")
    for path, message in ((bad, "line 1: a token needs at least 16"), (tmp_path / "missing", "No such file")):
        r = run_cli("serve", "--port", "0", "--storage", "none", "--auth-token-file", str(path))
        assert r.returncode == 1 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_serve_help_lists_the_security_flags() -> None:
    r = run_cli("serve", "--help")
    for flag in ("--auth-token-file", "--tls-cert", "--tls-key", "--max-put-bytes", "--max-datasets"):
        assert flag in r.stdout
    assert "--token" in run_cli("ls", "--help").stdout


# -- TLS ------------------------------------------------------------------------------------------


def self_signed(directory: Path, ips: tuple[str, ...] = ("127.0.0.1",)) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and ``ips``, and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flightcache test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), *(x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def test_tls_round_trip(tmp_path: Path) -> None:
    """grpc+tls with a self-signed certificate: the client that trusts its CA works, one that does not is told why."""
    cert, key = self_signed(tmp_path)
    server = build_server(
        ServerConfig(
            memory_limit=64 * 1024 * 1024,
            tls_cert=cert.read_bytes(),
            tls_key=key.read_bytes(),
            credentials=Auth({WRITE_TOKEN: "write"}),
        )
    )
    uri = f"grpc+tls://127.0.0.1:{server.port}"
    try:
        with flightcache.connect(uri, token=WRITE_TOKEN, tls_ca=cert) as c:
            c.put("t/tls", logs_table(500))
            assert c.get("t/tls").equals(logs_table(500))
        with flightcache.connect(uri, token=WRITE_TOKEN, tls_ca=cert.read_text(), timeout=10) as c:
            assert pickle.loads(pickle.dumps(c)).info("t/tls")["rows"] == 500
        with (
            flightcache.connect(uri, token=WRITE_TOKEN, timeout=10) as c,
            pytest.raises(ServerUnavailableError, match=r"TLS: the certificate .* is not trusted.*--tls-ca"),
        ):
            c.list()
        with (
            flightcache.connect(uri.replace("grpc+tls", "grpc"), token=WRITE_TOKEN, timeout=10) as c,
            pytest.raises(ServerUnavailableError),
        ):
            c.list()
    finally:
        server.shutdown()


def test_cli_serves_tls(tmp_path: Path, credentials: Path) -> None:
    """serve --tls-cert/--tls-key answers on grpc+tls://; the client commands take --tls-ca or $FLIGHTCACHE_TLS_CA."""
    cert, key = self_signed(tmp_path)
    proc, uri = start_server(
        "--storage", "none", "--tls-cert", str(cert), "--tls-key", str(key), "--auth-token-file", str(credentials)
    )
    try:
        assert uri.startswith("grpc+tls://")
        r = run_cli("ls", "--uri", uri, "--token", READ_TOKEN, "--tls-ca", str(cert))
        assert r.returncode == 0, r.stderr
        r = run_cli("stats", "--uri", uri, env={"FLIGHTCACHE_TOKEN": READ_TOKEN, "FLIGHTCACHE_TLS_CA": str(cert)})
        assert r.returncode == 0, r.stderr
        r = run_cli("ls", "--uri", uri, "--token", READ_TOKEN, env={"FLIGHTCACHE_TLS_CA": ""})
        assert r.returncode == 1 and "not trusted" in r.stderr
    finally:
        assert stop_server(proc) == 0
    r = run_cli("serve", "--port", "0", "--tls-cert", str(cert))
    assert r.returncode == 1 and "both --tls-cert and --tls-key" in r.stderr


# -- limits ---------------------------------------------------------------------------------------


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[FlightcacheServer, flightcache.Client]]:
    server = build_server(
        ServerConfig(
            memory_limit=256 * 1024 * 1024,
            storage=str(tmp_path / "storage"),
            limits=Limits(max_put_bytes=1024 * 1024, max_datasets=3, max_action_bytes=4096),
        )
    )
    with flightcache.connect(f"grpc://127.0.0.1:{server.port}") as c:
        yield server, c
    server.shutdown()


def test_a_put_over_the_limit_publishes_nothing(limited: tuple[FlightcacheServer, flightcache.Client]) -> None:
    _, c = limited
    c.put("small", logs_table(100))
    with pytest.raises(LimitExceededError, match=r"limit for one put \(flightcache serve --max-put-bytes\)"):
        c.put("small", logs_table(100_000))
    assert c.info("small")["version"] == 1 and c.info("small")["rows"] == 100
    with pytest.raises(LimitExceededError):
        c.put("big", logs_table(100_000))
    assert [d["name"] for d in c.list()] == ["small"]
    stats = c.stats()
    assert stats["memory_staged"] == 0 and stats["puts_aborted"] == 2
    assert stats["memory_used"] == c.info("small")["bytes"]


def test_the_dataset_count_is_bounded(limited: tuple[FlightcacheServer, flightcache.Client], tmp_path: Path) -> None:
    """Puts, SQL into, loads and commits of new names stop at --max-datasets; existing names still change."""
    _, c = limited
    for name in ("a", "b"):
        c.put(name, logs_table(10))
    c.put("d", logs_table(10), txn="t1")  # staged while there is room
    c.put("c", logs_table(10))
    external = tmp_path / "x.parquet"
    pq.write_table(logs_table(10), external)
    with pytest.raises(LimitExceededError, match=r"at most 3 datasets \(flightcache serve --max-datasets\)"):
        c.put("d", logs_table(10))
    with pytest.raises(LimitExceededError):
        c.put("d", logs_table(10), txn="t2")
    with pytest.raises(LimitExceededError):
        c.sql('SELECT * FROM "a"', into="d")
    with pytest.raises(LimitExceededError):
        c.load("d", str(external))
    with pytest.raises(LimitExceededError):
        c.commit("t1", "d")
    c.put("a", logs_table(20))
    c.sql('SELECT * FROM "b"', into="c")
    assert sorted(d["name"] for d in c.list()) == ["a", "b", "c"]
    c.drop("a")
    c.put("d", logs_table(10))


def test_action_bodies_are_bounded(limited: tuple[FlightcacheServer, flightcache.Client]) -> None:
    _, c = limited
    with pytest.raises(LimitExceededError, match=r"action 'sql' .* \(flightcache serve --max-action-bytes\)"):
        c.sql("SELECT '" + "x" * 5000 + "'", into="s")
    fc = flight.connect(f"grpc://127.0.0.1:{limited[0].port}")
    with pytest.raises(flight.FlightServerError, match="action 'anything'"):
        list(fc.do_action(flight.Action("anything", b"x" * 5000)))
    with pytest.raises(flight.FlightServerError, match="LIMIT_EXCEEDED"):
        list(fc.do_action(flight.Action("drop", b"x" * 5000)))


def test_limits_from_the_command_line(tmp_path: Path) -> None:
    proc, uri = start_server("--storage", "none", "--max-put-bytes", "64KiB", "--max-datasets", "1")
    try:
        with flightcache.connect(uri) as c:
            with pytest.raises(LimitExceededError, match=r"64\.0 KiB"):
                c.put("a", logs_table(10_000))
            c.put("a", logs_table(10))
            with pytest.raises(LimitExceededError, match="at most 1 datasets"):
                c.put("b", logs_table(10))
    finally:
        stop_server(proc)


# -- names ----------------------------------------------------------------------------------------

HOSTILE_NAMES = [
    "../escape",
    "a/../../escape",
    "..",
    "/etc/passwd",
    "a//b",
    "a\\..\\b",
    "C:\\windows",
    "a\x00b",
    "a\nb",
    "ümlaut",
    "a/b\u202e",
    "~/x",
    "a/./b",
    ".hidden",
    "",
    "x" * 201,
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_hostile_names_are_refused_everywhere(tmp_path: Path, name: str) -> None:
    """A plain Flight client sending a name outside the grammar gets INVALID_NAME from every entry point,
    and nothing is written anywhere."""
    storage = tmp_path / "storage"
    server = build_server(ServerConfig(storage=str(storage), persist="sync"))
    external = tmp_path / "x.parquet"
    pq.write_table(logs_table(5), external)
    fc = flight.connect(f"grpc://127.0.0.1:{server.port}")
    table = logs_table(5)
    try:
        attempts: list[Callable[[], object]] = []
        raw = name.encode("utf-8", "surrogatepass")

        def put() -> None:
            writer, results = fc.do_put(flight.FlightDescriptor.for_path(raw), table.schema)
            writer.write_table(table)
            writer.done_writing()
            results.read()
            writer.close()

        attempts.append(put)
        attempts.append(lambda: fc.get_flight_info(flight.FlightDescriptor.for_path(raw)))
        attempts.append(
            lambda: fc.get_flight_info(flight.FlightDescriptor.for_command(json.dumps({"name": name}).encode()))
        )
        for kind in ("drop", "info", "pin", "unpin", "evict", "persist"):
            attempts.append(lambda k=kind: list(fc.do_action(flight.Action(k, json.dumps({"name": name}).encode()))))
        for kind in ("drop", "info", "pin", "unpin", "evict"):
            if raw and raw[:1] != b"{":
                attempts.append(lambda k=kind: list(fc.do_action(flight.Action(k, raw))))
        bodies = {
            "load": {"name": name, "uri": str(external)},
            "commit": {"txn": "t", "name": name, "schema": encode_schema(table.schema)},
            "sql": {"query": "SELECT 1 AS x", "into": name},
        }
        for kind, body in bodies.items():
            attempts.append(lambda k=kind, b=body: list(fc.do_action(flight.Action(k, json.dumps(b).encode()))))
        for attempt in attempts:
            with pytest.raises(flight.FlightServerError) as raised:
                attempt()
            assert json.loads(raised.value.extra_info)["code"] in ("INVALID_NAME", "INVALID_REQUEST"), raised.value
            assert "INVALID_NAME" in str(raised.value) or not name
        assert server.store.list() == []
        assert sorted(p.name for p in tmp_path.iterdir()) == ["x.parquet"] + (["storage"] if storage.exists() else [])
        assert not storage.exists() or not any(storage.iterdir())
    finally:
        server.shutdown()


@pytest.mark.parametrize("name", ["../escape", "/abs", "a\\b", "a\x00b", "é"], ids=repr)
def test_storage_never_leaves_its_root(tmp_path: Path, name: str) -> None:
    """Storage checks names itself, and recovery ignores a manifest that names a path outside its directory."""
    root = tmp_path / "root"
    storage = Storage(str(root))
    table = logs_table(5)
    for attempt in (
        lambda: storage.write_version(name, 1, table.schema, table.to_batches()),
        lambda: storage.delete(name),
        lambda: storage.manifest(name),
    ):
        with pytest.raises(InvalidNameError):
            attempt()
    victim = tmp_path / "escape" / "v1"
    victim.mkdir(parents=True)
    manifest = storage.write_version("good", 1, table.schema, table.to_batches())
    forged = json.loads(manifest.to_json())
    for bad in (
        {"name": name},
        {"name": "../escape"},
        {"name": "other"},
        {"files": [{**forged["files"][0], "path": "../../x"}]},
    ):
        (root / "forged" / "v1").mkdir(parents=True, exist_ok=True)
        (root / "forged" / "v1" / "manifest.json").write_text(json.dumps({**forged, **bad}))
        assert [m.name for m in storage.catalog()] == ["good"]
    server = build_server(ServerConfig(storage=str(root)))
    try:
        assert [i.name for i in server.store.list()] == ["good"]
        assert victim.exists()
    finally:
        server.shutdown()


# -- Spark ----------------------------------------------------------------------------------------


@pytest.mark.spark
def test_spark_reads_and_writes_with_a_token(spark: object, secured: Secured) -> None:
    """The token option reaches the driver's planning and every worker; a read token cannot write."""
    from pyspark.sql import SparkSession

    assert isinstance(spark, SparkSession)
    df = spark.read.format("flightcache").option("uri", secured.uri).option("token", READ_TOKEN).load("t/a")
    assert df.count() == 100
    (
        df.where("status >= 500")
        .write.format("flightcache")
        .option("uri", secured.uri)
        .option("token", WRITE_TOKEN)
        .mode("overwrite")
        .save("t/errors")
    )
    expected = sum(1 for s in logs_table(100)["status"].to_pylist() if s >= 500)
    assert secured.server.store.info("t/errors").num_rows == expected
    with pytest.raises(Exception, match="needs the write role"):
        df.write.format("flightcache").option("uri", secured.uri).option("token", READ_TOKEN).mode("append").save("t/x")
    with pytest.raises(Exception, match="requires authentication"):
        spark.read.format("flightcache").option("uri", secured.uri).load("t/a").count()
    assert "t/x" not in {i.name for i in secured.server.store.list()}


def test_spark_options_keep_the_token_out_of_reprs() -> None:
    pytest.importorskip("pyspark")
    from flightcache.integrations.spark import _Options

    o = _Options.parse({"path": "t/a", "uri": "grpc://h:1", "token": WRITE_TOKEN})
    assert o.client().token == WRITE_TOKEN and WRITE_TOKEN not in repr(o)
