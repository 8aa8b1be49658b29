"""Locked-down DuckDB databases for queries: opened ahead of need, cleaned and reused after reads."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import duckdb  # imported where used: DuckDB adds ~35 MiB to a server that may never run SQL

    from .engine import SqlLimits

log = logging.getLogger("flightcache.sql")

T = TypeVar("T")

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


class DatabasePool:
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
        def close_and_replace() -> None:
            con.close()
            self._top_up()

        self._submit(close_and_replace)

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
