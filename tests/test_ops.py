"""Operations: Prometheus metrics, the request log, stats, health checks and graceful shutdown."""

from __future__ import annotations

import json
import logging
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from conftest import logs_table, run_cli, start_server, start_server_ready, stop_server
from prometheus_client.parser import text_string_to_metric_families

import flightcache
from flightcache.errors import DatasetNotFoundError, NotInstalledError, ServerUnavailableError
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer
from flightcache.server.logs import JsonFormatter, logfmt
from flightcache.server.prometheus import MetricsEndpoint
from flightcache.server.storage import Storage

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def tiered(tmp_path: Path) -> Iterator[FlightcacheServer]:
    """A server with a local storage tier, so reads can miss and datasets can be evicted."""
    srv = build_server(ServerConfig(memory_limit=64 * 1024 * 1024, storage=str(tmp_path / "storage")))
    yield srv
    srv.shutdown()


@pytest.fixture
def fc(tiered: FlightcacheServer) -> Iterator[flightcache.Client]:
    # shm=False: these tests count the streaming RPCs (get_flight_info, do_get); test_shm covers the shm action
    with flightcache.connect(f"grpc://127.0.0.1:{tiered.port}", shm=False) as c:
        yield c


@pytest.fixture
def endpoint(tiered: FlightcacheServer) -> Iterator[MetricsEndpoint]:
    m = MetricsEndpoint(tiered, 0)
    yield m
    m.close()


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def scrape(url: str, server: FlightcacheServer | None = None) -> Samples:
    """Every sample of the endpoint, keyed by (name, sorted labels)."""
    if server is not None:  # a do_get is accounted when its stream ends on the server, just after the client's
        _wait(lambda: server.ops.in_flight == 0, "the calls in flight to end")
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_follow_puts_reads_misses_evictions_and_drops(
    tiered: FlightcacheServer, fc: flightcache.Client, endpoint: MetricsEndpoint
) -> None:
    """Each cache figure moves as the operations say, and counters never go down when a dataset is dropped."""
    table = logs_table(5000)
    before = scrape(endpoint.url, tiered)
    assert value(before, "flightcache_hits_total") == 0
    assert value(before, "flightcache_memory_limit_bytes") == 64 * 1024 * 1024

    put = fc.put("a", table, persist="sync")
    fc.get("a")
    fc.get("a", columns=["status"])
    s = scrape(endpoint.url, tiered)
    assert value(s, "flightcache_hits_total") == 2 and value(s, "flightcache_misses_total") == 0
    assert value(s, "flightcache_received_bytes_total") > 0 and value(s, "flightcache_served_bytes_total") > 0
    assert value(s, "flightcache_persisted_bytes_total") == put["bytes"]
    assert value(s, "flightcache_memory_used_bytes") == put["bytes"]
    assert value(s, "flightcache_datasets", state="persisted") == 1
    assert value(s, "flightcache_puts_total") == 1 and value(s, "flightcache_gets_total") == 2

    fc.evict("a")
    s = scrape(endpoint.url, tiered)
    assert value(s, "flightcache_evictions_total") == 1 and value(s, "flightcache_memory_used_bytes") == 0
    assert value(s, "flightcache_datasets", state="in-storage-only") == 1

    assert fc.get("a").equals(table)  # read-through
    with pytest.raises(DatasetNotFoundError):
        fc.get("missing")
    s = scrape(endpoint.url, tiered)
    assert value(s, "flightcache_misses_total") == 1 and value(s, "flightcache_hits_total") == 2
    assert value(s, "flightcache_loaded_bytes_total") > 0
    assert value(s, "flightcache_load_seconds_total") > 0

    fc.drop("a")
    after = scrape(endpoint.url, tiered)
    for counter in ("hits", "misses", "evictions", "served_bytes", "loaded_bytes", "persisted_bytes"):
        assert value(after, f"flightcache_{counter}_total") == value(s, f"flightcache_{counter}_total"), counter
    assert value(after, "flightcache_datasets", state="in-storage-only") == 0
    assert value(after, "process_resident_memory_bytes") > 0


def test_request_counts_and_latency_per_rpc_and_action(
    tiered: FlightcacheServer, fc: flightcache.Client, endpoint: MetricsEndpoint
) -> None:
    """flightcache_requests_total and the duration histogram have one series per RPC, action and outcome."""
    fc.put("a", logs_table(100))
    fc.get("a")
    fc.info("a")
    fc.info("a")
    with pytest.raises(DatasetNotFoundError):
        fc.info("nope")
    with pytest.raises(flight.FlightServerError, match="INVALID_REQUEST"):
        list(fc.flight.do_action(flight.Action("no-such-action\nfake=1", b"")))
    s = scrape(endpoint.url, tiered)
    requests = "flightcache_requests_total"
    assert value(s, requests, method="do_put", action="", outcome="ok") == 1
    assert value(s, requests, method="get_flight_info", action="", outcome="ok") == 1
    assert value(s, requests, method="do_get", action="", outcome="ok") == 1
    assert value(s, requests, method="do_action", action="info", outcome="ok") == 2
    assert value(s, requests, method="do_action", action="info", outcome="DATASET_NOT_FOUND") == 1
    # an action name is the client's text: unknown ones share one label value
    assert value(s, requests, method="do_action", action="other", outcome="INVALID_REQUEST") == 1

    histogram = "flightcache_request_duration_seconds"
    info = {"method": "do_action", "action": "info"}
    assert value(s, f"{histogram}_count", **info) == 3
    assert value(s, f"{histogram}_bucket", **info, le="+Inf") == 3
    assert value(s, f"{histogram}_sum", **info) > 0
    bounds = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in s.items()
        if name == f"{histogram}_bucket" and dict(labels)["method"] == "do_get"
    )
    assert [v for _, v in bounds] == sorted(v for _, v in bounds)  # cumulative
    assert bounds[-1] == (float("inf"), 1)


def test_one_log_line_per_request(fc: flightcache.Client, caplog: pytest.LogCaptureFixture) -> None:
    """Every call logs one line with method, dataset, rows, bytes, duration, client and outcome; a put only once."""
    caplog.set_level(logging.INFO, logger="flightcache")
    table = logs_table(1000)
    put = fc.put("logs/raw", table)
    fc.get("logs/raw")
    with pytest.raises(DatasetNotFoundError):
        fc.get("missing")
    fc.drop("logs/raw")

    def lines() -> list[dict[str, Any]]:
        return [r.fields for r in caplog.records if r.name == "flightcache.requests"]  # type: ignore[attr-defined]

    _wait(lambda: len(lines()) == 5, "five request lines")
    by_call = {(line["method"], line["dataset"]): line for line in lines()}
    put_line, info_line, get_line, missing, drop = (
        by_call[("do_put", "logs/raw")],
        by_call[("get_flight_info", "logs/raw")],
        by_call[("do_get", "logs/raw")],
        by_call[("get_flight_info", "missing")],
        by_call[("do_action", "logs/raw")],
    )
    assert put_line["method"] == "do_put" and put_line["dataset"] == "logs/raw"
    assert put_line["rows"] == 1000 and put_line["bytes"] == put["bytes"] and put_line["version"] == 1
    assert put_line["outcome"] == "ok" and put_line["peer"].startswith("ipv") and put_line["duration_ms"] > 0
    assert info_line["method"] == "get_flight_info"
    assert get_line["method"] == "do_get" and get_line["rows"] == 1000 and get_line["bytes"] > 0
    assert missing["outcome"] == "DATASET_NOT_FOUND" and "dataset 'missing' not found" in missing["error"]
    assert drop["action"] == "drop" and drop["dataset"] == "logs/raw"
    text = next(r.getMessage() for r in caplog.records if r.name == "flightcache.requests")
    assert text.startswith("request method=do_put ") and "dataset=logs/raw" in text and "rows=1000" in text
    assert not [r for r in caplog.records if r.name == "flightcache.server"]  # no second line for the put


def test_log_formats() -> None:
    """logfmt keeps one line whatever the value; the JSON formatter adds a request line's fields."""
    assert logfmt({"a": 1, "b": "x y", "c": "q\n=", "d": None}) == 'a=1 b="x y" c="q\\n=" d=null'
    record = logging.LogRecord("flightcache.requests", logging.INFO, __file__, 1, "request %s", ("x",), None)
    record.fields = {"method": "do_get", "rows": 3}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "request x" and entry["method"] == "do_get" and entry["rows"] == 3
    assert entry["level"] == "INFO" and entry["logger"] == "flightcache.requests" and "T" in entry["time"]


def test_healthcheck_action(tiered: FlightcacheServer, fc: flightcache.Client) -> None:
    """The healthcheck action answers status, version and figures; plain Flight clients can call it."""
    fc.put("a", logs_table(10))
    h = fc.healthcheck()
    assert h["status"] == "ok" and h["version"] == flightcache.__version__ and not h["draining"]
    assert h["datasets"] == 1 and h["memory_used"] > 0 and h["memory_limit"] == 64 * 1024 * 1024
    assert h["pending_persists"] == 0 and h["uptime_s"] >= 0
    assert fc.ping()["latency_s"] > 0
    _wait(lambda: fc.healthcheck()["in_flight"] == 0, "no other call in flight")  # the check leaves itself out
    actions = dict((a.type, a.description) for a in fc.flight.list_actions())
    assert "draining" in actions["healthcheck"]
    plain = flight.connect(fc.uri)
    assert (
        json.loads(next(iter(plain.do_action(flight.Action("healthcheck", b"")))).body.to_pybytes())["status"] == "ok"
    )
    plain.close()


def test_metrics_need_the_extra(tiered: FlightcacheServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without prometheus-client the endpoint refuses to start with the pip command to run."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "prometheus_client" else real(name)
    )
    with pytest.raises(NotInstalledError, match=r"pip install 'flightcache\[metrics\]'"):
        MetricsEndpoint(tiered, 0)


# -- the command line -------------------------------------------------------------------------------


@pytest.fixture
def served() -> Iterator[tuple[str, Any]]:
    """A `flightcache serve` process without storage, and its URI."""
    proc, uri = start_server("--memory-limit", "64MiB", "--storage", "none")
    yield uri, proc
    stop_server(proc, signal.SIGKILL)


def test_ping_command(served: tuple[str, Any]) -> None:
    """flightcache ping: exit 0 and one line when the server serves; exit 1 and one line when it is not there."""
    uri, _ = served
    r = run_cli("ping", "--uri", uri)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{uri}: ok, flightcache {flightcache.__version__}") and "0 datasets" in r.stdout
    assert json.loads(run_cli("ping", "--uri", uri, "--output", "json").stdout)["status"] == "ok"
    r = run_cli("ping", "--uri", "grpc://127.0.0.1:1", "--timeout", "2")
    assert r.returncode == 1 and "cannot reach the flightcache server" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_stats_command_tables(served: tuple[str, Any]) -> None:
    """flightcache stats: figures with the hit ratio, a table of calls with latencies, one row per dataset."""
    uri, _ = served
    with flightcache.connect(uri, shm=False) as c:
        c.put("logs/raw", logs_table(100))
        c.get("logs/raw")
    r = run_cli("stats", "--uri", uri)
    assert r.returncode == 0, r.stderr
    assert "hit ratio" in r.stdout and "100.0%" in r.stdout and "calls in flight" in r.stdout
    header = next(line for line in r.stdout.splitlines() if line.startswith("CALL"))
    assert header.split() == ["CALL", "COUNT", "ERRORS", "MEAN", "MS", "P50", "MS", "P99", "MS"]
    assert any(line.split()[:3] == ["do_put", "1", "0"] for line in r.stdout.splitlines())
    assert any(line.split()[:2] == ["logs/raw", "1"] for line in r.stdout.splitlines())  # DATASET, HITS
    s = json.loads(run_cli("stats", "--uri", uri, "--output", "json").stdout)
    assert s["hits"] == 1 and s["puts"] == 1 and "logs/raw" in s["per_dataset"]
    assert {r["method"] for r in s["requests"]} >= {"do_put", "do_get", "get_flight_info"}


def test_metrics_port_taken_is_one_line() -> None:
    """serve --metrics-port on a port in use fails at start with one line, exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("serve", "--port", "0", "--storage", "none", "--metrics-port", str(port))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert f"flightcache serve: error: [Errno 98] cannot serve metrics at 127.0.0.1:{port}" in r.stderr


def _reader_at_first_batch(uri: str, name: str) -> tuple[flight.FlightStreamReader, pa.RecordBatch]:
    c = flight.connect(uri)
    info = c.get_flight_info(flight.FlightDescriptor.for_path(name))
    assert len(info.endpoints) == 1
    reader = c.do_get(info.endpoints[0].ticket)
    return reader, reader.read_chunk().data


@pytest.mark.slow
def test_sigterm_drains_finishes_reads_refuses_new_calls_and_flushes(tmp_path: Path) -> None:
    """SIGTERM: a read in flight completes, new calls are refused, a pending write-back lands, exit 0."""
    storage = tmp_path / "storage"
    log_file = tmp_path / "server.log"
    with log_file.open("w") as err:
        proc, ready = start_server_ready(
            "--memory-limit",
            "512MiB",
            "--storage",
            str(storage),
            "--grace-period",
            "60",
            "--metrics-port",
            "0",
            "--log-level",
            "INFO",
            "--log-format",
            "json",
            stderr=err,
        )
    uri = ready["uri"]
    with flightcache.connect(uri, shm=False) as fc:
        big = pa.table({"x": pa.array(range(8_000_000), pa.int64())})  # 64 MB: more than gRPC buffers
        fc.put("big", big, persist="none")
        assert scrape(ready["metrics"])[("flightcache_datasets", (("state", "memory-only"),))] == 1
        reader, first = _reader_at_first_batch(uri, "big")
        written = fc.put("wb", logs_table(200_000), persist="async")
        proc.send_signal(signal.SIGTERM)
        _wait(lambda: fc.healthcheck()["status"] == "draining", "the server to drain")
        with pytest.raises(ServerUnavailableError, match="shutting down"):
            fc.list()
        with pytest.raises(ServerUnavailableError, match="shutting down"):
            fc.get("big")
        r = run_cli("ping", "--uri", uri)
        assert r.returncode == 1 and "draining" in r.stderr
        rest = reader.read_all()
        assert pa.concat_tables([pa.Table.from_batches([first]), rest]).equals(big)
    assert proc.wait(timeout=60) == 0  # by itself: no second signal
    stop_server(proc)
    manifest = Storage(str(storage)).manifest("wb")
    assert manifest is not None and manifest.rows == 200_000 and manifest.version == written["version"]
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]  # JSON only: nothing else on stderr
    puts = [e for e in lines if e["logger"] == "flightcache.requests" and e.get("method") == "do_put"]
    assert [(e["dataset"], e["rows"]) for e in puts] == [("big", 8_000_000), ("wb", 200_000)]
    refused = [(e["method"], e.get("action")) for e in lines if e.get("outcome") == "UNAVAILABLE"]
    assert refused == [("do_action", "list"), ("get_flight_info", None)]
    assert not [e for e in lines if "again" in e["message"]]
    summary = next(e["message"] for e in lines if e["message"].startswith("stopped after"))
    assert "calls finished, 0 cut" in summary and "0 failed" in summary


@pytest.mark.slow
def test_streams_past_the_grace_period_are_cut(tmp_path: Path) -> None:
    """A reader that stops reading does not hold the server up: after the grace period it exits 0."""
    log_file = tmp_path / "server.log"
    with log_file.open("w") as err:
        proc, uri = start_server("--storage", "none", "--grace-period", "1", stderr=err)
    with flightcache.connect(uri) as fc:
        fc.put("big", pa.table({"x": pa.array(range(8_000_000), pa.int64())}))
        reader, _ = _reader_at_first_batch(uri, "big")
        assert stop_server(proc) == 0
        with pytest.raises((flight.FlightError, pa.ArrowException)):
            reader.read_all()
    assert "0 calls finished, 1 cut at the end of the grace period" in log_file.read_text()


def test_exit_status_1_when_a_write_back_failed(tmp_path: Path) -> None:
    """A dataset that could not be persisted is lost with the process: the stop says so and exits 1."""
    storage = tmp_path / "storage"
    storage.mkdir()
    (storage / "wb").write_text("a file where the dataset's directory goes")
    log_file = tmp_path / "server.log"
    with log_file.open("w") as err:
        proc, uri = start_server("--storage", str(storage), stderr=err)
    with flightcache.connect(uri) as fc:
        fc.put("wb", logs_table(100), persist="async")
        _wait(lambda: fc.info("wb")["state"] == "persist-failed", "the write-back to fail")
    assert stop_server(proc) == 1
    assert "1 datasets failed to persist" in log_file.read_text()


@pytest.mark.slow
def test_second_signal_stops_waiting(tmp_path: Path) -> None:
    """A second SIGINT ends the grace period at once: the stalled read is cut, the stop is still clean."""
    log_file = tmp_path / "server.log"
    with log_file.open("w") as err:
        proc, uri = start_server("--storage", "none", "--grace-period", "600", stderr=err)
    with flightcache.connect(uri) as fc:
        fc.put("big", pa.table({"x": pa.array(range(8_000_000), pa.int64())}))
        reader, _ = _reader_at_first_batch(uri, "big")
        proc.send_signal(signal.SIGINT)
        _wait(lambda: fc.healthcheck()["draining"], "the server to drain")
        assert stop_server(proc, signal.SIGINT) == 0
        with pytest.raises((flight.FlightError, pa.ArrowException)):
            reader.read_all()
    log = log_file.read_text()
    assert "received SIGINT again: not waiting" in log and "0 calls finished, 1 cut" in log


def test_help_shows_the_operations_flags() -> None:
    """The new flags and the ping command are explained by --help."""
    r = run_cli("serve", "--help")
    for flag in ("--metrics-port", "--metrics-host", "--grace-period", "--log-format"):
        assert flag in r.stdout, flag
    assert "ping" in run_cli("--help").stdout and "--timeout" in run_cli("ping", "--help").stdout
