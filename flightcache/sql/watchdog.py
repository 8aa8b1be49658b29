"""The SQL watchdog: one thread, alive while queries are, that interrupts the late and the cancelled."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Query

log = logging.getLogger("flightcache.sql")


class Watchdog:
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
