"""Real parts, really started: a Flight server on 127.0.0.1 port 0 per test, table factories."""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pytest

import flightcache
from flightcache.protocol import Ticket
from flightcache.server.config import ServerConfig, build_server
from flightcache.server.flight import FlightcacheServer

ROOT = Path(__file__).resolve().parent.parent


# Tests that use these fixtures carry the mark, so that `-m "not spark and not s3"` starts neither; a
# test that starts Spark or moto by other means is marked where it is written.
FIXTURE_MARKS = {"spark": "spark", "moto_s3": "s3", "s3_bucket": "s3"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in set(FIXTURE_MARKS).intersection(getattr(item, "fixturenames", ())):
            item.add_marker(FIXTURE_MARKS[fixture])
    # The longest files first (a long timeout marks them): `make test` hands whole files to two processes in
    # this order, and a long file started last would run alone at the end.
    items.sort(key=lambda item: -_timeout(item))


def _timeout(item: pytest.Item) -> float:
    marker = item.get_closest_marker("timeout")
    return float(marker.args[0]) if marker is not None and marker.args else 0.0


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[FlightcacheServer]:
    """A server on 127.0.0.1; for a test's shared-memory read path (``both_read_paths``), with --shm on: it
    fails to start where there is no shared memory, rather than leave a small /dev/shm to "auto"."""
    callspec = getattr(request.node, "callspec", None)
    shm = "on" if callspec is not None and callspec.params.get("client") == "shm" else "auto"
    srv = build_server(ServerConfig(memory_limit=512 * 1024 * 1024, shm=shm))
    yield srv
    srv.shutdown()


@pytest.fixture
def uri(server: FlightcacheServer) -> str:
    return f"grpc://127.0.0.1:{server.port}"


# A read takes one of two paths: shared memory (a client on the server's host maps its files) or a
# do_get stream (any other client). Which one a default client takes depends on the host, so read tests
# name it: ``@both_read_paths`` runs a test that uses ``client`` once per path, on any host.
READ_PATHS = ("shm", "stream")
both_read_paths = pytest.mark.parametrize("client", READ_PATHS, indirect=True)


def read_path_client(uri: str, server: FlightcacheServer, path: str | None) -> flightcache.Client:
    """A client on ``server`` that reads through ``path`` ("shm", "stream"; None: the host's default)."""
    if path == "shm" and server.cache.shm is None:
        pytest.fail("the shared-memory read path cannot be tested: the server has no shared memory on this host")
    return flightcache.connect(uri, shm=None if path is None else path == "shm")


def check_read_path(server: FlightcacheServer, path: str | None) -> None:
    """Fail unless every read the server served took ``path``: a shm client that silently streamed fails."""
    stats = server.stats()
    if path == "shm":
        assert stats["shm_reads"] > 0, "no read went through shared memory"
        assert stats["gets"] == stats["shm_reads"], f"reads streamed instead of mapping shared memory: {stats}"
    elif path == "stream":
        assert stats["shm_reads"] == 0, f"a streaming client read through shared memory: {stats}"


@pytest.fixture
def client(uri: str, server: FlightcacheServer, request: pytest.FixtureRequest) -> Iterator[flightcache.Client]:
    """A client of ``server``; parametrized by ``both_read_paths``, one that reads through that path only."""
    path = getattr(request, "param", None)
    with read_path_client(uri, server, path) as c:
        yield c
    check_read_path(server, path)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what} after {timeout} s"
        time.sleep(0.02)


# -- S3 (a real moto server over HTTP on 127.0.0.1) -------------------------------------------------


class MotoS3:
    """A moto S3 server in this process; ``restart`` stops it and starts it again on the same port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._cls = ThreadedMotoServer
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        self.port = self.server._server.server_port  # type: ignore[union-attr]
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = self._cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


@contextlib.contextmanager
def shaping_proxy(upstream_port: int, latency_ms: float, bandwidth_mbps: float) -> Iterator[int]:
    """bench/shaping.py in front of 127.0.0.1:``upstream_port``, in its own process; its port."""
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "shaping.py"),
            *("--upstream", f"127.0.0.1:{upstream_port}"),
            *("--latency-ms", str(latency_ms), "--bandwidth-mbps", str(bandwidth_mbps)),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        yield json.loads(proc.stdout.readline())["port"]
    finally:
        proc.terminate()
        proc.wait()
        proc.stdout.close()


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[MotoS3]:
    s3 = MotoS3()
    yield s3
    s3.stop()


@pytest.fixture
def s3_bucket(moto_s3: MotoS3, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test on the module's moto server; AWS variables point at it."""
    import re

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_s3.endpoint)
    # the hash keeps apart the cases of a test whose names agree in their first 40 characters
    digest = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{digest}-{os.getpid() % 10000}"
    client = moto_s3.client()
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def storage_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same tests on a local directory and on S3 (fsspec's abstract-test idea)."""
    if request.param == "local":
        return str(tmp_path / "storage")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/cache"


def logs_table(rows: int = 10_000, seed: int = 0) -> pa.Table:
    """A small web-log-like table."""
    import random

    rnd = random.Random(seed)
    return pa.table(
        {
            "ts": pa.array(
                [dt.datetime(2026, 11, 24, tzinfo=dt.UTC) + dt.timedelta(seconds=i) for i in range(rows)],
                pa.timestamp("us", tz="UTC"),
            ),
            "status": pa.array([rnd.choice([200, 200, 200, 304, 404, 500]) for _ in range(rows)], pa.int32()),
            "method": pa.array([rnd.choice(["GET", "POST", "PUT"]) for _ in range(rows)], pa.string()),
            "bytes": pa.array([rnd.randint(0, 100_000) for _ in range(rows)], pa.int64()),
            "latency_ms": pa.array([rnd.random() * 500 for _ in range(rows)], pa.float64()),
        }
    )


def every_type_table() -> pa.Table:
    """One column per Arrow type the store keeps, with nulls."""
    tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
    n = 4
    return pa.table(
        {
            "bool": pa.array([True, False, None, True]),
            "int8": pa.array([1, -2, None, 127], pa.int8()),
            "uint64": pa.array([0, 2**63, None, 1], pa.uint64()),
            "float32": pa.array([1.5, None, -0.0, float("inf")], pa.float32()),
            "float64": pa.array([1.5, None, -1e300, 2.0]),
            "decimal128": pa.array(
                [decimal.Decimal("1.23"), None, decimal.Decimal("-99999.99"), decimal.Decimal(0)], pa.decimal128(10, 2)
            ),
            "decimal256": pa.array(
                [decimal.Decimal("1" * 40), None, decimal.Decimal(0), decimal.Decimal(-1)], pa.decimal256(50, 0)
            ),
            "date32": pa.array([dt.date(2026, 1, 1), None, dt.date(1970, 1, 1), dt.date(2100, 12, 31)]),
            "ts_ns_utc": pa.array([1, None, 3, 4], pa.timestamp("ns", tz="UTC")),
            "ts_us_zone": pa.array(
                [dt.datetime(2026, 11, 24, 12, tzinfo=tz)] * 3 + [None], pa.timestamp("us", tz="Asia/Kolkata")
            ),
            "ts_ms_naive": pa.array([0, 1, None, 2], pa.timestamp("ms")),
            "duration": pa.array([1, None, 3, 4], pa.duration("s")),
            "time64": pa.array([1, None, 3, 4], pa.time64("us")),
            "string": pa.array(["a", None, "", "ünïcode"]),
            "large_string": pa.array(["x" * 10, None, "", "y"], pa.large_string()),
            "binary": pa.array([b"\x00\x01", None, b"", b"z"]),
            "large_binary": pa.array([b"\xff" * 3, None, b"", b"q"], pa.large_binary()),
            "fixed_binary": pa.array([b"ab", b"cd", None, b"ef"], pa.binary(2)),
            "dictionary": pa.array(["red", "green", None, "red"]).dictionary_encode(),
            "list": pa.array([[1, 2], [], None, [3]], pa.list_(pa.int64())),
            "large_list": pa.array([["a"], None, [], ["b", None]], pa.large_list(pa.string())),
            "fixed_list": pa.array([[1.0, 2.0], None, [3.0, 4.0], [5.0, 6.0]], pa.list_(pa.float64(), 2)),
            "struct": pa.array(
                [{"x": 1, "y": "a"}, None, {"x": None, "y": "c"}, {"x": 4, "y": None}],
                pa.struct([("x", pa.int32()), ("y", pa.string())]),
            ),
            "nested": pa.array(
                [[{"k": [1, 2]}], None, [], [{"k": None}]], pa.list_(pa.struct([("k", pa.list_(pa.int16()))]))
            ),
            "map": pa.array([[("a", 1)], None, [], [("b", 2), ("c", None)]], pa.map_(pa.string(), pa.int64())),
            "list_of_dict": pa.array([["p", "q"], None, [], ["p"]], pa.list_(pa.string())).cast(
                pa.list_(pa.dictionary(pa.int32(), pa.string()))
            ),
            "null": pa.nulls(n),
        }
    )


def start_server(*args: str, stderr: Any = None) -> tuple[subprocess.Popen[str], str]:
    """A real ``flightcache serve --port 0`` process (extra flags in ``args``) and its URI."""
    proc, ready = start_server_ready(*args, stderr=stderr)
    return proc, ready["uri"]


def start_server_ready(*args: str, stderr: Any = None) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """Like ``start_server``, with the whole start-up message (uri, pid, metrics, ...)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flightcache.cli", "serve", "--port", "0", "--output", "json", *args],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    while not lines or not lines[-1].startswith("}"):  # the JSON start-up message spans several lines
        line = proc.stdout.readline()
        assert line, f"flightcache serve exited with status {proc.wait()} before it was ready"
        lines.append(line)
    return proc, json.loads("".join(lines))


def stop_server(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> int:
    """Signal a server started by ``start_server``; its exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
    status = proc.wait(timeout=60)
    if proc.stdout is not None:
        proc.stdout.close()
    return status


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the installed ``flightcache`` command."""
    return subprocess.run(
        [sys.executable, "-m", "flightcache.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


# -- Spark -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def spark() -> Iterator[object]:
    """One local Spark session for the whole run: format("flightcache") is the JVM connector (its jar, when
    built), format("flightcache-python") the Python data source."""
    with pytest.MonkeyPatch.context() as mp:
        # Spark's Python workers must run this interpreter, which has flightcache installed.
        mp.setenv("PYSPARK_PYTHON", sys.executable)
        mp.setenv("PYSPARK_DRIVER_PYTHON", sys.executable)
        from pyspark.sql import SparkSession

        import flightcache.integrations.spark
        import flightcache.integrations.spark_jvm

        builder = SparkSession.builder
        if flightcache.integrations.spark_jvm.available():
            builder = flightcache.integrations.spark_jvm.configure(builder)
        session = (
            builder.master("local[2]")
            .appName("flightcache-tests")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.sql.shuffle.partitions", "2")
            .config("spark.default.parallelism", "2")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            # for the tests of option("pushdown", "true"), which needs it (pyspark's default is false)
            .config("spark.sql.python.filterPushdown.enabled", "true")
            .getOrCreate()
        )
        session.sparkContext.setLogLevel("ERROR")
        flightcache.integrations.spark.register(session)
        yield session
        session.stop()


class RecordingServer(FlightcacheServer):
    """A server that keeps the tickets it serves (what Spark asked for) and, with ``endpoint_host``,
    names that host as every endpoint's location."""

    def __init__(self, *args: Any, endpoint_host: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tickets: list[Ticket] = []
        self.endpoint_host = endpoint_host
        self._tickets_lock = threading.Lock()

    def get_flight_info(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> Any:
        info = super().get_flight_info(context, descriptor)
        if self.endpoint_host is None:
            return info
        location = flight.Location.for_grpc_tcp(self.endpoint_host, self.port)
        endpoints = [flight.FlightEndpoint(e.ticket, [location]) for e in info.endpoints]
        return flight.FlightInfo(info.schema, info.descriptor, endpoints, info.total_records, info.total_bytes)

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        with self._tickets_lock:
            self.tickets.append(Ticket.from_bytes(ticket.ticket))
        return super().do_get(context, ticket)

    def take_tickets(self) -> list[Ticket]:
        with self._tickets_lock:
            tickets, self.tickets = self.tickets, []
        return tickets


def files_of(srv: FlightcacheServer) -> list[str]:
    """The files in a server's shared-memory directory."""
    assert srv.cache.shm is not None
    return sorted(os.listdir(srv.cache.shm.dir))
