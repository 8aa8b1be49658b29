"""Load: throughput and p50/p99 latency of small gets and puts at 1, 4 and 16 concurrent clients.

The server runs in its own process (``flightcache serve``), every client in a process of its own (so the
clients' GIL is not what is measured), each with one connection, doing one call after another for a fixed
time: a get reads a 1,000-row dataset all clients share (``client.get``: get_flight_info, then do_get); a
put overwrites the client's own 1,000-row dataset. Cells (operation x concurrency) are interleaved,
their order rotated from round to round, after a warm-up.

    .venv/bin/python bench/load.py            # 3 rounds of 5 s per cell -> bench_results/load.json (~2 min)
    .venv/bin/python bench/load.py --quick    # 1 round of 0.5 s per cell -> a temp dir, in seconds
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

try:
    from ._common import machine_info, median, progress, sources_digest, write_json
except ImportError:  # run as a script: bench/ is on sys.path
    from _common import machine_info, median, progress, sources_digest, write_json

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bench_results"
CONCURRENCY = (1, 4, 16)
OPERATIONS = ("get", "put")
ROWS = 1000
SHARED = "load/small"
START_DELAY = 0.5  # seconds between handing out a cell and its start: every client starts together

NOTES = [
    "Each client is a process with one connection doing one call after another; throughput is the calls all "
    "clients completed in a cell divided by the cell's wall time (from the common start to the last completion).",
    "get = flightcache.Client.get of a 1,000-row dataset (two RPCs: get_flight_info, then do_get of its one "
    "endpoint); put = Client.put of 1,000 rows overwriting the client's own dataset (one do_put stream).",
    "The machine has 2 cores, shared by the server, all client processes and whatever else ran at the time "
    "(other engineers' test suites): at 4 and 16 clients the processes queue for the cores, so latency there "
    "includes waiting for a CPU, and throughput is what 2 cores give, not what the server alone could do.",
    "p50/p99 pool every call of every round of a cell; ops_per_s is the median over rounds (every round's figure "
    "is kept in ops_per_s_rounds).",
]


def small_table(rows: int = ROWS, seed: int = 0) -> pa.Table:
    """A small web-log-like table (~40 KB)."""
    rng = np.random.default_rng(seed)
    methods = pa.array(["GET", "POST", "PUT"])
    return pa.table(
        {
            "ts": pa.array(np.arange(rows, dtype=np.int64) * 1_000_000, pa.timestamp("us", tz="UTC")),
            "status": rng.choice(np.array([200, 304, 404, 500], np.int32), rows),
            "method": methods.take(pa.array(rng.integers(0, 3, rows))),
            "bytes": rng.integers(0, 100_000, rows),
            "latency_ms": rng.random(rows) * 500,
        }
    )


# -- the client processes --------------------------------------------------------------------------------


def client_process(uri: str, index: int, tasks: Any, results: Any) -> None:
    """Run cells as they come: (operation, start, end) -> {"latencies": [...], "errors": n, "last": t}."""
    import flightcache

    table = small_table(seed=index)
    with flightcache.connect(uri) as client:
        client.get(SHARED)  # connect before the first cell
        while (task := tasks.get()) is not None:
            operation, start, end = task
            latencies: list[float] = []
            errors: list[str] = []
            time.sleep(max(0.0, start - time.time()))
            while time.time() < end:
                began = time.perf_counter()
                try:
                    if operation == "get":
                        client.get(SHARED)
                    else:
                        client.put(f"load/put/{index}", table)
                except Exception as e:  # counted and reported, not fatal: the figures say how many failed
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                latencies.append(time.perf_counter() - began)
            results.put({"index": index, "latencies": latencies, "errors": errors, "last": time.time()})


class Clients:
    """``n`` client processes, started once and handed cells."""

    def __init__(self, uri: str, n: int) -> None:
        ctx = mp.get_context("spawn")  # no gRPC state forked into the clients
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(n)]
        self.procs = [
            ctx.Process(target=client_process, args=(uri, i, self.tasks[i], self.results), daemon=True)
            for i in range(n)
        ]
        for p in self.procs:
            p.start()

    def run(self, operation: str, clients: int, seconds: float) -> dict[str, Any]:
        start = time.time() + START_DELAY
        for q in self.tasks[:clients]:
            q.put((operation, start, start + seconds))
        parts = [self.results.get(timeout=seconds + 120) for _ in range(clients)]
        latencies = [x for p in parts for x in p["latencies"]]
        errors = [e for p in parts for e in p["errors"]]
        wall = max(p["last"] for p in parts) - start
        return {
            "ops": len(latencies),
            "errors": len(errors),
            "first_errors": errors[:3],
            "wall_s": wall,
            "ops_per_s": len(latencies) / wall if wall > 0 else float("nan"),
            "latencies": latencies,
        }

    def close(self) -> None:
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


# -- the server ----------------------------------------------------------------------------------------------


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flightcache.cli",
            "serve",
            "--port",
            "0",
            "--storage",
            "none",
            "--memory-limit",
            "2GiB",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "FLIGHTCACHE_LOG_LEVEL": "WARNING"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once the server is serving
    found = re.search(r"serving at (grpc://\S+)", line)
    if found is None:
        stop(proc)
        raise RuntimeError(f"the flightcache server did not start: {line!r}")
    return proc, found.group(1)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# -- the run ---------------------------------------------------------------------------------------------------


def percentile_ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 3) if values else float("nan")


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    import flightcache

    proc, uri = start_server()
    clients = None
    try:
        with flightcache.connect(uri) as c:
            c.put(SHARED, small_table())
        progress(f"server at {uri}; starting {max(CONCURRENCY)} client processes")
        clients = Clients(uri, max(CONCURRENCY))
        for operation in OPERATIONS:  # warm-up: connections, allocators, the server's first puts
            clients.run(operation, max(CONCURRENCY), args.warmup)
        cells: dict[str, dict[int, list[dict[str, Any]]]] = {op: {n: [] for n in CONCURRENCY} for op in OPERATIONS}
        order = [(op, n) for n in CONCURRENCY for op in OPERATIONS]
        for r in range(args.rounds):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            for op, n in rotated:
                cell = clients.run(op, n, args.seconds)
                progress(
                    f"round {r + 1}/{args.rounds} {op} x{n}: {cell['ops_per_s']:.0f} ops/s, "
                    f"p50 {percentile_ms(cell['latencies'], 50)} ms, {cell['errors']} errors"
                )
                cells[op][n].append(cell)
        with flightcache.connect(uri) as c:
            server_stats = c.stats()
    finally:
        if clients is not None:
            clients.close()
        stop(proc)
    results: dict[str, Any] = {}
    for op in OPERATIONS:
        results[op] = {}
        for n in CONCURRENCY:
            runs = cells[op][n]
            latencies = [x for cell in runs for x in cell["latencies"]]
            results[op][str(n)] = {
                "ops_per_s": round(median([cell["ops_per_s"] for cell in runs]), 1),
                "ops_per_s_rounds": [round(cell["ops_per_s"], 1) for cell in runs],
                "p50_ms": percentile_ms(latencies, 50),
                "p99_ms": percentile_ms(latencies, 99),
                "p50_ms_rounds": [percentile_ms(cell["latencies"], 50) for cell in runs],
                "p99_ms_rounds": [percentile_ms(cell["latencies"], 99) for cell in runs],
                "max_ms": percentile_ms(latencies, 100),
                "ops": len(latencies),
                "errors": sum(cell["errors"] for cell in runs),
                "first_errors": [e for cell in runs for e in cell["first_errors"]][:3],
            }
    return {
        "results": results,
        "server_stats": {k: server_stats[k] for k in ("gets", "puts", "puts_aborted")},
        "targets": targets(results),
    }


def targets(results: dict[str, Any]) -> dict[str, Any]:
    def figure(op: str, n: int, key: str) -> float:
        return results[op][str(n)][key]

    errors = sum(results[op][str(n)]["errors"] for op in OPERATIONS for n in CONCURRENCY)
    return {
        "no_errors_under_load": {
            "target": "every small get and put succeeds at 1, 4 and 16 concurrent clients (throughput and "
            "latency are informational: the issue asks for the figures, not a bound)",
            "errors": errors,
            "get_ops_s_c1": figure("get", 1, "ops_per_s"),
            "get_ops_s_c16": figure("get", 16, "ops_per_s"),
            "get_p99_ms_c16": figure("get", 16, "p99_ms"),
            "put_ops_s_c1": figure("put", 1, "ops_per_s"),
            "put_ops_s_c16": figure("put", 16, "ops_per_s"),
            "put_p99_ms_c16": figure("put", 16, "p99_ms"),
            "get_ratio_c16_c1": round(figure("get", 16, "ops_per_s") / figure("get", 1, "ops_per_s"), 2),
            "put_ratio_c16_c1": round(figure("put", 16, "ops_per_s") / figure("put", 1, "ops_per_s"), 2),
            "met": errors == 0,
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 round of 0.5 s per cell, to a temp dir")
    parser.add_argument("--seconds", type=float, help="length of one cell (default: 5, --quick: 0.5)")
    parser.add_argument("--rounds", type=int, help="rounds over all cells (default: 3, --quick: 1)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per operation (default: 2, --quick: 0.3)")
    parser.add_argument(
        "--out", type=Path, help=f"directory for load.json (default: {DEFAULT_OUT}; --quick: a temp dir)"
    )
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (0.5 if args.quick else 5.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.warmup = args.warmup if args.warmup is not None else (0.3 if args.quick else 2.0)
    args.out = args.out or (Path(tempfile.mkdtemp(prefix="flightcache-load-")) if args.quick else DEFAULT_OUT)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "parameters": {
            "quick": args.quick,
            "seconds": args.seconds,
            "rounds": args.rounds,
            "warmup_s": args.warmup,
            "concurrency": CONCURRENCY,
            "rows": ROWS,
        },
        "unit": {"ops_per_s": "completed calls per second, all clients together", "latency": "milliseconds per call"},
        "notes": NOTES,
    }
    results["loadavg_before"] = os.getloadavg()  # the machine is shared: how busy it was says how to read the run
    results.update(run_benchmark(args))
    results["loadavg_after"] = os.getloadavg()
    after = sources_digest("flightcache")
    if after != results["machine"].get("flightcache_sources_sha256"):
        results["flightcache_sources_changed_during_run"] = after
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    write_json(args.out / "load.json", results)
    for op in OPERATIONS:
        for n in CONCURRENCY:
            r = results["results"][op][str(n)]
            print(
                f"{op:4} x{n:<2}  {r['ops_per_s']:8.0f} ops/s  p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms"
                f"  errors {r['errors']}"
            )
    progress(f"wrote {args.out / 'load.json'} in {results['elapsed_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
