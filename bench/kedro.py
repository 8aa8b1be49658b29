"""A Kedro feature-engineering pipeline, its hand-offs through cloud-shaped S3, flightcache and Vineyard.

Six nodes (generate a table of transactions, clean it, per-user and per-merchant features, join them
back, summarize) run with Kedro's SequentialRunner; every dataset between nodes goes through one of:

  s3-cloud           kedro-datasets' own pandas ParquetDataset over s3fs, against moto S3 behind
                     bench/shaping.py (first-byte latency and per-connection bandwidth of cloud S3)
  flightcache        flightcache.integrations.kedro.ArrowDataset on a memory-only `flightcache serve`
                     (shared-memory reads)
  flightcache-noshm  the same, streamed over Flight (shm off: what a reader on another host gets)
  vineyard           Vineyard's Kedro plugin (vineyard-kedro 0.24.2's VineyardDataSet) on `vineyardd --meta=local`
  flightcache-k018   flightcache in Vineyard's venv (Kedro 0.18.14, pandas 2): the same framework and pandas as
                     the vineyard mode, so that the two differ only in the hand-off

vineyard-kedro 0.24.2 imports kedro.io.core.AbstractDataSet, which Kedro removed in 0.19, so its mode runs
under Kedro 0.18.14 in a venv of its own (.venv-vineyard, made here with the project's `kedro-vineyard`
extra when missing); the other modes run under the project's Kedro (1.x). Each run is a fresh process,
modes alternate, and every mode's final output must be the same. Vineyard's published figure (its Kedro
benchmark: 231.6 s end to end through Vineyard against 1,069.7 s through AWS S3, 4.6x) is quoted beside ours.

    python bench/kedro.py                 # 3M rows, 3 runs of each mode -> bench_results/kedro.json
    python bench/kedro.py --quick         # small, one run, no Vineyard unless its venv exists
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This file is named kedro.py: with its directory on sys.path (where Python puts a script's), `import kedro`
# would import this file. It is put back last for bench/_common.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
MODES = ("s3-cloud", "flightcache", "flightcache-noshm", "vineyard", "flightcache-k018")
SIDE_VENV_MODES = ("vineyard", "flightcache-k018")
BUCKET = "kedro-bench"
VINEYARD_VENV = ROOT / ".venv-vineyard"
VINEYARD_PUBLISHED = {
    "source": "https://v6d.io/tutorials/data-processing/accelerate-data-sharing-in-kedro.html (Kubernetes, Argo)",
    "vineyard_s": 231.6,
    "aws_s3_s": 1069.7,
    "speedup": round(1069.7 / 231.6, 2),
}
# Run in children under either Kedro: no kedro_datasets or flightcache import unless the mode needs it.
ENV = {"KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", "PYTHONWARNINGS": "ignore"}


# -- the pipeline (the child process) ---------------------------------------------------------------


def generate(rows: int) -> Any:
    """Card transactions: ~6 columns, a few million rows, seeded (every mode computes the same)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(7)
    categories = np.array(["grocery", "fuel", "travel", "dining", "online", "pharmacy", "electronics", "other"])
    countries = np.array(["de", "fr", "us", "gb", "nl", "es", "it", "pl", "se", "jp"])
    return pd.DataFrame(
        {
            "user_id": rng.integers(0, max(rows // 30, 1), rows),
            "merchant_id": rng.integers(0, max(rows // 200, 1), rows),
            "ts": rng.integers(1_700_000_000, 1_730_000_000, rows),
            "amount": np.round(rng.lognormal(3.0, 1.2, rows) * np.where(rng.random(rows) < 0.02, -1, 1), 2),
            "category": categories[rng.integers(0, len(categories), rows)].astype(object),
            "country": countries[rng.integers(0, len(countries), rows)].astype(object),
        }
    )


def clean(transactions: Any) -> Any:
    import numpy as np

    df = transactions[transactions["amount"] > 0].reset_index(drop=True)
    return df.assign(
        hour=(df["ts"] // 3600) % 24,
        weekday=(df["ts"] // 86400 + 4) % 7,
        log_amount=np.log1p(df["amount"]),
        abroad=(df["country"] != "de").astype("int8"),
        night=(df["ts"] // 3600 % 24 < 6).astype("int8"),
    )


def user_features(cleaned: Any) -> Any:
    g = cleaned.groupby("user_id")
    out = g.agg(
        u_count=("amount", "size"),
        u_total=("amount", "sum"),
        u_mean_log=("log_amount", "mean"),
        u_max=("amount", "max"),
        u_abroad=("abroad", "mean"),
        u_night=("night", "mean"),
    )
    return out.reset_index()


def merchant_features(cleaned: Any) -> Any:
    g = cleaned.groupby("merchant_id")
    return g.agg(m_count=("amount", "size"), m_mean=("amount", "mean"), m_users=("user_id", "nunique")).reset_index()


def model_input(cleaned: Any, users: Any, merchants: Any) -> Any:
    df = cleaned.merge(users, on="user_id", how="left").merge(merchants, on="merchant_id", how="left")
    return df.assign(
        amount_vs_user=df["amount"] / df["u_total"] * df["u_count"],
        amount_vs_merchant=df["amount"] / df["m_mean"],
    )


def summarize(features: Any) -> Any:
    out = features.groupby(["category", "weekday"]).agg(
        n=("amount", "size"),
        amount=("amount", "sum"),
        vs_user=("amount_vs_user", "mean"),
        vs_merchant=("amount_vs_merchant", "mean"),
    )
    return out.reset_index().sort_values(["category", "weekday"]).reset_index(drop=True)


HANDOFFS = ("transactions", "cleaned", "users", "merchants", "features", "summary")


def child(mode: str, rows: int, config: dict[str, Any]) -> dict[str, Any]:
    """One timed pipeline run; its summary for the parent."""
    import pandas as pd
    from kedro.io import DataCatalog
    from kedro.pipeline import node
    from kedro.pipeline import pipeline as make_pipeline
    from kedro.runner import SequentialRunner

    compute: dict[str, float] = {}

    def timed(fn: Any) -> Any:
        def run(*args: Any) -> Any:
            started = time.perf_counter()
            result = fn(*args)
            compute[fn.__name__] = time.perf_counter() - started
            return result

        run.__name__ = fn.__name__
        return run

    pipe = make_pipeline(
        [
            node(timed(generate), "params:rows", "transactions"),
            node(timed(clean), "transactions", "cleaned"),
            node(timed(user_features), "cleaned", "users"),
            node(timed(merchant_features), "cleaned", "merchants"),
            node(timed(model_input), ["cleaned", "users", "merchants"], "features"),
            node(timed(summarize), "features", "summary"),
        ]
    )
    datasets: dict[str, Any] = {}
    for name in HANDOFFS:
        if mode == "s3-cloud":
            from kedro_datasets.pandas import ParquetDataset

            datasets[name] = ParquetDataset(
                filepath=f"s3://{BUCKET}/{config['run']}/{name}.parquet",
                credentials={
                    "key": "testing",
                    "secret": "testing",
                    "client_kwargs": {"endpoint_url": config["endpoint"], "region_name": "us-east-1"},
                },
            )
        elif mode.startswith("flightcache"):
            from flightcache.integrations.kedro import ArrowDataset

            datasets[name] = ArrowDataset(
                name=f"kedro-bench/{name}",
                uri=config["uri"],
                persist="none",
                client_args={"shm": mode != "flightcache-noshm"},
                release_drops=name != "summary",  # as Vineyard's plugin frees what no later node reads
            )
        elif mode == "vineyard":
            from vineyard.contrib.kedro.io import VineyardDataSet

            datasets[name] = VineyardDataSet(ds_name=f"kedro_bench_{name}", vineyard_ipc_socket=config["socket"])
    from kedro.io import MemoryDataset  # type: ignore[attr-defined]

    datasets["params:rows"] = MemoryDataset(rows)
    catalog = DataCatalog(datasets)
    started = time.perf_counter()
    SequentialRunner().run(pipe, catalog)
    total = time.perf_counter() - started
    summary = catalog.load("summary") if hasattr(catalog, "load") else catalog["summary"].load()
    summary = pd.DataFrame(summary).sort_values(["category", "weekday"]).reset_index(drop=True)
    return {
        "mode": mode,
        "total_s": total,
        "compute_s": sum(compute.values()),
        "handoff_s": total - sum(compute.values()),
        "nodes_compute_s": compute,
        "kedro": __import__("kedro").__version__,
        "result": summary.round(6).astype({"category": str}).to_dict(orient="list"),
    }


# -- the parent: servers, schedule, summary ---------------------------------------------------------


def vineyard_python(create: bool) -> tuple[Path | None, str | None]:
    """The side venv's python for the Vineyard mode, made with the kedro-vineyard extra when missing; why not."""
    python = VINEYARD_VENV / "bin" / "python"
    if not python.exists():
        if not create:
            return None, f"{VINEYARD_VENV} does not exist (not made in --quick mode)"
        from _common import progress

        progress(f"making {VINEYARD_VENV} with the kedro-vineyard extra (Kedro 0.18.14, vineyard-kedro 0.24.2)")
        subprocess.run([sys.executable, "-m", "venv", str(VINEYARD_VENV)], check=True)
        out = subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[kedro-vineyard]"], capture_output=True, text=True
        )
        if out.returncode != 0:
            return None, f"pip install -e '.[kedro-vineyard]' failed: {out.stderr[-2000:]}"
    check = subprocess.run(
        [str(python), "-c", "import vineyard.contrib.kedro.io, kedro; print(kedro.__version__)"],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
    )
    if check.returncode != 0:
        return None, f"vineyard-kedro does not import: {check.stderr[-2000:]}"
    return python, None


def run_child(python: Path, mode: str, rows: int, config: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [
            str(python),
            str(Path(__file__).resolve()),
            "--child",
            mode,
            "--rows",
            str(rows),
            "--config",
            json.dumps(config),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
    )
    if out.returncode != 0:
        sys.stderr.write(out.stderr[-4000:])
        raise RuntimeError(f"the {mode} run failed with exit status {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in runs)

    return {
        "runs": len(runs),
        "kedro": runs[0]["kedro"],
        "total_s_median": med("total_s"),
        "total_s": [r["total_s"] for r in runs],
        "handoff_s_median": med("handoff_s"),
        "compute_s_median": med("compute_s"),
        "nodes_compute_s_median": {
            n: statistics.median(r["nodes_compute_s"][n] for r in runs) for n in runs[0]["nodes_compute_s"]
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3_000_000, help="transactions generated (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs of each mode, alternating (default: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs of each mode first (default: 1)")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    parser.add_argument("--latency-ms", type=float, default=100.0, help="shaped S3 first-byte latency")
    parser.add_argument("--bandwidth-mbps", type=float, default=90.0, help="shaped S3 MB/s per connection")
    parser.add_argument("--jitter", type=float, default=0.0, help="shaped S3 latency jitter (log-normal sigma)")
    parser.add_argument("--quick", action="store_true", help="20k rows, one run, no warm-up (for the test suite)")
    parser.add_argument("--out", help="directory for kedro.json (default: bench_results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rows, json.loads(args.config))))
        return 0

    sys.path[:0] = [str(ROOT / "pipelines")]
    sys.path.append(str(HERE))  # last: bench/_common, after the installed kedro
    from _common import machine_info, progress, start_proxy, write_json
    from common import flightcache_server, moto_s3

    if args.quick:
        args.rows, args.runs, args.warmup = 20_000, 1, 0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; the modes are {', '.join(MODES)}")
    pythons = dict.fromkeys(modes, Path(sys.executable))
    skipped: dict[str, str] = {}
    side = [m for m in modes if m in SIDE_VENV_MODES]
    if side:
        python, why = vineyard_python(create=not args.quick)
        for mode in side:
            if python is None:
                assert why is not None
                skipped[mode] = why
                modes.remove(mode)
                progress(f"{mode} skipped: {why}")
            else:
                pythons[mode] = python
    out_dir = Path(args.out) if args.out else ROOT / "bench_results"
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    started = time.perf_counter()
    with ExitStack() as stack:
        env = stack.enter_context(moto_s3(BUCKET))
        direct = env["AWS_ENDPOINT_URL"]
        shaped = start_proxy(int(direct.rsplit(":", 1)[1]), args.latency_ms, args.bandwidth_mbps, args.jitter, stack)
        config: dict[str, Any] = {"endpoint": shaped}
        if any(m.startswith("flightcache") for m in modes):
            server = stack.enter_context(flightcache_server("--storage", "none", "--memory-limit", "6GiB"))
            config["uri"] = server.uri
        if "vineyard" in modes:
            work = Path(tempfile.mkdtemp(prefix="kedro-bench-vineyard-"))
            stack.callback(shutil.rmtree, work, True)
            config["socket"] = str(work / "vineyard.sock")
            vineyardd = next((VINEYARD_VENV / "lib").glob("python*/site-packages/vineyard/bdist/vineyardd"))
            log = (work / "vineyardd.log").open("w")
            proc = subprocess.Popen(
                [str(vineyardd), f"--socket={config['socket']}", "--meta=local", "--size=6Gi"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            stack.callback(log.close)
            stack.callback(proc.wait, 30)
            stack.callback(proc.terminate)
            deadline = time.monotonic() + 30
            while not os.path.exists(config["socket"]):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"vineyardd did not start: {(work / 'vineyardd.log').read_text()[-2000:]}")
                time.sleep(0.1)
        schedule = [("warm-up", m) for _ in range(args.warmup) for m in modes]
        schedule += [(f"run {i + 1}/{args.runs}", m) for i in range(args.runs) for m in modes]
        for n, (label, mode) in enumerate(schedule):
            result = run_child(pythons[mode], mode, args.rows, {**config, "run": f"run-{n}"})
            progress(
                f"{label} {mode:<18} total {result['total_s']:6.2f}s  hand-off {result['handoff_s']:6.2f}s  "
                f"compute {result['compute_s']:6.2f}s"
            )
            if label != "warm-up":
                runs[mode].append(result)
    summary = {m: summarize_runs(r) for m, r in runs.items()}
    results = {m: r[0]["result"] for m, r in runs.items()}
    reference = next(iter(results.values()))
    same = all(_close(r, reference) for r in results.values())
    speedups: dict[str, Any] = {}
    if "s3-cloud" in summary:
        base = summary["s3-cloud"]
        for m in summary:
            if m != "s3-cloud":
                speedups[f"{m}_vs_s3-cloud"] = {
                    "total": round(base["total_s_median"] / summary[m]["total_s_median"], 2),
                    "handoff": round(base["handoff_s_median"] / summary[m]["handoff_s_median"], 2),
                }
    for fc in ("flightcache", "flightcache-k018"):
        if fc in summary and "vineyard" in summary:
            speedups[f"{fc}_vs_vineyard"] = {
                "total": round(summary["vineyard"]["total_s_median"] / summary[fc]["total_s_median"], 2),
                "handoff": round(summary["vineyard"]["handoff_s_median"] / summary[fc]["handoff_s_median"], 2),
            }
    write_json(
        out_dir / "kedro.json",
        {
            "benchmark": "bench/kedro.py",
            "machine": machine_info(),
            "settings": {
                "rows": args.rows,
                "runs": args.runs,
                "warmup": args.warmup,
                "modes": modes,
                "handoffs": list(HANDOFFS),
                "shaping": {
                    "latency_ms": args.latency_ms,
                    "bandwidth_mbps": args.bandwidth_mbps,
                    "jitter": args.jitter,
                },
            },
            "skipped": skipped,
            "summary": summary,
            "speedups": speedups,
            "vineyard_published": VINEYARD_PUBLISHED,
            "checks": {"same_result": same},
            "runs": {m: [{k: v for k, v in r.items() if k != "result"} for r in rs] for m, rs in runs.items()},
            "wall_s": time.perf_counter() - started,
        },
    )
    progress(json.dumps(speedups))
    if not same:
        progress("the modes' final outputs differ")
        return 1
    return 0


def _close(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> bool:
    """Equal outputs: the same keys and values (floats to a relative 1e-9; sums may differ in the last bits)."""
    import math

    if a.keys() != b.keys():
        return False
    for key in a:
        for x, y in zip(a[key], b[key], strict=True):
            if isinstance(x, float) or isinstance(y, float):
                if not math.isclose(float(x), float(y), rel_tol=1e-9, abs_tol=1e-12):
                    return False
            elif x != y:
                return False
    return True


if __name__ == "__main__":
    sys.exit(main())
