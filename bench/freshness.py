"""What freshness costs: on-read checks on cached reads, and an incremental refresh against a full reload.

A ~1 GB dataset in 100 Parquet files on moto S3 behind ``bench/shaping.py`` (S3's first-byte latency and
per-connection bandwidth: the "cloud" of the other benchmarks), loaded by a flightcache server in its own
process (moto in its own process too).

* **on-read cost**: the latency of a cached read's metadata call (``get_flight_info``, where the check sits)
  and of the whole read (``client.get``, 1 GB), for the same dataset loaded three ways, phase after phase:
  ``manual`` (no check), ``on-read`` with ``--refresh-min-interval 0`` (every read lists the prefix) and
  ``on-read`` with a 2 s interval (at most one listing per 2 s, shared). Beside them, one S3 listing round
  trip through the same proxy (boto3 ``list_objects_v2``, the call a check makes), measured in the same
  phases: the target is an added cost of at most one listing round trip, and no more than one listing per
  interval (counted by the server's ``source_checks``).
* **incremental vs full**: a refresh after 1% new data (one new file of the 100) against a refresh after
  one file changed (a full reload of all 101), alternating, ``--reps`` each.

    .venv/bin/python bench/freshness.py            # 100 files x 10 MB -> bench_results/freshness.json
    .venv/bin/python bench/freshness.py --quick    # 20 files x 1 MB, 2 reps -> a temp dir, in seconds
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

try:
    from ._common import machine_info, median, progress, start_proxy, write_json
    from .sql import AWS_ENV, s3_filesystem, start_moto, stop
except ImportError:  # run as a script: bench/ is on sys.path
    from _common import machine_info, median, progress, start_proxy, write_json
    from sql import AWS_ENV, s3_filesystem, start_moto, stop

import flightcache

BUCKET = "fresh"
PREFIX = f"s3://{BUCKET}/events"
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "bench_results"


def part(index: int, rows: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng([index, seed])
    return pa.table(
        {
            "id": pa.array(np.arange(index * rows, (index + 1) * rows, dtype=np.int64)),
            "value": pa.array(rng.random(rows)),  # random: Parquet keeps it about Arrow-sized, as logs with ids
        }
    )


def write_part(s3: Any, index: int, rows: int, seed: int = 0) -> int:
    table = part(index, rows, seed)
    with s3.open_output_stream(f"{BUCKET}/events/part-{index:05d}.parquet") as f:
        pq.write_table(table, f, compression="none")
    return table.nbytes


def start_server(env: dict[str, str], memory_limit: str) -> tuple[Any, str]:
    import re
    import subprocess
    import sys

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
            *[memory_limit],
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, **env, "FLIGHTCACHE_LOG_LEVEL": "WARNING"},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"serving at (grpc://\S+)", line)
    if found is None:
        stop(proc)
        raise RuntimeError(f"the flightcache server did not start: {line!r}")
    return proc, found.group(1)


def timed(fn: Any) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def read_phase(client: flightcache.Client, name: str, lister: Any, reads: int, gap_s: float) -> dict[str, Any]:
    """``reads`` cached reads of ``name``, ``gap_s`` apart, each beside one S3 listing round trip."""
    info_s, get_s, list_s = [], [], []
    checks_before = client.stats()["source_checks"]
    started = time.monotonic()
    for _ in range(reads):
        list_s.append(timed(lister))
        info_s.append(timed(lambda: client.flight_info(name)))
        get_s.append(timed(lambda: client.get(name)))
        time.sleep(gap_s)  # spreads the reads over time, so that a min interval can pass
    elapsed = time.monotonic() - started
    return {
        "reads": reads,
        "seconds": round(elapsed, 3),
        "flight_info_s_median": median(info_s),
        "get_s_median": median(get_s),
        "listing_round_trip_s_median": median(list_s),
        "source_checks": client.stats()["source_checks"] - checks_before,
        "flight_info_s": info_s,
        "get_s": get_s,
    }


def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    import boto3

    with ExitStack() as stack:
        progress("starting moto S3 and its shaping proxy, each in its own process")
        moto, endpoint = start_moto(workdir / "moto.log")
        stack.callback(stop, moto)
        cloud = start_proxy(int(endpoint.rsplit(":", 1)[1]), args.latency_ms, args.bandwidth_mbps, 0.0, stack)
        s3 = s3_filesystem(endpoint)
        s3.create_dir(BUCKET)
        rows = int(args.file_mb * 1e6 / 16)  # two 8-byte columns
        progress(f"writing {args.files} files of {args.file_mb} MB to moto")
        with ThreadPoolExecutor(4) as pool:
            arrow_bytes = sum(pool.map(lambda i: write_part(s3, i, rows), range(args.files)))
        next_index = args.files
        env = {**AWS_ENV, "AWS_ENDPOINT_URL": cloud}
        server, uri = start_server(env, args.memory_limit)
        stack.callback(stop, server)
        client = stack.enter_context(flightcache.connect(uri))
        lister_client = boto3.client("s3", endpoint_url=cloud, **_boto_credentials())

        def lister() -> None:
            lister_client.list_objects_v2(Bucket=BUCKET, Prefix="events/")

        phases: dict[str, Any] = {}
        loads: list[float] = []
        for label, refresh, interval, gap in (
            ("manual", "manual", None, 0.0),
            ("on-read, min interval 0 s", "on-read", 0.0, 0.0),
            (f"on-read, min interval {args.interval:g} s", "on-read", args.interval, args.interval / 4),
        ):
            if any(d["name"] == "events" for d in client.list()):
                client.drop("events")
            progress(f"loading {args.files} files ({label})")
            loads.append(
                timed(lambda r=refresh, i=interval: client.load("events", PREFIX, refresh=r, refresh_min_interval=i))
            )
            client.get("events")  # warm: the first read may check
            phases[label] = read_phase(client, "events", lister, args.reads, gap)
            p = phases[label]
            progress(
                f"  {label}: flight_info {p['flight_info_s_median'] * 1e3:.1f} ms, "
                f"get {p['get_s_median'] * 1e3:.0f} ms, listing {p['listing_round_trip_s_median'] * 1e3:.1f} ms, "
                f"{p['source_checks']} checks in {p['seconds']:.1f} s"
            )
        # The last dataset (on-read, with an interval) takes explicit refreshes now; no reads run meanwhile.
        incremental, full = [], []
        for rep in range(args.reps):
            write_part(s3, next_index, rows)  # 1% new data
            next_index += 1
            started = time.perf_counter()
            result = client.refresh("events")
            incremental.append(time.perf_counter() - started)
            assert result["refreshed"] == "incremental", result
            write_part(s3, rep, rows, seed=rep + 1)  # rewrite a file (new values, new ETag): all is read again
            started = time.perf_counter()
            result = client.refresh("events")
            full.append(time.perf_counter() - started)
            assert result["refreshed"] == "full", result
            progress(f"rep {rep + 1}/{args.reps}: incremental {incremental[-1]:.2f} s, full {full[-1]:.2f} s")
        final = client.info("events")
        stats = client.stats()
    manual, every, spaced = phases.values()
    result: dict[str, Any] = {
        "benchmark": "freshness",
        "machine": machine_info(),
        "dataset": {
            "files": args.files,
            "file_mb": args.file_mb,
            "arrow_bytes": arrow_bytes,
            "rows": rows * args.files,
            "final_rows": final["rows"],
        },
        "shaping": {"latency_ms": args.latency_ms, "bandwidth_mbps_per_connection": args.bandwidth_mbps},
        "load_s": loads,
        "on_read": phases,
        "on_read_added_s": {
            "flight_info_every_read": every["flight_info_s_median"] - manual["flight_info_s_median"],
            "flight_info_with_interval": spaced["flight_info_s_median"] - manual["flight_info_s_median"],
            "listing_round_trip": median([p["listing_round_trip_s_median"] for p in phases.values()]),
            "checks_with_interval": spaced["source_checks"],
            "checks_allowed_with_interval": int(spaced["seconds"] // args.interval) + 1,
        },
        "refresh": {
            "incremental_s": incremental,
            "full_s": full,
            "incremental_s_median": median(incremental),
            "full_s_median": median(full),
            "speedup": median(full) / median(incremental),
            "new_data_fraction": 1 / args.files,
        },
        "server_stats": {
            k: stats[k] for k in ("source_checks", "refreshes_incremental", "refreshes_full", "refresh_bytes")
        },
    }
    added, refresh = result["on_read_added_s"], result["refresh"]
    result["targets"] = {
        "on_read_cost": {
            "target": "an on-read check adds at most one S3 listing round trip to a cached read's get_flight_info",
            "added_ms": round(added["flight_info_every_read"] * 1e3, 1),
            "listing_ms": round(added["listing_round_trip"] * 1e3, 1),
            "listings_added": round(added["flight_info_every_read"] / added["listing_round_trip"], 2),
            "met": added["flight_info_every_read"] <= added["listing_round_trip"],
        },
        "on_read_interval": {
            "target": "no more than one check per min interval, shared by the reads in it",
            "checks": added["checks_with_interval"],
            "allowed": added["checks_allowed_with_interval"],
            "met": added["checks_with_interval"] <= added["checks_allowed_with_interval"],
        },
        "incremental_refresh": {
            "target": "a refresh after 1% new data >= 10x faster than a full reload",
            "speedup": round(refresh["speedup"], 1),
            "met": refresh["speedup"] >= 10,
        },
    }
    return result


def _boto_credentials() -> dict[str, str]:
    return {
        "region_name": AWS_ENV["AWS_REGION"],
        "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--file-mb", type=float, default=10.0, help="Arrow megabytes per file (default 10)")
    parser.add_argument("--reads", type=int, default=12, help="cached reads per on-read phase")
    parser.add_argument("--interval", type=float, default=2.0, help="the min interval of the third phase")
    parser.add_argument("--reps", type=int, default=3, help="incremental and full refreshes, alternating")
    parser.add_argument("--latency-ms", type=float, default=100.0)
    parser.add_argument("--bandwidth-mbps", type=float, default=90.0)
    parser.add_argument("--memory-limit", default="6GiB")
    parser.add_argument("--quick", action="store_true", help="20 files of 1 MB, 4 reads, 2 reps, to a temp dir")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.file_mb, args.reads, args.reps = 20, 1.0, 4, 2
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
        out = args.out or (Path(tmp) / "freshness.json" if args.quick else DEFAULT_OUT / "freshness.json")
        write_json(out, result)
    a, r = result["on_read_added_s"], result["refresh"]
    print(
        f"on-read added per read: every read {a['flight_info_every_read'] * 1e3:.1f} ms, with a "
        f"{args.interval:g} s interval {a['flight_info_with_interval'] * 1e3:.1f} ms; one listing "
        f"{a['listing_round_trip'] * 1e3:.1f} ms; checks {a['checks_with_interval']} (allowed "
        f"{a['checks_allowed_with_interval']})\nrefresh after {r['new_data_fraction']:.0%} new data "
        f"{r['incremental_s_median']:.2f} s vs full reload {r['full_s_median']:.2f} s: {r['speedup']:.1f}x\n-> {out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
