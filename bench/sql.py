"""Server-side SQL on the cache versus DuckDB reading the same data from S3, from a local Parquet file and from
an in-process Arrow table: log-analytics queries (aggregation, join, selective filter, percentile by key).

Every path runs the same SQL text and returns a pyarrow Table in this process:

* ``server``: ``client.sql(query)``: DuckDB inside the flightcache server (its own process) over the cached
  datasets, the result streamed back over Flight;
* ``attach``: a local DuckDB over the server's datasets through ``flightcache.integrations.duck.attach``
  (each scan pulls the columns it needs, filtered on the server);
* ``s3-cloud``: a local DuckDB over ``pyarrow.dataset`` on the Parquet files in moto S3 behind
  ``bench/shaping.py``, which gives each request S3's first-byte latency and each connection S3's bandwidth
  (the pipeline benchmark's "cloud"; DuckDB's httpfs extension cannot be downloaded here, and DuckDB pushes
  projection and filters into the pyarrow scanner);
* ``s3``: the same on moto directly (loopback, no latency: the most optimistic S3);
* ``parquet``: a local DuckDB over the same Parquet files on local disk (``read_parquet``);
* ``arrow``: a local DuckDB over the same data as an in-process Arrow table.

moto and the flightcache server each run in their own process (moto in this process would hold the GIL while
serving). Repetitions are interleaved, the order of the paths rotating from rep to rep, and every ratio is
computed within this run. Before timing, each query's result is checked to be the same on every path.

    .venv/bin/python bench/sql.py            # 8M rows, 9 reps -> bench_results/sql.{json,png}
    .venv/bin/python bench/sql.py --quick    # 400k rows, 2 reps -> a new temp dir, in seconds
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

try:
    from ._common import machine_info, median, progress, sources_digest, start_proxy, write_json
except ImportError:  # run as a script: bench/ is on sys.path
    from _common import machine_info, median, progress, sources_digest, start_proxy, write_json

import flightcache
from flightcache.integrations.duck import attach

SEED = 20261124
MiB = 2**20
BUCKET = "bench"
FILES = 4
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bench_results"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}

QUERIES: dict[str, tuple[str, str]] = {
    "aggregation": (
        "GROUP BY two low-cardinality keys, four aggregates over every row",
        "SELECT method, status, count(*) AS n, round(avg(latency_ms), 6) AS avg_ms, sum(bytes) AS bytes, "
        'max(ts) AS last FROM "bench/logs" GROUP BY ALL ORDER BY ALL',
    ),
    "join": (
        "the 5xx rows (~17%) joined to a 100k-row dimension, grouped by two of its columns",
        'SELECT u.country, u.plan, count(*) AS n, sum(l.bytes) AS bytes FROM "bench/logs" l '
        'JOIN "bench/users" u USING (user_id) WHERE l.status >= 500 GROUP BY ALL ORDER BY ALL',
    ),
    "filter": (
        "a selective filter (~0.03% of rows) returning three columns",
        "SELECT ts, user_id, latency_ms FROM \"bench/logs\" WHERE path = '/api/v1/item/42' AND status = 500 "
        "ORDER BY ts, user_id",
    ),
    "p99_by_path": (
        "99th percentile latency per path (5,000 groups), top 10",
        'SELECT path, round(quantile_cont(latency_ms, 0.99), 6) AS p99, count(*) AS n FROM "bench/logs" '
        "GROUP BY path ORDER BY p99 DESC, path LIMIT 10",
    ),
}
PATHS: dict[str, str] = {
    "server": "flightcache client.sql (DuckDB in the server, over the cache)",
    "attach": "local DuckDB over the server via flightcache.integrations.duck.attach",
    "s3-cloud": "local DuckDB over pyarrow.dataset on moto S3 Parquet shaped like cloud S3",
    "s3": "local DuckDB over pyarrow.dataset on moto S3 Parquet (loopback, unshaped)",
    "parquet": "local DuckDB over local Parquet (read_parquet)",
    "arrow": "local DuckDB over an in-process Arrow table",
}
COLORS = {
    "server": "#2ca02c",
    "attach": "#98df8a",
    "s3-cloud": "#8c1c13",
    "s3": "#d62728",
    "parquet": "#1f77b4",
    "arrow": "#7f7f7f",
}


# -- data ------------------------------------------------------------------------------------------


def make_tables(rows: int) -> tuple[pa.Table, pa.Table]:
    """Web logs (``rows``) and a 100k-row user dimension, deterministic."""
    rng = np.random.default_rng(SEED)
    paths = pa.array([f"/api/v1/item/{i}" for i in range(5000)])
    start = np.datetime64("2026-11-24T00:00:00", "us").astype("int64")
    logs = pa.table(
        {
            "ts": pa.array(start + np.sort(rng.integers(0, 86_400_000_000, rows)), pa.timestamp("us", tz="UTC")),
            "status": pa.array(rng.choice(np.array([200, 200, 200, 200, 304, 404, 500, 503], np.int32), rows)),
            "method": pa.array(np.array(["GET", "GET", "GET", "POST", "PUT", "DELETE"])[rng.integers(0, 6, rows)]),
            "path": paths.take(pa.array(rng.zipf(1.3, rows) % 5000)),
            "user_id": pa.array(rng.integers(0, 100_000, rows)),
            "bytes": pa.array(rng.integers(0, 1_000_000, rows)),
            "latency_ms": pa.array(rng.gamma(2.0, 40.0, rows)),
        }
    )
    users = pa.table(
        {
            "user_id": pa.array(np.arange(100_000)),
            "country": pa.array(np.array(["us", "de", "fr", "jp", "br", "in"])[rng.integers(0, 6, 100_000)]),
            "plan": pa.array(np.array(["free", "pro", "team"])[rng.integers(0, 3, 100_000)]),
        }
    )
    return pa.Table.from_batches(logs.to_batches(max_chunksize=65536)), users


def write_parquet(fs: pafs.FileSystem, root: str, logs: pa.Table, users: pa.Table) -> None:
    """The logs as FILES Parquet files (zstd, 512Ki-row groups) and the users as one, under ``root``."""
    fs.create_dir(f"{root}/logs", recursive=True)
    step = -(-logs.num_rows // FILES)
    for i in range(FILES):
        part = logs.slice(i * step, step)
        pq.write_table(part, f"{root}/logs/part-{i}.parquet", filesystem=fs, compression="zstd", row_group_size=1 << 19)
    pq.write_table(users, f"{root}/users.parquet", filesystem=fs, compression="zstd")


# -- processes -------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.1)


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    with log.open("wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=f,
            env={**os.environ, **AWS_ENV},
        )
    wait_port(port, proc, "moto")
    return proc, f"http://127.0.0.1:{port}"


def start_server(memory_limit: str) -> tuple[subprocess.Popen[bytes], str]:
    limit = ["--memory-limit", memory_limit]
    proc = subprocess.Popen(
        [sys.executable, "-m", "flightcache.cli", "serve", "--port", "0", "--storage", "none", *limit],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "FLIGHTCACHE_LOG_LEVEL": "WARNING"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # printed once the server is fully constructed
    found = re.search(r"serving at (grpc://\S+)", line)
    if found is None:
        stop(proc)
        raise RuntimeError(f"the flightcache server did not start: {line!r}")
    return proc, found.group(1)


def stop(proc: subprocess.Popen[Any] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def s3_filesystem(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(
        endpoint_override=endpoint.split("://", 1)[1],
        scheme="http",
        region=AWS_ENV["AWS_REGION"],
        access_key=AWS_ENV["AWS_ACCESS_KEY_ID"],
        secret_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        allow_bucket_creation=True,
    )


# -- the run ---------------------------------------------------------------------------------------


def on_s3(s3: pafs.S3FileSystem) -> Callable[[str], pa.Table]:
    con = duckdb.connect()
    con.register("bench/logs", ds.dataset(f"{BUCKET}/parquet/logs", filesystem=s3, format="parquet"))
    con.register("bench/users", ds.dataset(f"{BUCKET}/parquet/users.parquet", filesystem=s3, format="parquet"))
    return lambda q: con.sql(q).to_arrow_table()


def connections(
    client: flightcache.Client,
    s3: pafs.S3FileSystem,
    cloud: pafs.S3FileSystem,
    local_root: Path,
    logs: pa.Table,
    users: pa.Table,
) -> dict[str, Callable[[str], pa.Table]]:
    """Each path as a function from SQL text to a pyarrow Table."""
    attached = duckdb.connect()
    attach(attached, client)
    on_disk = duckdb.connect()
    on_disk.execute(f"CREATE VIEW \"bench/logs\" AS SELECT * FROM read_parquet('{local_root}/logs/*.parquet')")
    on_disk.execute(f"CREATE VIEW \"bench/users\" AS SELECT * FROM read_parquet('{local_root}/users.parquet')")
    in_process = duckdb.connect()
    in_process.register("bench/logs", logs)
    in_process.register("bench/users", users)
    return {
        "server": client.sql,
        "attach": lambda q: attached.sql(q).to_arrow_table(),
        "s3-cloud": on_s3(cloud),
        "s3": on_s3(s3),
        "parquet": lambda q: on_disk.sql(q).to_arrow_table(),
        "arrow": lambda q: in_process.sql(q).to_arrow_table(),
    }


def check_same(query: str, results: dict[str, pa.Table]) -> int:
    """Every path gave the same rows (types may differ: Parquet reads timestamps back as written); the row count."""
    rows = {path: t.to_pylist() for path, t in results.items()}
    reference = rows["arrow"]
    for path, r in rows.items():
        if r != reference:
            raise AssertionError(f"{path} differs from arrow for {query!r}: {r[:3]} vs {reference[:3]}")
    return len(reference)


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with ExitStack() as stack:
        progress(f"generating {args.rows:,} rows of web logs")
        logs, users = make_tables(args.rows)
        progress("starting moto S3, its shaping proxy and the flightcache server, each in its own process")
        moto, endpoint = start_moto(workdir / "moto.log")
        stack.callback(stop, moto)
        server, uri = start_server(args.memory_limit)
        stack.callback(stop, server)
        port = int(endpoint.rsplit(":", 1)[1])
        cloud = s3_filesystem(start_proxy(port, args.latency_ms, args.bandwidth_mbps, args.jitter, stack))
        s3 = s3_filesystem(endpoint)
        s3.create_dir(BUCKET)
        write_parquet(s3, f"{BUCKET}/parquet", logs, users)
        write_parquet(pafs.LocalFileSystem(), str(workdir / "parquet"), logs, users)
        parquet_bytes = sum(p.stat().st_size for p in (workdir / "parquet").rglob("*.parquet"))
        client = stack.enter_context(flightcache.connect(uri))
        client.put("bench/logs", logs)
        client.put("bench/users", users)
        paths = connections(client, s3, cloud, workdir / "parquet", logs, users)
        progress(f"{logs.nbytes / MiB:.0f} MiB Arrow, {parquet_bytes / MiB:.0f} MiB Parquet; checking results")
        result_rows = {}
        for name, (_, sql) in QUERIES.items():
            result_rows[name] = check_same(name, {p: fn(sql) for p, fn in paths.items()})  # also warms every path
        samples: dict[str, dict[str, list[float]]] = {q: {p: [] for p in paths} for q in QUERIES}
        order = list(paths)
        for rep in range(args.reps):
            for name, (_, sql) in QUERIES.items():
                for path in order:
                    started = time.perf_counter()
                    paths[path](sql)
                    samples[name][path].append(time.perf_counter() - started)
            order = order[1:] + order[:1]
            progress(
                f"rep {rep + 1}/{args.reps}: "
                + ", ".join(f"{q} {median(s['server']) * 1e3:.0f} ms" for q, s in samples.items())
            )
    result = summarize(args, samples, result_rows, logs, parquet_bytes)
    result["shaping"] = {
        "latency_ms": args.latency_ms,
        "bandwidth_mbps_per_connection": args.bandwidth_mbps,
        "jitter_lognormal_sigma": args.jitter,
    }
    return result


def summarize(
    args: argparse.Namespace,
    samples: dict[str, dict[str, list[float]]],
    result_rows: dict[str, int],
    logs: pa.Table,
    parquet_bytes: int,
) -> dict[str, Any]:
    queries = {}
    for name, (what, sql) in QUERIES.items():
        med = {p: median(s) for p, s in samples[name].items()}
        queries[name] = {
            "what": what,
            "sql": sql,
            "result_rows": result_rows[name],
            "median_ms": {p: round(v * 1e3, 2) for p, v in med.items()},
            "min_ms": {p: round(min(s) * 1e3, 2) for p, s in samples[name].items()},
            "samples_ms": {p: [round(v * 1e3, 2) for v in s] for p, s in samples[name].items()},
            "s3_cloud_over_server": round(med["s3-cloud"] / med["server"], 2),
            "s3_over_server": round(med["s3"] / med["server"], 2),
            "parquet_over_server": round(med["parquet"] / med["server"], 2),
            "arrow_over_server": round(med["arrow"] / med["server"], 2),
            "attach_over_server": round(med["attach"] / med["server"], 2),
            # What DuckDB over the same Arrow data reaches in-process, with no server: the ceiling for the ratios.
            "s3_cloud_over_arrow": round(med["s3-cloud"] / med["arrow"], 2),
            "s3_over_arrow": round(med["s3"] / med["arrow"], 2),
            "parquet_over_arrow": round(med["parquet"] / med["arrow"], 2),
        }
    worst_cloud = min(q["s3_cloud_over_server"] for q in queries.values())
    worst_s3 = min(q["s3_over_server"] for q in queries.values())
    worst_parquet = min(q["parquet_over_server"] for q in queries.values())
    return {
        "dataset": {
            "rows": logs.num_rows,
            "arrow_bytes": logs.nbytes,
            "parquet_bytes": parquet_bytes,
            "parquet_files": FILES,
            "users_rows": 100_000,
        },
        "paths": PATHS,
        "queries": queries,
        "targets": {
            # Judged against S3 shaped like the cloud (the developers' guide: comparisons with "the cloud" shape
            # moto to published S3 figures); the unshaped moto ratio is reported beside it.
            "server_at_least_5x_faster_than_s3": {
                "worst_ratio": worst_cloud,
                "worst_ratio_unshaped_moto": worst_s3,
                "met": worst_cloud >= 5,
            },
            "server_no_slower_than_local_parquet": {"worst_ratio": worst_parquet, "met": worst_parquet >= 1},
        },
        "notes": [
            "Times are wall clock in this process from the call to a complete pyarrow Table, median of the reps.",
            "Ratios are median(other path) / median(server) within this run; above 1 means the server is faster. "
            "s3_over_arrow and parquet_over_arrow are the same ratios for DuckDB over the Arrow table in this process: "
            "the most a server running DuckDB over Arrow could reach.",
            "All DuckDB instances use their default thread count (one per core); the flightcache server, moto and "
            "this process share the same cores.",
            "s3-cloud reaches moto through bench/shaping.py (first-byte latency per request, bandwidth per connection, "
            "log-normal jitter; see shaping); s3 is moto on loopback with neither, faster than any real S3.",
        ],
    }


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = list(results["queries"])
    paths = list(PATHS)
    fig, ax = plt.subplots(figsize=(10, 6))
    width = 0.8 / len(paths)
    for i, p in enumerate(paths):
        values = [results["queries"][q]["median_ms"][p] for q in queries]
        bars = ax.bar([x + i * width for x in range(len(queries))], values, width, label=PATHS[p], color=COLORS[p])
        ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7, padding=1)
    ax.set_xticks([x + width * (len(paths) - 1) / 2 for x in range(len(queries))], queries)
    ax.set_yscale("log")
    ax.set_ylabel("median wall time (ms, log scale)")
    d = results["dataset"]
    ax.set_title(f"SQL over {d['rows']:,} log rows ({d['arrow_bytes'] / MiB:.0f} MiB Arrow): lower is better")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_summary(results: dict[str, Any]) -> None:
    for name, q in results["queries"].items():
        cells = ", ".join(f"{p} {v:.1f} ms" for p, v in q["median_ms"].items())
        print(f"{name:12s} {cells}")
        print(
            f"{'':12s} s3-cloud/server {q['s3_cloud_over_server']}x, s3/server {q['s3_over_server']}x, "
            f"parquet/server {q['parquet_over_server']}x, "
            f"arrow/server {q['arrow_over_server']}x"
        )
    for target, t in results["targets"].items():
        print(f"{target}: worst ratio {t['worst_ratio']} -> {'met' if t['met'] else 'NOT met'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few-second run into a new temp dir")
    parser.add_argument("--rows", type=int, help="log rows (default: 8,000,000; 400,000 with --quick)")
    parser.add_argument("--reps", type=int, help="timed repetitions, interleaved (default: 9; 2 with --quick)")
    parser.add_argument("--memory-limit", default="4GiB", help="the server's --memory-limit (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="where sql.json and sql.png go (default: bench_results/)")
    parser.add_argument(
        "--latency-ms", type=float, default=100.0, help="s3-cloud first-byte latency per request (default: %(default)s)"
    )
    parser.add_argument(
        "--bandwidth-mbps", type=float, default=90.0, help="s3-cloud MB/s per connection (default: %(default)s)"
    )
    parser.add_argument(
        "--jitter", type=float, default=0.5, help="s3-cloud log-normal latency sigma (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    args.rows = args.rows or (400_000 if args.quick else 8_000_000)
    args.reps = args.reps or (2 if args.quick else 9)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="sql_bench_")) if args.quick else DEFAULT_OUT
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "versions": {"duckdb": duckdb.__version__, "pyarrow": pa.__version__},
        "parameters": {"rows": args.rows, "reps": args.reps, "quick": args.quick, "seed": SEED},
    }
    with tempfile.TemporaryDirectory(prefix="sql_bench_work_") as workdir:
        results.update(run(args, Path(workdir)))
    if sources_digest("flightcache") != results["machine"].get("flightcache_sources_sha256"):
        results["flightcache_sources_changed_during_run"] = True
        progress("WARNING: flightcache's sources changed during the run")
    results["elapsed_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "sql.json", results)
    plot(results, args.out / "sql.png")
    print_summary(results)
    progress(f"wrote {args.out / 'sql.json'} and sql.png in {results['elapsed_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
