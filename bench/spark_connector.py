"""The JVM Spark connector against the Python data source and Spark's native Parquet on local disk.

One local Spark application (local[2], warm), one flightcache server holding a web-log table of mixed
columns (timestamps, integers, doubles, URL strings; ~1 GB of Arrow by default), and, alternating
path by path for each repetition:

* a full read (``write.format("noop")``, every row of every column) and an aggregation
  (``GROUP BY status`` with count, sum and mean) through (a) the JVM connector, ``format("flightcache")``,
  (b) the Python data source, ``format("flightcache-python")`` (with its shared-memory reads, its
  fastest path), and (c) Spark's native Parquet reader on a local directory of the same data;
* a full write of the same DataFrame (read from that local Parquet, so every path pays the same
  source) through (a), (b) and Spark's native Parquet writer to local disk.

Writes bench_results/spark_connector.json and .png.

    .venv/bin/python bench/spark_connector.py                 # 1 GB, 5 repetitions
    .venv/bin/python bench/spark_connector.py --size 256MB --reps 3
    .venv/bin/python bench/spark_connector.py --quick         # 32 MB, 2 repetitions, to a temp dir
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "pipelines")]

from _common import machine_info, progress, write_json  # noqa: E402
from common import flightcache_server, spark_session  # noqa: E402
from flight_throughput import make_table  # noqa: E402

NAME = "bench/connector"
PATHS = ("jvm", "python", "parquet")
OPS = ("read", "aggregate", "write")
# The floor of a read: the same rows in Spark's own in-memory columnar cache, no source at all. What a path
# takes beyond it is the most any connector work could save.
FLOOR = "spark-memory"


def paths_of(op: str) -> tuple[str, ...]:
    return PATHS if op == "write" else (*PATHS, FLOOR)

FORMATS = {"jvm": "flightcache", "python": "flightcache-python"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GB", help="Arrow bytes of the table (default: %(default)s)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of every (op, path) (default: 5)")
    parser.add_argument("--quick", action="store_true", help="32 MB, 2 repetitions, results to a temp dir")
    parser.add_argument("--out", type=Path, help="output directory (default: bench_results)")
    args = parser.parse_args()
    if args.quick:
        args.size, args.reps = "32MB", 2
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else HERE.parent / "bench_results")
    import flightcache
    import flightcache.integrations.spark_jvm
    from flightcache.units import parse_bytes

    flightcache.integrations.spark_jvm.jar_path()  # fails with the build command if the jar is missing
    table = make_table(parse_bytes(args.size))
    work = Path(tempfile.mkdtemp(prefix="spark-connector-bench-"))
    samples: dict[str, dict[str, list[float]]] = {op: {p: [] for p in paths_of(op)} for op in OPS}
    try:
        with flightcache_server("--storage", "none", "--memory-limit", "8GiB", "--shm", "on") as server:
            with flightcache.connect(server.uri) as fc:
                fc.put(NAME, table)
                endpoints = len(fc.flight_info(NAME).endpoints)
            del table  # the server has it; keep this process small
            spark = spark_session("spark-connector-bench")
            spark.sparkContext.setLogLevel("ERROR")
            parquet = str(work / "parquet")
            source = spark.read.format("flightcache").option("uri", server.uri).load(NAME)
            source.write.mode("overwrite").parquet(parquet)
            rows = spark.read.parquet(parquet).count()
            progress(f"{rows:,} rows, {endpoints} endpoints, Parquet copy at {parquet}")
            from pyspark import StorageLevel

            # where("true") gives the cached plan a shape of its own: Spark swaps a cached plan in for any query
            # with the same plan, and the parquet path (and every write's source) must keep reading the files.
            memory = spark.read.parquet(parquet).where("true").persist(StorageLevel.MEMORY_ONLY)
            assert memory.count() == rows
            infos = spark.sparkContext._jsc.sc().getRDDStorageInfo()
            cached = sum(i.numCachedPartitions() for i in infos) / max(1, sum(i.numPartitions() for i in infos))
            progress(f"the floor: {cached:.0%} of the partitions in Spark's memory")

            def frame(path: str) -> Any:
                if path == "parquet":
                    return spark.read.parquet(parquet)
                if path == FLOOR:
                    return memory
                return spark.read.format(FORMATS[path]).option("uri", server.uri).load(NAME)

            def read(path: str) -> None:
                frame(path).write.format("noop").mode("overwrite").save()

            def aggregate(path: str) -> None:
                got = frame(path).groupBy("status").agg({"*": "count", "bytes_sent": "sum", "latency_ms": "avg"})
                assert sum(r[1] for r in got.collect()) == rows

            def write(path: str) -> None:
                df = spark.read.parquet(parquet)
                if path == "parquet":
                    df.write.mode("overwrite").parquet(str(work / "written"))
                else:
                    df.write.format(FORMATS[path]).option("uri", server.uri).mode("overwrite").save(f"{NAME}-{path}")

            actions: dict[str, Callable[[str], None]] = {"read": read, "aggregate": aggregate, "write": write}

            def timed(op: str, path: str) -> float:
                started = time.perf_counter()
                actions[op](path)
                return time.perf_counter() - started

            for op in OPS:  # warm-up: JIT, Python workers, imports
                for path in paths_of(op):
                    timed(op, path)
            for i in range(args.reps):
                for op in OPS:
                    order = paths_of(op) if i % 2 == 0 else paths_of(op)[::-1]  # drift hits every path alike
                    for path in order:
                        samples[op][path].append(timed(op, path))
                    times = ", ".join(f"{p} {samples[op][p][-1]:.2f}s" for p in paths_of(op))
                    progress(f"rep {i + 1}/{args.reps} {op}: {times}")
            with flightcache.connect(server.uri) as fc:
                written = {p: fc.info(f"{NAME}-{p}")["rows"] for p in ("jvm", "python")}
            assert written == {"jvm": rows, "python": rows}, written
            spark.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    arrow_bytes = parse_bytes(args.size)
    result = summarize(samples, args, rows, endpoints, arrow_bytes)
    result["parameters"]["reps_done"] = args.reps
    result["spark_memory_floor"]["cached_fraction"] = round(cached, 3)
    write_json(out / "spark_connector.json", result)
    plot(result, out / "spark_connector.png")
    progress(f"wrote {out / 'spark_connector.json'}: {result['targets']}")
    return 0


def _ratios(slow: list[float], fast: list[float]) -> list[float]:
    return [round(s / f, 4) for s, f in zip(slow, fast, strict=True)]


def summarize(
    samples: dict[str, dict[str, list[float]]], args: argparse.Namespace, rows: int, endpoints: int, nbytes: int
) -> dict[str, Any]:
    medians = {op: {p: round(statistics.median(v), 4) for p, v in by.items()} for op, by in samples.items()}
    paired = {
        op: {
            "jvm_vs_python": _ratios(samples[op]["python"], samples[op]["jvm"]),
            "jvm_vs_parquet": _ratios(samples[op]["parquet"], samples[op]["jvm"]),
        }
        for op in OPS
    }
    speed = {op: {k: round(statistics.median(v), 3) for k, v in by.items()} for op, by in paired.items()}

    def target(text: str, value: float, goal: float, pairs: list[float]) -> dict[str, Any]:
        return {"target": text, "speedup": value, "min_paired": min(pairs), "met": value >= goal}

    return {
        "machine": machine_info(),
        "parameters": {
            "rows": rows,
            "arrow_bytes": nbytes,
            "reps": args.reps,
            "endpoints": endpoints,
            "spark": "local[2], one warm application",
            "read": "write.format('noop')",
            "aggregate": "groupBy(status).agg(count(*), sum(bytes_sent), avg(latency_ms))",
            "write": "the local Parquet copy read and written (mode overwrite) through each path",
        },
        "seconds": samples,
        "medians_s": medians,
        "read_gb_per_s": {p: round(nbytes / 1e9 / t, 3) for p, t in medians["read"].items()},
        "spark_memory_floor": {
            "what": "the same rows read from Spark's own in-memory columnar cache (persist MEMORY_ONLY): no source",
            "jvm_over_floor": {op: round(medians[op]["jvm"] / medians[op][FLOOR], 3) for op in ("read", "aggregate")},
            "parquet_over_floor": {
                op: round(medians[op]["parquet"] / medians[op][FLOOR], 3) for op in ("read", "aggregate")
            },
        },
        "paired_speedups": paired,
        "median_speedups": speed,
        "targets": {
            "read_vs_python": target(
                "full read through the JVM connector >= 3x the Python data source",
                speed["read"]["jvm_vs_python"],
                3.0,
                paired["read"]["jvm_vs_python"],
            ),
            "read_vs_parquet": target(
                "full read through the JVM connector >= 1.25x Spark's native Parquet on local disk",
                speed["read"]["jvm_vs_parquet"],
                1.25,
                paired["read"]["jvm_vs_parquet"],
            ),
            "aggregate_vs_python": target(
                "aggregation through the JVM connector >= 3x the Python data source",
                speed["aggregate"]["jvm_vs_python"],
                3.0,
                paired["aggregate"]["jvm_vs_python"],
            ),
            "aggregate_vs_parquet": target(
                "aggregation through the JVM connector >= 1.25x native local Parquet",
                speed["aggregate"]["jvm_vs_parquet"],
                1.25,
                paired["aggregate"]["jvm_vs_parquet"],
            ),
            "write_vs_python": target(
                "full write through the JVM connector >= 2x the Python data source",
                speed["write"]["jvm_vs_python"],
                2.0,
                paired["write"]["jvm_vs_python"],
            ),
            "write_vs_parquet": target(
                "full write through the JVM connector no slower than native local Parquet",
                speed["write"]["jvm_vs_parquet"],
                1.0,
                paired["write"]["jvm_vs_parquet"],
            ),
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = result["medians_s"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.27
    labels = {"jvm": "JVM connector", "python": "Python data source", "parquet": "native Parquet, local disk"}
    for k, p in enumerate(PATHS):
        xs = [i + (k - 1) * width for i in range(len(OPS))]
        bars = ax.bar(xs, [medians[op][p] for op in OPS], width, label=labels[p])
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(range(len(OPS)), [f"full {op}" if op != "aggregate" else "aggregation" for op in OPS])
    ax.set_ylabel("median seconds (lower is better)")
    gb = result["parameters"]["arrow_bytes"] / 1e9
    ax.set_title(f"Spark local[2], {gb:.2f} GB of Arrow, {result['parameters']['reps']} alternating repetitions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
