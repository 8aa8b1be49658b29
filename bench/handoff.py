"""The same-host hand-off, against the real alternatives: one process produces a table, another consumes it.

For each size (a table of int64, float64 and a 10-character string column) and each alternative, a
producer process puts the table and a consumer process (another process on the same host) gets it and
scans every column (so zero-copy is not free: the pages are touched). Alternatives:

  flightcache             put(shm on: same-host adoption of an IPC file the client writes), get mapped
  flightcache-streamput   the put streamed over Flight (the put before adoption), get mapped
  flightcache-stream      put and get streamed over Flight (``shm=False``)
  vineyard                client.put / client.get by object id, vineyardd with its default settings
  vineyard-reserve        the same with ``--reserve_memory=true``
  ray                     ray.put in one actor, ray.get in another (shared-memory object store)
  parquet-zstd            Parquet on local disk, zstd
  parquet-none            Parquet on local disk, uncompressed
  parquet-s3              Parquet (zstd) on moto S3 behind bench/shaping.py (cloud-shaped)
  ipc-floor               an Arrow IPC file written to /dev/shm and memory-mapped by the consumer

Repetitions alternate (each repetition runs every alternative once, in a rotated order). Reported per
size and alternative: medians of put, get, scan and total (put + get + scan) seconds; the producer's
peak extra memory during the put and what the hand-off layer holds once the put returned, over what it
held idle before the first hand-off (its daemons' private memory plus the allocated bytes of the shared-memory
files they map: flightcache's /dev/shm files, Vineyard's memfd arena, Ray's plasma file; Parquet: none, the
file is on disk), per byte of the table; and, for every alternative, the types of a table of many types that
do not come back unchanged.

    python bench/handoff.py                 # ~10 MB to ~2 GB, 5 repetitions
    python bench/handoff.py --quick         # tiny sizes, one repetition, fast alternatives only
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import decimal
import gc
import inspect
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "pipelines")]

from _common import machine_info, median, progress, start_proxy, write_json  # noqa: E402

ALTERNATIVES = (
    "flightcache",
    "flightcache-streamput",
    "flightcache-stream",
    "vineyard",
    "vineyard-reserve",
    "ray",
    "parquet-zstd",
    "parquet-none",
    "parquet-s3",
    "ipc-floor",
)
QUICK_ALTERNATIVES = ("flightcache", "flightcache-stream", "vineyard", "ray", "parquet-zstd", "ipc-floor")
ROW_BYTES = 8 + 8 + 10 + 4  # int64, float64, 10 characters and their int32 offset
SIZES = (10e6, 100e6, 300e6, 1e9, 2e9)
QUICK_SIZES = (1e6,)
BUCKET = "handoff"
MB = 1e6
# One node, its metadata in process; no RPC port (the default 9600 would make the two daemons collide; clients
# here use the IPC socket only). gflags booleans take "=".
VINEYARDD_FLAGS = ("--meta=local", "--rpc=false")
# With no --size (unlimited, the default) --reserve_memory=true pre-faults memory without end (measured: 3.8 GB
# in 32 s and growing): the reserved daemon gets a size that holds the largest table (1.25x, at least 1 GiB).
RESERVE_FLAGS = ("--reserve_memory=true",)


def reserve_size(largest: float) -> str:
    return f"--size={max(1024, math.ceil(largest * 1.25 / 2**20))}Mi"

# -- the table and its scan ---------------------------------------------------------------------


def make_table(rows: int, seed: int = 0) -> pa.Table:
    """``rows`` rows of int64, float64 and a 10-character ASCII string, built from numpy buffers."""
    rng = np.random.default_rng(seed)
    letters = rng.integers(ord("a"), ord("z") + 1, size=rows * 10, dtype=np.uint8)
    offsets = np.arange(0, rows * 10 + 1, 10, dtype=np.int32)
    text = pa.StringArray.from_buffers(rows, pa.py_buffer(offsets), pa.py_buffer(letters))
    return pa.table(
        {
            "id": pa.array(rng.integers(0, 1 << 40, size=rows, dtype=np.int64)),
            "value": pa.array(rng.standard_normal(rows)),
            "name": text,
        }
    )


def scan(table: pa.Table) -> dict[str, Any]:
    """Touch every byte of every column: sums for numbers; for strings, a check of every byte and the maximum."""
    out: dict[str, Any] = {"rows": table.num_rows}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            out[name] = [bool(pc.all(pc.string_is_ascii(col)).as_py()), pc.max(col).as_py()]
        else:
            out[name] = pc.sum(col).as_py()
    return out


def type_table() -> pa.Table:
    """A small table of many Arrow types, with nulls: what each alternative gives back is compared with it."""
    tz = dt.timezone(dt.timedelta(hours=5, minutes=30))
    return pa.table(
        {
            "bool": pa.array([True, False, None, True]),
            "int8": pa.array([1, -2, None, 127], pa.int8()),
            "uint64": pa.array([0, 2**63, None, 1], pa.uint64()),
            "float32": pa.array([1.5, None, -0.0, float("inf")], pa.float32()),
            "float64": pa.array([1.5, None, -1e300, 2.0]),
            "decimal128": pa.array([decimal.Decimal("1.23"), None, decimal.Decimal("-9.99"), 0], pa.decimal128(10, 2)),
            "date32": pa.array([dt.date(2026, 1, 1), None, dt.date(1970, 1, 1), dt.date(2100, 12, 31)]),
            "ts_ns_utc": pa.array([1, None, 3, 4], pa.timestamp("ns", tz="UTC")),
            "ts_us_zone": pa.array([dt.datetime(2026, 11, 24, 12, tzinfo=tz)] * 3 + [None], pa.timestamp("us", tz=tz)),
            "ts_ms_naive": pa.array([0, 1, None, 2], pa.timestamp("ms")),
            "duration": pa.array([1, None, 3, 4], pa.duration("s")),
            "time64": pa.array([1, None, 3, 4], pa.time64("us")),
            "string": pa.array(["a", None, "", "ünïcode"]),
            "large_string": pa.array(["x" * 10, None, "", "y"], pa.large_string()),
            "binary": pa.array([b"\x00\x01", None, b"", b"z"]),
            "fixed_binary": pa.array([b"ab", b"cd", None, b"ef"], pa.binary(2)),
            "dictionary": pa.array(["red", "green", None, "red"]).dictionary_encode(),
            "list": pa.array([[1, 2], [], None, [3]], pa.list_(pa.int64())),
            "large_list": pa.array([["a"], None, [], ["b", None]], pa.large_list(pa.string())),
            "struct": pa.array(
                [{"x": 1, "y": "a"}, None, {"x": None, "y": "c"}, {"x": 4, "y": None}],
                pa.struct([("x", pa.int32()), ("y", pa.string())]),
            ),
            "map": pa.array([[("a", 1)], None, [], [("b", 2), ("c", None)]], pa.map_(pa.string(), pa.int64())),
            "null": pa.nulls(4),
        }
    )


def type_differences(sent: pa.Table, got: pa.Table) -> dict[str, str]:
    """Column -> how it came back, for every column that did not come back unchanged (type or values)."""
    out = {}
    for field in sent.schema:
        if field.name not in got.column_names:
            out[field.name] = "missing"
            continue
        back = got.column(field.name)
        if not back.type.equals(field.type):
            out[field.name] = f"{field.type} -> {back.type}"
        elif not back.equals(sent.column(field.name)):
            out[field.name] = "values differ"
    return out


# -- memory figures -----------------------------------------------------------------------------


def proc_status(pid: int | str, *fields: str) -> dict[str, int]:
    """Fields of /proc/PID/status in bytes (0 for a field the kernel does not report)."""
    out = dict.fromkeys(fields, 0)
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1]) * 1024
    return out


def reset_peak() -> None:
    """Reset this process's VmHWM to its current RSS (Linux: /proc/self/clear_refs, 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def layer_bytes(pids: list[int]) -> int:
    """What daemons hold: their private resident memory plus the allocated bytes of every shared-memory file
    (in /dev/shm, or a memfd) they map or hold open, each file once. Arenas (Vineyard's memfd, Ray's plasma
    file) count with what they keep allocated, in use or not; flightcache's files with what they hold."""
    total, seen = 0, set()
    for pid in pids:
        total += proc_status(pid, "RssAnon")["RssAnon"]
        for kind in ("map_files", "fd"):
            try:
                entries = os.listdir(f"/proc/{pid}/{kind}")
            except OSError:
                continue
            for entry in entries:
                link = f"/proc/{pid}/{kind}/{entry}"
                try:
                    target = os.readlink(link)
                    if not target.startswith(("/dev/shm/", "/memfd:")):
                        continue
                    info = os.stat(link)
                except OSError:
                    continue
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
    return total


# -- the alternatives, one side each ------------------------------------------------------------


class Sides:
    """The producer's and the consumer's side of every alternative, in one process (either role)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.clients: dict[str, Any] = {}
        self.tables: dict[int, pa.Table] = {}

    def table(self, rows: int) -> pa.Table:
        if rows not in self.tables:
            self.tables.clear()
            gc.collect()
            self.tables[rows] = make_table(rows)
        return self.tables[rows]

    def _flightcache(self, shm: bool) -> Any:
        import flightcache

        key = f"fc-{shm}"
        if key not in self.clients:
            self.clients[key] = flightcache.connect(self.env["FLIGHTCACHE_URI"], shm=shm)
        return self.clients[key]

    def _vineyard(self, which: str) -> Any:
        import vineyard

        if which not in self.clients:
            self.clients[which] = vineyard.connect(self.env[f"VINEYARD_{which.upper().replace('-', '_')}"])
        return self.clients[which]

    def _s3(self) -> Any:
        import pyarrow.fs as pafs

        if "s3" not in self.clients:
            host = self.env["S3_SHAPED"].split("//", 1)[1]
            self.clients["s3"] = pafs.S3FileSystem(
                access_key="testing", secret_key="testing", region="us-east-1", scheme="http", endpoint_override=host
            )
        return self.clients["s3"]

    def put(self, alt: str, table: pa.Table, key: str) -> Any:
        """Hand ``table`` off under ``key``; the handle the consumer needs."""
        import pyarrow.parquet as pq

        if alt.startswith("flightcache"):
            client = self._flightcache(alt != "flightcache-stream")
            if alt == "flightcache-streamput" or alt == "flightcache-stream":
                kwargs = {"shm": False} if "shm" in inspect.signature(client.put).parameters else {}
                client.put(key, table, **kwargs)
            else:
                client.put(key, table)
            return key
        if alt.startswith("vineyard"):
            return int(self._vineyard(alt).put(table))
        if alt == "ray":
            import ray

            return [ray.put(table)]  # in a list: Ray would resolve a bare reference passed to the consumer
        if alt.startswith("parquet-") and alt != "parquet-s3":
            path = Path(self.env["PARQUET_DIR"]) / f"{key.replace('/', '_')}.parquet"
            pq.write_table(table, path, compression=alt.split("-", 1)[1])
            return str(path)
        if alt == "parquet-s3":
            path = f"{BUCKET}/{key.replace('/', '_')}.parquet"
            pq.write_table(table, path, compression="zstd", filesystem=self._s3())
            return path
        if alt == "ipc-floor":
            path = f"/dev/shm/handoff-floor-{os.getpid()}-{key.replace('/', '_')}.arrow"
            with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            return path
        raise ValueError(f"unknown alternative {alt!r}")

    def get(self, alt: str, handle: Any) -> pa.Table:
        import pyarrow.parquet as pq

        if alt.startswith("flightcache"):
            return self._flightcache(alt != "flightcache-stream").get(handle)
        if alt.startswith("vineyard"):
            import vineyard

            return self._vineyard(alt).get(vineyard.ObjectID(handle))
        if alt == "ray":
            import ray

            return ray.get(handle[0])
        if alt.startswith("parquet-") and alt != "parquet-s3":
            return pq.read_table(handle)
        if alt == "parquet-s3":
            return pq.read_table(handle, filesystem=self._s3())
        if alt == "ipc-floor":
            return pa.ipc.open_file(pa.memory_map(handle)).read_all()
        raise ValueError(f"unknown alternative {alt!r}")

    def remove(self, alt: str, handle: Any) -> None:
        """Free what a hand-off holds (not timed)."""
        if alt.startswith("flightcache"):
            self._flightcache(alt != "flightcache-stream").drop(handle)
        elif alt.startswith("vineyard"):
            import vineyard

            self._vineyard(alt).delete(vineyard.ObjectID(handle))
        elif alt == "ray":
            pass  # Ray frees an object when its last reference goes: the caller's, once the hand-off returns
        elif alt == "parquet-s3":
            self._s3().delete_file(handle)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(handle)

    # -- the two roles ------------------------------------------------------------------------

    def produce(self, alt: str, rows: int, key: str, column: str | None = None) -> dict[str, Any]:
        table = self.table(rows) if rows else type_table().select([column])
        gc.collect()
        before = proc_status("self", "VmRSS")["VmRSS"]
        reset_peak()
        started = time.perf_counter()
        handle = self.put(alt, table, key)
        put_s = time.perf_counter() - started
        after = proc_status("self", "VmHWM", "RssAnon")
        return {
            "handle": handle,
            "put_s": put_s,
            "producer_peak_extra": after["VmHWM"] - before,
            "nbytes": table.nbytes,
        }

    def consume(self, alt: str, handle: Any, rows: int, column: str | None = None) -> dict[str, Any]:
        gc.collect()
        started = time.perf_counter()
        table = self.get(alt, handle)
        got = time.perf_counter()
        result = scan(table) if rows else {}
        done = time.perf_counter()
        out = {"get_s": got - started, "scan_s": done - got, "scan": result}
        if not rows:
            out["differences"] = type_differences(type_table().select([column]), table)
        del table
        gc.collect()
        return out

    def expected(self, rows: int) -> dict[str, Any]:
        return scan(self.table(rows))


def _serve(conn: Any, env: dict[str, str]) -> None:
    """A worker process: run (method, args) commands from the pipe, answer ("ok", value) or ("error", text)."""
    os.environ.update(env)
    sides = Sides(env)
    while True:
        command = conn.recv()
        if command is None:
            return
        method, args = command
        try:
            conn.send(("ok", getattr(sides, method)(*args)))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class Worker:
    """A process running ``Sides`` commands (spawned: no state inherited from this one)."""

    def __init__(self, env: dict[str, str]) -> None:
        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(theirs, env), daemon=True)
        self.proc.start()

    def call(self, method: str, *args: Any) -> Any:
        self.conn.send((method, args))
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(value)
        return value

    def close(self) -> None:
        with contextlib.suppress(OSError, BrokenPipeError):
            self.conn.send(None)
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.terminate()


class RayWorker:
    """``Worker``'s interface over a Ray actor, so that ray.put and ray.get run in Ray worker processes."""

    def __init__(self, env: dict[str, str]) -> None:
        import ray

        actor = ray.remote(num_cpus=0)(_RaySides)
        self.actor = actor.remote(env)
        self.pid = ray.get(self.actor.pid.remote())

    def call(self, method: str, *args: Any) -> Any:
        import ray

        try:
            return ray.get(self.actor.call.remote(method, *args))
        except ray.exceptions.RayTaskError as e:
            raise RuntimeError(str(e)) from None

    def close(self) -> None:
        import ray

        ray.kill(self.actor)


class _RaySides:
    def __init__(self, env: dict[str, str]) -> None:
        os.environ.update(env)
        self.sides = Sides(env)

    def pid(self) -> int:
        return os.getpid()

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.sides, method)(*args)


# -- the services -------------------------------------------------------------------------------


def available(alt: str) -> str | None:
    """Why ``alt`` cannot run here (its package is not installed), or None."""
    needs = {"vineyard": "vineyard", "ray": "ray", "parquet-s3": "moto"}
    for prefix, module in needs.items():
        if alt.startswith(prefix):
            try:
                __import__(module)
            except ImportError:
                return f"not installed: pip install -e '.[{'peers' if module != 'moto' else 'dev'}]'"
    return None


def start_vineyardd(stack: ExitStack, work: Path, name: str, *flags: str) -> tuple[str, int]:
    """A vineyardd for one node; its socket and pid."""
    from vineyard.deploy.utils import find_vineyardd_path  # the binary the wheel ships

    binary = find_vineyardd_path()
    if not binary:
        raise RuntimeError("vineyardd not found: pip install -e '.[peers]'")
    socket = str(work / f"{name}.sock")
    log = open(work / f"{name}.log", "w")  # noqa: SIM115 -- closed by the stack
    stack.callback(log.close)
    proc = subprocess.Popen(
        [str(binary), f"--socket={socket}", *VINEYARDD_FLAGS, *flags], stdout=log, stderr=subprocess.STDOUT
    )
    stack.callback(lambda: (proc.terminate(), proc.wait(timeout=60)))
    deadline = time.monotonic() + 60
    while not os.path.exists(socket):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"vineyardd {' '.join(flags)} did not start: see {work / f'{name}.log'}")
        time.sleep(0.1)
    return socket, proc.pid


@contextlib.contextmanager
def services(
    alternatives: list[str], work: Path, largest: float
) -> Iterator[tuple[dict[str, str], dict[str, list[int]]]]:
    """Start what the alternatives need; yields the workers' environment and each alternative's daemon pids."""
    from common import flightcache_server, moto_s3

    env: dict[str, str] = {"PARQUET_DIR": str(work / "parquet")}
    (work / "parquet").mkdir()
    daemons: dict[str, list[int]] = {}
    with ExitStack() as stack:
        if any(a.startswith("flightcache") for a in alternatives):
            server = stack.enter_context(
                flightcache_server(
                    "--memory-limit", "10GiB", "--shm", "on", "--storage", "none", "--retain-seconds", "0"
                )
            )
            env["FLIGHTCACHE_URI"] = server.uri
            for a in alternatives:
                if a.startswith("flightcache"):
                    daemons[a] = [server.pid]
        if "vineyard" in alternatives:
            env["VINEYARD_VINEYARD"], pid = start_vineyardd(stack, work, "vineyard-default")
            daemons["vineyard"] = [pid]
        if "vineyard-reserve" in alternatives:
            env["VINEYARD_VINEYARD_RESERVE"], pid = start_vineyardd(
                stack, work, "vineyard-reserve", *RESERVE_FLAGS, reserve_size(largest)
            )
            daemons["vineyard-reserve"] = [pid]
        if "parquet-s3" in alternatives:
            s3 = stack.enter_context(moto_s3(BUCKET))
            port = int(s3["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
            env["S3_SHAPED"] = start_proxy(port, 100.0, 90.0, 0.0, stack)
            daemons["parquet-s3"] = _pids_listening(port)
        if "ray" in alternatives:
            import psutil
            import ray

            # Ray's memory monitor kills the largest worker when the node passes 95% of its memory; on a machine
            # shared with other jobs that is their memory, not Ray's (it killed our consumer at 100 MB): off, so
            # that Ray runs under the same rules as every other alternative here.
            os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            stack.callback(ray.shutdown)
            daemons["ray"] = [p.pid for p in psutil.Process().children(recursive=True) if p.name() == "raylet"]
        yield env, daemons


def _pids_listening(port: int) -> list[int]:
    """The moto server process listening on ``port`` (for its memory)."""
    try:
        import psutil
    except ImportError:
        return []
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return [c.pid]
    return []


# -- the run ------------------------------------------------------------------------------------


def handoff(
    alt: str,
    rows: int,
    key: str,
    producer: Any,
    consumer: Any,
    daemons: list[int],
    idle: int,
    check: dict[str, Any] | None,
) -> dict[str, Any]:
    """One hand-off: put in the producer, get and scan in the consumer, free it; its figures."""
    gc.collect()
    made = producer.call("produce", alt, rows, key)
    held = layer_bytes(daemons) - idle
    used = consumer.call("consume", alt, made["handle"], rows)
    producer.call("remove", alt, made["handle"])
    kept = layer_bytes(daemons) - idle  # freed: what the layer still keeps (an arena keeps its pages)
    result = {
        "put_s": made["put_s"],
        "get_s": used["get_s"],
        "scan_s": used["scan_s"],
        "total_s": made["put_s"] + used["get_s"] + used["scan_s"],
        "nbytes": made["nbytes"],
        "producer_peak_extra_per_byte": made["producer_peak_extra"] / made["nbytes"],
        "held_per_byte": held / made["nbytes"],
        "kept_after_free_per_byte": kept / made["nbytes"],
    }
    if check is not None and used["scan"] != check:
        result["mismatch"] = {"expected": check, "got": used["scan"]}
    if "differences" in used:
        result["differences"] = used["differences"]
    return result


def round_trip(alt: str, producer: Any, consumer: Any) -> dict[str, str]:
    """Column of ``type_table`` -> what came back, or the error, for each column that did not come back unchanged."""
    out = {}
    for column in type_table().column_names:
        try:
            made = producer.call("produce", alt, 0, f"handoff/types-{column}", column)
        except RuntimeError as e:
            out[column] = "put failed: " + str(e).strip().splitlines()[-1][:200]
            continue
        try:
            used = consumer.call("consume", alt, made["handle"], 0, column)
            out.update(used["differences"])
        except RuntimeError as e:
            out[column] = "get failed: " + str(e).strip().splitlines()[-1][:200]
        with contextlib.suppress(RuntimeError):
            producer.call("remove", alt, made["handle"])
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("put_s", "get_s", "scan_s", "total_s", "producer_peak_extra_per_byte", "held_per_byte")
    keys += ("kept_after_free_per_byte",) if all("kept_after_free_per_byte" in r for r in runs) else ()
    out: dict[str, Any] = {k: round(median([r[k] for r in runs]), 6) for k in keys}
    out["total_s_all"] = [round(r["total_s"], 5) for r in runs]
    out["reps"] = len(runs)
    out["mismatches"] = sum("mismatch" in r for r in runs)
    return out


def targets(per_size: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets at every size >= 100 MB, in bench/report.py's form: flightcache's total (put + get + scan)
    against the fastest of Vineyard and Ray, and against the IPC floor; medians, and the median of the per-repetition
    ratios (repetition i of each, measured next to each other)."""
    big = {s: alts for s, alts in per_size.items() if float(s) >= 100e6 and "flightcache" in alts}

    def label(size: str) -> str:
        return f"{float(size) / MB:.0f}MB"

    def paired(a: dict[str, Any], b: dict[str, Any]) -> float:
        return round(median([x / y for x, y in zip(a["total_s_all"], b["total_s_all"], strict=False)]), 3)

    peers: dict[str, float] = {}
    peers_paired: dict[str, float] = {}
    floor: dict[str, float] = {}
    floor_paired: dict[str, float] = {}
    puts: dict[str, float] = {}
    for size, alts in big.items():
        fc = alts["flightcache"]
        present = [alts[a] for a in ("vineyard", "vineyard-reserve", "ray") if a in alts]
        if present:
            fastest = min(present, key=lambda p: p["total_s"])
            peers[label(size)] = round(fc["total_s"] / fastest["total_s"], 3)
            peers_paired[label(size)] = paired(fc, fastest)
        if "ipc-floor" in alts:
            floor[label(size)] = round(fc["total_s"] / alts["ipc-floor"]["total_s"], 3)
            floor_paired[label(size)] = paired(fc, alts["ipc-floor"])
        if "flightcache-streamput" in alts:
            puts[label(size)] = round(alts["flightcache-streamput"]["put_s"] / fc["put_s"], 3)
    out: dict[str, Any] = {}
    if peers:
        out["vs_fastest_peer"] = {
            "target": "flightcache's same-host hand-off (put + get + full scan) no slower than the fastest of "
            "Vineyard and Ray, every size >= 100 MB (ratio of medians; <= 1 meets it)",
            "ratios": peers,
            "paired_ratios": peers_paired,
            "met": all(r <= 1 for r in peers.values()),
        }
    if floor:
        out["vs_ipc_floor"] = {
            "target": "flightcache's same-host hand-off within 1.5x of an Arrow IPC file in /dev/shm mapped by the "
            "consumer, every size >= 100 MB (ratio of medians)",
            "ratios": floor,
            "paired_ratios": floor_paired,
            "met": all(r <= 1.5 for r in floor.values()),
        }
    if puts:
        out["adopted_put"] = {
            "target": "a same-host put by adoption faster than the streamed put it replaces (speed-up of medians)",
            "speedups": puts,
            "met": all(r >= 1 for r in puts.values()),
        }
    return out


def plot(per_size: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(per_size)
    alts = sorted({a for s in per_size.values() for a in s}, key=ALTERNATIVES.index)
    fig, ax = plt.subplots(figsize=(10, 6))
    for alt in alts:
        xs = [float(s) / MB for s in sizes if alt in per_size[s]]
        ys = [per_size[s][alt]["total_s"] for s in sizes if alt in per_size[s]]
        ax.plot(xs, ys, marker="o", label=alt, linewidth=2.5 if alt == "flightcache" else 1.2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("table size (MB, Arrow bytes)")
    ax.set_ylabel("hand-off seconds (put + get + full scan), median")
    ax.set_title("Same-host hand-off between two processes")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict[str, Any]:
    wanted = args.alternatives or list(QUICK_ALTERNATIVES if args.quick else ALTERNATIVES)
    skipped = {a: why for a in wanted if (why := available(a))}
    alternatives = [a for a in wanted if a not in skipped]
    for a, why in skipped.items():
        progress(f"{a}: {why}")
    sizes = args.sizes or list(QUICK_SIZES if args.quick else SIZES)
    reps = args.reps or (1 if args.quick else 5)
    per_size: dict[str, dict[str, Any]] = {}
    types: dict[str, Any] = {}
    idle: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="handoff-") as tmp, services(alternatives, Path(tmp), max(sizes)) as (
        env,
        daemons,
    ):
        plain = [a for a in alternatives if a != "ray"]
        workers: dict[str, tuple[Any, Any]] = {}
        stack = ExitStack()
        with stack:
            if plain:
                producer, consumer = Worker(env), Worker(env)
                stack.callback(producer.close)
                stack.callback(consumer.close)
                workers.update({a: (producer, consumer) for a in plain})
            if "ray" in alternatives:
                rp, rc = RayWorker(env), RayWorker(env)
                stack.callback(rp.close)
                stack.callback(rc.close)
                workers["ray"] = (rp, rc)
            idle.update({a: layer_bytes(daemons.get(a, [])) for a in alternatives})  # before any hand-off
            for alt in alternatives:  # types first: a tiny table, a column at a time (a put may refuse one)
                types[alt] = round_trip(alt, *workers[alt])
            for size in sizes:
                rows = max(1, int(size // ROW_BYTES))
                expected = {id(w[0]): w[0].call("expected", rows) for w in workers.values()}
                runs: dict[str, list[dict[str, Any]]] = {a: [] for a in alternatives}
                for rep in range(reps):
                    order = alternatives[rep % len(alternatives) :] + alternatives[: rep % len(alternatives)]
                    for alt in order:
                        p, c = workers[alt]
                        r = handoff(alt, rows, "handoff/t", p, c, daemons.get(alt, []), idle[alt], expected[id(p)])
                        runs[alt].append(r)
                        progress(
                            f"{size / MB:.0f} MB rep {rep + 1}/{reps} {alt}: put {r['put_s']:.3f} get {r['get_s']:.4f} "
                            f"scan {r['scan_s']:.3f} total {r['total_s']:.3f} s"
                        )
                key = str(int(size))
                per_size[key] = {a: summarize(rs) for a, rs in runs.items()}
                per_size[key]["_nbytes"] = runs[alternatives[0]][0]["nbytes"]  # type: ignore[assignment]
                write_json(args.out, document(args, alternatives, skipped, reps, per_size, types, idle))  # so far
    return document(args, alternatives, skipped, reps, per_size, types, idle)


def document(
    args: argparse.Namespace,
    alternatives: list[str],
    skipped: dict[str, str],
    reps: int,
    per_size: dict[str, dict[str, Any]],
    types: dict[str, Any],
    idle: dict[str, int],
) -> dict[str, Any]:
    """The JSON of a run (of the sizes measured so far)."""
    tables = {s: {a: v for a, v in alts.items() if not a.startswith("_")} for s, alts in per_size.items()}
    return {
        "benchmark": "handoff",
        "quick": args.quick,
        "machine": machine_info(),
        "versions": _versions(),
        "alternatives": alternatives,
        "skipped": skipped,
        "reps": reps,
        "table": "int64, float64, 10-character string (30 bytes per row)",
        "vineyardd_flags": {
            "vineyard": VINEYARDD_FLAGS,
            "vineyard-reserve": (*VINEYARDD_FLAGS, *RESERVE_FLAGS, reserve_size(max(map(float, per_size), default=1))),
        },
        "ray_env": {"RAY_memory_monitor_refresh_ms": "0"},
        "nbytes": {s: alts["_nbytes"] for s, alts in per_size.items()},
        "results": tables,
        "targets": targets(tables),
        "type_differences": types,
        "idle_layer_bytes": idle,  # held before the first hand-off: a reserved Vineyard holds its --size from the start
    }


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for package in ("vineyard", "ray", "moto"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def markdown(data: dict[str, Any], detail: str | None = None) -> str:
    """README tables from a run: total seconds per alternative and size; put/get/scan/memory at ``detail``."""
    results = data["results"]
    sizes = list(results)
    alts = sorted({a for s in results.values() for a in s}, key=ALTERNATIVES.index)
    head = "| alternative | " + " | ".join(f"{float(s) / MB:,.0f} MB" for s in sizes) + " |"
    lines = [head, "|---" * (len(sizes) + 1) + "|"]
    for alt in alts:
        cells = [f"{results[s][alt]['total_s']:.3g}" if alt in results[s] else "" for s in sizes]
        lines.append(f"| {alt} | " + " | ".join(cells) + " |")
    detail = detail or sizes[-1]
    lines += [
        "",
        f"At {float(detail) / MB:,.0f} MB (medians; memory per byte of the table):",
        "",
        "| alternative | put s | get s | scan s | total s | producer peak extra | held by layer | kept once freed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for alt in alts:
        r = results[detail].get(alt)
        if r:
            kept = f"{r['kept_after_free_per_byte']:.2f}" if "kept_after_free_per_byte" in r else ""
            lines.append(
                f"| {alt} | {r['put_s']:.3g} | {r['get_s']:.3g} | {r['scan_s']:.3g} | {r['total_s']:.3g} | "
                f"{r['producer_peak_extra_per_byte']:.2f} | {r['held_per_byte']:.2f} | {kept} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition, fast alternatives only")
    parser.add_argument("--sizes", type=float, nargs="+", help="table sizes in bytes (default: 1e7 1e8 3e8 1e9 2e9)")
    parser.add_argument("--reps", type=int, help="repetitions (default: 5; --quick: 1)")
    parser.add_argument("--alternatives", nargs="+", choices=ALTERNATIVES)
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results" / "handoff.json")
    parser.add_argument("--retarget", action="store_true", help="recompute targets and the PNG of --out; run nothing")
    parser.add_argument("--markdown", metavar="SIZE", nargs="?", const="", help="print README tables of --out only")
    args = parser.parse_args(argv)
    if args.markdown is not None:
        print(markdown(json.loads(args.out.read_text()), args.markdown or None))
        return 0
    if args.retarget:
        data = json.loads(args.out.read_text())
        data["targets"] = targets(data["results"])
    else:
        data = run(args)
    write_json(args.out, data)
    if data["results"]:
        plot(data["results"], args.out.with_suffix(".png"))
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
