"""The Prometheus endpoint (``serve --metrics-port``): the server's own figures, read at scrape time.

The figures live in plain Python (``RequestStats``, the store's and cache's counters), so ``flightcache
stats`` and ``/metrics`` show the same numbers and nothing is counted twice. ``prometheus-client`` is
needed only here (``pip install 'flightcache[metrics]'``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import require

if TYPE_CHECKING:
    from .flight import FlightcacheServer

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
    ("flightcache_source_checks", "source_checks", "Checks of loaded datasets' sources (listings)."),
    ("flightcache_source_check_failures", "source_check_failures", "Source checks or refreshes that failed."),
    ("flightcache_refreshes_incremental", "refreshes_incremental", "Refreshes that appended only new files."),
    ("flightcache_refreshes_full", "refreshes_full", "Refreshes that reloaded a dataset whole."),
    ("flightcache_refresh_bytes", "refresh_bytes", "Arrow bytes read by refreshes."),
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
    ("flightcache_sources_stale", "sources_stale", "Loaded datasets whose last source check failed."),
    ("flightcache_source_staleness_seconds", "source_staleness_s_max",
     "Most seconds since a loaded dataset last matched its source."),
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
