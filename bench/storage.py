"""Loading Parquet from S3 into flightcache versus pyarrow's own reads of the same files, and what a cached
``get`` saves a second pipeline stage compared with reading the Parquet from S3 again.

moto's S3 server, the flightcache server and this benchmark client each run in their own process: moto
inside the benchmark process holds the GIL while it serves bytes and distorts every figure. The paths are
interleaved within each repetition (their order rotates from rep to rep) and every ratio is computed
within this run.

    .venv/bin/python bench/storage.py            # ~1 GiB, 3 reps -> bench_results/storage.{json,png}
    .venv/bin/python bench/storage.py --quick    # 64 MiB, 1 rep -> a new temp dir, in seconds

On a quiet 2-core machine a 1 GiB rep takes about 25 s (the committed results: --reps 5, 4 minutes); on a busy
one the run waits for quiet before each timed call and measures disturbed samples again (--quiet-wait, --redo).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.flight as flight
import pyarrow.fs as pafs
import pyarrow.parquet as pq

try:
    from ._common import GB, machine_info, median, progress, rss_bytes, sources_digest, write_json
except ImportError:  # run as a script: bench/ is on sys.path
    from _common import GB, machine_info, median, progress, rss_bytes, sources_digest, write_json

SEED = 20261124
MiB = 2**20
BUCKET = "bench"
RAW = f"{BUCKET}/raw"
PYARROW_OUT = f"{BUCKET}/pyarrow-write"
STORAGE_URI = f"s3://{BUCKET}/cache"
LOADED = "bench/logs"
PERSISTED = "bench/persisted"
WARM = "bench/warm"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bench_results"
QUIET_WINDOW = 0.5  # seconds over which the machine's other load is sampled before a timed call
QUIET_CORES = 0.15  # at most this much CPU (in cores) used by other processes counts as quiet
DISTURBED_CORES = 0.1  # a sample during which other processes used more than this (on average) is disturbed
TICK_FLOOR_S = 0.05  # /proc/stat counts in 10 ms ticks: less than this is rounding, not another process
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # the AWS SDK would otherwise probe the instance metadata service
}

# key -> (group, label); the order is the order of the plot and the summary.
PATHS: dict[str, tuple[str, str]] = {
    "load": ("load", "flightcache client.load (server reads S3)"),
    "pq_read_table": ("pyarrow", "pyarrow.parquet.read_table"),
    "ds_to_table": ("pyarrow", "pyarrow.dataset(...).to_table()"),
    "read_external": ("read_external", "flightcache read_external, in the client"),
    "server_pq_read_table": ("server_read", "pyarrow.parquet.read_table, in the server process"),
    "server_ds_to_table": ("server_read", "pyarrow.dataset(...).to_table(), in the server process"),
    "server_read_external": ("server_read", "flightcache read_external, in the server process"),
    "fetch_only": ("floor", "floor: GET whole objects only (8 threads)"),
    "decode_only": ("floor", "floor: decode Parquet from memory only"),
    "get_cached": ("get", "flightcache client.get (cached)"),
    "put_sync": ("write", "flightcache put persist=sync (write-through)"),
    "pyarrow_write": ("write", "pyarrow.dataset.write_dataset (zstd) to S3"),
    "get_readthrough": ("readthrough", "flightcache get after evict (read-through)"),
    "get_after_readthrough": ("readthrough", "flightcache get, second (cached)"),
}
LOAD_GROUP = (
    "load",
    "pq_read_table",
    "ds_to_table",
    "read_external",
    "server_pq_read_table",
    "server_ds_to_table",
    "server_read_external",
)
WRITE_GROUP = ("put_sync", "pyarrow_write")
GROUP_COLORS = {
    "load": ("#1f77b4", "into the cache: client.load"),
    "pyarrow": ("#888888", "pyarrow reads of the same files (client process)"),
    "read_external": ("#9467bd", "flightcache read_external in the client (load minus the server)"),
    "server_read": ("#17becf", "the same reads inside the server process (result discarded)"),
    "floor": ("#c7c7c7", "diagnostic floors: S3 transfer only / decode only"),
    "get": ("#2ca02c", "cached get (second pipeline stage)"),
    "write": ("#ff7f0e", "writes to S3"),
    "readthrough": ("#bcbd22", "read-through of flightcache's own Parquet"),
}

S3_SHAPE = {
    "server": "moto (python -m moto.server), its own process, on the same 2-core machine as everything else",
    "network": "loopback (127.0.0.1, plain HTTP); no shaping: no added latency, no bandwidth cap, no throttling",
    "object_store": "moto keeps an object in memory up to 5 MiB and in a temp file beyond, and answers every GET, "
    "ranged or not, by reading the whole object and slicing it, under a per-object lock",
    "caveat": "real S3 is slower per connection (tens of ms to first byte, ~100 MB/s per connection) and more "
    "variable, and charges a ranged GET for its bytes only; these figures compare code paths on one machine, they "
    "are not S3 throughput. No attempt is made to model S3 here.",
}
NOTES = [
    "GB/s = Arrow bytes of the dataset (the generated tables' nbytes) / wall time of the whole call; 1 GB = 1e9 B.",
    "The client (this process), the flightcache server and moto share 2 cores: CPU spent by one is not available "
    "to the others, so each sample records every process's user and system CPU seconds and minor page faults "
    "(cpu), and median_cpu_s sums user and system.",
    "load, pq_read_table, ds_to_table and read_external read the same files; their order rotates from rep to rep. "
    "The dataset is dropped (untimed) before each load.",
    "The S3 re-read a second pipeline stage would do is the faster of pq_read_table and ds_to_table in the same "
    "reps; get_cached runs right after them, on the dataset the rep's load brought in.",
    "put_sync sends the table over Flight and returns once flightcache's Parquet (zstd, 128 MiB Arrow parts) has "
    "committed to S3; pyarrow_write writes the same table with pyarrow.dataset.write_dataset (zstd) straight from "
    "the client. get_readthrough reads flightcache's own Parquet after an evict; get_after_readthrough is the next "
    "get, from memory.",
    "fetch_only (whole-object GETs into memory, no decode) and decode_only (pq.read_table from those bytes in "
    "memory) are diagnostic floors that split read_external's time into transfer and decode.",
    "requests counts moto's access log lines per call: 'GET 206' is a ranged GET.",
    f"Samples during which other processes used more than {DISTURBED_CORES} of a core on average are flagged "
    "disturbed; the medians and ratios use every sample, 'undisturbed' medians and ratios only the others. "
    "Before each timed call the benchmark waits (up to --quiet-wait s) for the machine to be quiet, and a disturbed "
    "sample is measured again (up to --redo times); the samples it replaced are listed under "
    "discarded_disturbed_samples.",
    "machine_pages_allocated_mib and machine_thp_faults (from /proc/vmstat, the whole machine) show how much fresh "
    "memory a call made the kernel hand out: on this VM, system CPU time grows with it, by up to seconds per GiB.",
    "noise: other_tasks_s is the machine's task CPU time during the call minus that of the three processes (other "
    "work on the machine, kernel threads), irq_s interrupt time (mostly loopback TCP, charged to no process), "
    "steal_s the time the hypervisor gave the VM's CPUs to someone else.",
    "server_* run the client's reads inside the flightcache server process (a 'bench.read' action; the table is "
    "dropped at once): same process, allocator and CPU share as load, so load / server_* isolates what load adds "
    "to a plain read, free of differences between the two processes.",
    "server_phases are wall times inside the flightcache server process, from timing wrappers around "
    "flightcache.cache.read_external, Cache.load, Storage.read_version/write_version and Store.restore.",
]

# -- the data ------------------------------------------------------------------------------------

_SECTIONS = [
    "api/v1/users",
    "api/v1/orders",
    "api/v2/items",
    "static/img",
    "static/js",
    "search",
    "checkout",
    "blog/posts",
    "account/settings",
    "cart",
]
_BROWSERS = ["Chrome/131.0.0.0", "Firefox/133.0", "Safari/605.1.15", "Edg/131.0.2903.70", "curl/8.5.0"]
_SYSTEMS = [
    "Windows NT 10.0; Win64; x64",
    "Macintosh; Intel Mac OS X 10_15_7",
    "X11; Linux x86_64",
    "iPhone; CPU iPhone OS 18_1 like Mac OS X",
]


def _vocabularies(seed: int) -> dict[str, pa.Array]:
    rng = np.random.default_rng(seed)
    urls = [
        f"/{_SECTIONS[i % len(_SECTIONS)]}/{rng.integers(1, 10**7)}"
        + (f"?q={'abcdefghij'[: 1 + i % 10]}&page={i % 7}" if i % 3 == 0 else "")
        for i in range(8192)
    ]
    octets = rng.integers(0, 256, (16384, 3))
    agents = [
        f"Mozilla/5.0 ({system}) AppleWebKit/537.36 (KHTML, like Gecko) {browser}"
        for system in _SYSTEMS
        for browser in _BROWSERS
    ]
    return {
        "url": pa.array(urls),
        "client_ip": pa.array([f"10.{a}.{b}.{c}" for a, b, c in octets]),
        "user_agent": pa.array(agents),
        "host": pa.array([f"web-{i:02d}.eu-west-1.internal" for i in range(24)]),
        "method": pa.array(["GET", "POST", "PUT", "DELETE", "HEAD"]),
    }


def log_table(rows: int, part: int, seed: int = SEED) -> pa.Table:
    """A deterministic web-log table: part ``part`` of the dataset, ``rows`` rows."""
    vocab = _vocabularies(seed)
    rng = np.random.default_rng([seed, part])
    start = np.datetime64("2026-11-24T00:00:00", "us").astype(np.int64) + part * rows * 10_000
    ts = start + np.cumsum(rng.integers(0, 20_000, rows, dtype=np.int32), dtype=np.int64)
    codes = np.array([200] * 40 + [201, 204, 301, 302, 304, 304, 400, 401, 403, 404, 404, 429, 500, 502, 503])

    def pick(name: str, index: np.ndarray) -> pa.Array:
        # A dictionary cast builds the string column without a Python object per row.
        return pa.DictionaryArray.from_arrays(pa.array(index.astype(np.int32)), vocab[name]).cast(pa.string())

    method = np.minimum(rng.standard_exponential(rows) * 0.6, len(vocab["method"]) - 1)
    return pa.table(
        {
            "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
            "host": pick("host", rng.integers(0, len(vocab["host"]), rows)),
            "method": pick("method", method),
            "url": pick("url", (rng.standard_exponential(rows) * 600).astype(np.int64) % len(vocab["url"])),
            "status": pa.array(codes[rng.integers(0, len(codes), rows)].astype(np.int16)),
            "bytes_sent": (rng.standard_exponential(rows) * 20_000).astype(np.int64),
            "latency_ms": rng.standard_exponential(rows) * 35.0 + 0.2,
            "user_id": rng.integers(1, 2_000_000_000, rows).astype(np.int64),
            "client_ip": pick("client_ip", rng.integers(0, len(vocab["client_ip"]), rows)),
            "user_agent": pick("user_agent", rng.integers(0, len(vocab["user_agent"]), rows)),
        }
    )


def write_raw(fs: pafs.FileSystem, size: int, files: int) -> dict[str, Any]:
    """Write ``files`` Parquet files of about ``size`` Arrow bytes in all under s3://bench/raw/."""
    sample = log_table(20_000, 0)
    rows_per_file = max(1, round(size / (sample.nbytes / sample.num_rows) / files))
    arrow_bytes = rows = 0
    for i in range(files):
        table = log_table(rows_per_file, i)
        # pyarrow's defaults (snappy, 1Mi-row groups), as a producer that knows nothing of flightcache writes.
        pq.write_table(table, f"{RAW}/part-{i:05d}.parquet", filesystem=fs)
        arrow_bytes += table.nbytes
        rows += table.num_rows
        progress(f"  wrote {RAW}/part-{i:05d}.parquet ({table.nbytes / MiB:.0f} MiB Arrow)")
    infos = fs.get_file_info(pafs.FileSelector(RAW))
    return {
        "rows": rows,
        "arrow_bytes": arrow_bytes,
        "files": files,
        "parquet_bytes": sum(i.size for i in infos),
        "parquet_file_bytes": sorted(i.size for i in infos),
        "compression": "snappy (pyarrow default)",
        "row_group_rows": 1024 * 1024,
        "schema": sample.schema.to_string(),
    }


# -- the processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_stat(pid: int) -> dict[str, float]:
    """User and system CPU seconds and minor page faults of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {"user": int(fields[11]) / tick, "sys": int(fields[12]) / tick, "minflt": int(fields[7])}


def machine_cpu() -> dict[str, float]:
    """CPU seconds of the whole machine so far, from /proc/stat: busy in tasks (user, nice, system), in interrupts
    (irq, softirq: loopback TCP is mostly softirq, charged to no process), and stolen by the hypervisor."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = (
        int(v) / os.sysconf("SC_CLK_TCK") for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]
    )
    return {"tasks": user + nice + system, "irq": irq + softirq, "steal": steal}


def vmstat() -> dict[str, int]:
    """Machine-wide page allocations and transparent-huge-page faults so far, from /proc/vmstat."""
    wanted = ("pgalloc_normal", "thp_fault_alloc", "pgfault")
    found = dict.fromkeys(wanted, 0)
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name in found:
            found[name] = int(value)
    return found


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # werkzeug colours some log lines
_REQUEST = re.compile(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3})')


@dataclass
class Moto:
    """moto's S3 server in its own process; its access log counts the requests of each call."""

    log: Path
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _offset: int = 0

    def start(self) -> None:
        self.port = free_port()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env={**os.environ, **AWS_ENV},
            )
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto did not start; see {self.log}") from None
                time.sleep(0.1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def requests(self) -> dict[str, int]:
        """Requests moto answered since the last call, as {"METHOD status": count}."""
        with self.log.open("rb") as f:
            f.seek(self._offset)
            text = f.read()
        cut = text.rfind(b"\n") + 1  # a line still being written is counted next time
        self._offset += cut
        return dict(
            Counter(f"{m[0]} {m[2]}" for m in _REQUEST.findall(_ANSI.sub("", text[:cut].decode(errors="replace"))))
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


@dataclass
class Server:
    """The flightcache server, in its own process (this file with --serve)."""

    spec: dict[str, Any]
    env: dict[str, str]
    proc: subprocess.Popen[str] | None = None
    uri: str = ""

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(self.spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # the allocator flightcache serve runs on (its --memory-pool default)
            env={**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "jemalloc", **self.env},
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the flightcache server exited with {self.proc.wait()} before it was ready")
        self.uri = f"grpc://127.0.0.1:{json.loads(line)['port']}"

    def _action(self, kind: str, body: bytes = b"") -> Any:
        conn = flight.connect(self.uri)
        try:
            answer = next(iter(conn.do_action(flight.Action(kind, body))))
        finally:
            conn.close()
        return json.loads(answer.body.to_pybytes())

    def phases(self) -> dict[str, list[float]]:
        """Wall times of the server's instrumented phases since the last call."""
        return self._action("bench.phases")  # type: ignore[no-any-return]

    def read(self, reader: str) -> int:
        """Run one of the client's reads inside the server process; returns the rows read."""
        return int(self._action("bench.read", reader.encode())["rows"])

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def serve(spec: dict[str, Any]) -> None:
    """Server-process entry point: flightcache's server as ``flightcache serve`` builds it, plus timing
    wrappers and a 'bench.phases' action; prints {"port": N} and serves until stdin closes."""
    from flightcache.server import cache as cache_module
    from flightcache.server.cache import Cache
    from flightcache.server.config import ServerConfig, build_server
    from flightcache.server.flight import FlightcacheServer
    from flightcache.server.storage import Storage
    from flightcache.server.store import Store
    from flightcache.units import parse_bytes

    phases: dict[str, list[float]] = defaultdict(list)
    lock = threading.Lock()

    def timed(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with lock:
                    phases[key].append(round(time.perf_counter() - started, 4))

        return wrapper

    cache_module.read_external = timed("read_external", cache_module.read_external)  # type: ignore[assignment]
    Cache.load = timed("cache.load", Cache.load)  # type: ignore[method-assign]
    Cache._publish_through = timed("cache.publish_through", Cache._publish_through)  # type: ignore[method-assign]
    Cache._read_stored = timed("cache.read_stored", Cache._read_stored)  # type: ignore[method-assign]
    Storage.read_version = timed("storage.read_version", Storage.read_version)  # type: ignore[method-assign]
    Storage.write_version = timed("storage.write_version", Storage.write_version)  # type: ignore[method-assign]
    Store.restore = timed("store.restore", Store.restore)  # type: ignore[method-assign]

    fs = s3_filesystem(os.environ["AWS_ENDPOINT_URL"])
    readers: dict[str, Callable[[], pa.Table]] = {
        "pq_read_table": lambda: pq.read_table(f"{RAW}/", filesystem=fs),
        "ds_to_table": lambda: ds.dataset(f"{RAW}/", filesystem=fs, format="parquet").to_table(),
        "read_external": lambda: cache_module.read_external(f"s3://{RAW}/"),
    }

    class BenchServer(FlightcacheServer):
        def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Any:
            if action.type == "bench.phases":
                with lock:
                    answer = dict(phases)
                    phases.clear()
                return [json.dumps(answer).encode()]
            if action.type == "bench.read":  # the client's reads, run in this process, the result dropped
                rows = readers[action.body.to_pybytes().decode()]().num_rows
                return [json.dumps({"rows": rows}).encode()]
            return super().do_action(context, action)

    config = ServerConfig(memory_limit=parse_bytes(spec["memory_limit"]), storage=spec["storage"], shm="auto")
    server = build_server(config, BenchServer)
    print(json.dumps({"port": server.port}), flush=True)
    sys.stdin.read()
    server.shutdown()


# -- the measurements ----------------------------------------------------------------------------


@dataclass
class Measure:
    key: str
    group: str
    label: str
    seconds: list[float] = field(default_factory=list)
    cpu: list[dict[str, dict[str, float]]] = field(default_factory=list)  # process -> user s, sys s, minflt
    noise: list[dict[str, float]] = field(default_factory=list)  # CPU of other processes, time stolen from the VM
    requests: list[dict[str, int]] = field(default_factory=list)
    phases: list[dict[str, list[float]]] = field(default_factory=list)
    discarded: list[dict[str, Any]] = field(default_factory=list)  # disturbed samples measured again

    def add(self, sample: dict[str, Any]) -> None:
        self.seconds.append(sample["seconds"])
        self.cpu.append(sample["cpu"])
        self.noise.append(sample["noise"])
        self.requests.append(sample["requests"])
        self.phases.append(sample["phases"])


class Bench:
    """Every path of the benchmark, with what each needs, and the bookkeeping around a timed call."""

    def __init__(self, args: argparse.Namespace, moto: Moto, server: Server, data: dict[str, Any]) -> None:
        import flightcache

        self.args = args
        self.moto = moto
        self.server = server
        self.rows = data["rows"]
        self.arrow_bytes = data["arrow_bytes"]
        self.client = flightcache.connect(server.uri)
        self.fs = s3_filesystem(moto.endpoint)
        self.files = sorted(i.path for i in self.fs.get_file_info(pafs.FileSelector(RAW)))
        self.raw_bytes: list[pa.Buffer] = []
        self.table: pa.Table | None = None  # kept from the first pyarrow read, for the writes
        self.measures = {key: Measure(key, group, label) for key, (group, label) in PATHS.items()}
        self.quiet_budget = 12 * args.quiet_wait
        self.redo_budget = args.redo * len(PATHS)
        self.runs: dict[str, Callable[[], int]] = {
            "load": self.load,
            "pq_read_table": lambda: self.keep(pq.read_table(f"{RAW}/", filesystem=self.fs)),
            "ds_to_table": lambda: ds.dataset(f"{RAW}/", filesystem=self.fs, format="parquet").to_table().num_rows,
            "read_external": self.read_external,
            "server_pq_read_table": lambda: self.server.read("pq_read_table"),
            "server_ds_to_table": lambda: self.server.read("ds_to_table"),
            "server_read_external": lambda: self.server.read("read_external"),
            "fetch_only": self.fetch_only,
            "decode_only": self.decode_only,
            "get_cached": lambda: self.client.get(LOADED).num_rows,
            "put_sync": self.put_sync,
            "pyarrow_write": self.pyarrow_write,
            "get_readthrough": lambda: self.client.get(PERSISTED).num_rows,
            "get_after_readthrough": lambda: self.client.get(PERSISTED).num_rows,
        }
        self.setups: dict[str, Callable[[], None]] = {
            "load": lambda: self.drop(LOADED),
            "put_sync": lambda: self.drop(PERSISTED),
            "pyarrow_write": lambda: self.fs.delete_dir_contents(PYARROW_OUT, missing_dir_ok=True),
            "get_readthrough": lambda: self.client.evict(PERSISTED),
        }

    # -- the paths -----------------------------------------------------------------------------

    def load(self) -> int:
        return int(self.client.load(LOADED, f"s3://{RAW}/")["rows"])

    def read_external(self) -> int:
        from flightcache.server.storage import read_external

        return read_external(f"s3://{RAW}/", threads=self.args.threads).num_rows

    def keep(self, table: pa.Table) -> int:
        if self.table is None:
            self.table = table
        return table.num_rows

    def fetch_only(self) -> int:
        def fetch(path: str) -> pa.Buffer:
            with self.fs.open_input_file(path) as f:
                return f.read_buffer()

        with ThreadPoolExecutor(self.args.threads) as pool:
            self.raw_bytes = list(pool.map(fetch, self.files))
        return sum(pq.read_metadata(pa.BufferReader(b)).num_rows for b in self.raw_bytes)

    def decode_only(self) -> int:
        if not self.raw_bytes:
            self.fetch_only()
        with ThreadPoolExecutor(self.args.threads) as pool:
            tables = list(pool.map(lambda b: pq.read_table(pa.BufferReader(b)), self.raw_bytes))
        return pa.concat_tables(tables).num_rows

    def put_sync(self) -> int:
        assert self.table is not None
        return int(self.client.put(PERSISTED, self.table, persist="sync")["rows"])

    def pyarrow_write(self) -> int:
        assert self.table is not None
        per_file = max(1, -(-self.table.num_rows // len(self.files)))  # as many files as the raw dataset
        ds.write_dataset(
            self.table,
            PYARROW_OUT,
            filesystem=self.fs,
            format="parquet",
            file_options=ds.ParquetFileFormat().make_write_options(compression="zstd"),
            max_rows_per_group=min(1024 * 1024, per_file),
            max_rows_per_file=per_file,
            existing_data_behavior="overwrite_or_ignore",
        )
        return self.table.num_rows

    def drop(self, name: str) -> None:
        if any(d["name"] == name for d in self.client.list()):
            self.client.drop(name)

    # -- bookkeeping ---------------------------------------------------------------------------

    def run(self, key: str) -> float:
        """One timed sample of ``key``; a disturbed one is measured again (within --redo and a run budget)."""
        m = self.measures[key]
        for attempt in range(1 + self.args.redo):
            sample = self.sample(key)
            if not sample["noise"]["disturbed"] or attempt == self.args.redo or self.redo_budget <= 0:
                break
            self.redo_budget -= 1
            m.discarded.append(sample)
            progress(f"{key}: other processes took {sample['noise']['other_tasks_s']:.2f} CPU s of the sample; again")
        m.add(sample)
        return float(sample["seconds"])

    def sample(self, key: str, wait: bool = True) -> dict[str, Any]:
        setup = self.setups.get(key)
        if setup is not None:
            setup()
        gc.collect()
        self.moto.requests()
        self.server.phases()
        assert self.server.proc is not None and self.moto.proc is not None
        pids = {"client": os.getpid(), "server": self.server.proc.pid, "moto": self.moto.proc.pid}
        waited = self.wait_for_quiet(list(pids.values())) if wait else 0.0
        before = {name: proc_stat(pid) for name, pid in pids.items()}
        machine0, vm0 = machine_cpu(), vmstat()
        started = time.perf_counter()
        rows = self.runs[key]()
        elapsed = time.perf_counter() - started
        machine1, vm1 = machine_cpu(), vmstat()
        after = {name: proc_stat(pid) for name, pid in pids.items()}
        if rows != self.rows:
            raise RuntimeError(f"{key}: {rows} rows, expected {self.rows}")
        cpu = {
            name: {k: round(after[name][k] - before[name][k], 3) for k in ("user", "sys", "minflt")} for name in pids
        }
        other = max(0.0, machine1["tasks"] - machine0["tasks"] - sum(c["user"] + c["sys"] for c in cpu.values()))
        noise = {
            "other_tasks_s": round(other, 3),
            "irq_s": round(machine1["irq"] - machine0["irq"], 3),
            "steal_s": round(machine1["steal"] - machine0["steal"], 3),
            "quiet_wait_s": round(waited, 2),
            "disturbed": other > max(DISTURBED_CORES * elapsed, TICK_FLOOR_S),
            "machine_pages_allocated_mib": round((vm1["pgalloc_normal"] - vm0["pgalloc_normal"]) * 4096 / MiB),
            "machine_thp_faults": vm1["thp_fault_alloc"] - vm0["thp_fault_alloc"],
        }
        return {
            "seconds": elapsed,
            "cpu": cpu,
            "noise": noise,
            "requests": self.moto.requests(),
            "phases": self.server.phases(),
        }

    def wait_for_quiet(self, pids: list[int]) -> float:
        """Wait (up to --quiet-wait seconds, within a budget for the run) until other processes leave the CPUs
        alone: a test suite or another benchmark on this shared 2-core machine would otherwise land in one
        path's sample and not in the other's."""
        if self.args.quiet_wait <= 0 or self.quiet_budget <= 0:
            return 0.0
        started = time.monotonic()
        while True:
            machine0, ours0 = machine_cpu()["tasks"], sum(proc_stat(p)["user"] + proc_stat(p)["sys"] for p in pids)
            time.sleep(QUIET_WINDOW)
            ours1 = sum(proc_stat(p)["user"] + proc_stat(p)["sys"] for p in pids)
            other = machine_cpu()["tasks"] - machine0 - (ours1 - ours0)
            waited = time.monotonic() - started
            if other <= QUIET_CORES * QUIET_WINDOW or waited >= min(self.args.quiet_wait, self.quiet_budget):
                break
        if waited > QUIET_WINDOW * 1.5:
            progress(f"waited {waited:.1f}s for other processes to leave the CPUs")
        self.quiet_budget -= waited
        return waited

    def warm_up(self) -> None:
        """One untimed call of every path, so no path pays the process's first S3 client, imports or page
        faults in its first sample."""
        for key in PATHS:
            self.sample(key, wait=False)

    def measure(self) -> None:
        for rep in range(self.args.reps):
            loads = LOAD_GROUP[rep % len(LOAD_GROUP) :] + LOAD_GROUP[: rep % len(LOAD_GROUP)]
            writes = WRITE_GROUP[rep % 2 :] + WRITE_GROUP[: rep % 2]
            order = [*loads, "fetch_only", "decode_only", "get_cached", *writes]
            order += ["get_readthrough", "get_after_readthrough"]
            for key in order:
                elapsed = self.run(key)
                progress(f"rep {rep + 1}/{self.args.reps} {key:<22} {elapsed:7.2f}s {self.gbps(elapsed):6.3f} GB/s")
            rss = {"client": rss_bytes(os.getpid())}
            for name, proc in (("server", self.server.proc), ("moto", self.moto.proc)):
                assert proc is not None
                rss[name] = rss_bytes(proc.pid)
            progress("RSS GiB: " + ", ".join(f"{k} {v / 2**30:.2f}" for k, v in rss.items()))

    def gbps(self, seconds: float) -> float:
        return self.arrow_bytes / seconds / GB


def s3_filesystem(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[1], scheme="http", region=AWS_ENV["AWS_REGION"])


# -- the run -------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import boto3

    moto = Moto(workdir / "moto.log")
    server: Server | None = None
    try:
        progress("starting moto S3 in its own process")
        moto.start()
        env = {**AWS_ENV, "AWS_ENDPOINT_URL": moto.endpoint}
        os.environ.update(env)  # for read_external and pyarrow in this process
        boto3.client("s3", endpoint_url=moto.endpoint).create_bucket(Bucket=BUCKET)
        progress(f"writing ~{args.size / MiB:.0f} MiB (Arrow) of web logs as {args.files} Parquet files to s3://{RAW}/")
        data = write_raw(s3_filesystem(moto.endpoint), args.size, args.files)
        progress(
            f"dataset: {data['rows']:,} rows, {data['arrow_bytes'] / MiB:.0f} MiB Arrow, "
            f"{data['parquet_bytes'] / MiB:.0f} MiB Parquet"
        )
        server = Server({"storage": STORAGE_URI, "memory_limit": args.memory_limit}, env)
        server.start()
        progress(f"flightcache server at {server.uri}; warm-up")
        bench = Bench(args, moto, server, data)
        bench.warm_up()
        bench.measure()
        info = bench.client.info(PERSISTED)
        stored = bench.fs.get_file_info(pafs.FileSelector(f"{STORAGE_URI[5:]}/{PERSISTED}", recursive=True))
        info["parquet_bytes"] = sum(i.size for i in stored if i.base_name.endswith(".parquet"))
        info["parquet_files"] = sum(i.base_name.endswith(".parquet") for i in stored)
    finally:
        if server is not None:
            server.stop()
        moto.stop()
    results = summarize(bench)
    results["dataset"] = data
    results["persisted"] = {
        k: info[k] for k in ("bytes", "rows", "batches", "parquet_bytes", "parquet_files", "persisted_version")
    }
    results["persisted"]["format"] = "flightcache storage: zstd, 1Mi-row groups, 128 MiB (Arrow) parts, manifest"
    results["client_max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return results


def summarize(bench: Bench) -> dict[str, Any]:
    ms = bench.measures
    med = {k: median(m.seconds) for k, m in ms.items()}
    best_read = min(("pq_read_table", "ds_to_table"), key=lambda k: med[k])
    best_server = min(("server_pq_read_table", "server_ds_to_table"), key=lambda k: med[k])

    calm = {k: [s for s, n in zip(m.seconds, m.noise, strict=True) if not n["disturbed"]] for k, m in ms.items()}

    def ratio(num: str, den: str, meaning: str) -> dict[str, Any]:
        per_rep = [a / b for a, b in zip(ms[num].seconds, ms[den].seconds, strict=True)]
        return {
            "meaning": meaning,
            "of_median_seconds": round(med[num] / med[den], 4),
            "of_undisturbed_medians": round(median(calm[num]) / median(calm[den]), 4)
            if calm[num] and calm[den]
            else None,
            "median_per_rep": round(median(per_rep), 4),
            "per_rep": [round(r, 4) for r in per_rep],
        }

    ratios = {
        "load / best_pyarrow_read": ratio("load", best_read, f"load time / {best_read} time (target <= 1.10)"),
        "load / pq_read_table": ratio("load", "pq_read_table", "time ratio"),
        "load / ds_to_table": ratio("load", "ds_to_table", "time ratio"),
        "read_external / best_pyarrow_read": ratio(
            "read_external", best_read, "flightcache's reader in the client process / pyarrow's, time ratio"
        ),
        "load / read_external": ratio(
            "load", "read_external", "load / the same reader in the client process, time ratio"
        ),
        "load / best_server_pyarrow_read": ratio(
            "load", best_server, f"load / {best_server}: both in the server process, time ratio"
        ),
        "server_read_external / best_server_pyarrow_read": ratio(
            "server_read_external", best_server, "flightcache's reader / pyarrow's, both in the server process"
        ),
        "load / server_read_external": ratio(
            "load", "server_read_external", "what load adds to its reader (staging, publish, the action), time"
        ),
        "server_read_external / read_external": ratio(
            "server_read_external", "read_external", "the same reader in the server process / in the client"
        ),
        "best_pyarrow_read / get_cached": ratio(
            best_read, "get_cached", "speed-up of a cached get over reading the Parquet from S3 again"
        ),
        "put_sync / pyarrow_write": ratio("put_sync", "pyarrow_write", "write-through put / pyarrow write, time"),
        "get_readthrough / get_after_readthrough": ratio(
            "get_readthrough", "get_after_readthrough", "first get after evict / cached get, time"
        ),
        "get_readthrough / best_pyarrow_read": ratio(
            "get_readthrough", best_read, "read-through of flightcache's Parquet / pyarrow read of the raw files"
        ),
        "read_external / (fetch_only + decode_only)": {
            "meaning": "read_external time / the sum of the transfer and decode floors' medians",
            "of_median_seconds": round(med["read_external"] / (med["fetch_only"] + med["decode_only"]), 4),
        },
    }
    load_ratio = ratios["load / best_pyarrow_read"]
    speedup = ratios["best_pyarrow_read / get_cached"]["of_median_seconds"]
    targets = {
        "load_within_10pct_of_pyarrow": {
            "target": f"client.load of s3://{RAW}/ takes <= 1.10x the time of the faster pyarrow read of the same "
            f"files ({best_read}), medians within this run",
            "ratio": load_ratio["of_median_seconds"],
            "median_per_rep_ratio": load_ratio["median_per_rep"],
            "undisturbed_ratio": load_ratio["of_undisturbed_medians"],
            "met": load_ratio["of_median_seconds"] <= 1.10,
        },
        "load_within_10pct_of_pyarrow_same_process": {
            "target": f"secondary, for the diagnosis: client.load <= 1.10x the faster pyarrow read run inside the "
            f"server process ({best_server}), medians within this run",
            "ratio": ratios["load / best_server_pyarrow_read"]["of_median_seconds"],
            "median_per_rep_ratio": ratios["load / best_server_pyarrow_read"]["median_per_rep"],
            "undisturbed_ratio": ratios["load / best_server_pyarrow_read"]["of_undisturbed_medians"],
            "met": ratios["load / best_server_pyarrow_read"]["of_median_seconds"] <= 1.10,
        },
        "cached_get_faster_than_s3_reread": {
            "target": "a cached client.get is faster than reading the Parquet from S3 again (informational: the "
            "issue asks for the figure, not a bound)",
            "speedup": speedup,
            "met": speedup > 1.0,
        },
    }
    paths = {}
    for k, m in ms.items():
        phases: dict[str, float] = {}
        for name in sorted({p for sample in m.phases for p in sample}):
            phases[name] = round(median([sum(sample.get(name, [0.0])) for sample in m.phases]), 4)
        paths[k] = {
            "label": m.label,
            "group": m.group,
            "median_s": round(med[k], 4),
            "median_gbps": round(bench.gbps(med[k]), 4),
            "samples_s": [round(s, 4) for s in m.seconds],
            "samples_gbps": [round(bench.gbps(s), 4) for s in m.seconds],
            "undisturbed": {
                "samples": len(calm[k]),
                "median_s": round(median(calm[k]), 4) if calm[k] else None,
                "median_gbps": round(bench.gbps(median(calm[k])), 4) if calm[k] else None,
            },
            "median_cpu_s": {
                p: round(median([c[p]["user"] + c[p]["sys"] for c in m.cpu]), 3) for p in ("client", "server", "moto")
            },
            "median_cpu": {
                p: {k: round(median([c[p][k] for c in m.cpu]), 3) for k in ("user", "sys", "minflt")}
                for p in ("client", "server", "moto")
            },
            "cpu": m.cpu,
            "noise": m.noise,
            "discarded_disturbed_samples": [
                {"seconds": round(d["seconds"], 4), "noise": d["noise"]} for d in m.discarded
            ],
            "requests": m.requests,
            "median_server_phases_s": phases,
            "server_phases_s": m.phases,
        }
    return {
        "unit": "GB/s = 1e9 Arrow bytes per second; seconds are wall time of the whole call",
        "s3": S3_SHAPE,
        "noise_thresholds": {"quiet_cores": QUIET_CORES, "disturbed_cores": DISTURBED_CORES},
        "notes": NOTES,
        "best_pyarrow_read": best_read,
        "best_server_pyarrow_read": best_server,
        "paths": paths,
        "ratios": ratios,
        "targets": targets,
    }


# -- output --------------------------------------------------------------------------------------


def print_summary(results: dict[str, Any]) -> None:
    paths = results["paths"]
    print(f"\n{'path':<56} {'median s':>9} {'GB/s':>7} {'calm':>5}  {'cpu s c/s/m':<14} samples GB/s")
    for p in paths.values():
        samples = " ".join(f"{s:.3f}" for s in p["samples_gbps"])
        cpu = "/".join(f"{v:.1f}" for v in p["median_cpu_s"].values())
        calm = f"{p['undisturbed']['samples']}/{len(p['samples_s'])}"
        print(f"{p['label']:<56} {p['median_s']:>9.3f} {p['median_gbps']:>7.3f} {calm:>5}  {cpu:<14} {samples}")
    print(f"\n{'ratio (all samples, undisturbed only)':<50} {'all':>7} {'calm':>7}")
    for name, r in results["ratios"].items():
        calm = r.get("of_undisturbed_medians")
        calm_text = f"{calm:.3f}" if calm is not None else "-"
        print(f"{name:<50} {r['of_median_seconds']:>7.3f} {calm_text:>7}  {r['meaning']}")
    print()
    for name, t in results["targets"].items():
        value = t.get("ratio", t.get("speedup"))
        kind = " (informational)" if "informational" in t["target"] else ""
        print(f"target {name}{kind}: {'MET' if t['met'] else 'MISSED'} ({value:.3f})")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = results["paths"]
    keys = list(paths)
    # The transfer floor is several times faster than everything else; clip it rather than flatten the rest.
    top = 1.25 * max(max(p["samples_gbps"]) for k, p in paths.items() if k != "fetch_only")
    fig, ax = plt.subplots(figsize=(13, 6.5))
    for i, key in enumerate(keys):
        p = paths[key]
        ax.bar(i, min(p["median_gbps"], top), color=GROUP_COLORS[p["group"]][0], width=0.7)
        shown = [min(s, top) for s in p["samples_gbps"]]
        ax.plot([i] * len(shown), shown, "k.", markersize=4)
        clipped = " (clipped)" if p["median_gbps"] > top else ""
        ax.text(i, min(p["median_gbps"], top), f"{p['median_gbps']:.2f}{clipped}", ha="center", va="bottom", fontsize=8)
    best = paths[results["best_pyarrow_read"]]["median_gbps"]
    ax.axhline(best, color="k", linestyle="--", linewidth=0.8, label=f"faster pyarrow read ({best:.2f} GB/s)")
    ax.axhline(best / 1.1, color="r", linestyle=":", linewidth=0.8, label="load target: within 10% of its time")
    for color, name in GROUP_COLORS.values():
        ax.bar(0, 0, color=color, label=name)
    ax.set_xticks(range(len(keys)), [paths[k]["label"] for k in keys], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GB/s of Arrow data (bar: median; dots: samples)")
    d, m, t = results["dataset"], results["machine"], results["targets"]
    load = t["load_within_10pct_of_pyarrow"]
    ax.set_title(
        f"{d['arrow_bytes'] / 2**30:.2f} GiB Arrow ({d['parquet_bytes'] / 2**20:.0f} MiB Parquet, {d['files']} files)"
        f" on moto S3 (loopback, separate process); load / pyarrow = {load['ratio']:.2f}x "
        f"({'met' if load['met'] else 'missed'}); cached get / S3 re-read speed-up "
        f"{t['cached_get_faster_than_s3_reread']['speedup']:.2f}x\n{m['cpu_count']} CPUs, pyarrow {m['pyarrow']}, "
        f"{results['parameters']['reps']} reps, {m['date'][:10]}",
        fontsize=9,
    )
    ax.set_ylim(0, top * 1.45)  # headroom for the legend
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark flightcache's load of Parquet from (moto) S3 against pyarrow's own reads of the same "
        "files, a cached get against re-reading S3, and write-through / read-through against pyarrow.",
        epilog="moto, the flightcache server and this client run in separate processes. Writes storage.json and "
        "storage.png. Ratios are computed within one run; absolute GB/s depend on the machine and its load, and "
        "moto on loopback is not S3 (see the 's3' section of the JSON).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="64 MiB and 1 rep, written to --out (default: a new temp dir); for tests"
    )
    parser.add_argument("--size", help="Arrow bytes of the dataset, e.g. 1GiB, 256MiB (default: 1GiB; 64MiB --quick)")
    parser.add_argument("--reps", type=int, help="timed repetitions of every path, interleaved (default: 3; 1 --quick)")
    parser.add_argument("--files", type=int, default=8, help="Parquet files the dataset is written as (default: 8)")
    parser.add_argument(
        "--threads", type=int, default=8, help="threads of read_external and the floors in the client (default: 8)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20.0,
        help="before each timed call, wait up to this many seconds until other processes use less than "
        f"{QUIET_CORES} of a core (0: never wait; at most 12x this in a run) (default: %(default)s)",
    )
    parser.add_argument(
        "--redo",
        type=int,
        default=2,
        help=f"measure a sample again, up to this many times, when other processes used more than {DISTURBED_CORES} "
        "of a core during it (at most this many times the number of paths in a run) (default: %(default)s)",
    )
    parser.add_argument("--memory-limit", default="8GiB", help="the server's --memory-limit (default: %(default)s)")
    parser.add_argument(
        "--out",
        type=Path,
        help=f"directory for the results (default: {DEFAULT_OUT}; with --quick a new temp dir, so quick runs never "
        "overwrite the committed results)",
    )
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # server-process entry point
    args = parser.parse_args(argv)
    if args.serve:
        return args
    from flightcache.units import parse_bytes

    args.size = parse_bytes(args.size or ("64MiB" if args.quick else "1GiB"))
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    if args.reps < 1 or args.size < 1 or args.files < 1 or args.threads < 1:
        parser.error("--reps, --size, --files and --threads must be positive")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="storage_bench_")) if args.quick else DEFAULT_OUT
    return args


def check_memory(size: int) -> None:
    """Refuse to start what would push a shared machine into the OOM killer."""
    needed = 8 * size + 2 * 2**30  # two datasets in the server, a kept table and reads in the client, moto
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:") and int(line.split()[1]) * 1024 < needed:
            sys.exit(
                f"storage: needs about {needed / 2**30:.0f} GiB of free memory for {size / 2**30:.2f} GiB, only "
                f"{int(line.split()[1]) / 2**20:.1f} GiB available; use a smaller --size"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(json.loads(args.serve))
        return 0
    import boto3
    import moto

    check_memory(args.size)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "versions": {"moto": moto.__version__, "boto3": boto3.__version__, "pyarrow": pa.__version__},
        "parameters": {
            "size": args.size,
            "reps": args.reps,
            "files": args.files,
            "threads": args.threads,
            "memory_limit": args.memory_limit,
            "quick": args.quick,
            "quiet_wait": args.quiet_wait,
            "redo": args.redo,
            "seed": SEED,
        },
    }
    with tempfile.TemporaryDirectory(prefix="storage_bench_work_") as workdir:
        results.update(run_benchmark(args, Path(workdir)))
    after = sources_digest("flightcache")
    if after != results["machine"].get("flightcache_sources_sha256"):
        results["flightcache_sources_changed_during_run"] = after
        progress("WARNING: flightcache's sources changed during the run")
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out / "storage.json", results)
    plot(results, args.out / "storage.png")
    print_summary(results)
    progress(f"wrote {args.out / 'storage.json'} and storage.png in {results['elapsed_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
