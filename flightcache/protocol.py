"""Everything that crosses the wire, shared by server and client.

Datasets are ``FlightDescriptor.for_path(name)``. Requests that need more than a name travel as
small JSON objects with a version field ``"v": 1``:

* a read command, ``FlightDescriptor.for_command(ReadRequest(...).to_bytes())``, asks
  ``get_flight_info`` for a projected / filtered / pinned-version read;
* a ticket (``Ticket``) names one endpoint: a dataset version and a range of its batches;
* put options (``PutOptions``) travel either as a command descriptor
  (``{"v": 1, "name": ..., "mode": ...}``) or as the ``app_metadata`` of the first message of a
  ``do_put`` stream on a path descriptor;
* action bodies are JSON objects (``{"name": "..."}``) or, for one-name actions, the bare name;
  every action is declared once in ``ACTIONS``: name, request, response, role, and who answers it.

Every decoder treats its bytes as hostile: size-limited, strict JSON, known keys and types only.
Errors travel as Flight error classes whose ``extra_info`` is ``{"code": ...}`` (see ``errors``).
"""

from __future__ import annotations

import base64
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, cast

import pyarrow as pa
import pyarrow.flight as flight

from .errors import (
    ERRORS_BY_CODE,
    FlightcacheError,
    InvalidRequestError,
    ServerUnavailableError,
    UnauthenticatedError,
    UnauthorizedError,
)
from .names import validate_name

WIRE_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024

def _decode(raw: bytes, what: str) -> dict[str, Any]:
    if len(raw) > MAX_REQUEST_BYTES:
        raise InvalidRequestError(f"{what} is {len(raw)} bytes, more than the {MAX_REQUEST_BYTES} allowed")
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidRequestError(f"{what} is not valid UTF-8 JSON ({e}); see the README's wire protocol") from e
    if not isinstance(obj, dict):
        raise InvalidRequestError(f"{what} must be a JSON object, got {type(obj).__name__}")
    v = obj.pop("v", WIRE_VERSION)
    if v != WIRE_VERSION:
        raise InvalidRequestError(f"{what} has wire version {v!r}; this server speaks version {WIRE_VERSION}")
    return obj


class _Message:
    """Strict JSON (de)serialisation for the frozen dataclasses below."""

    _types: ClassVar[dict[str, tuple[type, ...]]] = {}
    _what: ClassVar[str] = "message"

    def to_bytes(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if v is not None}  # type: ignore[call-overload]
        return json.dumps({"v": WIRE_VERSION, **body}, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> Any:
        obj = _decode(raw, cls._what)
        defaults = {f.name: f.default for f in fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(obj) - set(defaults))
        if unknown:
            raise InvalidRequestError(f"{cls._what} has unknown field(s) {unknown}; known: {sorted(defaults)}")
        for key, value in obj.items():
            if value is None and defaults[key] is not None:  # only optional fields may be null
                raise InvalidRequestError(f"{cls._what} field {key!r} must not be null")
            if value is not None and not _has_type(value, cls._types[key]):
                raise InvalidRequestError(f"{cls._what} field {key!r} has the wrong type: {value!r}")
        for key in ("columns", "parts"):
            if not all(isinstance(c, str) for c in obj.get(key) or []):
                raise InvalidRequestError(f"{cls._what} field {key!r} must be a list of strings")
        if obj.get("name") is not None:
            validate_name(obj["name"])
        try:
            return cls(**obj)
        except TypeError as e:  # a required field is missing
            raise InvalidRequestError(f"{cls._what} is incomplete: {e}") from e


def _has_type(value: object, types: tuple[type, ...]) -> bool:
    if isinstance(value, bool):  # JSON true is not an int here
        return bool in types
    return isinstance(value, types)


@dataclass(frozen=True)
class ReadRequest(_Message):
    """A read of a dataset: optional projection, filter (string form or Substrait) and version, and at
    least how many endpoints to split it into (as far as its batches allow), for readers that want
    more partitions than its size gives, such as Spark with more cores than the data has 128 MiB."""

    name: str
    columns: list[str] | None = None
    filter: str | None = None
    filter_substrait: str | None = None  # base64 of a Substrait ExtendedExpression
    version: int | None = None
    endpoints: int | None = None

    _types = {
        "name": (str,),
        "columns": (list,),
        "filter": (str,),
        "filter_substrait": (str,),
        "version": (int,),
        "endpoints": (int,),
    }
    _what = "read request"

    def substrait_bytes(self) -> bytes | None:
        if self.filter_substrait is None:
            return None
        try:
            return base64.b64decode(self.filter_substrait, validate=True)
        except ValueError as e:
            raise InvalidRequestError(f"filter_substrait of {self.name!r} is not valid base64") from e


@dataclass(frozen=True)
class Ticket(_Message):
    """One endpoint: batches [start, end) of one version of a dataset, with the read's options."""

    name: str
    version: int
    start: int
    end: int
    columns: list[str] | None = None
    filter: str | None = None
    filter_substrait: str | None = None
    part: str | None = None  # cluster mode: the part of the version the range is in, and the node that holds it
    node: str | None = None

    _types = {
        "name": (str,),
        "version": (int,),
        "start": (int,),
        "end": (int,),
        "columns": (list,),
        "filter": (str,),
        "filter_substrait": (str,),
        "part": (str,),
        "node": (str,),
    }
    _what = "ticket"

    def read_request(self) -> ReadRequest:
        return ReadRequest(self.name, self.columns, self.filter, self.filter_substrait, self.version)


@dataclass(frozen=True)
class PutOptions(_Message):
    """How a put publishes: mode, and the row count the client promises (checked if given)."""

    name: str | None = None
    mode: str = "overwrite"
    expect_rows: int | None = None
    txn: str | None = None  # stage as a part of this transaction instead of publishing
    persist: str | None = None  # none, sync or async; default: the server's --persist
    ttl: float | None = None  # seconds in memory before it is evicted (or dropped if memory-only)
    trailer: bool = False  # the stream ends with an EndOfStream message; without it nothing publishes

    _types = {
        "name": (str,),
        "mode": (str,),
        "expect_rows": (int,),
        "txn": (str,),
        "persist": (str,),
        "ttl": (int, float),
        "trailer": (bool,),
    }
    _what = "put options"


@dataclass(frozen=True)
class EndOfStream(_Message):
    """The last message of a put with ``trailer``: the client finished, having sent ``rows`` rows.

    A client whose data source fails mid-stream closes the stream without it, and the server
    publishes nothing (a closed stream alone cannot tell a finished put from a failed one).
    """

    end: bool
    rows: int

    _types = {"end": (bool,), "rows": (int,)}
    _what = "end-of-stream message"


@dataclass(frozen=True)
class CommitRequest(_Message):
    """Publish the staged parts of a transaction (all, or those listed) as one new version."""

    txn: str
    name: str
    mode: str = "overwrite"
    parts: list[str] | None = None
    schema: str | None = None  # base64 Arrow IPC schema, for a transaction with no parts
    persist: str | None = None
    ttl: float | None = None

    _types = {
        "txn": (str,),
        "name": (str,),
        "mode": (str,),
        "parts": (list,),
        "schema": (str,),
        "persist": (str,),
        "ttl": (int, float),
    }
    _what = "commit request"

    def arrow_schema(self) -> pa.Schema | None:
        if self.schema is None:
            return None
        try:
            return decode_schema(self.schema)
        except (ValueError, pa.ArrowException) as e:
            raise InvalidRequestError(f"commit of dataset {self.name!r}: 'schema' is not a base64 Arrow schema") from e


@dataclass(frozen=True)
class LoadRequest(_Message):
    """Load external Parquet (a file or a directory, hive partitions too) or an Iceberg table as a dataset;
    ``refresh``: manual, on-read or a period in seconds (see ``flightcache.server.sources``)."""

    name: str
    uri: str
    mode: str = "overwrite"
    persist: str | None = None
    ttl: float | None = None
    refresh: str | float | None = None
    refresh_min_interval: float | None = None

    _types = {
        "name": (str,),
        "uri": (str,),
        "mode": (str,),
        "persist": (str,),
        "ttl": (int, float),
        "refresh": (str, int, float),
        "refresh_min_interval": (int, float),
    }
    _what = "load request"


@dataclass(frozen=True)
class PersistRequest(_Message):
    """Persist a dataset's current version now; with ``wait``, answer once it has committed."""

    name: str
    wait: bool = True

    _types = {"name": (str,), "wait": (bool,)}
    _what = "persist request"


@dataclass(frozen=True)
class ShmRequest(_Message):
    """Ask where a version's batches are in shared memory (``flightcache.shm``)."""

    name: str
    version: int | None = None

    _types = {"name": (str,), "version": (int,)}
    _what = "shm request"


@dataclass(frozen=True)
class AbortRequest(_Message):
    """Discard the staged parts of a transaction."""

    txn: str

    _types = {"txn": (str,)}
    _what = "abort request"


@dataclass(frozen=True)
class AdoptRequest(_Message):
    """The ``adopt`` action: without ``path``, ask for a file to write; with it, hand the written file over."""

    name: str
    path: str | None = None
    nbytes: int | None = None  # the size the client is about to write (checked before it writes)
    rows: int | None = None  # the rows the client wrote (checked)
    mode: str = "overwrite"
    txn: str | None = None
    persist: str | None = None
    ttl: float | None = None

    _types = {
        "name": (str,),
        "path": (str,),
        "nbytes": (int,),
        "rows": (int,),
        "mode": (str,),
        "txn": (str,),
        "persist": (str,),
        "ttl": (int, float),
    }
    _what = "adopt request"


@dataclass(frozen=True)
class NameRequest(_Message):
    """The body of a one-dataset action: ``{"name": NAME}``, or the bare UTF-8 name."""

    name: str

    _types = {"name": (str,)}
    _what = "action body"

    @classmethod
    def from_bytes(cls, raw: bytes) -> NameRequest:
        if raw[:1] == b"{":
            return super().from_bytes(raw)  # type: ignore[no-any-return]
        if len(raw) > MAX_REQUEST_BYTES:
            raise InvalidRequestError(f"{cls._what} is too large")
        try:
            return cls(validate_name(raw.decode("utf-8")))
        except UnicodeDecodeError as e:
            raise InvalidRequestError(f"{cls._what} is neither JSON nor a UTF-8 dataset name") from e


# -- the actions ---------------------------------------------------------------------------------

READ, WRITE = "read", "write"  # the role a call's credentials need (see flightcache.server.auth)
CORE, SQL = "core", "sql"  # who answers: the dataset handlers, or the SQL service
HEALTHCHECK = "healthcheck"  # the one action a draining server still answers


@dataclass(frozen=True)
class Action:
    """One action of the protocol: its name, request and response, the role it needs, who answers it.

    ``request`` is the message class its body decodes to (None: an empty body); the SQL service's
    actions carry Flight SQL protobuf messages or ``flightsql.SqlRequest``, decoded there. ``response``
    says what each result body holds; ``streams``: several results (progress, then the answer).
    """

    name: str
    doc: str
    request: type[_Message] | None
    response: str
    role: str = READ
    service: str = CORE
    streams: bool = False

    def describe(self) -> str:
        """The description ``list_actions`` gives: what it does, the body, the answer, the role."""
        body = "empty" if self.request is None and self.service == CORE else self.body_doc()
        return f"{self.doc} Body: {body}. Answer: {self.response}. Role: {self.role}."

    def body_doc(self) -> str:
        return _BODIES.get(self.name, self.request.__name__ if self.request is not None else "empty")

    def decode(self, body: bytes) -> Any:
        """The request message of a call's body (the SQL service decodes its own)."""
        if self.request is None:
            if body:
                raise InvalidRequestError(f"action {self.name!r} takes an empty body, got {len(body)} bytes")
            return None
        return self.request.from_bytes(body)


_NAME_BODY = '{"name": NAME} or the bare name'
_BODIES = {
    "drop": _NAME_BODY,
    "info": _NAME_BODY,
    "pin": _NAME_BODY,
    "unpin": _NAME_BODY,
    "evict": _NAME_BODY,
    "commit": '{"txn": ID, "name": NAME, "mode": MODE, "parts": [PART, ...] (default all), "schema": B64, '
    '"persist": MODE, "ttl": SECONDS}',
    "abort": '{"txn": ID}',
    "load": '{"name": NAME, "uri": URI, "mode": MODE, "persist": none|sync|async, "ttl": SECONDS, '
    '"refresh": manual|on-read|SECONDS, "refresh_min_interval": SECONDS}',
    "refresh": _NAME_BODY,
    "persist": '{"name": NAME, "wait": true}',
    "shm": '{"name": NAME, "version": N (default: the current one)}',
    "adopt": '{"name": NAME, "nbytes": BYTES} or {"name": NAME, "path": PATH, "rows": ROWS, "mode": MODE, '
    '"txn": ID, "persist": MODE, "ttl": SECONDS}',
    "sql": '{"query": SQL, "into": NAME, "params": [...], "mode": MODE, "persist": none|sync|async, '
    '"ttl": SECONDS, "timeout": SECONDS}',
    "CreatePreparedStatement": "ActionCreatePreparedStatementRequest (Flight SQL)",
    "ClosePreparedStatement": "ActionClosePreparedStatementRequest (Flight SQL)",
    "CancelFlightInfo": "CancelFlightInfoRequest (Flight)",
    "CancelQuery": "ActionCancelQueryRequest (Flight SQL)",
}
_SUMMARY = '{"name", "version", "rows", "bytes"}'
_INFO = (
    "the dataset's info: name, state, version, rows, bytes, schema, times, pins, TTL, persist_error, "
    "source (a loaded dataset's URI, refresh policy, last check, staleness)"
)

ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action("drop", "Drop a dataset and free its memory.", NameRequest, '{"name", "version", "bytes"}', WRITE),
        Action("info", "Describe a dataset.", NameRequest, _INFO),
        Action("list", "List every dataset with its info.", None, "a list of infos"),
        Action("stats", "Server figures: memory, datasets, counters, requests.", None, "an object of figures"),
        Action("nodes", "The members of the cluster (one, for a single server), with memory and load.", None,
               'a list of {"id", "name", "location", "host", "memory_used", "memory_limit", "datasets", "load", '
               '"in_flight", "state", "started", "self"}'),
        Action(
            HEALTHCHECK,
            "Health for orchestrators; answered while draining.",
            None,
            '{"status": ok|draining, "version", "uptime_s", "memory_used", "memory_limit", "datasets", ...}',
        ),
        Action("commit", "Publish the parts staged by do_put under a transaction as one version.",
               CommitRequest, _SUMMARY, WRITE),
        Action("abort", "Discard the parts staged under a transaction.", AbortRequest,
               '{"txn", "parts_discarded"}', WRITE),
        Action("load", "Load external Parquet (file or directory, hive partitions) as a dataset.", LoadRequest,
               '{"progress": {"files_done", "files"}} results, then ' + _SUMMARY, WRITE, streams=True),
        Action("refresh", "Check a loaded dataset's source now; append new files or reload what changed.",
               NameRequest, '{"name", "refreshed": none|incremental|full, "version", "files_added", "bytes_read"}',
               WRITE),
        Action("persist", "Persist a dataset now.", PersistRequest,
               '{"name", "version", "state", "persist_error"}', WRITE),
        Action("pin", "Keep a dataset in memory: never evicted.", NameRequest, _INFO, WRITE),
        Action("unpin", "Let a pinned dataset be evicted again.", NameRequest, _INFO, WRITE),
        Action("evict", "Free the memory of a persisted dataset (it stays in storage).", NameRequest,
               '{"name", "version", "bytes"}', WRITE),
        Action("shm", "Where a version's batches are in shared memory, for a client on the same host.", ShmRequest,
               '{"name", "version", "rows", "batches", "schema", "files": [{"path", "nonce"}] or null}'),
        Action(
            "adopt",
            "A same-host put: without a path, answers a file to write in the server's shared memory and its nonce; "
            "with the written path, publishes that Arrow IPC file (see flightcache.server.adopt).",
            AdoptRequest,
            '{"path", "nonce"} for a file to write, then ' + _SUMMARY + " (or a staged part's)",
            WRITE,
        ),
        Action("sql", "Run a query and store its result as a dataset.", None, _SUMMARY, WRITE, SQL),
        Action("CreatePreparedStatement", "Flight SQL: prepare a query.", None,
               "ActionCreatePreparedStatementResult", READ, SQL),
        Action("ClosePreparedStatement", "Flight SQL: close a prepared statement.", None, "empty", READ, SQL),
        Action("CancelFlightInfo", "Cancel the running query behind a FlightInfo.", None,
               "CancelFlightInfoResult", READ, SQL),
        Action("CancelQuery", "Flight SQL (deprecated): cancel the running query behind a FlightInfo.", None,
               "ActionCancelQueryResult", READ, SQL),
    )
}
WRITE_ACTIONS = frozenset(name for name, a in ACTIONS.items() if a.role == WRITE)




def encode_schema(schema: pa.Schema) -> str:
    """A schema on the wire and in manifests: base64 of its Arrow IPC serialization."""
    return base64.b64encode(schema.serialize().to_pybytes()).decode()


def decode_schema(text: str) -> pa.Schema:
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text, validate=True)))


def descriptor_name(descriptor: flight.FlightDescriptor) -> tuple[str, bytes | None]:
    """(name, command) of a descriptor: a one-element path, or a JSON command carrying a name."""
    if descriptor.descriptor_type == flight.DescriptorType.PATH:
        path = descriptor.path or []
        if len(path) != 1:
            raise InvalidRequestError(
                f"a dataset descriptor has exactly one path element (the dataset name, e.g. "
                f"FlightDescriptor.for_path('logs/raw')), got {len(path)}"
            )
        try:
            return validate_name(path[0].decode("utf-8")), None
        except UnicodeDecodeError as e:
            raise InvalidRequestError("the dataset name in the descriptor is not UTF-8") from e
    command = descriptor.command or b""
    obj = _decode(command, "descriptor command")
    name = obj.get("name")
    if not isinstance(name, str):
        raise InvalidRequestError('a command descriptor must be a JSON object with a "name" string')
    return validate_name(name), command


# -- errors -------------------------------------------------------------------------------------

_FLIGHT_CLASS: dict[str, type[flight.FlightError]] = {
    "UNAVAILABLE": flight.FlightUnavailableError,
    "PUT_ABORTED": flight.FlightCancelledError,
    "INTERNAL": flight.FlightInternalError,
    "UNAUTHENTICATED": flight.FlightUnauthenticatedError,
    "UNAUTHORIZED": flight.FlightUnauthorizedError,
}


def error_to_flight(exc: FlightcacheError) -> flight.FlightError:
    """The Flight error a client receives for ``exc``: clean message, stable code in extra_info."""
    cls = _FLIGHT_CLASS.get(exc.code, flight.FlightServerError)
    return cls(f"[{exc.code}] {exc}", extra_info=json.dumps({"code": exc.code}).encode())


def error_from_flight(exc: flight.FlightError, uri: str = "") -> Exception:
    """Map a Flight error back to the flightcache exception the server raised, where there is one."""
    code = None
    extra = getattr(exc, "extra_info", None)
    if extra:
        try:
            code = json.loads(extra).get("code")
        except (ValueError, AttributeError):
            code = None
    message = clean_message(str(exc))
    if code in ERRORS_BY_CODE:
        prefix = f"[{code}] "
        return ERRORS_BY_CODE[code](message[len(prefix) :] if message.startswith(prefix) else message)
    if isinstance(exc, flight.FlightUnauthenticatedError):  # refused by a proxy or another Flight server
        return UnauthenticatedError(f"{message}; give a token (token=, --token or $FLIGHTCACHE_TOKEN)")
    if isinstance(exc, flight.FlightUnauthorizedError):
        return UnauthorizedError(message)
    if isinstance(exc, flight.FlightUnavailableError) and "certificate verify failed" in message:
        return ServerUnavailableError(
            f"TLS: the certificate of the flightcache server at {uri or 'the given URI'} is not trusted "
            f"({message}); give the CA that signed it (tls_ca=, --tls-ca or $FLIGHTCACHE_TLS_CA)"
        )
    if isinstance(exc, flight.FlightUnavailableError):
        return ServerUnavailableError(
            f"cannot reach the flightcache server at {uri or 'the given URI'} ({message}); "
            "is it running? start one with 'flightcache serve'"
        )
    return cast(Exception, exc)  # a FlightError (pyarrow has no types: mypy sees Any)


def clean_message(message: str) -> str:
    """Drop the transport's suffixes ('. Detail: Failed', gRPC client context) from a message."""
    for marker in (". Detail: ", ". gRPC client debug context: ", ". Client context: "):
        cut = message.find(marker)
        if cut != -1:
            message = message[:cut]
    return message
