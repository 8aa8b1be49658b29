"""Operations: request accounting, the request log, draining, and the Prometheus endpoint.

Every Flight call passes through ``Operations``, a server middleware: it refuses new calls while the
server drains, counts the calls in flight, and when a call completes (for ``do_get``: when its
stream has ended) records its count, outcome and duration per RPC and action and writes one request
log line. Handlers add what only they know (dataset, rows, bytes, action) with ``note``.

The figures live in plain Python (``RequestStats`` here, the store's and cache's counters) and are
read at scrape time by a Prometheus collector, so ``flightcache stats`` and ``/metrics`` show the
same numbers and nothing is counted twice. ``prometheus-client`` is needed only for the endpoint
(``pip install 'flightcache[metrics]'``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow.flight as flight

from .errors import ERRORS_BY_CODE, ServerUnavailableError, require
from .protocol import clean_message, error_to_flight

if TYPE_CHECKING:
    from .server import FlightcacheServer

request_log = logging.getLogger("flightcache.requests")

MIDDLEWARE_KEY = "flightcache-ops"
DEFAULT_GRACE_SECONDS = 20.0
# Upper bounds in seconds: a metadata call takes about a millisecond, a stream of gigabytes a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# The one action a draining server still answers, so orchestrators can see it is shutting down.
# With authentication on it needs a token like any call (a read token does): probes run
# `flightcache ping` with $FLIGHTCACHE_TOKEN, and an open port tells nobody what the server holds.
HEALTHCHECK = "healthcheck"


class RequestStats:
    """Counts, outcomes and a latency histogram per (RPC method, action); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outcomes: dict[tuple[str, str], dict[str, int]] = {}
        self._latency: dict[tuple[str, str], list[float]] = {}  # per bucket (non-cumulative), +Inf, sum

    def record(self, method: str, action: str, outcome: str, seconds: float) -> None:
        key = (method, action)
        slot = next((i for i, bound in enumerate(LATENCY_BUCKETS) if seconds <= bound), len(LATENCY_BUCKETS))
        with self._lock:
            outcomes = self._outcomes.setdefault(key, {})
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            latency = self._latency.setdefault(key, [0.0] * (len(LATENCY_BUCKETS) + 2))
            latency[slot] += 1
            latency[-1] += seconds

    def snapshot(self) -> list[dict[str, Any]]:
        """One entry per (method, action): count, errors, outcomes, seconds, cumulative buckets."""
        with self._lock:
            items = [(key, dict(self._outcomes[key]), list(self._latency[key])) for key in sorted(self._outcomes)]
        result = []
        for (method, action), outcomes, latency in items:
            cumulative, total = [], 0
            for bound, n in zip(LATENCY_BUCKETS, latency, strict=False):
                total += int(n)
                cumulative.append([bound, total])
            count = sum(outcomes.values())
            result.append(
                {
                    "method": method,
                    "action": action or None,
                    "count": count,
                    "errors": count - outcomes.get("ok", 0),
                    "outcomes": outcomes,
                    "seconds": round(latency[-1], 6),
                    "buckets": cumulative,  # [upper bound, calls at or under it]; the rest took longer
                }
            )
        return result


class Operations(flight.ServerMiddlewareFactory):
    """The middleware factory of a server: request accounting, the request log, draining."""

    def __init__(self, known_actions: set[str]) -> None:
        super().__init__()
        self.requests = RequestStats()
        self.known_actions = known_actions  # metric labels only for these: action names come from clients
        self.draining = False
        self._in_flight = 0
        self._cut = False
        self._changed = threading.Condition()

    @property
    def in_flight(self) -> int:
        with self._changed:
            return self._in_flight

    def start_call(self, info: flight.CallInfo, headers: dict[str, Any]) -> _Call:
        method = info.method.name.lower()
        with self._changed:  # checked and counted at once: drain() must not miss a call that got past it
            # Actions pass here so a health check is answered while draining; do_action refuses the rest.
            refused = self.draining and info.method != flight.FlightMethod.DO_ACTION
            if not refused:
                self._in_flight += 1
        if refused:
            refusal = error_to_flight(draining_error())
            self.refused(method, refusal)
            raise refusal
        return _Call(self, method)

    def refused(self, method: str, error: BaseException) -> None:
        """Count and log a call refused before it started (draining, or by authentication)."""
        self._account(method, {}, error, 0.0)

    def _finished(self, call: _Call, exception: BaseException | None) -> None:
        with self._changed:
            self._in_flight -= 1
            self._changed.notify_all()
        self._account(call.method, call.fields, exception, time.perf_counter() - call.started)

    def _account(self, method: str, noted: dict[str, Any], exception: BaseException | None, seconds: float) -> None:
        """Count a call and write its request log line."""
        outcome = _outcome(exception)
        action = str(noted.get("action", ""))
        label = action if action in self.known_actions or not action else "other"
        self.requests.record(method, label, outcome, seconds)
        if request_log.isEnabledFor(logging.INFO):
            fields = {"method": method, **noted, "duration_ms": round(seconds * 1000, 3), "outcome": outcome}
            if exception is not None:
                fields["error"] = clean_message(str(exception))
            request_log.info("request %s", logfmt(fields), extra={"fields": fields})

    def drain(self, grace: float) -> tuple[int, int]:
        """Refuse new calls, wait up to ``grace`` seconds for the calls in flight (or ``cut``).

        Returns (calls that finished, calls still running).
        """
        deadline = time.monotonic() + grace
        with self._changed:
            self.draining = True
            waiting = self._in_flight
            while self._in_flight and not self._cut:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            return waiting - min(waiting, self._in_flight), self._in_flight

    def cut(self) -> None:
        """Stop waiting for the calls in flight (a second signal)."""
        with self._changed:
            self._cut = True
            self._changed.notify_all()


class _Call(flight.ServerMiddleware):
    """One call: its method, start time and the fields its handler noted."""

    def __init__(self, ops: Operations, method: str) -> None:
        super().__init__()
        self.ops = ops
        self.method = method
        self.started = time.perf_counter()
        self.fields: dict[str, Any] = {}

    def call_completed(self, exception: BaseException | None) -> None:
        self.ops._finished(self, exception)


def note(context: flight.ServerCallContext, **fields: Any) -> None:
    """Add fields (dataset, rows, bytes, action, ...) to the request log line of this call."""
    call = context.get_middleware(MIDDLEWARE_KEY)
    if isinstance(call, _Call):
        call.fields.update({k: v for k, v in fields.items() if v is not None})


def draining_error() -> ServerUnavailableError:
    return ServerUnavailableError("the server is shutting down and accepts no new requests; retry on another server")


def _outcome(exception: BaseException | None) -> str:
    if exception is None:
        return "ok"
    try:
        code = json.loads(getattr(exception, "extra_info", None) or b"{}").get("code")
    except (ValueError, AttributeError):
        code = None
    return code if code in ERRORS_BY_CODE else type(exception).__name__


# -- the request log -------------------------------------------------------------------------------


def logfmt(fields: dict[str, Any]) -> str:
    """``key=value`` pairs; values with spaces, quotes or '=' are JSON-quoted (one line, always)."""
    parts = []
    for key, value in fields.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if not text or any(c in text for c in ' "=\n\r\t\\'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus a request line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Log to stderr at ``level``, as text lines or JSON lines."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


# -- Prometheus ------------------------------------------------------------------------------------

# (name, stats key, help) of the counters the server, store and cache already keep.
COUNTERS = (
    ("flightcache_hits", "hits", "Reads of a dataset found in memory."),
    ("flightcache_misses", "misses", "Reads of a dataset that had to be loaded from storage."),
    ("flightcache_evictions", "evictions", "Datasets evicted from memory (they stay in storage)."),
    ("flightcache_served_bytes", "bytes_served", "Dataset bytes streamed to readers (after projection and filter)."),
    ("flightcache_received_bytes", "bytes_received", "Dataset bytes received by puts."),
    ("flightcache_loaded_bytes", "bytes_loaded", "Bytes loaded into memory from storage or external Parquet."),
    ("flightcache_persisted_bytes", "bytes_persisted", "Bytes written to the storage tier."),
    ("flightcache_load_seconds", "load_s", "Time spent loading datasets into memory."),
    ("flightcache_persist_seconds", "persist_s", "Time spent writing datasets to storage."),
    ("flightcache_puts", "puts", "Puts published or staged."),
    ("flightcache_puts_aborted", "puts_aborted", "Puts that ended abnormally; nothing was published."),
    ("flightcache_gets", "gets", "do_get streams started."),
    ("flightcache_writebacks", "writebacks_done", "Write-backs (async persists) that committed."),
    ("flightcache_writeback_failures", "writebacks_failed", "Write-backs that failed (state persist-failed)."),
)
GAUGES = (
    ("flightcache_memory_used_bytes", "memory_used", "Bytes of distinct Arrow buffers held by datasets."),
    ("flightcache_memory_staged_bytes", "memory_staged", "Bytes held by puts in progress."),
    ("flightcache_memory_limit_bytes", "memory_limit", "The memory limit (absent without one)."),
    ("flightcache_retained_versions", "retained_versions", "Replaced versions kept for readers already on them."),
    ("flightcache_pinned_datasets", "pinned", "Datasets pinned in memory."),
    ("flightcache_open_transactions", "open_transactions", "Multi-part puts staged and not yet committed."),
    ("flightcache_pending_persists", "pending_persists", "Write-backs scheduled and not yet finished."),
    ("flightcache_requests_in_flight", "in_flight", "Flight calls running now (a do_get until its stream ends)."),
    ("flightcache_uptime_seconds", "uptime_s", "Seconds since the server started."),
)


LABELS = ["method", "action"]


class _Collector:
    """Reads a server's ``stats()`` at scrape time."""

    def __init__(self, server: FlightcacheServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = self.server.stats()
        for name, key, text in COUNTERS:
            yield CounterMetricFamily(name, text, value=s.get(key, 0))
        for name, key, text in GAUGES:
            if s.get(key) is not None:
                yield GaugeMetricFamily(name, text, value=s[key])
        yield GaugeMetricFamily("flightcache_draining", "1 while the server drains, else 0.", int(s["draining"]))
        states = GaugeMetricFamily("flightcache_datasets", "Datasets by state.", labels=["state"])
        for state, n in s["states"].items():
            states.add_metric([state], n)
        yield states
        requests = CounterMetricFamily(
            "flightcache_requests", "Flight calls by method, action and outcome.", labels=[*LABELS, "outcome"]
        )
        latency = HistogramMetricFamily(
            "flightcache_request_duration_seconds",
            "Duration of Flight calls by method and action (a do_get until its stream ends).",
            labels=LABELS,
        )
        for r in s["requests"]:
            labels = [r["method"], r["action"] or ""]
            for outcome, n in r["outcomes"].items():
                requests.add_metric([*labels, outcome], n)
            buckets = [(str(bound), n) for bound, n in r["buckets"]] + [("+Inf", r["count"])]
            latency.add_metric(labels, buckets, r["seconds"])
        yield requests
        yield latency


class MetricsEndpoint:
    """A Prometheus ``/metrics`` HTTP endpoint for one server, on its own registry and thread."""

    def __init__(self, server: FlightcacheServer, port: int, host: str = "127.0.0.1") -> None:
        require("prometheus_client", "metrics")
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.process_collector import ProcessCollector

        self.registry = CollectorRegistry()
        self.registry.register(_Collector(server))
        ProcessCollector(registry=self.registry)  # resident memory, CPU, open files of the server process
        try:
            self._http, self._thread = start_http_server(port, host, registry=self.registry)
        except OSError as e:
            raise OSError(e.errno, f"cannot serve metrics at {host}:{port}: {e.strerror}") from e
        self.host = host
        self.port = self._http.server_port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()
