"""A Spark read of a cached dataset, with and without shared-memory reads, in one Spark application.

The pipeline benchmark's stages are each a Spark application start plus work, and on a loaded 2-core
machine their run-to-run noise is larger than the read path. This isolates the read: one local Spark
session, one flightcache server (``--shm on``) holding a ~256 MiB web-log table, and a full read
of it (``write.format("noop")``, which makes every partition read all its rows) with
``option("shm", "true")`` and ``"false"``, alternating, after a warm-up of each. Writes
bench_results/spark_read.json.

    .venv/bin/python bench/spark_read.py              # 256 MiB, 7 pairs
    .venv/bin/python bench/spark_read.py --quick      # 16 MiB, 2 pairs, to a temp dir
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "pipelines")]

from _common import machine_info, progress, write_json  # noqa: E402
from common import flightcache_server, spark_session  # noqa: E402
from flight_throughput import make_table  # noqa: E402

NAME = "bench/spark"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256MiB", help="Arrow bytes of the table (default: %(default)s)")
    parser.add_argument("--pairs", type=int, default=7, help="timed (shm, no shm) pairs (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="16 MiB, 2 pairs, results to a temp dir")
    parser.add_argument("--out", type=Path, help="output directory (default: bench_results)")
    args = parser.parse_args()
    if args.quick:
        args.size, args.pairs = "16MiB", 2
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else HERE.parent / "bench_results")
    import flightcache
    from flightcache.units import parse_bytes

    table = make_table(parse_bytes(args.size))
    samples: dict[str, list[float]] = {"shm": [], "stream": []}
    with flightcache_server("--storage", "none", "--memory-limit", "4GiB", "--shm", "on") as server:
        with flightcache.connect(server.uri) as fc:
            fc.put(NAME, table)
            endpoints = len(fc.flight_info(NAME).endpoints)
        spark = spark_session("spark-read-bench")
        progress(f"{table.num_rows:,} rows, {table.nbytes:,} Arrow bytes, {endpoints} endpoints")

        def read(shm: bool) -> float:
            started = time.perf_counter()
            df = spark.read.format("flightcache-python")  # the Python source: it maps shared memory
            df = df.option("uri", server.uri).option("shm", str(shm).lower())
            df.load(NAME).write.format("noop").mode("overwrite").save()
            return time.perf_counter() - started

        for shm in (True, False):  # warm-up: Python workers, imports
            read(shm)
        for i in range(args.pairs):
            order = (True, False) if i % 2 == 0 else (False, True)
            for shm in order:
                samples["shm" if shm else "stream"].append(read(shm))
            progress(f"pair {i + 1}/{args.pairs}: shm {samples['shm'][-1]:.2f}s, stream {samples['stream'][-1]:.2f}s")
        spark.stop()
    paired = [b / a for a, b in zip(samples["shm"], samples["stream"], strict=True)]
    result: dict[str, Any] = {
        "machine": machine_info(),
        "parameters": {
            "rows": table.num_rows,
            "arrow_bytes": table.nbytes,
            "pairs": args.pairs,
            "endpoints": endpoints,
            "spark": "local[2]",
            "read": "write.format('noop')",
        },
        "seconds": samples,
        "medians_s": {k: statistics.median(v) for k, v in samples.items()},
        "paired_speedups": [round(p, 4) for p in paired],
        "targets": {
            "spark_read_faster_with_shm": {
                "target": "a full Spark read of a cached dataset (one application, alternating) is faster with "
                "shared-memory reads than streaming it over Flight",
                "speedup": round(statistics.median(paired), 3),
                "min_paired_speedup": round(min(paired), 3),
                "met": statistics.median(paired) > 1.0,
            }
        },
    }
    write_json(out / "spark_read.json", result)
    progress(f"wrote {out / 'spark_read.json'}; median speedup {statistics.median(paired):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
