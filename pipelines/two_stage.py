"""`make demo-quick`: a two-stage hand-off through a flightcache server, each stage its own process.

stage 1 (ingest)    generates web-access logs and puts them into the cache as `demo/logs`
stage 2 (aggregate) a separate process: reads `demo/logs` back (status >= 400 only, three
                    columns) and aggregates errors per path and method, printing the top rows

Run with --rows N for another scale; --help for the flags.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

import flightcache
from flightcache.units import format_bytes

PATHS = np.array(["/", "/login", "/search", "/cart", "/checkout", "/api/items", "/api/user", "/static/app.js"])
METHODS = np.array(["GET", "GET", "GET", "POST", "PUT", "DELETE"])
STATUSES = np.array([200] * 80 + [301] * 5 + [304] * 5 + [404] * 6 + [500] * 3 + [503])


def make_logs(rows: int, seed: int = 7) -> pa.Table:
    rng = np.random.default_rng(seed)
    start = np.datetime64("2026-11-24T00:00:00", "us")
    return pa.table(
        {
            "ts": pa.array(
                start + np.sort(rng.integers(0, 86_400_000_000, rows)).astype("timedelta64[us]"),
                pa.timestamp("us", tz="UTC"),
            ),
            "client_ip": pa.array([f"10.0.{a}.{b}" for a, b in rng.integers(0, 256, (rows, 2))]),
            "method": pa.array(rng.choice(METHODS, rows)),
            "path": pa.array(rng.choice(PATHS, rows)),
            "status": pa.array(rng.choice(STATUSES, rows).astype(np.int16)),
            "bytes": pa.array(rng.lognormal(8, 1.5, rows).astype(np.int64)),
            "latency_ms": pa.array(rng.gamma(2.0, 30.0, rows)),
        }
    )


def stage_ingest(uri: str, rows: int) -> dict:
    started = time.perf_counter()
    table = make_logs(rows)
    generated = time.perf_counter()
    with flightcache.connect(uri) as fc:
        result = fc.put("demo/logs", table)
    done = time.perf_counter()
    return {**result, "generate_s": generated - started, "put_s": done - generated}


def stage_aggregate(uri: str) -> dict:
    started = time.perf_counter()
    with flightcache.connect(uri) as fc:
        errors = fc.get("demo/logs", columns=["path", "method", "status"], filter="status >= 400")
    fetched = time.perf_counter()
    report = (
        errors.group_by(["path", "method"])
        .aggregate([("status", "count"), ("status", "max")])
        .sort_by([("status_count", "descending")])
    )
    top = report.slice(0, 5).to_pylist()
    return {
        "rows_read": errors.num_rows,
        "groups": report.num_rows,
        "top": top,
        "get_s": fetched - started,
        "aggregate_s": time.perf_counter() - fetched,
        "share_5xx": float(pc.mean(pc.greater_equal(errors["status"], 500)).as_py() or 0.0),
    }


def run_stage(args: list[str]) -> dict:
    """Run one stage as its own process (as a scheduler would) and return what it reported."""
    out = subprocess.run([sys.executable, __file__, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="log rows stage 1 generates (default: %(default)s)")
    parser.add_argument("--stage", choices=("ingest", "aggregate"), help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage == "ingest":
        print(json.dumps(stage_ingest(args.uri, args.rows)))
        return 0
    if args.stage == "aggregate":
        print(json.dumps(stage_aggregate(args.uri)))
        return 0

    server = subprocess.Popen(
        [sys.executable, "-m", "flightcache.cli", "serve", "--port", "0", "--output", "json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        uri = json.loads("".join(iter(server.stdout.readline, "}\n")) + "}")["uri"]
        print(f"[server]  flightcache serving at {uri} (pid {server.pid}, memory limit 4 GiB)")
        one = run_stage(["--stage", "ingest", "--uri", uri, "--rows", str(args.rows)])
        print(
            f"[stage 1] generated {one['rows']:,} log rows in {one['generate_s']:.2f}s; put them as "
            f"demo/logs v{one['version']} ({format_bytes(one['bytes'])}) in {one['put_s']:.2f}s"
        )
        two = run_stage(["--stage", "aggregate", "--uri", uri])
        print(
            f"[stage 2] a separate process read {two['rows_read']:,} error rows (status >= 400, 3 of 7 "
            f"columns, filtered on the server) in {two['get_s']:.2f}s and aggregated them in "
            f"{two['aggregate_s']:.2f}s into {two['groups']} (path, method) groups; "
            f"{100 * two['share_5xx']:.1f}% are 5xx"
        )
        print("          top error sources:")
        for row in two["top"]:
            print(
                f"            {row['method']:<6} {row['path']:<16} {row['status_count']:>8,} errors "
                f"(worst status {row['status_max']})"
            )
        with flightcache.connect(uri) as fc:
            stats = fc.stats()
        print(
            f"[server]  {stats['datasets']} dataset, {format_bytes(stats['memory_used'])} in memory, "
            f"{stats['puts']} put, {stats['gets']} streams served"
        )
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("[server]  stopped cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
