"""The pipeline benchmark: completion time and its variability, per hand-off mode.

Runs the four-stage log pipeline (pipelines/logs.py) N times after a warm-up, in every hand-off
mode, interleaved (run 1 of every mode, then run 2, ...) so that drift on this shared machine hits
all modes alike:

  s3a-cloud          Spark's own Parquet on s3a:// paths (Spark's S3 connector, S3A, with its magic
                     committer), on moto S3 behind bench/shaping.py: first-byte latency and
                     per-connection bandwidth from AWS's published guidance, optional jitter; what
                     Spark users on S3 run, the baseline of the 3x target
  s3a-local          the same, unshaped (moto on loopback: the most optimistic S3)
  s3-cloud           Parquet hand-offs on the shaped moto S3 through pyarrow's S3 filesystem (format
                     arrow-parquet, a Python data source): the baseline before S3A was set up here
  s3-local           the same, unshaped
  local              Spark's own Parquet on local disk
  flightcache        through a flightcache server, memory only; its readers (Spark workers on this
                     host) map the hand-offs from the server's shared memory
  flightcache-noshm  the same with shared-memory reads off (FLIGHTCACHE_SHM=0): they stream over Flight
  flightcache-async  through the cache with write-back persistence to the shaped S3
  alluxio            Spark's own Parquet on alluxio:// paths: an Alluxio 2.9 master and worker on this
                     host (started once for the benchmark), blocks in memory, under-storage on the
                     shaped S3, written MUST_CACHE (memory only, as the flightcache mode)

The stages run as jobs of one Spark application, as on a running cluster (``--spark one-app``, the
default), or each as its own application, paying a JVM start per stage (``--spark per-stage``).

Every mode reads the raw logs with S3A from the same S3 endpoint it hands off through (the shaped
"cloud" for all but s3a-local and s3-local) and the final reports must be identical. Writes bench_results/pipeline.json
and bench_results/pipeline.png.

    python bench/pipeline.py                 # default scale, 5 runs per mode after a warm-up, ~17 min
    python bench/pipeline.py --modes all     # also flightcache-noshm (make bench), ~20 min
    python bench/pipeline.py --quick         # tiny, one run per mode (the test suite runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "pipelines")]

import logs  # noqa: E402
from _common import machine_info, progress, start_proxy, write_json  # noqa: E402
from common import flightcache_server, moto_s3  # noqa: E402

MODES = (
    "s3a-cloud",
    "s3a-local",
    "s3-cloud",
    "s3-local",
    "local",
    "flightcache",
    "flightcache-noshm",
    "flightcache-async",
    "alluxio",
)
UNSHAPED = ("s3a-local", "s3-local")
HANDOFF = {
    "s3a-cloud": "s3a",
    "s3a-local": "s3a",
    "s3-cloud": "s3",
    "s3-local": "s3",
    "local": "local",
    "alluxio": "alluxio",
}
# The default leaves out the secondary comparisons (pyarrow's S3 unshaped, shared memory off, write-back)
# to stay within ~20 minutes here; make bench runs all eight.
DEFAULT_MODES = ("s3a-cloud", "s3a-local", "s3-cloud", "local", "flightcache")
READ_STAGES = ("parse", "sessionize", "report")  # the stages that read an earlier stage's hand-off
BASE_ROWS = 250_000


def _hwm(pid: int) -> int:
    """Peak resident memory of a process so far (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def run_once(mode: str, args: argparse.Namespace, env: dict[str, str], work: Path, report: Path) -> dict[str, Any]:
    """One pipeline run in ``mode``; returns total and per-stage times, and the cache's memory peak."""
    handoff = HANDOFF.get(mode, "flightcache")
    endpoint = env["AWS_ENDPOINT_URL_DIRECT"] if mode in UNSHAPED else env["AWS_ENDPOINT_URL_SHAPED"]
    run_env = {**env, "AWS_ENDPOINT_URL": endpoint, "FLIGHTCACHE_SHM": "0" if mode == "flightcache-noshm" else "1"}
    common = {
        "rows": args.rows,
        "files": args.files,
        "work": work,
        "report_out": str(report),
        "env": run_env,
        "s3_prefix": f"s3://{logs.BUCKET}",
        "quiet": True,
        "one_app": args.spark == "one-app",
    }
    if handoff == "alluxio":
        master = env["ALLUXIO_MASTER_ADDRESS"]
        common["env"] = {**run_env, "ALLUXIO_MASTER": master}  # the stages' Spark loads Alluxio's client
        result = logs.run(handoff, cache_uri=None, persist="none", alluxio_uri=f"alluxio://{master}", **common)
        result["server_peak_rss"] = None
        return result
    if handoff != "flightcache":
        result = logs.run(handoff, cache_uri=None, persist="none", **common)
        result["server_peak_rss"] = None
        return result
    persist = "async" if mode == "flightcache-async" else "none"
    storage = f"s3://{logs.BUCKET}/cache" if persist == "async" else "none"
    with flightcache_server("--storage", storage, "--memory-limit", "8GiB", env=run_env) as server:
        result = logs.run("flightcache", cache_uri=server.uri, persist=persist, **common)
        if persist == "async":  # how long after the pipeline until its hand-offs are durable
            import flightcache

            started = time.perf_counter()
            with flightcache.connect(server.uri) as fc:
                while fc.stats()["pending_persists"]:
                    time.sleep(0.05)
            result["durable_after_s"] = time.perf_counter() - started
        result["server_peak_rss"] = _hwm(server.pid)
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    totals = [r["total_s"] for r in runs]
    mean = statistics.fmean(totals)
    stdev = statistics.stdev(totals) if len(totals) > 1 else 0.0
    stages: dict[str, dict[str, list[float]]] = {}
    for r in runs:
        for s in r["stages"]:
            entry = stages.setdefault(s["stage"], {"wall_s": [], "spark_s": [], "session_s": []})
            for key in entry:
                entry[key].append(s[key])
    peaks = [r["server_peak_rss"] for r in runs if r.get("server_peak_rss")]
    out: dict[str, Any] = {
        "total_s": totals,
        "mean_s": mean,
        "stddev_s": stdev,
        "cv": stdev / mean if mean else 0.0,
        "median_s": statistics.median(totals),
        "stages": stages,
        "stage_means_s": {k: statistics.fmean(v["wall_s"]) for k, v in stages.items()},
        # where a stage's time goes: starting the process and the Spark session, and the stage's own work
        "stage_profile_s": {
            k: {
                "process": statistics.fmean(w - sp for w, sp in zip(v["wall_s"], v["spark_s"], strict=True)),
                "spark_session": statistics.fmean(v["session_s"]),
                "work": statistics.fmean(sp - se for sp, se in zip(v["spark_s"], v["session_s"], strict=True)),
            }
            for k, v in stages.items()
        },
        "server_peak_rss_bytes": max(peaks) if peaks else None,
        "runs": [{"stages": [{k: st[k] for k in ("stage", "wall_s")} for st in r["stages"]]} for r in runs],
    }
    if runs and "app_start_s" in runs[0]:
        out["app_start_s"] = [r["app_start_s"] for r in runs]
    durable = [r["durable_after_s"] for r in runs if "durable_after_s" in r]
    if durable:
        out["durable_after_s"] = durable
    return out


def targets(s: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "flightcache" in s and "s3a-cloud" in s:
        speedup = s["s3a-cloud"]["mean_s"] / s["flightcache"]["mean_s"]
        out["flightcache_3x_faster_than_s3a_cloud"] = {
            "speedup": round(speedup, 3),
            "median_speedup": round(s["s3a-cloud"]["median_s"] / s["flightcache"]["median_s"], 3),
            "met": speedup >= 3,
            "moonshot_5x_met": speedup >= 5,
        }
    if "flightcache" in s and "s3a-local" in s:
        speedup = s["s3a-local"]["mean_s"] / s["flightcache"]["mean_s"]
        out["flightcache_vs_s3a_local"] = {"speedup": round(speedup, 3), "met": speedup >= 1}
    if "flightcache" in s and "s3-cloud" in s:
        speedup = s["s3-cloud"]["mean_s"] / s["flightcache"]["mean_s"]
        out["flightcache_3x_faster_than_s3_cloud"] = {"speedup": round(speedup, 3), "met": speedup >= 3}
        cv_ratio = s["flightcache"]["cv"] / s["s3-cloud"]["cv"] if s["s3-cloud"]["cv"] else None
        out["flightcache_cv_at_most_a_third_of_s3_cloud"] = {
            "cv_flightcache": round(s["flightcache"]["cv"], 4),
            "cv_s3_cloud": round(s["s3-cloud"]["cv"], 4),
            "ratio": None if cv_ratio is None else round(cv_ratio, 3),
            "met": cv_ratio is not None and cv_ratio <= 1 / 3,
        }
    if "flightcache" in s and "local" in s:
        ratio = s["flightcache"]["mean_s"] / s["local"]["mean_s"]
        out["flightcache_no_slower_than_local"] = {"ratio": round(ratio, 3), "met": ratio <= 1.0}
    if "flightcache" in s and "flightcache-noshm" in s:
        paired = [
            sum(b["wall_s"] for b in without["stages"] if b["stage"] in READ_STAGES)
            / sum(a["wall_s"] for a in with_["stages"] if a["stage"] in READ_STAGES)
            for with_, without in zip(s["flightcache"]["runs"], s["flightcache-noshm"]["runs"], strict=True)
        ]
        out["flightcache_shm_read_stages_faster"] = {
            "target": "the stages that read hand-offs (parse, sessionize, report) faster with shared-memory reads "
            "than streaming them over Flight, in every pair of adjacent runs",
            "speedup": round(statistics.median(paired), 3),
            "min_paired_speedup": round(min(paired), 3),
            "per_stage": {
                k: round(s["flightcache-noshm"]["stage_means_s"][k] / s["flightcache"]["stage_means_s"][k], 3)
                for k in READ_STAGES
            },
            "met": min(paired) > 1.0,
        }
    if "flightcache" in s and "flightcache-async" in s:
        ratio = s["flightcache-async"]["mean_s"] / s["flightcache"]["mean_s"]
        out["flightcache_async_within_15pct"] = {"ratio": round(ratio, 3), "met": ratio <= 1.15}
    return out


def plot(summary: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(summary)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    means = [summary[m]["mean_s"] for m in modes]
    ax1.bar(modes, means, yerr=[summary[m]["stddev_s"] for m in modes], capsize=6, color="#8fb3d9", edgecolor="#33557a")
    for i, m in enumerate(modes):
        ax1.scatter([i] * len(summary[m]["total_s"]), summary[m]["total_s"], color="#1a1a1a", s=14, zorder=3)
        ax1.annotate(
            f"cv {summary[m]['cv']:.2f}",
            (i, means[i]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
            fontsize=8,
        )
    ax1.set_ylabel("pipeline completion time (s)")
    ax1.set_title("completion time: mean ± stddev, each run a dot")
    ax1.tick_params(axis="x", rotation=20)
    bottom = [0.0] * len(modes)
    for stage in next(iter(summary.values()))["stage_means_s"]:
        heights = [summary[m]["stage_means_s"][stage] for m in modes]
        ax2.bar(modes, heights, bottom=bottom, label=stage)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ax2.set_ylabel("mean wall time per stage (s)")
    ax2.set_title("per-stage breakdown")
    ax2.legend()
    ax2.tick_params(axis="x", rotation=20)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="measured runs per mode (default: %(default)s)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="unmeasured runs first, cycling through the modes (default: %(default)s)"
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help=f"data scale: rows = {BASE_ROWS:,} x scale (default: %(default)s)"
    )
    parser.add_argument("--files", type=int, default=8, help="raw Parquet files (default: %(default)s)")
    parser.add_argument(
        "--modes",
        default=",".join(DEFAULT_MODES),
        help=f"comma-separated, of {', '.join(MODES)} (default: %(default)s)",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=100.0,
        help="s3-cloud first-byte latency per request (default: %(default)s, AWS: 100-200 ms)",
    )
    parser.add_argument(
        "--bandwidth-mbps",
        type=float,
        default=90.0,
        help="s3-cloud MB/s per connection (default: %(default)s, AWS: 85-90 MB/s)",
    )
    parser.add_argument(
        "--jitter",
        type=float,
        default=0.5,
        help="sigma of the log-normal latency factor (default: %(default)s; 0 for none)",
    )
    parser.add_argument(
        "--spark",
        choices=("one-app", "per-stage"),
        default="one-app",
        help="one-app: the stages are jobs of one Spark application, as on a running cluster; per-stage: each "
        "stage is its own application, paying a JVM start (default: %(default)s)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny scale, one run per mode, no warm-up")
    parser.add_argument("--out", help="output directory (default: bench_results, or a temp dir with --quick)")
    parser.add_argument(
        "--json-name",
        default="pipeline",
        help="results file name, without .json; a run of some modes only can leave the full run's file alone "
        "(default: %(default)s)",
    )
    args = parser.parse_args()
    if args.quick:
        args.runs, args.warmup, args.scale, args.files = 1, 0, 0.08, 2
    args.rows = int(BASE_ROWS * args.scale)
    modes = list(MODES) if args.modes == "all" else [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; the modes are {', '.join(MODES)}")
    out_dir = Path(args.out) if args.out else (Path(tempfile.mkdtemp()) if args.quick else ROOT / "bench_results")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    reports: dict[str, Any] = {}
    with ExitStack() as stack:
        env = stack.enter_context(moto_s3(logs.BUCKET))
        direct = env["AWS_ENDPOINT_URL"]
        shaped = start_proxy(int(direct.rsplit(":", 1)[1]), args.latency_ms, args.bandwidth_mbps, args.jitter, stack)
        env = {**env, "AWS_ENDPOINT_URL_DIRECT": direct, "AWS_ENDPOINT_URL_SHAPED": shaped}
        if "alluxio" in modes:  # one Alluxio cluster for the benchmark, as a running cluster is
            from alluxio import alluxio_cluster

            progress("starting an Alluxio master and worker, under-storage on the shaped S3")
            master = stack.enter_context(
                alluxio_cluster(f"s3://{logs.BUCKET}/alluxio", {**env, "AWS_ENDPOINT_URL": shaped})
            )
            env["ALLUXIO_MASTER_ADDRESS"] = master
        os.environ["AWS_ENDPOINT_URL"] = direct
        for key, value in env.items():
            os.environ.setdefault(key, value)
        progress(f"generating {args.rows:,} raw log lines in {args.files} files on moto S3")
        logs.generate(args.rows, f"s3://{logs.BUCKET}/raw/logs", args.files)
        logs.write_pages(f"s3://{logs.BUCKET}/dims/pages")
        schedule = [("warm-up", modes[i % len(modes)]) for i in range(args.warmup)]
        schedule += [(f"run {i + 1}/{args.runs}", mode) for i in range(args.runs) for mode in modes]
        for label, mode in schedule:
            report = work / f"report-{mode}.json"
            result = run_once(mode, args, env, work / mode, report)
            progress(
                f"{label} {mode:<18} {result['total_s']:6.1f}s  "
                + " ".join(f"{s['stage']} {s['wall_s']:.1f}" for s in result["stages"])
            )
            reports.setdefault(mode, json.loads(report.read_text()))
            if label != "warm-up":
                runs[mode].append(result)
    first = next(iter(reports.values()))
    identical = all(r == first for r in reports.values())
    summary = {m: summarize(r) for m, r in runs.items()}
    result = {
        "machine": machine_info(),
        "parameters": {
            "rows": args.rows,
            "scale": args.scale,
            "files": args.files,
            "runs": args.runs,
            "warmup": args.warmup,
            "modes": modes,
            "interleaved": True,
            "spark": "local[2], "
            + ("one application for all stages" if args.spark == "one-app" else "one application per stage"),
        },
        "shaping": {
            "latency_ms": args.latency_ms,
            "bandwidth_mbps_per_connection": args.bandwidth_mbps,
            "jitter_lognormal_sigma": args.jitter,
            "source": "AWS, Performance design patterns for Amazon S3: first-byte latency ~100-200 ms, "
            "plan one connection per 85-90 MB/s",
        },
        "reports_identical": identical,
        "report_rows": len(first),
        "modes": summary,
        "targets": targets(summary),
        "elapsed_s": time.perf_counter() - started,
    }
    write_json(out_dir / f"{args.json_name}.json", result)
    plot(
        summary,
        out_dir / f"{args.json_name}.png",
        f"log pipeline, {args.rows:,} rows, {result['parameters']['spark']}, {args.runs} runs per mode "
        f"after {args.warmup} warm-up, 2 cores",
    )
    progress(f"wrote {out_dir / args.json_name}.json and .png in {result['elapsed_s']:.0f}s")
    print(f"{'mode':<18} {'mean s':>8} {'stddev':>8} {'cv':>6}  stages (mean s)")
    for m, s in summary.items():
        print(
            f"{m:<18} {s['mean_s']:8.1f} {s['stddev_s']:8.2f} {s['cv']:6.3f}  "
            + ", ".join(f"{k} {v:.1f}" for k, v in s["stage_means_s"].items())
        )
    for name, t in result["targets"].items():
        print(f"target {name}: {'met' if t['met'] else 'MISSED'} {t}")
    print(f"reports identical across modes: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
