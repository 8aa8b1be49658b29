"""Server-side SQL: DuckDB queries over the cached datasets, and the Flight service that serves them.

Every query runs alone in a DuckDB database, opened with external access off (no files, no
network, no installing or loading extensions), Python replacement scans off, its own memory limit and
thread count, no spilling to disk, and its configuration locked before the query's text is seen. Only
the datasets a query names are registered in it, as zero-copy views over the version current when the
query started; a dataset that only storage holds is loaded on first use. A query cannot change a
dataset: the views are scans of immutable Arrow data. The one way to write is ``into=``, which
publishes the result through the cache like any put.

A query starts at ``get_flight_info`` (bound: names resolved, errors found, schema known) and runs at
``do_get``, streaming Arrow batches as DuckDB produces them. A watchdog interrupts a query that passes
its timeout or whose client cancelled the call (``context.is_cancelled()``), and drops a started
query whose result nobody fetched. Databases are opened ahead of need by a background thread (opening
one costs ~15 ms); one that ran only SELECT statements is cleaned and serves a later query, warm
(see ``Query``); after any other statement it is thrown away.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from .. import flightsql as fsql
from ..errors import (
    DatasetNotFoundError,
    InvalidNameError,
    InvalidRequestError,
    NotImplementedByServerError,
    PutAbortedError,
    SqlError,
)
from ..names import validate_name
from ..server.store import Version
from ..units import parse_bytes
from .pool import DatabasePool
from .watchdog import Watchdog

if TYPE_CHECKING:
    import duckdb  # imported where used: DuckDB adds ~35 MiB to a server that may never run SQL

log = logging.getLogger("flightcache.sql")

MAX_PARAMETER_SETS = 10_000
MAX_PARAMETER_BYTES = 16 * 2**20

T = TypeVar("T")
_MISSING_TABLE = re.compile(r"Table with name (.+?) does not exist")
_SQL_ERROR_INFO = b'{"code":"SQL_ERROR"}'


class QueryTimeoutError(SqlError):
    """Internal: the watchdog interrupted a query that ran past its timeout."""

    flight_class = flight.FlightTimedOutError  # how server/translate.py sends it


class QueryCancelledError(SqlError):
    """Internal: the client cancelled the call, so the query was interrupted."""

    flight_class = flight.FlightCancelledError


@dataclass(frozen=True)
class SqlLimits:
    """Bounds on every query. ``from_env`` reads ``FLIGHTCACHE_SQL_*`` over these defaults."""

    memory_limit: int = 1 << 30  # DuckDB's working memory per query; the datasets it reads are not counted
    threads: int = 0  # per query; 0: one per core
    timeout: float = 300.0  # seconds from get_flight_info to the last batch sent
    max_queries: int = 8  # queries holding a database at once; more wait, within their timeout
    claim_seconds: float = 60.0  # a started query whose result is not fetched within this is dropped
    prepared_seconds: float = 3600.0  # an idle Flight SQL prepared statement is closed after this

    ENV = {
        "memory_limit": "FLIGHTCACHE_SQL_MEMORY_LIMIT",
        "threads": "FLIGHTCACHE_SQL_THREADS",
        "timeout": "FLIGHTCACHE_SQL_TIMEOUT",
        "max_queries": "FLIGHTCACHE_SQL_MAX_QUERIES",
    }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SqlLimits:
        environ = os.environ if environ is None else environ
        limits = cls()
        for key, var in cls.ENV.items():
            raw = environ.get(var)
            if raw is None or raw == "":
                continue
            try:
                value: Any = parse_bytes(raw) if key == "memory_limit" else type(getattr(limits, key))(raw)
            except ValueError as e:
                raise ValueError(f"{var}={raw!r} is not a valid {key.replace('_', ' ')}: {e}") from e
            limits = replace(limits, **{key: value})
        return limits.checked()

    def checked(self) -> SqlLimits:
        if self.memory_limit < 1 << 20 or self.threads < 0 or self.timeout <= 0 or self.max_queries < 1:
            raise ValueError(f"invalid SQL limits {self}: memory >= 1 MiB, threads >= 0, timeout > 0, queries >= 1")
        return self


# -- the engine ----------------------------------------------------------------------------------


class Tables(Protocol):
    """The datasets SQL reads and writes: a server's ``Cache``, or a cluster node's view of the cluster."""

    @property
    def batch_rows(self) -> int: ...

    def get(self, name: str, version: int | None = None, *, count: bool = False) -> Version: ...

    def schemas(self) -> list[tuple[str, pa.Schema]]:
        """(name, schema) of every dataset, by name."""
        ...

    def put(
        self,
        name: str,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        *,
        mode: str,
        persist: str | None,
        ttl: float | None,
    ) -> dict[str, Any]:
        """Publish ``batches`` as a new version of ``name``, as a put would; its summary."""
        ...


class SqlEngine:
    """Runs queries over a ``Cache``'s datasets. Thread-safe."""

    def __init__(self, tables: Tables, limits: SqlLimits | None = None, *, spares: int = 2) -> None:
        self.tables = tables
        self.limits = (limits or SqlLimits.from_env()).checked()
        self.batch_rows = tables.batch_rows
        self._databases = DatabasePool(self.limits, spares)
        self._slots = threading.BoundedSemaphore(self.limits.max_queries)
        self._watchdog = Watchdog()
        self._lock = threading.Lock()
        self._started: dict[bytes, Query] = {}  # bound, waiting for their do_get

    def start(
        self,
        query: str,
        param_sets: list[list[Any] | dict[str, Any] | None] | None = None,
        *,
        timeout: float | None = None,
        context: flight.ServerCallContext | None = None,
        count: bool = True,
    ) -> Query:
        """Bind ``query`` (once per parameter set) in a database of its own; run it later with ``run``.

        ``count``: the datasets read count a hit (or a miss); not when only describing the query.
        """
        if len(query.encode("utf-8", "surrogatepass")) > fsql.MAX_QUERY_BYTES:
            raise InvalidRequestError(f"the query is longer than the {fsql.MAX_QUERY_BYTES} bytes allowed")
        if timeout is not None and timeout <= 0:
            raise InvalidRequestError(f"timeout must be positive, got {timeout}")
        timeout = self.limits.timeout if timeout is None else min(timeout, self.limits.timeout)
        q = Query(self, query, list(param_sets or [None]), timeout, count)
        import duckdb

        self._take_slot(q, context)
        q.attach(context)
        self._watchdog.watch(q)
        try:
            q.bind()
        except (duckdb.Error, pa.ArrowException) as e:
            q.close()
            raise q.error(e) from None
        except BaseException:
            q.close()
            raise
        q.attach(None)
        with self._lock:
            self._started[q.handle] = q
        q.claim_by = time.monotonic() + self.limits.claim_seconds
        return q

    def claim(self, handle: bytes) -> Query:
        """The started query behind a ticket; each is fetched once."""
        with self._lock:
            q = self._started.pop(handle, None)
        if q is None:
            raise InvalidRequestError(
                "unknown statement handle: the result was already fetched, or not fetched within "
                f"{self.limits.claim_seconds:g} s of get_flight_info and dropped"
            )
        q.claim_by = None
        if q.stopped is not None:
            q.close()
            raise q.error(None)
        return q

    def cancel(self, handle: bytes) -> bool:
        """Interrupt the query behind ``handle``; False if there is no such query running or waiting."""
        q = self._watchdog.find(handle)
        if q is None:
            return False
        q.stop("cancelled")
        if q.attached is None:  # not inside a call: nothing to interrupt, free it now
            with self._lock:
                self._started.pop(handle, None)
            q.close()
        return True

    def describe(self, query: str, context: flight.ServerCallContext | None = None) -> tuple[pa.Schema | None, int]:
        """(result schema, or None when it depends on parameter values; number of parameters) of ``query``."""
        import duckdb

        try:
            statements = self._databases.parse(lambda con: con.extract_statements(query))
        except duckdb.Error as e:
            raise SqlError(str(e)) from None
        n = len(statements[-1].named_parameters) if statements else 0
        if n:
            return None, n
        q = self.start(query, context=context, count=False)
        schema = q.schema
        q.close()
        with self._lock:
            self._started.pop(q.handle, None)
        return schema, 0

    def store(
        self,
        q: Query,
        into: str,
        *,
        mode: str = "overwrite",
        persist: str | None = None,
        ttl: float | None = None,
        context: flight.ServerCallContext | None = None,
    ) -> dict[str, Any]:
        """Run a started query and publish its result as dataset ``into``, as a put would; its summary."""

        def batches() -> Iterator[pa.RecordBatch]:
            yield from q.run(context)
            if context is not None and context.is_cancelled():
                raise PutAbortedError(f"sql into {into!r} was cancelled by the client; nothing was published")

        try:
            return self.tables.put(into, q.schema, batches(), mode=mode, persist=persist, ttl=ttl)
        except BaseException:
            q.close()  # refused before it ran (a bad mode, say): the query's database goes back
            raise

    def running(self) -> int:
        """Queries holding a database: started, running or streaming."""
        return self._watchdog.count()

    def _take_slot(self, q: Query, context: flight.ServerCallContext | None) -> None:
        while not self._slots.acquire(timeout=0.05):
            if context is not None and context.is_cancelled():
                raise QueryCancelledError("the query was cancelled by the client while it waited for a free slot")
            if time.monotonic() > q.deadline:
                raise QueryTimeoutError(
                    f"the query waited {q.timeout:g} s for one of the {self.limits.max_queries} query slots "
                    "and timed out; the server is busy"
                )
        q.holds_slot = True

    def _dataset(self, name: str, count: bool = False) -> Version | None:
        """The current version of dataset ``name``, loading it from storage; None if there is none."""
        try:
            return self.tables.get(validate_name(name.lower()), count=count)
        except (InvalidNameError, DatasetNotFoundError):
            return None  # not a dataset (a CTE, a DuckDB table function...): DuckDB reports it if it matters


class Query:
    """One statement in a database of its own, from binding to the last batch.

    The database is fresh, or one that only ever ran reads (SELECT statements) and was cleaned after
    each: a database's first query runs ~25% slower than its next ones (a p99-per-group aggregation
    over 8M rows: 313 ms against 248 ms), which is the gap between server-side SQL and an in-process
    DuckDB. Any other statement, a stopped query, or anything left in the catalog retires it.
    """

    def __init__(self, engine: SqlEngine, text: str, param_sets: list[Any], timeout: float, count: bool) -> None:
        self.engine = engine
        self.count = count
        self.handle = secrets.token_bytes(16)
        self.text = text
        self.param_sets = param_sets
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.claim_by: float | None = None
        self.schema = pa.schema([])
        self.stopped: str | None = None  # "timeout" or "cancelled" once the watchdog or a client stopped it
        self.holds_slot = False
        self.closed = False
        self.attached: flight.ServerCallContext | None = None  # the call being served, polled by the watchdog
        self._lock = threading.Lock()
        self._con: duckdb.DuckDBPyConnection | None = None
        self._relations: list[Any] = []
        self._versions: list[Version] = []  # the snapshots the views read
        self.read_only = False  # every statement a SELECT: the database can serve another query

    def attach(self, context: flight.ServerCallContext | None) -> None:
        with self._lock:
            self.attached = context

    def bind(self) -> None:
        """Register the datasets the query names and bind each parameter set; learn the result schema."""
        import duckdb

        names, self.read_only = self.engine._databases.parse(
            lambda con: (_referenced(con, self.text), _reads_only(con, self.text))
        )
        self._con = self.engine._databases.take()
        for _ in range(64):
            self._register(names)
            try:
                self._relations = [self._con.sql(self.text, params=p or None) for p in self.param_sets]
                break
            except duckdb.CatalogException as e:
                # The referenced-name pass can miss a dataset when the query does not bind without it.
                m = _MISSING_TABLE.search(str(e))
                missing = m.group(1).strip('"').lower() if m else None
                if missing is None or missing in names or self.engine._dataset(missing) is None:
                    raise
                names.add(missing)
                # Statements of a script before the last one have run: bind again in a fresh database.
                self.engine._databases.retire(self._con)
                self._con = self.engine._databases.take()
        if self._relations and self._relations[0] is not None:
            self.schema = _plain_schema(_result_schema(self._con, self._relations[0]))

    def _register(self, names: Iterable[str]) -> None:
        assert self._con is not None
        for name in sorted(names):
            version = self.engine._dataset(name, self.count)
            if version is not None:
                _check_readable(version)
                self._con.register(version.name, version.table())
                self._versions.append(version)

    def run(self, context: flight.ServerCallContext | None = None) -> Iterator[pa.RecordBatch]:
        """Run the query, yielding plain-typed record batches; always ends closed."""
        import duckdb

        self.attach(context)
        try:
            for relation in self._relations:
                if relation is None:
                    continue
                try:
                    reader = relation.to_arrow_reader(self.engine.batch_rows)
                    while True:
                        try:
                            batch = reader.read_next_batch()
                        except StopIteration:
                            break
                        yield _plain_batch(batch, self.schema)
                        if context is not None and context.is_cancelled():
                            self.stop("cancelled")
                            raise self.error(None)
                except (duckdb.Error, pa.ArrowException, OSError) as e:  # mid-stream, DuckDB's errors are OSError
                    raise self.error(e) from None
        finally:
            self.close()

    def stop(self, reason: str) -> None:
        """Interrupt the query (timeout, cancelled); the running read then fails with that reason."""
        with self._lock:  # held while interrupting, so that close() cannot retire the database meanwhile
            if self.stopped is None:
                self.stopped = reason
            if self._con is not None:
                self._con.interrupt()

    def check(self, now: float) -> None:
        """The watchdog's look: past the deadline, cancelled by the client, or never fetched."""
        with self._lock:
            context = self.attached
            cancelled = context is not None and context.is_cancelled()
        if now > self.deadline and context is None and self.claim_by is None:
            self.stop("timeout")
            self.close()  # fetched, but its stream was never read: nothing else will free it
        elif now > self.deadline:
            self.stop("timeout")
        elif cancelled:
            self.stop("cancelled")
        elif self.claim_by is not None and now > self.claim_by:
            with self.engine._lock:
                dropped = self.engine._started.pop(self.handle, None) is not None
            if dropped:
                log.info("dropping a query whose result was not fetched: %.200s", self.text)
                self.close()

    def error(self, e: BaseException | None) -> SqlError:
        if self.stopped == "timeout":
            return QueryTimeoutError(f"the query ran longer than its timeout of {self.timeout:g} s and was interrupted")
        if self.stopped == "cancelled":
            return QueryCancelledError("the query was cancelled by the client")
        return SqlError(str(e))

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self.attached = None
            con, self._con = self._con, None
            self._relations = []
            registered = {v.name for v in self._versions}
            self._versions = []
            reusable = self.read_only and self.stopped is None
        if con is not None and reusable:
            self.engine._databases.give_back(con, registered)
        elif con is not None:
            self.engine._databases.retire(con)
        self.engine._watchdog.unwatch(self)
        if self.holds_slot:
            self.holds_slot = False
            self.engine._slots.release()


def _result_schema(con: duckdb.DuckDBPyConnection, relation: Any) -> pa.Schema:
    """The Arrow schema of a bound relation's result, without running it where DuckDB can say."""
    try:
        from duckdb import _seam  # DuckDB 2's own way (private): the types the binder found, as Arrow

        return _seam.arrow_schema(con, relation.columns, relation.types)
    except (ImportError, AttributeError, TypeError):
        # Older DuckDB: run it with LIMIT 0, which still builds a join's hash table.
        return relation.limit(0).to_arrow_table().schema


def _referenced(con: duckdb.DuckDBPyConnection, query: str) -> set[str]:
    """The table names ``query`` reads, as far as DuckDB's parser can tell without them existing."""
    import duckdb

    names: set[str] = set()
    try:
        statements = con.extract_statements(query)
    except duckdb.Error:
        return names  # binding reports the parser's error
    for statement in statements:
        try:
            # The parse tree of a SELECT names every table it reads, bound or not.
            [(text,)] = con.execute("SELECT json_serialize_sql(?)", [statement.query]).fetchall()
            tree = json.loads(text)
        except (duckdb.Error, ValueError):
            tree = {"error": True}
        if not tree.get("error"):
            _base_tables(tree, names)
            continue
        try:  # not a SELECT: ask the binder, which needs the tables that exist to bind
            names |= {n.lower() for n in con.get_table_names(statement.query)}
        except duckdb.Error:
            continue  # the missing-table retry in bind() finds the rest
    return names


def _reads_only(con: duckdb.DuckDBPyConnection, query: str) -> bool:
    """Whether every statement of ``query`` is a SELECT (which leaves a database as it found it)."""
    import duckdb

    try:
        statements = con.extract_statements(query)
    except duckdb.Error:
        return False
    return bool(statements) and all(s.type == duckdb.StatementType.SELECT for s in statements)


def _base_tables(node: Any, names: set[str]) -> None:
    if isinstance(node, dict):
        if node.get("type") == "BASE_TABLE" and isinstance(node.get("table_name"), str):
            names.add(node["table_name"].lower())
        for value in node.values():
            _base_tables(value, names)
    elif isinstance(node, list):
        for value in node:
            _base_tables(value, names)


def _plain_type(t: pa.DataType) -> pa.DataType:
    """Arrow types every Flight client reads: no view or extension types (DuckDB may emit them)."""
    if isinstance(t, pa.BaseExtensionType):
        return _plain_type(t.storage_type)
    if t == pa.string_view():
        return pa.string()
    if t == pa.binary_view():
        return pa.binary()
    if pa.types.is_list_view(t) or pa.types.is_list(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)))
    if pa.types.is_large_list_view(t) or pa.types.is_large_list(t):
        return pa.large_list(t.value_field.with_type(_plain_type(t.value_type)))
    if pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_plain_type(t.value_type)), t.list_size)
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_plain_type(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(_plain_type(t.key_type), t.item_field.with_type(_plain_type(t.item_type)), t.keys_sorted)
    return t


def _check_readable(version: Version) -> None:
    """Refuse a dataset DuckDB would crash reading (the whole server with it): run-end encoded values that
    are run-end encoded again (DuckDB 2.0, found by fuzzing)."""

    def doubly_encoded(t: pa.DataType) -> bool:
        if pa.types.is_run_end_encoded(t) and pa.types.is_run_end_encoded(t.value_type):
            return True
        return any(doubly_encoded(t.field(i).type) for i in range(t.num_fields))

    for f in version.schema:
        if doubly_encoded(f.type):
            raise NotImplementedByServerError(
                f"SQL cannot read column {f.name!r} of dataset {version.name!r}: run-end encoded values that are "
                "run-end encoded again; read the dataset with get, or decode the column before putting it"
            )


def _plain_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f.with_type(_plain_type(f.type)) for f in schema], metadata=schema.metadata)


def _plain_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    if batch.schema.equals(schema):
        return batch
    columns = []
    for column, target in zip(batch.columns, schema.types, strict=True):
        if isinstance(column, pa.ExtensionArray):
            column = column.storage
        columns.append(column if column.type == target else column.cast(target))
    return pa.RecordBatch.from_arrays(columns, schema=schema)


# What a query could have left in a database: anything but DuckDB's own objects.
