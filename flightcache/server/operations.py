"""Operations: request accounting, the request log line, and draining.

Every Flight call passes through ``Operations``, a server middleware: it refuses new calls while the
server drains, counts the calls in flight, and when a call completes (for ``do_get``: when its
stream has ended) records its count, outcome and duration per RPC and action and writes one request
log line. Handlers add what only they know (dataset, rows, bytes, action) with ``note``.

The figures live in plain Python (``RequestStats`` here, the store's and cache's counters); the
Prometheus endpoint (``prometheus``) reads them at scrape time and the log format is in ``logs``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import pyarrow.flight as flight

from ..errors import ERRORS_BY_CODE, ServerUnavailableError
from ..protocol import clean_message, error_to_flight
from .logs import logfmt

if TYPE_CHECKING:
    pass

request_log = logging.getLogger("flightcache.requests")

MIDDLEWARE_KEY = "flightcache-ops"
DEFAULT_GRACE_SECONDS = 20.0
# Upper bounds in seconds: a metadata call takes about a millisecond, a stream of gigabytes a minute.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


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
