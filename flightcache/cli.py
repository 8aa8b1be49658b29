"""The ``flightcache`` command: run a server, and put, get, list, describe and drop datasets."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from .client import DEFAULT_URI, Client
from .errors import FlightcacheError
from .names import NAME_GRAMMAR
from .server.allocator import mmap_large_allocations
from .server.auth import DEFAULT_MAX_ACTION_BYTES
from .server.cache import PERSIST_MODES
from .server.logs import configure_logging
from .server.operations import DEFAULT_GRACE_SECONDS
from .units import DEFAULT_BATCH_ROWS, format_bytes, parse_bytes

POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
MEMORY_POOLS = ("system", "mimalloc", "jemalloc")
_POOL_SET = "FLIGHTCACHE_MEMORY_POOL_SET"

log = logging.getLogger("flightcache")

DEFAULT_STORAGE = "./.flightcache/storage"

EPILOG = f"""\
Dataset names: {NAME_GRAMMAR}.
Every command but 'serve' talks to the server at --uri (default: $FLIGHTCACHE_URI, else {DEFAULT_URI}),
authenticating with --token (default: $FLIGHTCACHE_TOKEN).
"""

FILTER_HELP = (
    "row filter applied on the server, e.g. \"status >= 500 and method in ('GET', 'POST')\"; "
    "operators == != < <= > >= in, not in, is None, is not None, and, or, not"
)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--uri",
        default=os.environ.get("FLIGHTCACHE_URI") or DEFAULT_URI,
        help="server address, grpc://HOST:PORT or grpc+tls://HOST:PORT (default: %(default)s)",
    )
    common.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="text for people, json for scripts (default: %(default)s)",
    )
    common.add_argument(
        "--log-level",
        default=os.environ.get("FLIGHTCACHE_LOG_LEVEL", "WARNING"),
        help="DEBUG, INFO, WARNING or ERROR (default: $FLIGHTCACHE_LOG_LEVEL or WARNING)",
    )

    parser = argparse.ArgumentParser(
        prog="flightcache",
        description="An Arrow Flight cache that hands named Arrow tables from one pipeline stage to the next.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        parents=[common],
        help="run a flightcache server",
        description="Run a flightcache server until SIGINT or SIGTERM.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument(
        "--port", type=int, default=8815, help="port to listen on; 0 picks a free one (default: %(default)s)"
    )
    serve.add_argument(
        "--memory-limit", default="4GiB", help="bound on dataset bytes held, e.g. 4GiB, 512MB (default: %(default)s)"
    )
    serve.add_argument(
        "--memory-pool",
        choices=MEMORY_POOLS,
        default=os.environ.get(POOL_ENV) or _default_pool(),
        help="Arrow's allocator for the server. Measured with 1 GiB here: jemalloc holds 1.08x the data "
        "and gives freed memory back; mimalloc (Arrow's usual default) 1.16x and kept a dropped gigabyte "
        "resident; system (malloc) 1.08x but decodes Parquet loads ~1.3x slower. glibc's mmap threshold is "
        "fixed at 32 MiB ($FLIGHTCACHE_MMAP_THRESHOLD: a size, or 'glibc' for glibc's own) "
        f"(default: ${POOL_ENV}, else jemalloc where pyarrow has it: %(default)s)",
    )
    serve.add_argument(
        "--batch-rows",
        type=int,
        default=DEFAULT_BATCH_ROWS,
        help="rows per stored record batch; larger batches are sliced, small ones coalesced (default: %(default)s)",
    )
    serve.add_argument(
        "--endpoint-bytes",
        default="128MiB",
        help="split a dataset into one Flight endpoint per this many bytes, for parallel reads (default: %(default)s)",
    )
    serve.add_argument(
        "--retain-seconds",
        type=float,
        default=60.0,
        help="keep a replaced version readable this long for readers already on it (default: %(default)s)",
    )
    serve.add_argument(
        "--storage",
        default=os.environ.get("FLIGHTCACHE_STORAGE", DEFAULT_STORAGE),
        help="where datasets persist as Parquet: s3://BUCKET/PREFIX, file:///PATH or a path; 'none' for "
        "memory only (default: $FLIGHTCACHE_STORAGE or %(default)s). S3 settings come from the AWS_* variables",
    )
    serve.add_argument(
        "--storage-grace",
        type=float,
        metavar="SECONDS",
        help="how long another server may still be reading a superseded version or writing an unfinished one "
        "in the same storage: removed only after that long (default: 600; 0: this server is the only writer)",
    )
    serve.add_argument(
        "--s3-endpoint",
        help="an S3-compatible endpoint, e.g. http://127.0.0.1:9000 "
        "(default: $AWS_ENDPOINT_URL_S3 or $AWS_ENDPOINT_URL, else AWS)",
    )
    serve.add_argument(
        "--persist",
        choices=PERSIST_MODES,
        default="none",
        help="default persistence of a put: none (memory only), sync (write-through), "
        "async (write-back) (default: %(default)s)",
    )
    _security_flags(serve)
    serve.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics; 0 picks a free port (default: off)",
    )
    serve.add_argument(
        "--metrics-host", default="127.0.0.1", help="address of the metrics endpoint (default: %(default)s)"
    )
    serve.add_argument(
        "--grace-period",
        type=float,
        default=DEFAULT_GRACE_SECONDS,
        help="on SIGTERM/SIGINT, seconds to let calls in flight finish before write-backs are flushed and "
        "the server exits; a second signal stops waiting (default: %(default)s)",
    )
    serve.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("FLIGHTCACHE_LOG_FORMAT", "text"),
        help="text lines or JSON lines on stderr; --log-level INFO logs one line per request "
        "(default: $FLIGHTCACHE_LOG_FORMAT or %(default)s)",
    )

    serve.add_argument(
        "--shm",
        choices=("auto", "on", "off"),
        default="auto",
        help="keep datasets in shared memory (/dev/shm) so that clients on this host map them instead of "
        "streaming them; auto: on when /dev/shm has room for the memory limit (default: %(default)s)",
    )
    serve.add_argument(
        "--shm-group", help="let this group read the shared-memory files too (default: only the server's user)"
    )

    _cluster_flags(serve)

    sub.add_parser("ls", parents=[common], help="list datasets", description="List the cached datasets.")
    sub.add_parser(
        "nodes",
        parents=[common],
        help="list the nodes of the cluster",
        description="List the live members of the cluster the server belongs to (one line for a single server).",
    )

    info = sub.add_parser(
        "info",
        parents=[common],
        help="describe a dataset",
        description="Show a dataset's schema, rows, bytes, version and times.",
    )
    info.add_argument("name")

    put = sub.add_parser(
        "put",
        parents=[common],
        help="put a Parquet file or directory as a dataset",
        description="Stream a Parquet file (or a directory of them) into the cache as dataset NAME.",
    )
    put.add_argument("name")
    put.add_argument("path", help="a .parquet file or a directory of Parquet files")
    _write_flags(put)

    load = sub.add_parser(
        "load",
        parents=[common],
        help="have the server load external Parquet (S3 or a path) as a dataset",
        description="The server reads a Parquet file or directory (hive partitions too), in parallel, as NAME.",
    )
    load.add_argument("name")
    load.add_argument(
        "source",
        metavar="URI",
        help="e.g. s3://bucket/logs/2026-11-24/ or /data/logs.parquet, as the server sees it, or an Iceberg table "
        "iceberg://CATALOG/NAMESPACE.TABLE (a catalog of pyiceberg's configuration on the server)",
    )
    _write_flags(load)
    load.add_argument(
        "--refresh",
        metavar="POLICY",
        help="how the dataset follows its source: manual (only 'flightcache refresh'), on-read (a read checks "
        "the source first) or a period in seconds (checked in the background) (default: manual)",
    )
    load.add_argument(
        "--refresh-min-interval",
        type=float,
        metavar="SECONDS",
        help="on-read: at most one check of the source per this many seconds (default: 5)",
    )
    sub.add_parser(
        "refresh",
        parents=[common],
        help="check a loaded dataset's source now",
        description="Check the source a dataset was loaded from: new files are appended, changed or removed "
        "ones reloaded.",
    ).add_argument("name")

    persist = sub.add_parser(
        "persist",
        parents=[common],
        help="persist a dataset to storage now",
        description="Write a dataset's current version to the storage tier now.",
    )
    persist.add_argument("name")
    persist.add_argument("--no-wait", action="store_true", help="return at once instead of when it has committed")
    for verb, text in (
        ("pin", "keep a dataset in memory (never evicted)"),
        ("unpin", "let a pinned dataset be evicted again"),
        ("evict", "free a persisted dataset's memory (it stays in storage)"),
    ):
        sub.add_parser(verb, parents=[common], help=text, description=text[0].upper() + text[1:] + ".").add_argument(
            "name"
        )

    get = sub.add_parser(
        "get",
        parents=[common],
        help="read a dataset (to a Parquet file or the terminal)",
        description="Read a dataset. With -o, write it to a Parquet file; else print its first rows.",
    )
    get.add_argument("name")
    get.add_argument("-o", "--out", help="write the result to this Parquet file")
    get.add_argument("--columns", help="comma-separated columns to read (default: all)")
    get.add_argument("--filter", help=FILTER_HELP)
    get.add_argument("--limit", type=int, default=20, help="rows to print without -o (default: %(default)s)")

    sql = sub.add_parser(
        "sql",
        parents=[common],
        help="run a SQL query on the server (to the terminal, a Parquet file or a new dataset)",
        description="Run a DuckDB SQL query on the server, where every dataset is a table by its name "
        "(quote names with '/': SELECT * FROM \"logs/raw\"). Print the first rows, write them with -o, or store "
        "them as a dataset with --into.",
    )
    sql.add_argument("query", help="the SQL text")
    sql.add_argument("-o", "--out", help="write the result to this Parquet file")
    sql.add_argument("--into", metavar="NAME", help="store the result on the server as dataset NAME")
    sql.add_argument(
        "--mode",
        choices=("overwrite", "append", "create"),
        default="overwrite",
        help="with --into: as for put (default: %(default)s)",
    )
    _persist_flags(sql)
    sql.add_argument("--timeout", type=float, help="seconds before the server interrupts the query")
    sql.add_argument("--limit", type=int, default=20, help="rows to print without -o or --into (default: %(default)s)")

    drop = sub.add_parser(
        "drop", parents=[common], help="drop a dataset", description="Drop a dataset and free its memory."
    )
    drop.add_argument("name")

    sub.add_parser(
        "stats",
        parents=[common],
        help="show server figures",
        description="Show memory, datasets by state, cache counters, requests per call and per dataset figures.",
    )

    ping = sub.add_parser(
        "ping",
        parents=[common],
        help="check that a server is up (for health checks)",
        description="Ask the server for its health. Exit status 0 when it serves, 1 when it cannot be reached "
        "or is shutting down.",
    )
    ping.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default: %(default)s)"
    )
    for command, subparser in sub.choices.items():
        if command != "serve":
            subparser.add_argument(
                "--token",
                default=os.environ.get("FLIGHTCACHE_TOKEN"),
                help="bearer token for a server with authentication (default: $FLIGHTCACHE_TOKEN, which "
                "unlike this flag other users cannot see in the process list)",
            )
            subparser.add_argument(
                "--tls-ca",
                metavar="FILE",
                default=os.environ.get("FLIGHTCACHE_TLS_CA") or None,
                help="PEM file of the CA that signed a grpc+tls:// server's certificate, if the system does not "
                "trust it (default: $FLIGHTCACHE_TLS_CA)",
            )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, getattr(args, "log_format", "text"))
    try:
        if args.command == "serve":
            if argv is None:  # the command itself, not a caller in its process: it owns the allocators
                _use_memory_pool(args.memory_pool)
                mmap_large_allocations()
            return serve(args)
        with Client(args.uri, token=args.token, tls_ca=args.tls_ca) as client:
            return COMMANDS[args.command](client, args)
    except (FlightcacheError, ValueError, OSError) as e:
        print(f"flightcache {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"flightcache {args.command}: interrupted", file=sys.stderr)
        return 130


def _default_pool() -> str:
    import pyarrow as pa

    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc (macOS wheels, for one)
        return "mimalloc"
    return "jemalloc"


def _use_memory_pool(pool: str) -> None:
    """Start this process over with Arrow's allocator set to ``pool``, unless it already is.

    Arrow reads ``ARROW_DEFAULT_MEMORY_POOL`` once, when pyarrow is imported, which is before any
    command-line flag is read; so the flag sets the variable and the process replaces itself (same pid).
    """
    import pyarrow as pa

    if pa.default_memory_pool().backend_name == pool or os.environ.get(_POOL_SET) == pool:
        return  # in use, or asked for once already (an Arrow built without it falls back to its default)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, {**os.environ, POOL_ENV: pool, _POOL_SET: pool})


def _write_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mode",
        choices=("overwrite", "append", "create"),
        default="overwrite",
        help="overwrite replaces, append adds rows (same schema), create fails if NAME exists (default: %(default)s)",
    )
    _persist_flags(parser)


def _persist_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--persist",
        choices=PERSIST_MODES,
        help="none (memory only), sync (return once written to storage) or async (write back "
        "in the background) (default: the server's --persist)",
    )
    parser.add_argument("--ttl", type=float, help="seconds in memory; then evicted if persisted, else dropped")


def _security_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--auth-token-file",
        metavar="FILE",
        default=os.environ.get("FLIGHTCACHE_AUTH_TOKEN_FILE"),
        help="require authentication: one credential a line, 'TOKEN [read|write]' or 'USER:PASSWORD [read|write]' "
        "(basic auth), role default write; re-read on SIGHUP (default: $FLIGHTCACHE_AUTH_TOKEN_FILE, else "
        "no authentication)",
    )
    serve.add_argument(
        "--tls-cert",
        metavar="FILE",
        default=os.environ.get("FLIGHTCACHE_TLS_CERT"),
        help="serve grpc+tls:// with this PEM certificate (chain) (default: $FLIGHTCACHE_TLS_CERT)",
    )
    serve.add_argument(
        "--tls-key",
        metavar="FILE",
        default=os.environ.get("FLIGHTCACHE_TLS_KEY"),
        help="the PEM private key of --tls-cert (default: $FLIGHTCACHE_TLS_KEY)",
    )
    serve.add_argument(
        "--max-put-bytes", metavar="SIZE", help="refuse a put stream larger than this, e.g. 1GiB (default: no limit)"
    )
    serve.add_argument(
        "--max-datasets", metavar="N", type=int, help="refuse to create a dataset beyond this many (default: no limit)"
    )
    serve.add_argument(
        "--max-action-bytes",
        metavar="SIZE",
        default=format_bytes(DEFAULT_MAX_ACTION_BYTES),
        help="refuse an action whose body is larger than this (default: %(default)s)",
    )
    sql = serve.add_argument_group("SQL limits (each defaults to its FLIGHTCACHE_SQL_* variable, else the value shown)")
    sql.add_argument("--sql-memory-limit", metavar="SIZE", help="DuckDB working memory per query (1GiB)")
    sql.add_argument("--sql-timeout", type=float, metavar="SECONDS", help="longest a query may run (300)")
    sql.add_argument("--sql-threads", type=int, metavar="N", help="DuckDB threads per query (0: one per core)")
    sql.add_argument("--sql-max-queries", type=int, metavar="N", help="queries running at once; more wait (8)")


def _cluster_flags(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("cluster mode (several nodes, one catalog in etcd; see docs/scaling.md)")
    group.add_argument(
        "--cluster",
        metavar="etcd://HOST:PORT[,HOST:PORT...]",
        default=os.environ.get("FLIGHTCACHE_CLUSTER"),
        help="join the cluster whose catalog is in this etcd (etcds:// for TLS); every node shares one "
        "--storage (default: $FLIGHTCACHE_CLUSTER, else a single server)",
    )
    group.add_argument(
        "--advertise",
        metavar="grpc://HOST[:PORT]",
        default=os.environ.get("FLIGHTCACHE_ADVERTISE"),
        help="where the other nodes and the clients reach this node; no port: the one it listens on "
        "(default: $FLIGHTCACHE_ADVERTISE, else --host and --port)",
    )
    group.add_argument("--node-id", help="this node's id in the cluster (default: a new random one each start)")
    group.add_argument(
        "--cluster-prefix", default="/flightcache", help="the cluster's etcd keys (default: %(default)s)"
    )
    group.add_argument(
        "--lease-seconds",
        type=int,
        default=10,
        help="a node that stops renewing its etcd lease is gone this long after (default: %(default)s)",
    )
    group.add_argument(
        "--node-token",
        default=os.environ.get("FLIGHTCACHE_NODE_TOKEN"),
        help="bearer token of the calls between nodes: a write token of the nodes' --auth-token-file "
        "(default: $FLIGHTCACHE_NODE_TOKEN)",
    )
    group.add_argument(
        "--cluster-ca", metavar="FILE", help="PEM CA of the other nodes' TLS certificates (default: --tls-cert)"
    )
    group.add_argument(
        "--etcd-user", default=os.environ.get("FLIGHTCACHE_ETCD_USER"), help="etcd user ($FLIGHTCACHE_ETCD_USER)"
    )
    group.add_argument(
        "--etcd-password-file", metavar="FILE", help="the etcd user's password, in a file ($FLIGHTCACHE_ETCD_PASSWORD)"
    )
    group.add_argument("--etcd-ca", metavar="FILE", help="PEM CA of etcd's certificate (etcds://)")
    group.add_argument("--etcd-cert", metavar="FILE", help="PEM client certificate for etcd --client-cert-auth")
    group.add_argument("--etcd-key", metavar="FILE", help="PEM key of --etcd-cert")


def _cluster_settings(args: argparse.Namespace) -> Any:
    """ClusterSettings of the cluster flags; None without --cluster."""
    if not args.cluster:
        return None
    from .server.cluster import ClusterSettings
    from .server.etcd import EtcdSettings

    password = os.environ.get("FLIGHTCACHE_ETCD_PASSWORD")
    if args.etcd_password_file:
        with open(args.etcd_password_file) as f:
            password = f.read().strip()
    ca = None
    if args.cluster_ca:
        with open(args.cluster_ca, "rb") as f:
            ca = f.read()
    scheme = "grpc+tls" if args.tls_cert else "grpc"
    advertise = args.advertise or f"{scheme}://{args.host}" + (f":{args.port}" if args.port else "")
    if args.host in ("0.0.0.0", "::") and not args.advertise:
        raise ValueError(f"--host {args.host} listens everywhere: give --advertise grpc://THIS_HOST for the others")
    return ClusterSettings(
        EtcdSettings(args.cluster, args.etcd_user, password, args.etcd_ca, args.etcd_cert, args.etcd_key),
        advertise=advertise,
        prefix=args.cluster_prefix,
        node_id=args.node_id,
        lease_seconds=args.lease_seconds,
        token=args.node_token,
        tls_ca=ca,
    )


def _server_security(args: argparse.Namespace) -> dict[str, Any]:
    """The ServerConfig fields of the security flags."""
    from .server.auth import Auth, Limits

    options: dict[str, Any] = {
        "limits": Limits(
            max_put_bytes=parse_bytes(args.max_put_bytes) if args.max_put_bytes else None,
            max_datasets=args.max_datasets,
            max_action_bytes=parse_bytes(args.max_action_bytes),
        ),
        "credentials": Auth.from_file(args.auth_token_file) if args.auth_token_file else None,
    }
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("give both --tls-cert and --tls-key, or neither")
    if args.tls_cert:
        with open(args.tls_cert, "rb") as cert, open(args.tls_key, "rb") as key:
            options["tls_cert"], options["tls_key"] = cert.read(), key.read()
    return options


def _sql_limits(args: argparse.Namespace) -> Any:
    """SqlLimits: the environment's, overridden by the --sql-* flags given."""
    from dataclasses import replace

    from .sql.engine import SqlLimits

    flags = {
        "memory_limit": parse_bytes(args.sql_memory_limit) if args.sql_memory_limit else None,
        "timeout": args.sql_timeout,
        "threads": args.sql_threads,
        "max_queries": args.sql_max_queries,
    }
    return replace(SqlLimits.from_env(), **{k: v for k, v in flags.items() if v is not None}).checked()


def serve(args: argparse.Namespace) -> int:
    import pyarrow as pa

    from .server.config import ServerConfig, build_server

    config = ServerConfig(
        host=args.host,
        port=args.port,
        memory_limit=parse_bytes(args.memory_limit),
        batch_rows=args.batch_rows,
        retain_seconds=args.retain_seconds,
        storage=None if args.storage == "none" else args.storage,
        s3_endpoint=args.s3_endpoint,
        **({} if args.storage_grace is None else {"storage_grace": args.storage_grace}),
        persist=args.persist,
        endpoint_bytes=parse_bytes(args.endpoint_bytes),
        shm=args.shm,
        shm_group=args.shm_group,
        sql=_sql_limits(args),
        **_server_security(args),
        cluster=_cluster_settings(args),
    )
    server = build_server(config)
    store, storage, scheme = server.store, server.cache.storage, config.scheme
    auth = config.credentials
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        if auth is None:
            log.warning(
                "serving on %s without --auth-token-file: anyone who reaches the port can read and write", args.host
            )
        elif scheme == "grpc":
            log.warning("serving on %s with credentials but without TLS: tokens cross the network in clear", args.host)
    metrics = None
    if args.metrics_port is not None:
        from .server.prometheus import MetricsEndpoint

        try:
            metrics = MetricsEndpoint(server, args.metrics_port, args.metrics_host)
        except BaseException:  # prometheus-client missing, port taken: the error is the message, not a hang
            server.shutdown()
            raise
    stopping = threading.Event()

    def stop(signum: int, frame: object) -> None:
        if stopping.is_set():
            log.warning("received %s again: not waiting for the calls in flight", signal.Signals(signum).name)
            server.ops.cut()
            return
        stopping.set()
        log.warning(
            "received %s: draining (%d calls in flight, %d write-backs pending, grace period %.0f s)",
            signal.Signals(signum).name,
            server.ops.in_flight,
            server.cache.stats()["pending_persists"],
            args.grace_period,
        )

    def reload(signum: int, frame: object) -> None:
        if auth is None:  # SIGHUP's default would kill the server without a drain or a flush
            log.warning("received SIGHUP: there is no --auth-token-file to re-read; ignored")
            return
        try:
            auth.reload()
        except (OSError, ValueError) as e:
            log.error("SIGHUP: keeping the previous credentials: %s", e)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reload)
    uri = f"{scheme}://{args.host}:{server.port}"
    recovered = store.stats()["states"]["in-storage-only"]
    where = f"storage {storage.uri}, {recovered} datasets recovered" if storage else "no storage"
    _emit(
        args,
        {
            "uri": uri,
            "memory_limit": store.memory_limit,
            "pid": os.getpid(),
            "memory_pool": pa.default_memory_pool().backend_name,
            "storage": storage.uri if storage else None,
            "recovered": recovered,
            "auth": auth.summary() if auth else None,
            "metrics": metrics.url if metrics else None,
            "shm": str(server.cache.shm.dir) if server.cache.shm else None,
            "node": getattr(server, "id", None),  # cluster mode: this node's id and address
            "advertise": getattr(getattr(server, "settings", None), "advertise", None),
        },
        f"flightcache serving at {uri} (memory limit {format_bytes(store.memory_limit or 0)}, {where}, "
        f"pid {os.getpid()}"
        + (f", metrics at {metrics.url}" if metrics else "")
        + (
            f", node {getattr(server, 'id', '')} of the cluster at {config.cluster.etcd.url})"
            if config.cluster
            else ")"
        ),
    )
    sys.stdout.flush()
    while not stopping.wait(0.2):
        pass
    summary = server.drain(args.grace_period)
    if metrics is not None:
        metrics.close()
    log.warning(
        "stopped after %.1f s: %d calls finished, %d cut at the end of the grace period; "
        "%d write-backs finished, %d failed",
        summary["seconds"],
        summary["finished"],
        summary["cut"],
        summary["flushed"],
        summary["flush_failed"],
    )
    if summary["persist_failed"]:
        log.error(
            "%d datasets failed to persist (state persist-failed; see 'flightcache ls'): their data is lost",
            summary["persist_failed"],
        )
    status = 1 if summary["persist_failed"] else 0
    if summary["cut"]:
        # The Flight server waits for its calls without bound; ending the process ends them.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def cmd_nodes(client: Client, args: argparse.Namespace) -> int:
    nodes = client.nodes()
    rows = [
        [
            n["id"] + (" *" if n.get("self") else ""),
            n["location"] or "-",
            format_bytes(n["memory_used"]) + " / " + (format_bytes(n["memory_limit"]) if n["memory_limit"] else "-"),
            str(n["datasets"]),
            f"{n['load']:.2f}",
            str(n["in_flight"]),
            n["state"],
            _time(n["started"]),
        ]
        for n in nodes
    ]
    header = ["NODE", "LOCATION", "MEMORY", "PARTS", "LOAD", "CALLS", "STATE", "STARTED"]
    _emit(args, nodes, _table(header, rows) + "\n(* the node asked)")
    return 0


def cmd_ls(client: Client, args: argparse.Namespace) -> int:
    datasets = client.list()
    rows = [
        [
            d["name"],
            str(d["version"]),
            f"{d['rows']:,}",
            format_bytes(d["bytes"]),
            d["state"] + (", pinned" if d["pinned"] else ""),
            _time(d["created"]),
            _time(d["last_read"]),
            *_source_columns(d.get("source")),
        ]
        for d in datasets
    ]
    header = ["NAME", "VERSION", "ROWS", "SIZE", "STATE", "CREATED", "LAST READ", "SOURCE", "CHECKED", "FRESH"]
    _emit(args, datasets, _table(header, rows) if rows else "no datasets")
    return 0


def _source_columns(source: dict[str, Any] | None) -> list[str]:
    """SOURCE, CHECKED, FRESH of a dataset made by load (dashes for one made by a put)."""
    if source is None:
        return ["-", "-", "-"]
    fresh = "stale" if source["stale"] else f"yes ({source['refresh']})"
    return [source["uri"], _time(source["checked"]), fresh]


def cmd_info(client: Client, args: argparse.Namespace) -> int:
    d = client.info(args.name)
    text = "\n".join(
        [
            f"name:      {d['name']}",
            f"version:   {d['version']}",
            f"rows:      {d['rows']:,}",
            f"size:      {format_bytes(d['bytes'])} ({d['bytes']:,} bytes in {d['batches']} batches)",
            f"created:   {_time(d['created'])}",
            f"last read: {_time(d['last_read'])}",
            f"state:     {d['state']}{', pinned' if d['pinned'] else ''}"
            + (f" (persisted version {d['persisted_version']})" if d["persisted_version"] else ""),
            *([f"error:     {d['persist_error']}"] if d["persist_error"] else []),
            *([f"expires:   {_time(d['expires'])}"] if d["expires"] else []),
            *_source_lines(d.get("source")),
            "activity:  " + ", ".join(_counter(k, v) for k, v in d["counters"].items()),
            "schema:",
            "  " + d["schema"].replace("\n", "\n  "),
        ]
    )
    _emit(args, d, text)
    return 0


def _source_lines(s: dict[str, Any] | None) -> list[str]:
    if s is None:
        return []
    return [
        f"source:    {s['uri']} ({s['files']} files, {format_bytes(s['source_bytes'])}"
        + (f", snapshot {s['snapshot']}" if s["snapshot"] is not None else "")
        + f"), refresh {s['refresh']}",
        f"checked:   {_time(s['checked'])}; matched the source {s['staleness_s']:.0f} s ago"
        + (" (STALE)" if s["stale"] else ""),
        *([f"refresh error: {s['error']}"] if s["error"] else []),
    ]


def cmd_put(client: Client, args: argparse.Namespace) -> int:
    import pyarrow.dataset as ds

    try:
        dataset = ds.dataset(args.path, format="parquet")
    except (FileNotFoundError, OSError, ValueError) as e:
        raise ValueError(f"cannot read Parquet at {args.path!r}: {e}") from e
    total = dataset.count_rows()
    bar = _Progress(f"put {args.name}", total)
    reader = dataset.scanner(batch_size=client.batch_rows).to_reader()
    result = client.put(args.name, reader, mode=args.mode, persist=args.persist, ttl=args.ttl, progress=bar.update)
    bar.close()
    _emit(
        args,
        result,
        f"put {result['name']}: version {result['version']}, {result['rows']:,} rows, {format_bytes(result['bytes'])}",
    )
    return 0


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = [c.strip() for c in args.columns.split(",")] if args.columns else None
    if not args.out:
        table = client.get(args.name, columns, args.filter)
        shown = table.slice(0, args.limit)
        if args.output == "json":
            _emit(args, shown.to_pylist(), "")
        else:
            print(shown.to_pandas().to_string() if _has_pandas() else shown.to_string(preview_cols=20))
            print(f"({table.num_rows:,} rows, showing {shown.num_rows})")
        return 0
    info = client.flight_info(args.name, columns, args.filter)
    bar = _Progress(f"get {args.name}", info.total_records if info.total_records >= 0 else None)
    rows = 0
    writer = None
    try:
        for batch in client.stream(args.name, columns, args.filter):
            if writer is None:
                writer = pq.ParquetWriter(args.out, batch.schema)
            writer.write_batch(batch)
            rows += batch.num_rows
            bar.update(batch.num_rows, batch.nbytes)
        if writer is None:
            pq.write_table(pa.Table.from_batches([], info.schema), args.out)
    finally:
        if writer is not None:
            writer.close()
        bar.close()
    _emit(
        args, {"name": args.name, "rows": rows, "path": args.out}, f"wrote {rows:,} rows of {args.name} to {args.out}"
    )
    return 0


def cmd_load(client: Client, args: argparse.Namespace) -> int:
    bar = _Progress(f"load {args.name}", None)

    def progress(done: int, total: int) -> None:
        bar.label = f"load {args.name}: {done}/{total} files"
        bar.update(0, 0)

    result = client.load(
        args.name,
        args.source,
        args.mode,
        persist=args.persist,
        ttl=args.ttl,
        progress=progress,
        refresh=args.refresh,
        refresh_min_interval=args.refresh_min_interval,
    )
    bar.close()
    _emit(
        args,
        result,
        f"loaded {result['name']}: version {result['version']}, {result['rows']:,} rows, "
        f"{format_bytes(result['bytes'])}",
    )
    return 0


def cmd_refresh(client: Client, args: argparse.Namespace) -> int:
    d = client.refresh(args.name)
    what = {"none": "unchanged", "incremental": f"{d['files_added']} new file(s) appended", "full": "reloaded"}
    _emit(args, d, f"{d['name']} version {d['version']}: {what.get(d['refreshed'], d['refreshed'])}")
    return 0


def cmd_persist(client: Client, args: argparse.Namespace) -> int:
    d = client.persist(args.name, wait=not args.no_wait)
    _emit(
        args,
        d,
        f"{d['name']} version {d['version']}: {d['state']}"
        + (f" ({d['persist_error']})" if d["persist_error"] else ""),
    )
    return 0 if d["state"] != "persist-failed" else 1


def cmd_pin(client: Client, args: argparse.Namespace) -> int:
    d = {"pin": client.pin, "unpin": client.unpin, "evict": client.evict}[args.command](args.name)
    _emit(args, d, f"{d['name']}: {d['state']}{', pinned' if d['pinned'] else ''}")
    return 0


def cmd_drop(client: Client, args: argparse.Namespace) -> int:
    result = client.drop(args.name)
    _emit(args, result, f"dropped {result['name']} (version {result['version']}, {format_bytes(result['bytes'])})")
    return 0


def cmd_ping(client: Client, args: argparse.Namespace) -> int:
    client.timeout = args.timeout
    h = client.ping()
    limit = format_bytes(h["memory_limit"]) if h["memory_limit"] else "no limit"
    _emit(
        args,
        h,
        f"{client.uri}: {h['status']}, flightcache {h['version']}, up {h['uptime_s']:.0f} s, "
        f"{h['datasets']} datasets, memory {format_bytes(h['memory_used'])} of {limit}, "
        f"{h['pending_persists']} pending persists ({1000 * h['latency_s']:.1f} ms)",
    )
    return 0


def cmd_stats(client: Client, args: argparse.Namespace) -> int:
    s = client.stats()
    limit = s.get("memory_limit")
    pct = f" ({100 * s['memory_used'] / limit:.1f}%)" if limit else ""
    reads = s.get("hits", 0) + s.get("misses", 0)
    lines = [
        ["datasets", str(s["datasets"])],
        ["memory used", f"{format_bytes(s['memory_used'])}{pct}"],
        ["memory limit", format_bytes(limit) if limit else "none"],
        ["puts in progress", format_bytes(s["memory_staged"])],
        ["retained versions", str(s["retained_versions"])],
        ["puts / aborted", f"{s['puts']} / {s['puts_aborted']}"],
        ["gets (streams)", str(s["gets"])],
        ["hits / misses", f"{s.get('hits', 0):.0f} / {s.get('misses', 0):.0f}"],
        ["hit ratio", f"{100 * s.get('hits', 0) / reads:.1f}%" if reads else "-"],
        ["evictions", f"{s.get('evictions', 0):.0f}"],
        ["bytes received", format_bytes(s["bytes_received"])],
        ["bytes served", format_bytes(s["bytes_served"])],
        ["bytes loaded", format_bytes(s.get("bytes_loaded", 0))],
        ["bytes persisted", format_bytes(s.get("bytes_persisted", 0))],
        ["pending persists", str(s["pending_persists"])],
        ["write-backs / failed", f"{s['writebacks_done']} / {s['writebacks_failed']}"],
        ["storage", s["storage"] or "none"],
        ["calls in flight", str(s["in_flight"]) + (" (draining)" if s["draining"] else "")],
        ["uptime", f"{s['uptime_s']:.0f} s"],
    ]
    process = s.get("process")
    if process:
        rss = format_bytes(process["rss"]) if process["rss"] is not None else "-"
        lines.append(["server RSS", rss])
        lines.append(["Arrow pool", f"{format_bytes(process['arrow_pool_bytes'])} ({process['memory_pool']})"])
    states = ", ".join(f"{n} {state}" for state, n in s["states"].items() if n)
    lines.insert(1, ["datasets by state", states or "-"])
    lost = s.get("recovery", {}).get("incomplete_versions", [])
    if lost:  # write-backs a crash cut short: acknowledged in memory, never committed to storage
        lines.append(["lost at the last start", ", ".join(f"{v['name']} v{v['version']}" for v in lost)])
    corrupt = s.get("recovery", {}).get("corrupt", [])
    if corrupt:  # manifests that cannot be read: their files are kept for inspection
        lines.append(["corrupt in storage", ", ".join(f"{c['name']} v{c['version']} ({c['uri']})" for c in corrupt)])
    per = [
        [
            name,
            f"{c['hits']:.0f}",
            f"{c['misses']:.0f}",
            format_bytes(c["bytes_served"]),
            format_bytes(c["bytes_loaded"]),
            format_bytes(c["bytes_persisted"]),
            f"{c['evictions']:.0f}",
            f"{c['load_s']:.2f}",
            f"{c['persist_s']:.2f}",
        ]
        for name, c in s["per_dataset"].items()
    ]
    calls = [
        [
            r["method"] + (f" {r['action']}" if r["action"] else ""),
            str(r["count"]),
            str(r["errors"]),
            f"{1000 * r['seconds'] / r['count']:.1f}",
            _quantile_ms(r, 0.5),
            _quantile_ms(r, 0.99),
        ]
        for r in s["requests"]
    ]
    text = _table(["FIGURE", "VALUE"], lines)
    if calls:
        text += "\n\n" + _table(["CALL", "COUNT", "ERRORS", "MEAN MS", "P50 MS", "P99 MS"], calls)
    if per:
        text += "\n\n" + _table(
            ["DATASET", "HITS", "MISSES", "SERVED", "LOADED", "PERSISTED", "EVICTIONS", "LOAD S", "PERSIST S"], per
        )
    _emit(args, s, text)
    return 0


def _quantile_ms(r: dict[str, Any], q: float) -> str:
    """The histogram bucket bound that the ``q`` quantile of a call's durations falls under."""
    for bound, n in r["buckets"]:
        if n >= q * r["count"]:
            return f"<= {1000 * bound:g}"
    return f"> {1000 * r['buckets'][-1][0]:g}"


def cmd_sql(client: Client, args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    if args.into:
        if args.out:
            raise ValueError("give either -o FILE or --into NAME, not both")
        r = client.sql(
            args.query, into=args.into, mode=args.mode, persist=args.persist, ttl=args.ttl, timeout=args.timeout
        )
        _emit(args, r, f"sql into {r['name']}: version {r['version']}, {r['rows']:,} rows, {format_bytes(r['bytes'])}")
        return 0
    if not args.out:
        table = client.sql(args.query, timeout=args.timeout)
        shown = table.slice(0, args.limit)
        if args.output == "json":
            _emit(args, shown.to_pylist(), "")
        else:
            print(shown.to_pandas().to_string() if _has_pandas() else shown.to_string(preview_cols=20))
            print(f"({table.num_rows:,} rows, showing {shown.num_rows})")
        return 0
    bar = _Progress("sql", None)
    rows = 0
    with client.sql_reader(args.query, timeout=args.timeout) as reader, pq.ParquetWriter(args.out, reader.schema) as w:
        for batch in reader:
            w.write_batch(batch)
            rows += batch.num_rows
            bar.update(batch.num_rows, batch.nbytes)
    bar.close()
    _emit(args, {"rows": rows, "path": args.out}, f"wrote {rows:,} rows to {args.out}")
    return 0


COMMANDS = {
    "ls": cmd_ls,
    "nodes": cmd_nodes,
    "info": cmd_info,
    "put": cmd_put,
    "get": cmd_get,
    "drop": cmd_drop,
    "stats": cmd_stats,
    "load": cmd_load,
    "persist": cmd_persist,
    "refresh": cmd_refresh,
    "pin": cmd_pin,
    "unpin": cmd_pin,
    "evict": cmd_pin,
    "sql": cmd_sql,
    "ping": cmd_ping,
}


class _Progress:
    """A one-line progress display on stderr, shown only on a terminal."""

    def __init__(self, label: str, total_rows: int | None) -> None:
        self.label, self.total = label, total_rows
        self.rows = self.nbytes = 0
        self.started = self.shown = time.monotonic()
        self.enabled = sys.stderr.isatty()

    def update(self, rows: int, nbytes: int) -> None:
        self.rows += rows
        self.nbytes += nbytes
        now = time.monotonic()
        if self.enabled and now - self.shown >= 0.2:
            self.shown = now
            rate = self.nbytes / max(now - self.started, 1e-9)
            done = f" {100 * self.rows / self.total:5.1f}%" if self.total else ""
            sys.stderr.write(
                f"\r{self.label}:{done} {self.rows:,} rows, {format_bytes(self.nbytes)} ({format_bytes(rate)}/s)   "
            )
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.shown != self.started:
            sys.stderr.write("\n")


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.output == "json" else text)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    )


def _counter(key: str, value: float) -> str:
    if key.startswith("bytes"):
        return f"{key.replace('_', ' ')} {format_bytes(value)}"
    return f"{key.replace('_', ' ')} {value:.2f}" if key.endswith("_s") else f"{key} {value:.0f}"


def _time(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _has_pandas() -> bool:
    import importlib.util

    return importlib.util.find_spec("pandas") is not None


def _version() -> str:
    from . import __version__

    return __version__


if __name__ == "__main__":
    sys.exit(main())
