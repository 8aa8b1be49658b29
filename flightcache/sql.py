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
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from . import flightsql as fsql
from .cache import Cache
from .errors import (
    DatasetNotFoundError,
    InvalidNameError,
    InvalidRequestError,
    NotImplementedByServerError,
    PutAbortedError,
    SqlError,
)
from .store import Version, parse_bytes, validate_name

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


class QueryCancelledError(SqlError):
    """Internal: the client cancelled the call, so the query was interrupted."""


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


class SqlEngine:
    """Runs queries over a ``Cache``'s datasets. Thread-safe."""

    def __init__(self, cache: Cache, limits: SqlLimits | None = None, *, spares: int = 2) -> None:
        self.cache = cache
        self.limits = (limits or SqlLimits.from_env()).checked()
        self.batch_rows = cache.store.batch_rows
        self._databases = _Databases(self.limits, spares)
        self._slots = threading.BoundedSemaphore(self.limits.max_queries)
        self._watchdog = _Watchdog()
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
    ) -> Version:
        """Run a started query and publish its result as dataset ``into``, as a put would."""
        try:
            staged = self.cache.store.begin_put(into, q.schema, mode)
        except BaseException:
            q.close()
            raise
        try:
            for batch in q.run(context):
                staged.add(batch)
            if context is not None and context.is_cancelled():
                raise PutAbortedError(f"sql into {into!r} was cancelled by the client; nothing was published")
            return self.cache.publish(staged, persist=persist, ttl=ttl)
        except BaseException:
            staged.abort()
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
            return self.cache.get(validate_name(name.lower()), count=count)
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
_CATALOG_OBJECTS = "SELECT " + " + ".join(
    f"(SELECT count(*) FROM {table})"
    for table in (
        "duckdb_tables()",
        "duckdb_views() WHERE NOT internal",
        "duckdb_functions() WHERE NOT internal",
        "duckdb_sequences()",
        "duckdb_types() WHERE NOT internal",
        "duckdb_indexes()",
        "duckdb_variables()",
    )
)


class _Databases:
    """Locked-down DuckDB databases, one query at a time each, opened ahead of need, cleaned or closed
    off the request path.

    Opening one costs ~12 ms of CPU, so the next is opened after a query ends rather than while it runs.
    A database that ran only reads comes back (``give_back``): its views are dropped and, if its catalog
    is empty again, it serves the next query, warm. Parsing (which reads no data) shares one long-lived
    database, where DuckDB's parser is warm.
    """

    def __init__(self, limits: SqlLimits, spares: int) -> None:
        self.limits = limits
        self.spares = spares
        self._ready: list[duckdb.DuckDBPyConnection] = []
        self._lock = threading.Lock()
        self._parser: duckdb.DuckDBPyConnection | None = None  # opened on first use: keeps start-up quick
        self._parser_lock = threading.Lock()
        # One worker; it exits by itself once this object (and so the executor) is garbage.
        self._background = ThreadPoolExecutor(1, thread_name_prefix="flightcache-sql")

    def take(self) -> duckdb.DuckDBPyConnection:
        """A database for one query: the most recently given back, else a spare, else a new one."""
        with self._lock:
            con = self._ready.pop() if self._ready else None
        if con is None:  # the first query (spares are made from then on: a server that runs no SQL loads no DuckDB)
            self._submit(self._top_up)
            return self.open()
        return con

    def retire(self, con: duckdb.DuckDBPyConnection) -> None:
        self._submit(lambda: (con.close(), self._top_up()))

    def give_back(self, con: duckdb.DuckDBPyConnection, views: Iterable[str]) -> None:
        """Keep a database that ran only reads, once it holds nothing of them."""
        self._submit(lambda: self._recycle(con, list(views)))

    def _recycle(self, con: duckdb.DuckDBPyConnection, views: list[str]) -> None:
        import duckdb

        try:
            for name in views:
                con.unregister(name)  # drops the view and its reference to the dataset's version
            clean = con.execute(_CATALOG_OBJECTS).fetchall() == [(0,)]
            # A read may have seeded random(): the next query's user must not be able to predict it.
            con.execute("SELECT setseed(?)", [secrets.randbelow(2**53) / 2**53]).fetchall()
        except duckdb.Error:
            clean = False
        if not clean:
            log.warning("a SQL database kept objects of a read-only query; closing it")
            con.close()
            self._top_up()
            return
        with self._lock:
            self._ready.append(con)  # taken next: the most recently used database is the warmest
            surplus = self._ready.pop(0) if len(self._ready) > self.spares else None
        if surplus is not None:
            surplus.close()

    def parse(self, fn: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """``fn`` run on the parsing database (it must not run the query)."""
        with self._parser_lock:
            if self._parser is None:
                self._parser = self.open()
            return fn(self._parser)

    def open(self) -> duckdb.DuckDBPyConnection:
        import duckdb

        threads = self.limits.threads or os.cpu_count() or 1
        con = duckdb.connect(
            ":memory:",
            config={
                "threads": threads,
                "memory_limit": f"{self.limits.memory_limit}B",
                "temp_directory": "",  # no spilling: the memory limit is a hard one
                "autoinstall_known_extensions": False,
                "autoload_known_extensions": False,
                "allow_community_extensions": False,
                "allow_unsigned_extensions": False,
                "python_enable_replacements": False,  # a query cannot read the server's Python variables
                "python_scan_all_frames": False,
            },
        )
        # After temp_directory (which external access off would refuse); locking comes last of all.
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        return con

    def _top_up(self) -> None:
        while True:
            with self._lock:
                if len(self._ready) >= self.spares:
                    return
            con = self.open()
            with self._lock:
                self._ready.append(con)

    def _submit(self, fn: Any) -> None:
        try:
            self._background.submit(fn)
        except RuntimeError:  # interpreter shutting down: do it here
            fn()


class _Watchdog:
    """One thread, alive while queries are: interrupts those past their deadline or cancelled."""

    def __init__(self, every: float = 0.05) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._queries: dict[bytes, Query] = {}
        self._thread: threading.Thread | None = None

    def watch(self, q: Query) -> None:
        with self._lock:
            self._queries[q.handle] = q
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="flightcache-sql-watchdog")
                self._thread.start()

    def unwatch(self, q: Query) -> None:
        with self._lock:
            self._queries.pop(q.handle, None)

    def find(self, handle: bytes) -> Query | None:
        with self._lock:
            return self._queries.get(handle)

    def count(self) -> int:
        with self._lock:
            return len(self._queries)

    def _run(self) -> None:
        while True:
            with self._lock:
                queries = list(self._queries.values())
                if not queries:
                    self._thread = None
                    return
            now = time.monotonic()
            for q in queries:
                try:
                    q.check(now)
                except Exception:
                    log.exception("sql watchdog check failed")
            time.sleep(self.every)


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

    def __init__(self, cache: Cache, limits: SqlLimits | None = None) -> None:
        self.cache = cache
        self.engine = SqlEngine(cache, limits)
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
        return action_type in fsql.ACTIONS or action_type in fsql.UNSUPPORTED_ACTIONS

    def list_actions(self) -> list[tuple[str, str]]:
        return list(fsql.ACTIONS.items())

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
            return flight.GeneratorStream(q.schema, _streamed(q.run(context)))
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
        try:
            q = self.engine.start(query, param_sets, timeout=timeout, context=context)
        except SqlError as e:
            raise _flight_error(e) from None
        ticket = fsql.pack(fsql.message("TicketStatementQuery", statement_handle=q.handle))
        return flight.FlightInfo(q.schema, descriptor, [flight.FlightEndpoint(ticket, [])], -1, -1)

    def _into(self, context: flight.ServerCallContext, request: fsql.SqlRequest) -> bytes:
        if request.into is None:
            raise InvalidRequestError("the 'sql' action stores a result: give 'into'; read one with get_flight_info")
        validate_name(request.into)
        started = time.perf_counter()
        try:
            q = self.engine.start(request.query, [request.params], timeout=request.timeout, context=context)
            version = self.engine.store(
                q, request.into, mode=request.mode, persist=request.persist, ttl=request.ttl, context=context
            )
        except SqlError as e:
            raise _flight_error(e) from None
        log.info(
            "sql into %s v%d: %d rows, %d bytes in %.3fs",
            version.name,
            version.number,
            version.num_rows,
            version.nbytes,
            time.perf_counter() - started,
        )
        answer = {"name": version.name, "version": version.number, "rows": version.num_rows, "bytes": version.nbytes}
        return json.dumps(answer).encode()

    def _prepare(self, context: flight.ServerCallContext, query: str) -> bytes:
        try:
            schema, _ = self.engine.describe(query, context)
        except SqlError as e:
            raise _flight_error(e) from None
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
            datasets = sorted((i.name, i.schema) for i in self.cache.store.list())
            return fsql.tables_table(cmd, datasets)
        if name == "CommandGetTableTypes":
            return fsql.table_types_table()
        if name == "CommandGetPrimaryKeys":
            return fsql.PRIMARY_KEYS_SCHEMA.empty_table()  # datasets have no keys
        return fsql.KEYS_SCHEMA.empty_table()

    def _sql_info(self) -> dict[int, Any]:
        import duckdb

        from . import __version__

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


def _streamed(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """``batches`` with SQL errors as Flight errors: the server's translation does not reach a stream."""
    try:
        yield from batches
    except SqlError as e:
        raise _flight_error(e) from None


def _flight_error(e: SqlError) -> flight.FlightError:
    """DuckDB's message unchanged; the class tells a timeout and a cancellation from a failed query."""
    if isinstance(e, QueryTimeoutError):
        return flight.FlightTimedOutError(str(e), extra_info=_SQL_ERROR_INFO)
    if isinstance(e, QueryCancelledError):
        return flight.FlightCancelledError(str(e), extra_info=_SQL_ERROR_INFO)
    return flight.FlightServerError(str(e), extra_info=_SQL_ERROR_INFO)


def _no_transaction(cmd: Any) -> None:
    if cmd.HasField("transaction_id"):
        raise NotImplementedByServerError("Flight SQL transactions are not implemented: send the query without one")


def _unsupported(name: str) -> NotImplementedByServerError:
    return NotImplementedByServerError(f"Flight SQL {name} is not implemented by flightcache")
