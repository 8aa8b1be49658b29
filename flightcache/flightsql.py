"""SQL on the wire: the Flight SQL messages, flightcache's own ``sql`` command, and the client's result reader.

Flight SQL requests are serialized ``google.protobuf.Any`` messages whose type URL names a message of the
package ``arrow.flight.protocol.sql``. The messages this server reads or writes are declared below, from a
compact table of field names, numbers and types taken from the public ``FlightSql.proto``, into a
descriptor pool of their own (so they never collide with another library's generated classes in the
default pool); the well-kept ``protobuf`` package makes the classes. Enum fields are declared as
``int32``, which is the same varint on the wire. Requests of that package that are not declared here
are recognised by their type URL and answered "not implemented".

flightcache's own command (``SqlRequest``) is strict JSON behind a prefix, so neither it nor a Flight SQL
``Any`` can be mistaken for the server's JSON descriptors and tickets, which start with ``{``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.flight as flight

if TYPE_CHECKING:
    from google.protobuf.message import Message

from .errors import InvalidRequestError, SqlError
from .protocol import error_from_flight

PACKAGE = "arrow.flight.protocol.sql"
TYPE_URL_PREFIX = f"type.googleapis.com/{PACKAGE}."
MAX_QUERY_BYTES = 1024 * 1024

# Flight SQL messages: name -> [(field, number, type, "" | "optional" | "repeated")].
_SQL_MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "CommandGetSqlInfo": [("info", 1, "uint32", "repeated")],
    "CommandGetCatalogs": [],
    "CommandGetDbSchemas": [
        ("catalog", 1, "string", "optional"),
        ("db_schema_filter_pattern", 2, "string", "optional"),
    ],
    "CommandGetTables": [
        ("catalog", 1, "string", "optional"),
        ("db_schema_filter_pattern", 2, "string", "optional"),
        ("table_name_filter_pattern", 3, "string", "optional"),
        ("table_types", 4, "string", "repeated"),
        ("include_schema", 5, "bool", ""),
    ],
    "CommandGetTableTypes": [],
    "CommandGetPrimaryKeys": [
        ("catalog", 1, "string", "optional"),
        ("db_schema", 2, "string", "optional"),
        ("table", 3, "string", ""),
    ],
    "CommandGetExportedKeys": [
        ("catalog", 1, "string", "optional"),
        ("db_schema", 2, "string", "optional"),
        ("table", 3, "string", ""),
    ],
    "CommandGetImportedKeys": [
        ("catalog", 1, "string", "optional"),
        ("db_schema", 2, "string", "optional"),
        ("table", 3, "string", ""),
    ],
    "CommandGetCrossReference": [
        ("pk_catalog", 1, "string", "optional"),
        ("pk_db_schema", 2, "string", "optional"),
        ("pk_table", 3, "string", ""),
        ("fk_catalog", 4, "string", "optional"),
        ("fk_db_schema", 5, "string", "optional"),
        ("fk_table", 6, "string", ""),
    ],
    "CommandStatementQuery": [("query", 1, "string", ""), ("transaction_id", 2, "bytes", "optional")],
    "CommandPreparedStatementQuery": [("prepared_statement_handle", 1, "bytes", "")],
    "TicketStatementQuery": [("statement_handle", 1, "bytes", "")],
    "ActionCreatePreparedStatementRequest": [("query", 1, "string", ""), ("transaction_id", 2, "bytes", "optional")],
    "ActionCreatePreparedStatementResult": [
        ("prepared_statement_handle", 1, "bytes", ""),
        ("dataset_schema", 2, "bytes", ""),
        ("parameter_schema", 3, "bytes", ""),
    ],
    "ActionClosePreparedStatementRequest": [("prepared_statement_handle", 1, "bytes", "")],
    "DoPutPreparedStatementResult": [("prepared_statement_handle", 1, "bytes", "optional")],
    "ActionCancelQueryRequest": [("info", 1, "bytes", "")],
    "ActionCancelQueryResult": [("result", 1, "int32", "")],
}
# Flight's own CancelFlightInfo action (Flight.proto); its FlightInfo field is read as bytes, alike on the wire.
_FLIGHT_MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "CancelFlightInfoRequest": [("info", 1, "bytes", "")],
    "CancelFlightInfoResult": [("status", 1, "int32", "")],
}

# Flight SQL actions: those served, and the rest of the protocol's (answered "not implemented").
UNSUPPORTED_ACTIONS = (
    "CreatePreparedSubstraitPlan",
    "BeginTransaction",
    "EndTransaction",
    "BeginSavepoint",
    "EndSavepoint",
    "RenewFlightEndpoint",
    "SetSessionOptions",
    "GetSessionOptions",
    "CloseSession",
)

# SqlInfo ids (FlightSql.proto, enum SqlInfo) and the dense union slot each value travels in.
SERVER_NAME, SERVER_VERSION, SERVER_ARROW_VERSION, SERVER_READ_ONLY, SERVER_SQL = 0, 1, 2, 3, 4
SERVER_SUBSTRAIT, SERVER_TRANSACTION, SERVER_CANCEL, SERVER_STATEMENT_TIMEOUT = 5, 8, 9, 100
SERVER_TRANSACTION_TIMEOUT = 101
SQL_DDL_CATALOG, SQL_DDL_SCHEMA, SQL_DDL_TABLE, SQL_IDENTIFIER_CASE = 500, 501, 502, 503
SQL_IDENTIFIER_QUOTE_CHAR, SQL_QUOTED_IDENTIFIER_CASE, SQL_ALL_TABLES_ARE_SELECTABLE = 504, 505, 506
SQL_NULL_ORDERING = 507
CASE_INSENSITIVE, NULLS_SORTED_AT_END, TRANSACTION_NONE = 1, 3, 0
CANCEL_CANCELLED, CANCEL_NOT_CANCELLABLE = 1, 3

CATALOG = None  # the datasets are views in DuckDB's temporary schema "main"; Flight SQL sees no catalog
DB_SCHEMA = "main"
TABLE_TYPE = "TABLE"


@functools.cache
def _classes() -> dict[str, type[Message]]:
    """The declared messages' classes, built on first use: protobuf costs a server that never sees Flight SQL
    about 6 MiB of memory."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    types = {
        kind: getattr(descriptor_pb2.FieldDescriptorProto, f"TYPE_{kind.upper()}")
        for kind in ("string", "bytes", "bool", "int32", "uint32")
    }
    pool = descriptor_pool.DescriptorPool()
    classes: dict[str, type[Message]] = {}
    for package, messages in (
        ("arrow.flight.protocol.sql", _SQL_MESSAGES),
        ("arrow.flight.protocol", _FLIGHT_MESSAGES),
    ):
        file = descriptor_pb2.FileDescriptorProto(
            name=f"flightcache/{package.replace('.', '_')}.proto", package=package, syntax="proto3"
        )
        for name, fields in messages.items():
            m = file.message_type.add(name=name)
            for field, number, kind, label in fields:
                f = m.field.add(name=field, number=number, type=types[kind], json_name=_camel(field))
                f.label = f.LABEL_REPEATED if label == "repeated" else f.LABEL_OPTIONAL
                if label == "optional":  # proto3 `optional`: presence through a synthetic one-field oneof
                    f.proto3_optional = True
                    f.oneof_index = len(m.oneof_decl)
                    m.oneof_decl.add(name=f"_{field}")
        pool.Add(file)
        for name in messages:
            classes[name] = message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))
    return classes


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def message(name: str, **fields: Any) -> Any:
    """A declared Flight SQL (or Flight) message."""
    return _classes()[name](**fields)


def pack(msg: Message) -> bytes:
    """``msg`` wrapped in a serialized ``google.protobuf.Any``, as Flight SQL sends commands and results."""
    from google.protobuf import any_pb2

    wrapper = any_pb2.Any()
    wrapper.Pack(msg)
    return wrapper.SerializeToString()


def parse(name: str, raw: bytes) -> Any:
    """A bare (not Any-wrapped) declared message."""
    from google.protobuf.message import DecodeError

    try:
        return _classes()[name].FromString(raw)
    except DecodeError as e:
        raise InvalidRequestError(f"malformed Flight SQL {name}: {e}") from e


def type_name(raw: bytes) -> str | None:
    """The Flight SQL message name of a serialized ``Any``, or None if ``raw`` is not one (cheap: no parsing)."""
    # An Any starts with field 1 (type_url): tag 0x0a, a one-byte length (every Flight SQL URL is < 128 bytes).
    if len(raw) < 2 or raw[0] != 0x0A or raw[1] >= 0x80:
        return None
    url = raw[2 : 2 + raw[1]]
    prefix = TYPE_URL_PREFIX.encode()
    if not url.startswith(prefix) or len(url) == len(prefix):
        return None
    try:
        return url[len(prefix) :].decode("ascii")
    except UnicodeDecodeError:
        return None


def unpack(raw: bytes) -> tuple[str, Any]:
    """(message name, message) of a serialized Flight SQL ``Any``; the message is None if not declared here."""
    if len(raw) > MAX_QUERY_BYTES + 1024:
        raise InvalidRequestError(f"Flight SQL request is {len(raw)} bytes, more than the {MAX_QUERY_BYTES} allowed")
    from google.protobuf import any_pb2
    from google.protobuf.message import DecodeError

    try:
        wrapper = any_pb2.Any.FromString(raw)
    except DecodeError as e:
        raise InvalidRequestError(f"malformed Flight SQL request (not a protobuf Any): {e}") from e
    if not wrapper.type_url.startswith(TYPE_URL_PREFIX):
        raise InvalidRequestError(f"not a Flight SQL message: type URL {wrapper.type_url!r}")
    name = wrapper.type_url[len(TYPE_URL_PREFIX) :]
    if name not in _SQL_MESSAGES:
        return name, None
    return name, parse(name, wrapper.value)


# -- flightcache's own sql command ---------------------------------------------------------------

COMMAND_PREFIX = b"flightcache.sql:"
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class SqlRequest:
    """A query with optional parameters (``?``/``$1`` from a list, ``$name`` from a dict), stored ``into`` a
    dataset when given, with that put's mode, persistence and ttl, under an optional shorter timeout."""

    query: str
    params: list[Any] | dict[str, Any] | None = None
    into: str | None = None
    mode: str = "overwrite"
    persist: str | None = None
    ttl: float | None = None
    timeout: float | None = None

    _types = {
        "query": (str,),
        "params": (list, dict),
        "into": (str,),
        "mode": (str,),
        "persist": (str,),
        "ttl": (int, float),
        "timeout": (int, float),
    }

    def to_bytes(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps({"v": 1, **body}, separators=(",", ":")).encode()

    def to_command(self) -> bytes:
        """The bytes of a ``FlightDescriptor.for_command`` that runs this query."""
        return COMMAND_PREFIX + self.to_bytes()

    @classmethod
    def from_bytes(cls, raw: bytes) -> SqlRequest:
        if len(raw) > MAX_QUERY_BYTES:
            raise InvalidRequestError(f"sql request is {len(raw)} bytes, more than the {MAX_QUERY_BYTES} allowed")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidRequestError(f"sql request is not valid UTF-8 JSON ({e})") from e
        if not isinstance(obj, dict) or obj.pop("v", 1) != 1:
            raise InvalidRequestError('sql request must be a JSON object {"v": 1, "query": ...}')
        unknown = sorted(set(obj) - set(cls._types))
        if unknown:
            raise InvalidRequestError(f"sql request has unknown field(s) {unknown}; known: {sorted(cls._types)}")
        for key, value in obj.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, cls._types[key])):
                raise InvalidRequestError(f"sql request field {key!r} has the wrong type: {value!r}")
        params = obj.get("params")
        values = params.values() if isinstance(params, dict) else params or []
        if not all(isinstance(v, _SCALARS) for v in values):
            raise InvalidRequestError("sql request 'params' must hold strings, numbers, booleans or nulls")
        if not isinstance(obj.get("query"), str):
            raise InvalidRequestError('sql request needs a "query" string')
        return cls(**obj)

    @classmethod
    def from_command(cls, raw: bytes) -> SqlRequest:
        return cls.from_bytes(raw[len(COMMAND_PREFIX) :])


def is_command(raw: bytes) -> bool:
    return raw.startswith(COMMAND_PREFIX)


# -- result and metadata tables -------------------------------------------------------------------

_STRING_LIST = pa.list_(pa.field("item", pa.string(), nullable=False))
SQL_INFO_VALUE = pa.dense_union(
    [
        pa.field("string_value", pa.string()),
        pa.field("bool_value", pa.bool_()),
        pa.field("bigint_value", pa.int64()),
        pa.field("int32_bitmask", pa.int32()),
        pa.field("string_list", _STRING_LIST),
        pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(pa.int32()))),
    ]
)
SQL_INFO_SCHEMA = pa.schema([pa.field("info_name", pa.uint32(), nullable=False), pa.field("value", SQL_INFO_VALUE)])
CATALOGS_SCHEMA = pa.schema([pa.field("catalog_name", pa.string(), nullable=False)])
DB_SCHEMAS_SCHEMA = pa.schema([pa.field("catalog_name", pa.string()), pa.field("db_schema_name", pa.string(), False)])
TABLES_SCHEMA = pa.schema(
    [
        pa.field("catalog_name", pa.string()),
        pa.field("db_schema_name", pa.string()),
        pa.field("table_name", pa.string(), nullable=False),
        pa.field("table_type", pa.string(), nullable=False),
    ]
)
TABLES_WITH_SCHEMA = TABLES_SCHEMA.append(pa.field("table_schema", pa.binary(), nullable=False))
TABLE_TYPES_SCHEMA = pa.schema([pa.field("table_type", pa.string(), nullable=False)])
PRIMARY_KEYS_SCHEMA = pa.schema(
    [
        pa.field("catalog_name", pa.string()),
        pa.field("db_schema_name", pa.string()),
        pa.field("table_name", pa.string(), nullable=False),
        pa.field("column_name", pa.string(), nullable=False),
        pa.field("key_name", pa.string()),
        pa.field("key_sequence", pa.int32(), nullable=False),
    ]
)
KEYS_SCHEMA = pa.schema(
    [
        pa.field("pk_catalog_name", pa.string()),
        pa.field("pk_db_schema_name", pa.string()),
        pa.field("pk_table_name", pa.string(), nullable=False),
        pa.field("pk_column_name", pa.string(), nullable=False),
        pa.field("fk_catalog_name", pa.string()),
        pa.field("fk_db_schema_name", pa.string()),
        pa.field("fk_table_name", pa.string(), nullable=False),
        pa.field("fk_column_name", pa.string(), nullable=False),
        pa.field("key_sequence", pa.int32(), nullable=False),
        pa.field("fk_key_name", pa.string()),
        pa.field("pk_key_name", pa.string()),
        pa.field("update_rule", pa.uint8(), nullable=False),
        pa.field("delete_rule", pa.uint8(), nullable=False),
    ]
)


def sql_info_table(values: dict[int, str | bool | int | list[str]], wanted: list[int]) -> pa.Table:
    """The GetSqlInfo answer: one row per id asked for (all when none) that this server knows."""
    ids = [i for i in (wanted or sorted(values)) if i in values]
    children: list[list[Any]] = [[] for _ in range(6)]
    type_ids, offsets = [], []
    for i in ids:
        value = values[i]
        if isinstance(value, bool):
            slot = 1
        elif isinstance(value, str):
            slot = 0
        elif isinstance(value, list):
            slot = 4
        else:  # every integer SqlInfo this server sends is an int32 (enums, bitmasks, timeouts)
            slot = 3
        type_ids.append(slot)
        offsets.append(len(children[slot]))
        children[slot].append(value)
    arrays = [pa.array(c, SQL_INFO_VALUE.field(k).type) for k, c in enumerate(children)]
    union = pa.UnionArray.from_dense(
        pa.array(type_ids, pa.int8()),
        pa.array(offsets, pa.int32()),
        arrays,
        [SQL_INFO_VALUE.field(k).name for k in range(6)],
    )
    return pa.Table.from_arrays([pa.array(ids, pa.uint32()), union], schema=SQL_INFO_SCHEMA)


def like(pattern: str | None) -> re.Pattern[str] | None:
    """A Flight SQL filter pattern (``%`` any run, ``_`` any one character, ``\\`` escapes) as a regex."""
    if pattern is None:
        return None
    out, escaped = [], False
    for ch in pattern:
        if escaped:
            out.append(re.escape(ch))
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(".*" if ch == "%" else "." if ch == "_" else re.escape(ch))
    return re.compile("".join(out), re.DOTALL)


def _in_catalog(catalog: str | None) -> bool:
    return catalog is None or catalog == ""  # "" asks for objects without a catalog, which ours are


def db_schemas_table(cmd: Any) -> pa.Table:
    pattern = like(cmd.db_schema_filter_pattern if cmd.HasField("db_schema_filter_pattern") else None)
    catalog = cmd.catalog if cmd.HasField("catalog") else None
    rows = [DB_SCHEMA] if _in_catalog(catalog) and (pattern is None or pattern.fullmatch(DB_SCHEMA)) else []
    return pa.table({"catalog_name": pa.nulls(len(rows), pa.string()), "db_schema_name": rows}, DB_SCHEMAS_SCHEMA)


def tables_table(cmd: Any, datasets: list[tuple[str, pa.Schema]]) -> pa.Table:
    """The GetTables answer over ``datasets`` ((name, schema), sorted), each a TABLE in schema ``main``."""
    catalog = cmd.catalog if cmd.HasField("catalog") else None
    schema_pattern = like(cmd.db_schema_filter_pattern if cmd.HasField("db_schema_filter_pattern") else None)
    table_pattern = like(cmd.table_name_filter_pattern if cmd.HasField("table_name_filter_pattern") else None)
    keep = (
        _in_catalog(catalog)
        and (schema_pattern is None or schema_pattern.fullmatch(DB_SCHEMA) is not None)
        and (not cmd.table_types or TABLE_TYPE in cmd.table_types)
    )
    rows = [(n, s) for n, s in datasets if keep and (table_pattern is None or table_pattern.fullmatch(n))]
    columns: dict[str, Any] = {
        "catalog_name": pa.nulls(len(rows), pa.string()),
        "db_schema_name": [DB_SCHEMA] * len(rows),
        "table_name": [n for n, _ in rows],
        "table_type": [TABLE_TYPE] * len(rows),
    }
    if not cmd.include_schema:
        return pa.table(columns, TABLES_SCHEMA)
    columns["table_schema"] = [_described(n, s).serialize().to_pybytes() for n, s in rows]
    return pa.table(columns, TABLES_WITH_SCHEMA)


def _described(name: str, schema: pa.Schema) -> pa.Schema:
    """``schema`` with the Flight SQL column metadata naming where each column comes from."""
    tagged = {b"ARROW:FLIGHT:SQL:DB_SCHEMA_NAME": DB_SCHEMA.encode(), b"ARROW:FLIGHT:SQL:TABLE_NAME": name.encode()}
    return pa.schema([f.with_metadata({**(f.metadata or {}), **tagged}) for f in schema], metadata=schema.metadata)


def table_types_table() -> pa.Table:
    return pa.table({"table_type": [TABLE_TYPE]}, TABLE_TYPES_SCHEMA)


# -- the client's reader --------------------------------------------------------------------------


class SqlReader:
    """The result of a query as it streams in. ``cancel()``, from any thread, stops the query on the server;
    leaving a ``with`` block before the end cancels it too."""

    def __init__(self, stream: flight.FlightStreamReader, uri: str) -> None:
        self._stream = stream
        self._uri = uri
        self._done = False
        self._cancelled = False

    @property
    def schema(self) -> pa.Schema:
        return self._call(lambda: self._stream.schema)

    def read_next_batch(self) -> pa.RecordBatch:
        """The next record batch; StopIteration at the end."""
        while True:
            try:
                chunk = self._call(self._stream.read_chunk)
            except StopIteration:
                self._done = True
                raise
            if chunk.data is not None:
                return chunk.data

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        while True:
            try:
                yield self.read_next_batch()
            except StopIteration:
                return

    def read_all(self) -> pa.Table:
        # Not FlightStreamReader.read_all: after cancel() it raises KeyboardInterrupt (pyarrow treats a
        # cancelled call like Ctrl-C), and a cancel from another thread must surface as SqlError.
        return pa.Table.from_batches(list(self), self.schema)

    def cancel(self) -> None:
        """Stop the query: the server interrupts it and a pending read raises ``SqlError``."""
        self._cancelled = True
        self._stream.cancel()

    def close(self) -> None:
        if not self._done and not self._cancelled:
            self.cancel()

    def __enter__(self) -> SqlReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Any) -> Any:
        try:
            return fn()
        except flight.FlightError as e:
            if self._cancelled and isinstance(e, flight.FlightCancelledError):
                raise SqlError("the query was cancelled by the client") from None
            raise error_from_flight(e, self._uri) from None
