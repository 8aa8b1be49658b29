"""IoT sensor windows: a Spark stage produces, a pandas stage (no Spark) consumes.

stage 1 (Spark)   deterministic sensor readings -> 5-minute windows per sensor
                  (mean, min, max, count) -> flightcache dataset iot/windows
stage 2 (pandas)  a separate plain-Python process reads iot/windows with the flightcache
                  client (only the columns it needs) and flags windows whose mean is more than
                  3 standard deviations from that sensor's norm

python pipelines/iot.py --rows 500000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import cache_format, flightcache_server, run_stage, spark_session

HERE = Path(__file__).resolve()


def stage_windows(uri: str, rows: int, sensors: int) -> dict[str, Any]:
    from pyspark.sql import functions as F

    spark = spark_session("iot-1-windows")
    readings = (
        spark.range(rows)
        .withColumn("sensor", F.concat(F.lit("sensor-"), (F.col("id") % sensors).cast("string")))
        .withColumn("ts", F.timestamp_seconds(F.lit(1_795_000_000) + (F.col("id") / sensors * 10).cast("long")))
        # a deterministic signal per sensor, with a fault on sensor-3 for an hour
        .withColumn(
            "value",
            F.sin(F.col("id") / 1000.0) * 10
            + (F.col("id") % sensors) * 2
            + F.when((F.col("id") % sensors == 3) & (F.col("id") / sensors).between(2000, 2360), 40).otherwise(0),
        )
    )
    windows = (
        readings.groupBy("sensor", F.window("ts", "5 minutes").alias("w"))
        .agg(
            F.avg("value").alias("mean"),
            F.min("value").alias("min"),
            F.max("value").alias("max"),
            F.count("*").alias("readings"),
        )
        .select("sensor", F.col("w.start").alias("window_start"), "mean", "min", "max", "readings")
    )
    windows.write.format(cache_format()).option("uri", uri).mode("overwrite").save("iot/windows")
    return {
        "stage": "windows",
        "readings": rows,
        "windows": spark.read.format(cache_format()).option("uri", uri).load("iot/windows").count(),
    }


def stage_anomalies(uri: str) -> dict[str, Any]:
    import flightcache

    with flightcache.connect(uri) as fc:
        df = fc.to_pandas("iot/windows", columns=["sensor", "window_start", "mean"])
    norm = df.groupby("sensor")["mean"].agg(["mean", "std"])
    df = df.join(norm, on="sensor", rsuffix="_norm")
    df["z"] = (df["mean"] - df["mean_norm"]) / df["std"]
    flagged = df[df["z"].abs() > 3].sort_values(["sensor", "window_start"])
    return {
        "stage": "anomalies",
        "windows": len(df),
        "flagged": len(flagged),
        "sensors_flagged": sorted(flagged["sensor"].unique().tolist()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=500_000, help="sensor readings (default: %(default)s)")
    parser.add_argument("--sensors", type=int, default=20, help="sensors (default: %(default)s)")
    parser.add_argument("--stage", choices=("windows", "anomalies"), help=argparse.SUPPRESS)
    parser.add_argument("--uri", help="use this flightcache server instead of starting one")
    args = parser.parse_args()
    if args.stage == "windows":
        print(json.dumps([stage_windows(args.uri, args.rows, args.sensors)]))
        return 0
    if args.stage == "anomalies":
        print(json.dumps([stage_anomalies(args.uri)]))
        return 0

    def both(uri: str) -> None:
        started = time.perf_counter()
        [one], one_s = run_stage(
            HERE, ["--stage", "windows", "--uri", uri, "--rows", str(args.rows), "--sensors", str(args.sensors)], {}
        )
        print(
            f"[stage 1] Spark: {one['readings']:,} readings -> {one['windows']:,} five-minute windows "
            f"in iot/windows ({one_s:.1f}s)"
        )
        [two], two_s = run_stage(HERE, ["--stage", "anomalies", "--uri", uri], {})
        print(
            f"[stage 2] pandas: read {two['windows']:,} windows, flagged {two['flagged']} in "
            f"{two['sensors_flagged']} ({two_s:.1f}s); total {time.perf_counter() - started:.1f}s"
        )

    if args.uri:
        both(args.uri)
    else:
        with flightcache_server("--storage", "none", env=dict(os.environ)) as server:
            both(server.uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
