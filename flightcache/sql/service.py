"""The Flight face of SQL: flightcache's own ``sql`` command and action, and Flight SQL.

``FlightcacheServer`` routes to ``SqlService`` the descriptors, tickets and actions it claims; queries run
in ``engine.SqlEngine``.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from .. import flightsql as fsql
from ..errors import (
    InvalidRequestError,
    NotImplementedByServerError,
)
from ..names import validate_name
from ..protocol import ACTIONS, SQL
from ..server.translate import translated_stream
from .engine import (
    MAX_PARAMETER_BYTES,
    MAX_PARAMETER_SETS,
    SqlEngine,
    SqlLimits,
    Tables,
)

log = logging.getLogger("flightcache.sql")

# -- the Flight service --------------------------------------------------------------------------

_METADATA = (
    "CommandGetSqlInfo",
    "CommandGetCatalogs",
    "CommandGetDbSchemas",
    "CommandGetTables",
    "CommandGetTableTypes",
    "CommandGetPrimaryKeys",
    "CommandGetExportedKeys",
    "CommandGetImportedKeys",
    "CommandGetCrossReference",
)
_READ_ONLY = (
    "flightcache SQL does not change datasets: write a query's result with client.sql(query, into=NAME) "
    "(the 'sql' action), or a table with client.put"
)


@dataclass
class _Prepared:
    query: str
    param_sets: list[Any] = field(default_factory=list)
    used: float = field(default_factory=time.monotonic)


class SqlService:
    """The Flight face of SQL, routed to by ``FlightcacheServer``: flightcache's ``sql`` command and
    action, and enough of Flight SQL for the ADBC driver and flightsql-dbapi."""

    def __init__(self, tables: Tables, limits: SqlLimits | None = None) -> None:
        self.tables = tables
        self.engine = SqlEngine(tables, limits)
        self._prepared: dict[bytes, _Prepared] = {}
        self._lock = threading.Lock()

    # -- routing ---------------------------------------------------------------------------

    def handles_descriptor(self, descriptor: flight.FlightDescriptor) -> bool:
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            return False
        command = descriptor.command or b""
        return fsql.is_command(command) or fsql.type_name(command) is not None

    def handles_ticket(self, ticket: bytes) -> bool:
        return fsql.type_name(ticket) is not None

    def handles_action(self, action_type: str) -> bool:
        spec = ACTIONS.get(action_type)
        return (spec is not None and spec.service == SQL) or action_type in fsql.UNSUPPORTED_ACTIONS

    # -- handlers --------------------------------------------------------------------------

    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        command = descriptor.command
        if fsql.is_command(command):
            request = fsql.SqlRequest.from_command(command)
            if request.into is not None:
                raise InvalidRequestError("a query with 'into' runs as the 'sql' action, not through get_flight_info")
            return self._start(context, descriptor, request.query, [request.params], request.timeout)
        name, cmd = fsql.unpack(command)
        if name == "CommandStatementQuery":
            _no_transaction(cmd)
            return self._start(context, descriptor, cmd.query, [None], None)
        if name == "CommandPreparedStatementQuery":
            prepared = self._prepared_statement(cmd.prepared_statement_handle)
            return self._start(context, descriptor, prepared.query, prepared.param_sets or [None], None)
        if name in _METADATA:
            table = self._metadata(name, cmd)
            endpoint = flight.FlightEndpoint(command, [])  # the ticket is the command: answered again at do_get
            return flight.FlightInfo(table.schema, descriptor, [endpoint], table.num_rows, -1)
        raise _unsupported(name)

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        name, cmd = fsql.unpack(ticket.ticket)
        if name == "TicketStatementQuery":
            q = self.engine.claim(cmd.statement_handle)
            return flight.GeneratorStream(q.schema, translated_stream("do_get", q.run(context)))
        if name in _METADATA:
            return flight.RecordBatchStream(self._metadata(name, cmd))
        raise _unsupported(name)

    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        command = descriptor.command
        if fsql.is_command(command):
            raise InvalidRequestError("the sql command is read with get_flight_info, or run with the 'sql' action")
        name, cmd = fsql.unpack(command)
        if name != "CommandPreparedStatementQuery":
            if name in ("CommandStatementUpdate", "CommandPreparedStatementUpdate", "CommandStatementIngest"):
                raise NotImplementedByServerError(f"Flight SQL {name} is not implemented: {_READ_ONLY}")
            raise _unsupported(name)
        prepared = self._prepared_statement(cmd.prepared_statement_handle)
        batches, rows, nbytes = [], 0, 0
        for chunk in reader:  # checked as it arrives: parameters are small, a stream of gigabytes is not
            if chunk.data is None:
                continue
            rows, nbytes = rows + chunk.data.num_rows, nbytes + chunk.data.get_total_buffer_size()
            if rows > MAX_PARAMETER_SETS or nbytes > MAX_PARAMETER_BYTES:
                raise InvalidRequestError(
                    f"more than {MAX_PARAMETER_SETS} parameter sets or {MAX_PARAMETER_BYTES // 2**20} MiB bound at "
                    "once; bind fewer and run the statement again for the rest"
                )
            batches.append(chunk.data)
        table = pa.Table.from_batches(batches, reader.schema)
        columns = [c.to_pylist() for c in table.columns]
        prepared.param_sets = [[c[i] for c in columns] for i in range(table.num_rows)]
        result = fsql.message("DoPutPreparedStatementResult", prepared_statement_handle=cmd.prepared_statement_handle)
        writer.write(pa.py_buffer(result.SerializeToString()))

    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterable[bytes]:
        kind = action.type
        body = action.body.to_pybytes() if action.body is not None else b""
        if kind == "sql":
            return [self._into(context, fsql.SqlRequest.from_bytes(body))]
        if kind in fsql.UNSUPPORTED_ACTIONS:
            if kind in ("BeginTransaction", "EndTransaction", "BeginSavepoint", "EndSavepoint"):
                raise NotImplementedByServerError(
                    f"Flight SQL action {kind} is not implemented: there are no transactions "
                    "(every query reads immutable snapshots of the datasets it names)"
                )
            raise NotImplementedByServerError(f"Flight action {kind} is not implemented by flightcache")
        if kind == "CancelFlightInfo":
            info = fsql.parse("CancelFlightInfoRequest", body).info
            status = self._cancel(info)
            return [fsql.message("CancelFlightInfoResult", status=status).SerializeToString()]
        name, cmd = fsql.unpack(body)
        if kind == "CreatePreparedStatement" and name == "ActionCreatePreparedStatementRequest":
            _no_transaction(cmd)
            return [self._prepare(context, cmd.query)]
        if kind == "ClosePreparedStatement" and name == "ActionClosePreparedStatementRequest":
            with self._lock:
                self._prepared.pop(cmd.prepared_statement_handle, None)
            return []
        if kind == "CancelQuery" and name == "ActionCancelQueryRequest":
            result = fsql.message("ActionCancelQueryResult", result=self._cancel(cmd.info))
            return [fsql.pack(result)]
        raise InvalidRequestError(f"action {kind!r} does not take a {name} body")

    # -- helpers ---------------------------------------------------------------------------

    def _start(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        query: str,
        param_sets: list[Any],
        timeout: float | None,
    ) -> flight.FlightInfo:
        q = self.engine.start(query, param_sets, timeout=timeout, context=context)
        ticket = fsql.pack(fsql.message("TicketStatementQuery", statement_handle=q.handle))
        return flight.FlightInfo(q.schema, descriptor, [flight.FlightEndpoint(ticket, [])], -1, -1)

    def _into(self, context: flight.ServerCallContext, request: fsql.SqlRequest) -> bytes:
        if request.into is None:
            raise InvalidRequestError("the 'sql' action stores a result: give 'into'; read one with get_flight_info")
        validate_name(request.into)
        started = time.perf_counter()
        q = self.engine.start(request.query, [request.params], timeout=request.timeout, context=context)
        answer = self.engine.store(
            q, request.into, mode=request.mode, persist=request.persist, ttl=request.ttl, context=context
        )
        log.info(
            "sql into %s v%d: %d rows, %d bytes in %.3fs",
            answer["name"],
            answer["version"],
            answer["rows"],
            answer["bytes"],
            time.perf_counter() - started,
        )
        return json.dumps(answer).encode()

    def _prepare(self, context: flight.ServerCallContext, query: str) -> bytes:
        schema, _ = self.engine.describe(query, context)
        handle = secrets.token_bytes(16)
        now = time.monotonic()
        with self._lock:
            idle = [h for h, p in self._prepared.items() if now - p.used > self.engine.limits.prepared_seconds]
            for h in idle:
                del self._prepared[h]
            if len(self._prepared) >= 10_000:
                raise InvalidRequestError("10000 prepared statements are open; close some (ClosePreparedStatement)")
            self._prepared[handle] = _Prepared(query)
        result = fsql.message(
            "ActionCreatePreparedStatementResult",
            prepared_statement_handle=handle,
            dataset_schema=schema.serialize().to_pybytes() if schema is not None else b"",
        )
        return fsql.pack(result)

    def _prepared_statement(self, handle: bytes) -> _Prepared:
        with self._lock:
            prepared = self._prepared.get(handle)
        if prepared is None:
            raise InvalidRequestError("unknown prepared statement handle: it was closed, or idle too long")
        prepared.used = time.monotonic()
        return prepared

    def _cancel(self, info: bytes) -> int:
        try:
            endpoints = flight.FlightInfo.deserialize(info).endpoints
        except (pa.ArrowException, ValueError, TypeError) as e:
            raise InvalidRequestError(f"cancel: not a serialized FlightInfo ({e})") from e
        cancelled = False
        for endpoint in endpoints:
            name, ticket = fsql.unpack(endpoint.ticket.ticket)
            if name == "TicketStatementQuery":
                cancelled |= self.engine.cancel(ticket.statement_handle)
        return fsql.CANCEL_CANCELLED if cancelled else fsql.CANCEL_NOT_CANCELLABLE

    def _metadata(self, name: str, cmd: Any) -> pa.Table:
        if name == "CommandGetSqlInfo":
            return fsql.sql_info_table(self._sql_info(), list(cmd.info))
        if name == "CommandGetCatalogs":
            return fsql.CATALOGS_SCHEMA.empty_table()  # the datasets have no catalog
        if name == "CommandGetDbSchemas":
            return fsql.db_schemas_table(cmd)
        if name == "CommandGetTables":
            datasets = self.tables.schemas()
            return fsql.tables_table(cmd, datasets)
        if name == "CommandGetTableTypes":
            return fsql.table_types_table()
        if name == "CommandGetPrimaryKeys":
            return fsql.PRIMARY_KEYS_SCHEMA.empty_table()  # datasets have no keys
        return fsql.KEYS_SCHEMA.empty_table()

    def _sql_info(self) -> dict[int, Any]:
        import duckdb

        from .. import __version__

        return {
            fsql.SERVER_NAME: "flightcache",
            fsql.SERVER_VERSION: f"{__version__} (DuckDB {duckdb.__version__})",
            fsql.SERVER_ARROW_VERSION: pa.__version__,
            fsql.SERVER_READ_ONLY: True,
            fsql.SERVER_SQL: True,
            fsql.SERVER_SUBSTRAIT: False,
            fsql.SERVER_TRANSACTION: fsql.TRANSACTION_NONE,
            fsql.SERVER_CANCEL: True,
            fsql.SERVER_STATEMENT_TIMEOUT: int(min(self.engine.limits.prepared_seconds * 1000, 2**31 - 1)),
            fsql.SERVER_TRANSACTION_TIMEOUT: 0,
            fsql.SQL_DDL_CATALOG: False,
            fsql.SQL_DDL_SCHEMA: False,
            fsql.SQL_DDL_TABLE: False,
            fsql.SQL_IDENTIFIER_CASE: fsql.CASE_INSENSITIVE,
            fsql.SQL_IDENTIFIER_QUOTE_CHAR: '"',
            fsql.SQL_QUOTED_IDENTIFIER_CASE: fsql.CASE_INSENSITIVE,
            fsql.SQL_ALL_TABLES_ARE_SELECTABLE: True,
            fsql.SQL_NULL_ORDERING: fsql.NULLS_SORTED_AT_END,
        }


def _no_transaction(cmd: Any) -> None:
    if cmd.HasField("transaction_id"):
        raise NotImplementedByServerError("Flight SQL transactions are not implemented: send the query without one")


def _unsupported(name: str) -> NotImplementedByServerError:
    return NotImplementedByServerError(f"Flight SQL {name} is not implemented by flightcache")
