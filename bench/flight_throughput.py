"""Flight DoGet/DoPut throughput of flightcache against a bare pyarrow Flight server (the floor).

Every server runs in its own process, so client and servers do not share a GIL, as in production: the
flightcache servers are `flightcache serve` as shipped (flags set the batch size, endpoints and shared
memory); the bare one is this file with --serve. The bare server serves the same deterministic table
re-chunked to several batch sizes; its best batch size is the floor that flightcache's DoGet is compared
with. Three phases, each interleaving its configurations within every repetition: 1. the DoGet batch-size
sweep, bare and flightcache, one stream each, and same-host reads from a server with shared memory on
(client.get mapping the data, the same plus touching every page, and do_get from that server); 2. one
stream against the default server's endpoints read in parallel, and DoPut; 3. the same reads from a cold
client. Then the server RSS experiments.

    .venv/bin/python bench/flight_throughput.py            # ~1 GiB, 7 reps -> bench_results/ (~4 min)
    .venv/bin/python bench/flight_throughput.py --quick    # 32 MiB, 1 rep -> a temp dir, in seconds
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

try:
    from ._common import GB, machine_info, median, progress, rss_bytes, sources_digest, write_json
except ImportError:  # run as a script: bench/ is on sys.path
    from _common import GB, machine_info, median, progress, rss_bytes, sources_digest, write_json

SEED = 20261124
DEFAULT_BATCH_ROWS = 64 * 1024
DEFAULT_ENDPOINT_BYTES = 128 * 1024 * 1024
ONE_ENDPOINT_BYTES = 1 << 62
SWEEP: dict[str, int | None] = {"8Ki": 8 * 1024, "64Ki": 64 * 1024, "256Ki": 256 * 1024, "1Mi": 1024 * 1024,
                                "single": None}
PARALLELISM = (1, 2, 4)
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bench_results"
NAME = "bench/t"
PUT_NAME = "bench/put"
SHM_GET_REPEAT = 10  # a mapped get takes ~5-10 ms: each sample is the mean of this many in a row
# `serve` fixes glibc's mmap threshold (32 MiB); the alternatives it was chosen over, side by side.
MALLOC_VARIANTS = {"glibc": {"FLIGHTCACHE_MMAP_THRESHOLD": "glibc"}, "1MiB": {"FLIGHTCACHE_MMAP_THRESHOLD": "1MiB"}}
MiB = 2**20

M_ARENA_MAX = -8  # glibc mallopt parameter

NOTES = [
    "GB/s = Arrow bytes of the table (table.nbytes) / wall time of the whole call, 1 GB = 1e9 bytes.",
    "Targets compare configurations of one phase; ratios across phases (fc_parallel/* / best bare) are "
    "informational: phase 2 runs other servers, with put churn in between.",
    "Warm reads (all but cold/*) run in one long-lived client process whose C allocator already holds the pages "
    "the previous read freed, as in the issue's figures. The client caps glibc at --client-arenas malloc arenas: "
    "with glibc's default (8 per core), the threads client.get starts for every call, and gRPC's own threads, "
    "each get an arena that holds up to a whole dataset of freed memory (the client reached 9.6 GiB and was "
    "OOM-killed), and a thread landing in a fresh arena faults all its memory in again, which makes parallel "
    "reads look slower than they are on the server side.",
    "cold/* reads run after malloc_trim(0) in the client, so every page is faulted in again, like the first read "
    "in a fresh process; on this VM that costs about 0.9 s of kernel time per GiB.",
    "The bare server's tables are zero-copy slices of one contiguous table; flightcache holds what its DoPut "
    "handler kept of what it received (see rss.*.arrow_pool_bytes: 0 means the batches are views into gRPC's "
    "receive buffers).",
    "put/bare discards every chunk (the issue's floor); put/bare-keep holds the last put's batches like a cache.",
    "fc_shm/*: a server with --shm on (64Ki batches, one endpoint). fc_shm/get is client.get on the same host: one "
    "action round trip, then the version's Arrow IPC files under /dev/shm are mapped and checked, and a Table over "
    "the mapping is returned, no byte copied (what a pipeline stage gets); each of its samples is the mean of "
    f"{SHM_GET_REPEAT} gets in a row (one get takes a few ms). fc_shm/get+touch also reads one byte of "
    "every 4 KiB page of every buffer, so every page is faulted into the client: the cost of actually using all of "
    "it. fc_shm/do_get streams the same server's mapped batches over loopback (client shm=False). The other "
    "flightcache servers run with --shm off, as before, so their figures and RSS stay comparable with earlier runs.",
    "RSS is VmRSS of the `flightcache serve` process, read from /proc; arrow_pool_bytes and the pool from the "
    "server's stats action.",
    "serve fixes glibc's mmap threshold at 32 MiB (FLIGHTCACHE_MMAP_THRESHOLD). put/flightcache-glibc and "
    "rss_experiments malloc=glibc leave glibc's own threshold, which rises with every mapped block freed (gRPC's "
    "receive buffers then stay in arenas, and so does freed memory); put/flightcache-1MiB and malloc=1MiB map "
    "every gRPC receive buffer afresh (faulted in for every message, returned at once).",
]


# -- the table ---------------------------------------------------------------------------------

_SECTIONS = ["api/v1/users", "api/v1/orders", "api/v2/items", "static/img", "static/js", "search", "checkout",
             "blog/posts", "account/settings", "cart"]


def make_table(target_bytes: int, seed: int = SEED) -> pa.Table:
    """A deterministic web-log table of about ``target_bytes`` Arrow bytes (one chunk per column)."""
    sample = _web_logs(10_000, seed)
    return _web_logs(max(1, round(target_bytes / (sample.nbytes / sample.num_rows))), seed)


def _web_logs(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    # Bounded int32 draws and a dictionary cast for the strings keep 1 GiB of generation to about a second.
    start = np.datetime64("2026-11-24T00:00:00", "us").astype(np.int64)
    ts = start + np.cumsum(rng.integers(0, 20_000, rows, dtype=np.int32), dtype=np.int64)
    user_id = rng.integers(1, 2_000_000_000, rows, dtype=np.int32).astype(np.int64)
    codes = np.array([200] * 40 + [201, 204, 301, 302, 304, 304, 400, 401, 403, 404, 404, 429, 500, 502, 503])
    status = codes[rng.integers(0, len(codes), rows, dtype=np.int32)].astype(np.int64)
    bytes_sent = (rng.standard_exponential(rows) * 20_000).astype(np.int64)
    latency_ms = rng.standard_exponential(rows) * 35.0 + 0.2
    vocab_rng = np.random.default_rng(seed + 1)
    vocab = pa.array([
        f"/{_SECTIONS[i % len(_SECTIONS)]}/{vocab_rng.integers(1, 10**7)}"
        + (f"?q={'abcdefghij'[: 1 + i % 10]}&page={i % 7}" if i % 3 == 0 else "")
        for i in range(8192)
    ])
    popular = (rng.standard_exponential(rows) * 600).astype(np.int32) % len(vocab)  # a few hot paths
    url = pa.DictionaryArray.from_arrays(pa.array(popular), vocab).cast(pa.string())
    return pa.table({
        "ts": pa.array(ts, pa.timestamp("us", tz="UTC")),
        "user_id": user_id,
        "status": status,
        "bytes_sent": bytes_sent,
        "latency_ms": latency_ms,
        "url": url,
    })


def rechunk(table: pa.Table, rows: int | None) -> pa.Table:
    """``table`` as batches of ``rows`` rows (None: one batch), zero-copy slices of contiguous columns."""
    table = table.combine_chunks()
    return table if rows is None else pa.Table.from_batches(table.to_batches(max_chunksize=rows), table.schema)


# -- the servers (each in its own process) -------------------------------------------------------


class BareServer(flight.FlightServerBase):
    """The floor: the same table, pre-chunked per batch size. DoPut reads every chunk (and drops it,
    or with descriptor path 'keep' holds the batches until the next put, as a cache must)."""

    def __init__(self, location: str, table: pa.Table) -> None:
        super().__init__(location)
        self.tables = {label: rechunk(table, rows) for label, rows in SWEEP.items()}
        self.kept: list[pa.RecordBatch] = []

    def get_flight_info(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> Any:
        table = self.tables[descriptor.path[0].decode()]
        endpoint = flight.FlightEndpoint(descriptor.path[0], [])
        return flight.FlightInfo(table.schema, descriptor, [endpoint], table.num_rows, table.nbytes)

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.RecordBatchStream:
        return flight.RecordBatchStream(self.tables[ticket.ticket.decode()])

    def do_put(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor,
               reader: flight.MetadataRecordBatchReader, writer: flight.FlightMetadataWriter) -> None:
        keep = descriptor.path[0] == b"keep"
        self.kept = []
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                return
            if keep and chunk.data is not None:
                self.kept.append(chunk.data)


def malloc_trim() -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):  # not glibc
        return False


def serve(spec: dict[str, Any]) -> None:
    """The bare server's process: print {port, pool} on stdout, serve until stdin closes."""
    server = BareServer("grpc://127.0.0.1:0", make_table(spec["size"]))
    print(json.dumps({"port": server.port, "pool": pa.default_memory_pool().backend_name}), flush=True)
    sys.stdin.read()
    server.shutdown()


@dataclass
class ServerProcess:
    label: str
    spec: dict[str, Any]  # {"kind": "bare", "size": N} or {"kind": "flightcache", "flags": [...]}
    env: dict[str, str] = field(default_factory=dict)  # over this process's environment
    proc: subprocess.Popen[str] | None = None
    port: int = 0
    pool: str = ""
    shm_dir: Path | None = None

    def start(self) -> None:
        if self.spec["kind"] == "bare":
            command = [sys.executable, str(Path(__file__).resolve()), "--serve", json.dumps(self.spec)]
        else:
            command = [sys.executable, "-m", "flightcache.cli", "serve", "--port", "0", "--output", "json",
                       "--log-level", "WARNING", *self.spec["flags"]]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **self.env})

    def ready(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        lines: list[str] = []
        # The bare server says one line; flightcache serve's JSON start-up message spans several.
        while not lines or (self.spec["kind"] != "bare" and not lines[-1].startswith("}")):
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"server {self.label} exited with {self.proc.wait()} before it was ready")
            lines.append(line)
        hello = json.loads("".join(lines))
        if self.spec["kind"] == "bare":
            self.port, self.pool = hello["port"], hello["pool"]
        else:
            self.port, self.pool = int(hello["uri"].rsplit(":", 1)[1]), hello["memory_pool"]
            self.shm_dir = Path(hello["shm"]) if hello["shm"] else None

    @property
    def uri(self) -> str:
        return f"grpc://127.0.0.1:{self.port}"

    @property
    def rss(self) -> int:
        assert self.proc is not None
        return rss_bytes(self.proc.pid)

    def cpu(self) -> tuple[float, float]:
        """(user, system) CPU seconds of the server process so far."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        tick = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / tick, int(fields[12]) / tick

    def memory(self) -> dict[str, Any]:
        """RSS, shared-memory pages and files, and Arrow-pool bytes of a flightcache server."""
        import flightcache

        with flightcache.connect(self.uri, shm=False) as client:
            process = client.stats()["process"]
        assert self.proc is not None
        shm_bytes = sum(f.stat().st_size for f in self.shm_dir.iterdir()) if self.shm_dir else 0
        return {"arrow_pool_bytes": process["arrow_pool_bytes"], "pool": process["memory_pool"], "rss": self.rss,
                "rss_shmem": rss_bytes(self.proc.pid, "RssShmem"), "shm_bytes": shm_bytes}

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.spec["kind"] == "bare":
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        else:
            self.proc.terminate()  # serve stops cleanly on SIGTERM, removing its shared-memory files
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def start_all(servers: list[ServerProcess]) -> None:
    for s in servers:
        s.start()
    for s in servers:
        s.ready()


# -- the measurements ----------------------------------------------------------------------------


@dataclass
class Config:
    key: str
    group: str  # bare_get, fc_get, fc_parallel, cold, put
    label: str
    run: Callable[[], None]
    before: Callable[[], object] = lambda: None  # untimed, before each run
    after: Callable[[], object] = lambda: None  # untimed clean-up after each run
    repeat: int = 1  # runs per timed sample: a read of a few ms is timed over several, so one hiccup cannot decide it
    samples: list[float] = field(default_factory=list)  # GB/s
    cpu: list[tuple[float, float, float, float]] = field(default_factory=list)  # client u/s, servers u/s


def bare_get(conn: flight.FlightClient, label: str, rows: int) -> Callable[[], None]:
    def run() -> None:
        result = conn.do_get(flight.Ticket(label.encode())).read_all()
        if result.num_rows != rows:
            raise RuntimeError(f"bare {label}: got {result.num_rows} rows, expected {rows}")

    return run


def fc_get(client: Any, rows: int) -> Callable[[], None]:
    def run() -> None:
        result = client.get(NAME)
        if result.num_rows != rows:
            raise RuntimeError(f"flightcache {client.uri}: got {result.num_rows} rows, expected {rows}")

    return run


def fc_shm_get(client: Any, rows: int, touch: bool) -> Callable[[], None]:
    """client.get through shared memory; with ``touch``, then read a byte of every page of every buffer."""
    if client.shared(NAME) is None:
        raise RuntimeError(f"flightcache {client.uri}: the data is not mapped from shared memory")

    def run() -> None:
        result = client.get(NAME)
        if result.num_rows != rows:
            raise RuntimeError(f"flightcache shm {client.uri}: got {result.num_rows} rows, expected {rows}")
        if touch:
            for batch in result.to_batches():
                for column in batch.columns:
                    for buf in column.buffers():
                        if buf is not None and buf.size:
                            np.frombuffer(buf, np.uint8)[::4096].sum()

    return run


def bare_put(conn: flight.FlightClient, table: pa.Table, path: str) -> Callable[[], None]:
    def run() -> None:
        writer, _ = conn.do_put(flight.FlightDescriptor.for_path(path), table.schema)
        with writer:
            for batch in table.to_reader(max_chunksize=DEFAULT_BATCH_ROWS):  # as client.put sends it
                writer.write_batch(batch)
            writer.done_writing()

    return run


def measure(configs: list[Config], nbytes: int, reps: int, servers: list[ServerProcess]) -> None:
    """Each rep runs every config once. The order rotates by two from rep to rep, and every other rep runs
    it backwards, so no config always runs first and adjacent pairs (bare, flightcache) stay adjacent."""
    progress(f"warm-up: {len(configs)} configurations")
    for c in configs:
        c.before()
        c.run()
        c.after()
    for rep in range(reps):
        shift = 2 * rep % len(configs)
        order = configs[shift:] + configs[:shift]
        for c in order[::-1] if rep % 2 else order:
            c.before()
            client0, servers0 = os.times(), [s.cpu() for s in servers]
            started = time.perf_counter()
            for _ in range(c.repeat):
                c.run()
            elapsed = time.perf_counter() - started
            client1, servers1 = os.times(), [s.cpu() for s in servers]
            c.samples.append(nbytes * c.repeat / elapsed / GB)
            c.cpu.append((client1.user - client0.user, client1.system - client0.system,
                          sum(b[0] - a[0] for a, b in zip(servers0, servers1, strict=True)),
                          sum(b[1] - a[1] for a, b in zip(servers0, servers1, strict=True))))
            c.after()
        progress(f"rep {rep + 1}/{reps}: " + ", ".join(f"{c.key} {c.samples[-1]:.2f}" for c in configs))
        rss = {"client": rss_bytes(os.getpid()), **{s.label: s.rss for s in servers}}
        progress(f"RSS GiB: total {sum(rss.values()) / 2**30:.1f}; "
                 + ", ".join(f"{k} {v / 2**30:.1f}" for k, v in rss.items()))


# -- the run -------------------------------------------------------------------------------------


def fc_spec(batch_rows: int, endpoint_bytes: int, shm: bool = False, *flags: str) -> dict[str, Any]:
    """`flightcache serve` with its defaults but these (memory only: the figures are of the memory tier)."""
    return {"kind": "flightcache", "flags": ["--storage", "none", "--batch-rows", str(batch_rows), "--endpoint-bytes",
                                             str(endpoint_bytes), "--shm", "on" if shm else "off", *flags]}


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import flightcache

    bare = ServerProcess("bare", {"kind": "bare", "size": args.size})
    fc_one = {label: ServerProcess(f"flightcache {label}, 1 endpoint", fc_spec(rows or 1 << 40, ONE_ENDPOINT_BYTES))
              for label, rows in SWEEP.items()}
    fc_default = ServerProcess("flightcache default", fc_spec(DEFAULT_BATCH_ROWS, args.endpoint_bytes))
    fc_malloc = {k: ServerProcess(f"flightcache, malloc {k}", fc_spec(DEFAULT_BATCH_ROWS, args.endpoint_bytes), env=env)
                 for k, env in MALLOC_VARIANTS.items()}
    fc_shm = ServerProcess("flightcache --shm on", fc_spec(DEFAULT_BATCH_ROWS, ONE_ENDPOINT_BYTES, shm=True))
    one_stream = fc_one[_label(DEFAULT_BATCH_ROWS)]
    try:
        progress(f"starting {2 + len(fc_one)} server processes; generating the table ({args.size / MiB:.0f} MiB)")
        start_all([bare, *fc_one.values(), fc_shm])  # the bare server builds its own copy of the table meanwhile
        table = make_table(args.size)
        rows, nbytes = table.num_rows, table.nbytes
        progress(f"table: {rows:,} rows, {nbytes:,} Arrow bytes; servers ready")
        conn = flight.connect(bare.uri)
        bare_info = conn.get_flight_info(flight.FlightDescriptor.for_path(b"single"))
        if bare_info.total_records != rows or bare_info.total_bytes != nbytes:
            raise RuntimeError("the bare server's table differs from the client's")
        stored = {}
        for label, batch_rows in SWEEP.items():
            # Sent in the store's batch size, so each server keeps the batches as they arrive.
            flightcache.connect(fc_one[label].uri, batch_rows=batch_rows or rows).put(NAME, table)
            stored[label] = flightcache.connect(fc_one[label].uri).info(NAME)
            if not flightcache.connect(fc_one[label].uri).get(NAME).equals(table):
                raise RuntimeError(f"{fc_one[label].label} returned a different table")
        shm_client = flightcache.connect(fc_shm.uri, shm=True)
        shm_client.put(NAME, table)
        stored["shm"] = shm_client.info(NAME)
        if not shm_client.get(NAME).equals(table) or not flightcache.connect(fc_shm.uri, shm=False).get(NAME).equals(
                table):
            raise RuntimeError(f"{fc_shm.label} returned a different table")

        progress("phase 1: DoGet batch-size sweep, bare and flightcache, one stream each")
        bare_sweep = [Config(f"bare_get/{label}", "bare_get", f"bare {label}", bare_get(conn, label, rows))
                      for label in SWEEP]
        fc_sweep = [Config(f"fc_get/{label}", "fc_get", f"flightcache {label}",
                           fc_get(flightcache.connect(fc_one[label].uri), rows)) for label in SWEEP]
        shm_reads = [Config("fc_shm/get", "fc_shm", "flightcache shm client.get", fc_shm_get(shm_client, rows, False),
                            repeat=SHM_GET_REPEAT),
                     Config("fc_shm/get+touch", "fc_shm", "fc shm get + touch every page",
                            fc_shm_get(shm_client, rows, True)),
                     Config("fc_shm/do_get", "fc_shm", "fc shm server, do_get",
                            fc_get(flightcache.connect(fc_shm.uri, shm=False), rows))]
        # Each bare size next to its flightcache twin: the paired per-rep ratios then see the same load.
        measure([c for pair in zip(bare_sweep, fc_sweep, strict=True) for c in pair] + shm_reads, nbytes, args.reps,
                [bare, *fc_one.values(), fc_shm])
        sweep = bare_sweep + fc_sweep + shm_reads
        fc_shm.stop()
        for s in fc_one.values():  # make room for phase 2's put churn
            if s is not one_stream:
                s.stop()

        start_all([fc_default, *fc_malloc.values()])
        servers = [bare, one_stream, fc_default, *fc_malloc.values()]
        main = flightcache.connect(fc_default.uri)
        rss: dict[str, Any] = {"idle": fc_default.memory()}
        started = time.perf_counter()
        put_result = main.put(NAME, table)
        rss["put_seconds"] = round(time.perf_counter() - started, 3)
        rss["after_put"] = fc_default.memory()
        time.sleep(args.settle)
        rss["settled"] = fc_default.memory()
        progress(f"put {put_result['bytes']:,} bytes into a default-config server in {rss['put_seconds']:.2f}s; "
                 f"RSS {rss['idle']['rss'] / MiB:.0f} -> {rss['settled']['rss'] / MiB:.0f} MiB")
        stored["default"] = main.info(NAME)
        endpoints = len(main.flight_info(NAME).endpoints)
        if not main.get(NAME).equals(table):
            raise RuntimeError("the default-config server returned a different table")

        progress(f"phase 2: one stream vs {endpoints} endpoints read in parallel; DoPut")
        scaling = [Config("fc_parallel/stream", "fc_parallel", f"fc 1 stream ({_label(DEFAULT_BATCH_ROWS)})",
                          fc_get(flightcache.connect(one_stream.uri), rows))]
        scaling += [Config(f"fc_parallel/p{p}", "fc_parallel", f"fc client.get {endpoints} ep, {p} thr",
                           fc_get(flightcache.connect(fc_default.uri, parallelism=p), rows)) for p in PARALLELISM]
        puts = [Config("put/bare", "put", "bare DoPut (discards)", bare_put(conn, table, "discard")),
                Config("put/bare-keep", "put", "bare DoPut (keeps)", bare_put(conn, table, "keep")),
                Config("put/flightcache", "put", "flightcache DoPut", lambda: main.put(PUT_NAME, table),
                       after=lambda: main.drop(PUT_NAME))]
        for k, server in fc_malloc.items():
            put, drop = _put_and_drop(server.uri, table)
            puts.append(Config(f"put/flightcache-{k}", "put", f"flightcache DoPut, malloc {k}", put, after=drop))
        measure(scaling + puts, nbytes, args.reps, servers)
        rss["after_reps"] = fc_default.memory()

        # A phase of its own: a trimmed client heap would make whichever warm read came next cold too.
        progress("phase 3: cold client")
        cold = [Config(f"cold/{c.key}", "cold", f"cold: {c.label}", c.run, before=malloc_trim)
                for c in [sweep[list(SWEEP).index(_label(DEFAULT_BATCH_ROWS))], *scaling] if c.key != "fc_parallel/p1"]
        measure(cold, nbytes, args.reps, servers)
    finally:
        for s in [bare, *fc_one.values(), fc_default, *fc_malloc.values(), fc_shm]:
            s.stop()

    results = summarize(sweep + scaling + cold + puts)
    results.update({
        "table": {"rows": rows, "arrow_bytes": nbytes, "schema": table.schema.to_string()},
        "stored": {k: {"batches": v["batches"], "bytes": v["bytes"], "rows": v["rows"]} for k, v in stored.items()},
        "default_endpoints": endpoints,
        "rss": rss_figures(put_result["bytes"], rss),
        "rss_experiments": rss_experiments(args, table),
    })
    results["targets"] = targets(results)
    return results


def _label(rows: int) -> str:
    return next(label for label, r in SWEEP.items() if r == rows)


def rss_figures(arrow_bytes: int, rss: dict[str, Any]) -> dict[str, Any]:
    """Raw figures plus, for each, total RSS / Arrow bytes and (RSS - idle RSS) / Arrow bytes.

    ``held`` is the memory the server holds: its RSS, less the shared-memory pages in it, plus every byte
    of its /dev/shm files (mapped and touched or not): with --shm on, RSS alone would undercount.
    """
    idle = rss["idle"]["rss"]
    out: dict[str, Any] = {"arrow_bytes": arrow_bytes, "pool": rss["idle"]["pool"],
                           "put_seconds": rss.pop("put_seconds")}
    for when, m in rss.items():
        held = m["rss"] - m["rss_shmem"] + m["shm_bytes"]
        out[when] = {"rss": m["rss"], "rss_over_arrow_bytes": round(m["rss"] / arrow_bytes, 4),
                     "delta_over_arrow_bytes": round((m["rss"] - idle) / arrow_bytes, 4),
                     "rss_shmem": m["rss_shmem"], "shm_bytes": m["shm_bytes"],
                     "held_over_arrow_bytes": round(held / arrow_bytes, 4),
                     "arrow_pool_bytes": m["arrow_pool_bytes"]}
    return out


def _put_and_drop(uri: str, table: pa.Table) -> tuple[Callable[[], Any], Callable[[], Any]]:
    """A put of ``table`` into the server at ``uri`` and the drop to run after it (untimed)."""
    import flightcache

    client = flightcache.connect(uri)
    return lambda: client.put(PUT_NAME, table), lambda: client.drop(PUT_NAME)


def rss_experiments(args: argparse.Namespace, table: pa.Table) -> dict[str, Any]:
    """RSS of fresh default-config servers after one put and after put/drop cycles: with --shm on (memory
    held counted as in rss_figures), and on other Arrow memory pools (serve --memory-pool)."""
    import flightcache

    variants: list[tuple[str, tuple[str, ...], bool, dict[str, str]]] = [("shm=on", (), True, {})]
    variants += [(f"pool={p}", ("--memory-pool", p), False, {}) for p in args.pools.split(",") if p]
    variants += [(f"malloc={k}", (), False, env) for k, env in MALLOC_VARIANTS.items()]
    out: dict[str, Any] = {}
    for name, flags, shm, env in variants:
        server = ServerProcess(name, fc_spec(DEFAULT_BATCH_ROWS, args.endpoint_bytes, shm, *flags), env=env)
        try:
            start_all([server])
            client = flightcache.connect(server.uri, shm=False)
            rss: dict[str, Any] = {"idle": server.memory()}
            started = time.perf_counter()
            result = client.put(NAME, table)
            rss["put_seconds"] = round(time.perf_counter() - started, 3)
            time.sleep(args.settle)
            rss["settled"] = server.memory()
            for _ in range(2):
                client.put(PUT_NAME, table)
                client.drop(PUT_NAME)
            time.sleep(args.settle)
            rss["after_2_put_drop"] = server.memory()
            out[name] = rss_figures(result["bytes"], rss)
            progress(f"{name}: RSS {rss['idle']['rss'] / MiB:.0f} -> {rss['settled']['rss'] / MiB:.0f} MiB after "
                     f"a put, {rss['after_2_put_drop']['rss'] / MiB:.0f} MiB after 2 put/drop cycles")
        finally:
            server.stop()
    return out


def summarize(configs: list[Config]) -> dict[str, Any]:
    medians = {c.key: round(median(c.samples), 4) for c in configs}
    best = max((c for c in configs if c.group == "bare_get"), key=lambda c: medians[c.key])
    one_stream = f"fc_get/{_label(DEFAULT_BATCH_ROWS)}"
    samples = {c.key: c.samples for c in configs}

    def ratio(num: str, den: str) -> dict[str, Any]:
        per_rep = [a / b for a, b in zip(samples[num], samples[den], strict=True)]
        return {"of_medians": round(medians[num] / medians[den], 4), "median_per_rep": round(median(per_rep), 4),
                "per_rep": [round(r, 4) for r in per_rep]}

    ratios: dict[str, Any] = {}
    for c in configs:
        if c.group in ("fc_get", "fc_parallel"):
            ratios[f"{c.key} / best bare"] = ratio(c.key, best.key)
    for label in SWEEP:
        ratios[f"fc_get/{label} / bare_get/{label}"] = ratio(f"fc_get/{label}", f"bare_get/{label}")
    for prefix in ("", "cold/"):  # parallel over one stream, each within its own phase
        for c in configs:
            if c.key.startswith(f"{prefix}fc_parallel/p"):
                ratios[f"{c.key} / {prefix}fc_parallel/stream"] = ratio(c.key, f"{prefix}fc_parallel/stream")
    ratios["cold/fc_parallel/stream / cold/bare_get/64Ki"] = ratio("cold/fc_parallel/stream", "cold/bare_get/64Ki")
    for key in ("fc_shm/get", "fc_shm/get+touch", "fc_shm/do_get"):
        ratios[f"{key} / {one_stream}"] = ratio(key, one_stream)
        ratios[f"{key} / best bare"] = ratio(key, best.key)
    ratios["put/flightcache / put/bare"] = ratio("put/flightcache", "put/bare")
    ratios["put/flightcache / put/bare-keep"] = ratio("put/flightcache", "put/bare-keep")
    for k in MALLOC_VARIANTS:
        ratios[f"put/flightcache / put/flightcache-{k}"] = ratio("put/flightcache", f"put/flightcache-{k}")
    return {
        "unit": "GB/s (1e9 Arrow bytes per second)",
        "notes": NOTES,
        "best_bare": best.key,
        "one_stream": one_stream,
        "configs": {c.key: {"label": c.label, "group": c.group, "median": medians[c.key],
                            "samples": [round(s, 4) for s in c.samples],
                            "median_cpu_s": dict(zip(("client_user", "client_sys", "servers_user", "servers_sys"),
                                                     (round(median([x[i] for x in c.cpu]), 3) for i in range(4)),
                                                     strict=True))}
                    for c in configs},
        "medians": medians,
        "ratios": ratios,
    }


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each ratio is the median over reps of the paired per-rep ratio (both measured in the same rep, close
    in time), which a drifting load on a shared machine skews less than a ratio of medians (also given)."""
    ratios, one, best = results["ratios"], results["one_stream"], results["best_bare"]

    def paired(key: str) -> float:
        return ratios[key]["median_per_rep"]

    doget = paired(f"{one} / best bare")
    parallel = {k: paired(f"fc_parallel/{k} / fc_parallel/stream") for k in ("p2", "p4")}
    settled = results["rss"]["settled"]
    return {
        "doget_within_10pct_of_floor": {
            "target": f"flightcache DoGet, one stream at the default batch_rows ({one}), >= 0.9x the best bare "
                      f"configuration ({best})",
            "ratio": doget, "met": doget >= 0.9,
            "ratio_of_medians": ratios[f"{one} / best bare"]["of_medians"],
        },
        "parallel_not_slower_than_one_stream": {
            "target": f"client.get over the default server's {results['default_endpoints']} endpoints with 2 and 4 "
                      "threads >= one stream (fc_parallel/stream, default batch_rows)",
            "ratios": parallel, "met": min(parallel.values()) >= 1.0,
            "ratios_of_medians": {k: ratios[f"fc_parallel/{k} / fc_parallel/stream"]["of_medians"] for k in parallel},
            "cold_client": {k: paired(f"cold/fc_parallel/{k} / cold/fc_parallel/stream") for k in parallel},
        },
        "shm_get_50x_do_get": {
            "target": f"same-host client.get through shared memory >= 50x flightcache DoGet over loopback ({one}), "
                      "full read of the table",
            "ratio": paired(f"fc_shm/get / {one}"), "met": paired(f"fc_shm/get / {one}") >= 50,
            "ratio_of_medians": ratios[f"fc_shm/get / {one}"]["of_medians"],
            "vs_best_bare": paired("fc_shm/get / best bare"),
            "touching_every_page": paired(f"fc_shm/get+touch / {one}"),
        },
        "rss_at_most_1.1x_arrow_bytes": {
            "target": "server RSS (VmRSS, settled after the put) <= 1.1x the dataset's Arrow bytes",
            "ratio": settled["rss_over_arrow_bytes"], "met": settled["rss_over_arrow_bytes"] <= 1.1,
            "delta_over_arrow_bytes": settled["delta_over_arrow_bytes"],
            "idle_rss": results["rss"]["idle"]["rss"],
        },
    }


# -- output --------------------------------------------------------------------------------------


def print_summary(results: dict[str, Any]) -> None:
    best = results["medians"][results["best_bare"]]
    print(f"\n{'configuration':<38} {'median GB/s':>11} {'/ best bare':>11}  samples")
    for c in results["configs"].values():
        vs = f"{c['median'] / best:.3f}" if c["group"] in ("bare_get", "fc_get", "fc_parallel", "fc_shm") else ""
        print(f"{c['label']:<38} {c['median']:>11.3f} {vs:>11}  {' '.join(f'{s:.2f}' for s in c['samples'])}")
    r = results["ratios"]
    print(f"\nDoPut flightcache / bare: {r['put/flightcache / put/bare']['of_medians']:.3f} "
          f"(/ bare that keeps the batches: {r['put/flightcache / put/bare-keep']['of_medians']:.3f}; "
          + "; ".join(f"/ malloc {k}: {r[f'put/flightcache / put/flightcache-{k}']['of_medians']:.3f}"
                      for k in MALLOC_VARIANTS) + ")")
    rss = results["rss"]
    print(f"RSS ({rss['pool']} pool), x Arrow bytes ({rss['arrow_bytes'] / MiB:.0f} MiB); total (minus idle):")
    for when in ("settled", "after_reps"):
        print(f"  {when:<20} {rss[when]['rss_over_arrow_bytes']:.3f}x ({rss[when]['delta_over_arrow_bytes']:.3f}x)")
    for name, e in results["rss_experiments"].items():
        print(f"  {name}: after a put {e['settled']['rss_over_arrow_bytes']:.3f}x RSS, "
              f"{e['settled']['held_over_arrow_bytes']:.3f}x held "
              f"({e['settled']['delta_over_arrow_bytes']:.3f}x), after 2 put/drop cycles "
              f"{e['after_2_put_drop']['rss_over_arrow_bytes']:.3f}x")
    print()
    for name, t in results["targets"].items():
        print(f"{'MET ' if t['met'] else 'MISS'}  {name}: {t.get('ratio', t.get('ratios'))}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = results["configs"]
    groups = {"bare_get": ("#888888", "bare DoGet (batch-size sweep)"),
              "fc_get": ("#1f77b4", "flightcache DoGet, 1 stream (batch_rows sweep)"),
              "fc_parallel": ("#2ca02c", "flightcache client.get, parallel endpoints"),
              "fc_shm": ("#d62728", "flightcache --shm on: mapped get, + touch, do_get"),
              "cold": ("#bcbd22", "cold client (page faults), bare / flightcache"),
              "put": ("#ff7f0e", "DoPut")}
    fig, (ax, ax_rss) = plt.subplots(1, 2, figsize=(16, 6.5), gridspec_kw={"width_ratios": [4, 1]})
    keys = list(configs)
    for i, key in enumerate(keys):
        c = configs[key]
        ax.bar(i, c["median"], color=groups[c["group"]][0], width=0.7)
        ax.plot([i] * len(c["samples"]), c["samples"], "k.", markersize=3)
        ax.text(i, c["median"], f"{c['median']:.2f}", ha="center", va="bottom", fontsize=8)
    best = results["medians"][results["best_bare"]]
    ax.axhline(best, color="k", linestyle="--", linewidth=0.8, label=f"best bare DoGet ({best:.2f} GB/s)")
    ax.axhline(0.9 * best, color="r", linestyle=":", linewidth=0.8, label="90% of best bare (target)")
    if max(c["median"] for c in configs.values()) > 20 * best:  # shared-memory reads dwarf the streams
        ax.set_yscale("log")
    for color, name in groups.values():
        ax.bar(0, 0, color=color, label=name)
    ax.set_xticks(range(len(keys)), [configs[k]["label"] for k in keys], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("GB/s (bar: median; dots: samples)")
    t, m = results["table"], results["machine"]
    ax.set_title(f"Arrow Flight DoGet/DoPut of {t['arrow_bytes'] / 2**30:.2f} GiB ({t['rows']:,} rows), servers in "
                 f"separate processes; {m['cpu_count']} CPUs, pyarrow {m['pyarrow']}, {m['date'][:10]}", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")

    rss = results["rss"]
    bars = {"after the put": rss["settled"], "after all reps": rss["after_reps"]}
    bars.update({name.split(":")[0].replace("pool=", "pool "): e["settled"]
                 for name, e in results["rss_experiments"].items()})
    ax_rss.bar(range(len(bars)), [b["rss_over_arrow_bytes"] for b in bars.values()], color="#9467bd")
    ax_rss.bar(range(len(bars)), [b["rss_over_arrow_bytes"] - b["delta_over_arrow_bytes"] for b in bars.values()],
               color="#c5b0d5", label="idle RSS")
    for i, b in enumerate(bars.values()):
        ax_rss.text(i, b["rss_over_arrow_bytes"], f"{b['rss_over_arrow_bytes']:.2f}", ha="center", va="bottom",
                    fontsize=8)
    ax_rss.axhline(1.1, color="r", linestyle=":", linewidth=0.8, label="1.1x (target)")
    ax_rss.set_xticks(range(len(bars)), list(bars), rotation=35, ha="right", fontsize=8)
    ax_rss.set_ylabel("server RSS / dataset Arrow bytes")
    ax_rss.set_title("flightcache server RSS", fontsize=10)
    ax_rss.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark flightcache DoGet/DoPut against a bare pyarrow Flight server serving the same table "
                    "(the floor): batch-size sweep, one stream vs parallel endpoints, DoPut, and server RSS.",
        epilog="Servers run in separate processes. Writes flight_throughput.json and flight_throughput.png. Ratios "
               "are computed within one run; absolute GB/s depend on the machine and its load.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="a 32 MiB table and 1 rep, written to --out (default: a new temp dir); for tests")
    parser.add_argument("--size",
                        help="Arrow bytes of the table, e.g. 1GiB, 256MiB (default: 1GiB; 32MiB with --quick)")
    parser.add_argument("--reps", type=int,
                        help="timed repetitions of every configuration, interleaved (default: 7; 1 with --quick)")
    parser.add_argument("--out", type=Path,
                        help=f"directory for the results (default: {DEFAULT_OUT}; with --quick a new temp dir, so "
                             "quick runs never overwrite the committed results)")
    parser.add_argument("--pools", default="system,mimalloc",
                        help="also measure server RSS on each of these serve --memory-pool values, "
                             "comma-separated, '' for none (default: %(default)s)")
    parser.add_argument("--settle", type=float,
                        help="seconds to wait after a put before reading RSS (default: 2; 0.2 with --quick)")
    parser.add_argument("--client-arenas", type=int, default=2,
                        help="cap the client's glibc malloc arenas (bounds its memory; 0: glibc's default) "
                             "(default: %(default)s)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # server-process entry point
    args = parser.parse_args(argv)
    if args.serve:  # a server process: it imports only what it serves with
        return args
    from flightcache.units import parse_bytes

    args.size = parse_bytes(args.size or ("32MiB" if args.quick else "1GiB"))
    args.reps = args.reps if args.reps is not None else (1 if args.quick else 7)
    args.settle = args.settle if args.settle is not None else (0.2 if args.quick else 2.0)
    # A small table gets proportionally smaller endpoints, so a quick run still reads ~8 in parallel.
    args.endpoint_bytes = min(DEFAULT_ENDPOINT_BYTES, max(MiB, args.size // 8))
    if args.reps < 1 or args.size < 1:
        parser.error("--reps and --size must be positive")
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="flight_throughput_")) if args.quick else DEFAULT_OUT
    return args


def check_memory(size: int) -> None:
    """Refuse to start what would push a shared machine into the OOM killer."""
    needed = 14 * size + 2 * 2**30  # measured peak of the servers and the client: ~12x the table
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:") and int(line.split()[1]) * 1024 < needed:
            sys.exit(f"flight_throughput: needs about {needed / 2**30:.0f} GiB of free memory for a "
                     f"{size / 2**30:.2f} GiB table, only {int(line.split()[1]) / 2**20:.1f} GiB available; "
                     "use a smaller --size")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve:
        serve(json.loads(args.serve))
        return 0
    if args.client_arenas > 0:
        try:  # before the first gRPC thread, so every thread shares these arenas
            ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, args.client_arenas)
        except (OSError, AttributeError):
            progress("not glibc: --client-arenas ignored")
    check_memory(args.size)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "parameters": {"size": args.size, "reps": args.reps, "quick": args.quick, "seed": SEED,
                       "sweep_rows": SWEEP, "parallelism": PARALLELISM, "default_endpoint_bytes": args.endpoint_bytes,
                       "pools": args.pools, "settle_s": args.settle, "client_arenas": args.client_arenas},
    }
    results.update(run_benchmark(args))
    after = sources_digest("flightcache")
    if after != results["machine"].get("flightcache_sources_sha256"):
        results["flightcache_sources_changed_during_run"] = after
        progress("WARNING: flightcache's sources changed during the run; the servers may have run different code")
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out / "flight_throughput.json", results)
    plot(results, args.out / "flight_throughput.png")
    print_summary(results)
    progress(f"wrote {args.out / 'flight_throughput.json'} and flight_throughput.png in {results['elapsed_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
