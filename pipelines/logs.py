"""A web-access-log pipeline in four Spark stages, each its own Spark application (or, with
``--one-app``, all jobs of one application).

    generate  deterministic raw access logs (Combined Log Format lines) as Parquet in object storage
    stage 1   ingest: read the raw lines from object storage, drop empty ones      -> logs/raw
    stage 2   parse, clean, enrich: fields, timestamps, status class, bots        -> logs/clean
    stage 3   sessionize (30 min inactivity) and aggregate per session and hour   -> logs/sessions, logs/hourly
    stage 4   join with the page catalog (a dimension table) and report           -> logs/report

Every stage reads its input from object storage with Spark's S3 connector (``s3a://``, pipelines/s3a.py).
Stages hand their output to the next through ``--handoff``: ``flightcache`` (the cache), ``s3a``
(Spark's Parquet in object storage), ``s3`` (Parquet in object storage through pyarrow) or ``local``
(Spark's Parquet on local disk). All give identical reports. ``run`` starts the services it needs
(moto S3 as the cloud, a flightcache server) unless told where they are, runs the stages one after
another and prints what each did.

    python pipelines/logs.py run --handoff flightcache --rows 1000000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from common import HANDOFFS, Handoff, flightcache_server, moto_s3, reset_dir, run_stage, spark_session
from s3a import to_s3a

HERE = Path(__file__).resolve()
BUCKET = "pipeline-data"
PAGES = [
    "/",
    "/login",
    "/logout",
    "/search",
    "/cart",
    "/checkout",
    "/account",
    "/help",
    "/api/items",
    "/api/cart",
    "/api/user",
    "/api/search",
    "/static/app.js",
    "/static/app.css",
    "/blog",
    "/blog/post",
]
SECTIONS = {
    "/": "home",
    "/login": "account",
    "/logout": "account",
    "/search": "search",
    "/cart": "shop",
    "/checkout": "shop",
    "/account": "account",
    "/help": "support",
    "/api/items": "api",
    "/api/cart": "api",
    "/api/user": "api",
    "/api/search": "api",
    "/static/app.js": "static",
    "/static/app.css": "static",
    "/blog": "content",
    "/blog/post": "content",
}
AGENTS = [
    "Mozilla/5.0 (X11; Linux x86_64) Firefox/133.0",
    "Mozilla/5.0 (Macintosh) Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0) Chrome/131.0",
    "curl/8.11.0",
    "Googlebot/2.1 (+http://www.google.com/bot)",
    "Mozilla/5.0 (compatible; bingbot/2.0)",
    "python-requests/2.32",
]
LINE_PATTERN = r'^(\S+) \S+ \S+ \[([^\]]+)\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+) "([^"]*)" "([^"]*)" (\d+)$'


# -- generate -------------------------------------------------------------------------------------


def generate(rows: int, dest: str, files: int = 8, seed: int = 42) -> dict[str, Any]:
    """Write ``rows`` raw log lines as ``files`` Parquet files under ``dest`` (any pyarrow URI)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from flightcache.server.storage import filesystem

    fs, root = filesystem(dest)
    fs.create_dir(root, recursive=True)
    per_file = -(-rows // files)
    start = np.datetime64("2026-11-24T00:00:00", "s")
    written = 0
    for i in range(files):
        n = min(per_file, rows - written)
        if n <= 0:
            break
        rng = np.random.default_rng(seed + i)
        clients = rng.integers(0, max(64, rows // 40), n)  # about 40 requests per client a day
        ips = [f"10.{c >> 16 & 255}.{c >> 8 & 255}.{c & 255}" for c in clients.tolist()]
        ts = pa.array(
            start + np.sort(rng.integers(i * 86_400 // files, (i + 1) * 86_400 // files, n)), pa.timestamp("s")
        )
        stamp = pc.strftime(ts, format="%d/%b/%Y:%H:%M:%S +0000")
        methods = rng.choice(["GET"] * 8 + ["POST", "PUT"], n)
        paths = rng.choice(PAGES, n)
        query = np.where(rng.random(n) < 0.3, np.char.add("?q=", rng.integers(0, 1000, n).astype(str)), "")
        status = rng.choice([200] * 85 + [301, 302, 304, 304] + [404] * 5 + [500, 503], n)
        size = rng.lognormal(8, 1.2, n).astype(np.int64)
        agents = rng.choice(AGENTS, n, p=[0.3, 0.2, 0.3, 0.05, 0.08, 0.04, 0.03])
        latency_us = (rng.gamma(2.0, 40_000.0, n)).astype(np.int64)
        line = pc.binary_join_element_wise(
            pa.array(ips),
            " - - [",
            stamp,
            '] "',
            pa.array(methods),
            " ",
            pa.array(np.char.add(paths, query)),
            ' HTTP/1.1" ',
            pa.array(status.astype(str)),
            " ",
            pa.array(size.astype(str)),
            ' "-" "',
            pa.array(agents),
            '" ',
            pa.array(latency_us.astype(str)),
            "",
        )
        if i == 0:  # a few lines a real log has: blank and garbled
            line = pa.concat_arrays([line, pa.array(["", "garbled \x00 line", "   "])])
        table = pa.table({"line": line, "source": pa.array([f"web-{i % 4}"] * len(line))})
        with fs.open_output_stream(f"{root}/part-{i:05d}.parquet") as out:
            pq.write_table(table, out, compression="zstd")
        written += n
    return {"rows": written, "files": files, "dest": dest}


def write_pages(dest: str) -> None:
    """The dimension table: page -> section, owning team."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flightcache.server.storage import filesystem

    fs, root = filesystem(dest)
    fs.create_dir(root, recursive=True)
    table = pa.table(
        {"path": PAGES, "section": [SECTIONS[p] for p in PAGES], "team": [f"team-{SECTIONS[p]}" for p in PAGES]}
    )
    with fs.open_output_stream(f"{root}/pages.parquet") as out:
        pq.write_table(table, out)


# -- the stages -------------------------------------------------------------------------------------


def _session(app: str) -> tuple[Any, float]:
    """The stage's Spark session and how long getting it took (a JVM start, unless one is running)."""
    started = time.perf_counter()
    spark = spark_session(app)
    return spark, time.perf_counter() - started


def stage_ingest(h: Handoff) -> dict[str, Any]:
    from pyspark.sql import functions as F

    spark, session_s = _session("logs-1-ingest")
    raw = spark.read.parquet(to_s3a(f"{h.s3_prefix}/raw/logs"))  # the input, from S3 as Spark reads it
    lines = raw.where(F.length(F.trim("line")) > 0).withColumn("ingested_at", F.lit("2026-11-25T00:00:00Z"))
    h.write(lines, "logs/raw")
    return {"stage": "ingest", "session_s": session_s, "rows_out": {"logs/raw": h.count(spark, "logs/raw")}}


def stage_parse(h: Handoff) -> dict[str, Any]:
    from pyspark.sql import functions as F

    spark, session_s = _session("logs-2-parse")
    raw = h.read(spark, "logs/raw").where(F.col("line").rlike(LINE_PATTERN))  # drop garbled lines
    fields = [F.regexp_extract("line", LINE_PATTERN, i) for i in range(1, 10)]
    parsed = raw.select(
        fields[0].alias("ip"),
        F.to_timestamp(fields[1], "dd/MMM/yyyy:HH:mm:ss Z").alias("ts"),
        fields[2].alias("method"),
        F.regexp_replace(fields[3], r"\?.*$", "").alias("path"),
        fields[4].cast("int").alias("status"),
        fields[5].cast("long").alias("bytes"),
        fields[7].alias("agent"),
        fields[8].cast("long").alias("latency_us"),
        "source",
    )
    clean = (
        parsed.where(F.col("ts").isNotNull() & (F.col("ip") != ""))
        .withColumn("status_class", F.concat((F.col("status") / 100).cast("int").cast("string"), F.lit("xx")))
        .withColumn("is_bot", F.lower("agent").rlike("bot|crawl|spider|curl|python-requests"))
        .withColumn("hour", F.date_trunc("hour", "ts"))
    )
    h.write(clean, "logs/clean")
    return {"stage": "parse", "session_s": session_s, "rows_out": {"logs/clean": h.count(spark, "logs/clean")}}


def stage_sessionize(h: Handoff) -> dict[str, Any]:
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    spark, session_s = _session("logs-3-sessionize")
    clean = h.read(spark, "logs/clean")
    humans = clean.where(~F.col("is_bot"))
    by_ip = Window.partitionBy("ip").orderBy("ts", "path", "bytes", "latency_us")
    gap = F.col("ts").cast("long") - F.lag(F.col("ts").cast("long")).over(by_ip)
    sessions = (
        humans.withColumn("new_session", F.when(gap.isNull() | (gap > 1800), 1).otherwise(0))
        .withColumn("session_no", F.sum("new_session").over(by_ip))
        .withColumn("session_id", F.concat_ws("-", "ip", F.col("session_no").cast("string")))
        .groupBy("session_id", "ip")
        .agg(
            F.min("ts").alias("start"),
            F.max("ts").alias("end"),
            F.count("*").alias("requests"),
            F.sum("bytes").alias("bytes"),
            F.sum(F.when(F.col("status") >= 500, 1).otherwise(0)).alias("errors"),
            F.min_by("path", F.struct("ts", "path", "bytes", "latency_us")).alias("entry_path"),
        )
        .withColumn("duration_s", F.col("end").cast("long") - F.col("start").cast("long"))
    )
    hourly = clean.groupBy("hour", "path").agg(
        F.count("*").alias("requests"),
        F.sum(F.when(F.col("status") >= 500, 1).otherwise(0)).alias("errors"),
        F.sum(F.when(F.col("status") == 404, 1).otherwise(0)).alias("not_found"),
        F.sum("bytes").alias("bytes"),
        F.sum("latency_us").alias("latency_us_sum"),
        F.sum(F.col("is_bot").cast("int")).alias("bot_requests"),
    )
    h.write(sessions, "logs/sessions")
    h.write(hourly, "logs/hourly")
    return {
        "stage": "sessionize",
        "session_s": session_s,
        "rows_out": {"logs/sessions": h.count(spark, "logs/sessions"), "logs/hourly": h.count(spark, "logs/hourly")},
    }


def stage_report(h: Handoff, out: str | None) -> dict[str, Any]:
    from pyspark.sql import functions as F

    spark, session_s = _session("logs-4-report")
    pages = spark.read.parquet(to_s3a(f"{h.s3_prefix}/dims/pages"))
    hourly = h.read(spark, "logs/hourly").join(F.broadcast(pages), "path", "left")
    sessions = h.read(spark, "logs/sessions").join(
        F.broadcast(pages.withColumnRenamed("path", "entry_path").withColumnRenamed("section", "entry_section")),
        "entry_path",
        "left",
    )
    traffic = hourly.groupBy("hour", "section").agg(
        F.sum("requests").alias("requests"),
        F.sum("errors").alias("errors"),
        F.sum("not_found").alias("not_found"),
        F.sum("bytes").alias("bytes"),
        F.sum("bot_requests").alias("bot_requests"),
        F.round(F.sum("latency_us_sum") / F.sum("requests") / 1000.0, 3).alias("avg_latency_ms"),
    )
    visits = sessions.groupBy("entry_section").agg(
        F.count("*").alias("sessions"),
        F.round(F.avg("duration_s"), 3).alias("avg_duration_s"),
        F.sum(F.when(F.col("requests") == 1, 1).otherwise(0)).alias("bounces"),
    )
    report = (
        traffic.join(visits, traffic.section == visits.entry_section, "left")
        .drop("entry_section")
        .withColumn("error_rate", F.round(F.col("errors") / F.col("requests"), 6))
        .orderBy("hour", "section")
    )
    h.write(report, "logs/report")
    rows = report.collect()
    if out:
        with open(out, "w") as f:
            json.dump([r.asDict() for r in rows], f, default=str, indent=0)
    top = sorted(rows, key=lambda r: -r["errors"])[:5]
    return {
        "stage": "report",
        "session_s": session_s,
        "rows_out": {"logs/report": len(rows)},
        "worst_hours": [
            {"hour": str(r["hour"]), "section": r["section"], "errors": r["errors"], "requests": r["requests"]}
            for r in top
        ],
    }


STAGES = {
    "1": ("ingest", stage_ingest),
    "2": ("parse", stage_parse),
    "3": ("sessionize", stage_sessionize),
    "4": ("report", stage_report),
}


def _warm_up(spark: Any, s3_prefix: str) -> None:
    """Start the application's Python processes and its S3 client as a running cluster has them: one
    tiny write and read through a Python data source, and one through S3A. Spark forks a process per
    kind of step (plan, task, commit) from a daemon it starts on first use, seconds each time, and S3A's
    first use loads the AWS SDK, ~15 s here; every hand-off mode gets the same warm-up."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        spark.range(4).write.format("arrow-parquet").mode("overwrite").save(f"{tmp}/warm")
        spark.read.format("arrow-parquet").load(f"{tmp}/warm").collect()
    spark.range(4).write.mode("overwrite").parquet(to_s3a(f"{s3_prefix}/warm"))
    spark.read.parquet(to_s3a(f"{s3_prefix}/warm")).collect()


# -- run ----------------------------------------------------------------------------------------------


def run(
    handoff: str,
    *,
    rows: int,
    files: int,
    work: Path,
    cache_uri: str | None,
    persist: str,
    report_out: str | None,
    env: dict[str, str],
    s3_prefix: str,
    quiet: bool = False,
    one_app: bool = False,
    alluxio_uri: str = "",
) -> dict[str, Any]:
    """Run the four stages with one hand-off mode, the services already running.

    Each stage is its own process and Spark application, as under a scheduler that submits jobs, and
    its time is the process's. With ``one_app`` the four run one after another as jobs of one
    application started before them, as on a running cluster: their times are the jobs' own, and
    starting the application is reported apart (``app_start_s``), outside the total.
    """
    if handoff == "local":
        reset_dir(work / "handoff")
    h = Handoff(handoff, cache_uri or "", s3_prefix, str(work / "handoff"), persist, alluxio_uri)
    report_args = ["--report-out", report_out] if report_out else []
    result: dict[str, Any] = {"handoff": handoff, "rows": rows}
    if one_app:
        stages, wall = run_stage(HERE, ["stage", "--one-app", *STAGES, *report_args], {**env, **h.env()})
        for s in stages:
            s["wall_s"] = s["spark_s"]
        result["total_s"] = sum(s["wall_s"] for s in stages)
        result["app_start_s"] = wall - result["total_s"]
    else:
        stages = []
        started = time.perf_counter()
        for number in STAGES:
            [summary], wall = run_stage(
                HERE, ["stage", number, *(report_args if number == "4" else [])], {**env, **h.env()}
            )
            stages.append({**summary, "wall_s": wall})
        result["total_s"] = time.perf_counter() - started
    result["stages"] = stages
    if not quiet:
        for number, summary in zip(STAGES, stages, strict=True):
            outs = ", ".join(f"{k} {v:,} rows" for k, v in summary["rows_out"].items())
            print(f"  stage {number} {summary['stage']:<11} {summary['wall_s']:6.1f}s  -> {outs}", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="generate the input (unless it is there) and run all four stages")
    r.add_argument(
        "--handoff",
        # alluxio needs a cluster, which bench/pipeline.py --modes alluxio starts
        choices=[h for h in HANDOFFS if h != "alluxio"],
        default="flightcache",
        help="how stages hand off (default: %(default)s)",
    )
    r.add_argument("--rows", type=int, default=1_000_000, help="raw log lines to generate (default: %(default)s)")
    r.add_argument("--files", type=int, default=8, help="raw Parquet files (default: %(default)s)")
    r.add_argument(
        "--persist",
        choices=("none", "sync", "async"),
        default="none",
        help="persistence of flightcache hand-offs (default: %(default)s)",
    )
    r.add_argument("--work", default=".flightcache/pipeline", help="scratch directory (default: %(default)s)")
    r.add_argument("--report-out", help="also write the final report rows to this JSON file")
    r.add_argument("--cache-uri", help="use this flightcache server instead of starting one")
    r.add_argument(
        "--one-app",
        action="store_true",
        help="run the stages in one Spark application (a running cluster) instead of one application each",
    )
    s = sub.add_parser("stage", help=argparse.SUPPRESS)
    s.add_argument("numbers", nargs="+", choices=STAGES, help="stages to run, in order, in one Spark application")
    s.add_argument("--report-out")
    s.add_argument("--one-app", action="store_true", help="start the Spark application before the first stage")
    g = sub.add_parser("generate", help="write raw logs and the page catalog to a URI (s3://... or a path)")
    g.add_argument("dest", help="e.g. s3://bucket/prefix: logs go to DEST/raw/logs, pages to DEST/dims/pages")
    g.add_argument("--rows", type=int, default=1_000_000)
    g.add_argument("--files", type=int, default=8)
    args = parser.parse_args()

    if args.command == "stage":
        h = Handoff.from_env()
        if args.one_app:
            _warm_up(spark_session("logs"), h.s3_prefix)  # the stages' sessions are this one
        summaries = []
        for number in args.numbers:
            _, fn = STAGES[number]
            started = time.perf_counter()
            summary = fn(h, args.report_out) if number == "4" else fn(h)
            summary["spark_s"] = time.perf_counter() - started
            summaries.append(summary)
        print(json.dumps(summaries, default=str))
        return 0
    if args.command == "generate":
        print(json.dumps(generate(args.rows, f"{args.dest}/raw/logs", args.files)))
        write_pages(f"{args.dest}/dims/pages")
        return 0

    work = Path(args.work).resolve()
    with moto_s3(BUCKET) as env:
        os.environ.update(env)
        prefix = f"s3://{BUCKET}"
        started = time.perf_counter()
        info = generate(args.rows, f"{prefix}/raw/logs", args.files)
        write_pages(f"{prefix}/dims/pages")
        print(
            f"[cloud]   moto S3 at {env['AWS_ENDPOINT_URL']}: {info['rows']:,} raw log lines in {info['files']} "
            f"Parquet files under {prefix}/raw/logs ({time.perf_counter() - started:.1f}s)",
            flush=True,
        )
        if args.handoff == "flightcache" and not args.cache_uri:
            with flightcache_server(
                "--storage", f"{prefix}/cache" if args.persist != "none" else "none", env=env
            ) as server:
                print(f"[cache]   flightcache serving at {server.uri}", flush=True)
                result = run(
                    args.handoff,
                    rows=args.rows,
                    files=args.files,
                    work=work,
                    cache_uri=server.uri,
                    persist=args.persist,
                    report_out=args.report_out,
                    env=env,
                    s3_prefix=prefix,
                    one_app=args.one_app,
                )
        else:
            result = run(
                args.handoff,
                rows=args.rows,
                files=args.files,
                work=work,
                cache_uri=args.cache_uri,
                persist=args.persist,
                report_out=args.report_out,
                env=env,
                s3_prefix=prefix,
            )
    report = result["stages"][-1]
    if "app_start_s" in result:
        print(f"[spark]   one application for the four stages, started in {result['app_start_s']:.1f}s")
    print(
        f"[done]    {args.handoff} hand-off: 4 stages in {result['total_s']:.1f}s; the report has "
        f"{report['rows_out']['logs/report']:,} rows (hour x section)"
    )
    for w in report["worst_hours"]:
        print(
            f"          worst: {w['hour']} {w['section']:<8} {w['errors']:>6,} errors in {w['requests']:>8,} requests"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
