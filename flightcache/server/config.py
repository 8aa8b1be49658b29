"""The composition root: one ``ServerConfig`` says what a server is, ``build_server`` builds it.

Every server is made here, by ``flightcache serve`` and the tests alike, so the parts are put together
in one place and in one order: storage, shared memory, the cache (which makes its memory store),
recovery from storage, the SQL service, then the Flight server that serves them. Each part gets its
collaborators through its constructor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow.flight as flight

from ..sql.engine import SqlLimits
from ..units import DEFAULT_BATCH_ROWS
from .auth import Auth, Limits
from .cache import Cache
from .cluster import ClusterSettings
from .flight import DEFAULT_ENDPOINT_BYTES, DEFAULT_MAX_ENDPOINTS, FlightcacheServer
from .shm import resolve as resolve_shm
from .storage import DEFAULT_PART_BYTES, DEFAULT_STORAGE_GRACE_SECONDS, Storage


@dataclass(frozen=True)
class ServerConfig:
    """What a server is: where it listens, its memory, its storage tier, its security and its limits."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (``server.port`` says which)
    # memory
    memory_limit: int | None = None  # bytes of Arrow buffers held; None: no limit
    batch_rows: int = DEFAULT_BATCH_ROWS  # puts are coalesced into batches of about this many rows
    retain_seconds: float = 60.0  # a replaced version stays readable this long, for readers holding its tickets
    shm: str = "auto"  # same-host reads through /dev/shm: auto, on or off
    shm_group: str | None = None
    # storage
    storage: str | None = None  # a pyarrow filesystem URI (s3://bucket/prefix, a path); None: memory only
    s3_endpoint: str | None = None
    storage_retries: int = 5
    storage_backoff: float = 0.2
    storage_part_bytes: int = DEFAULT_PART_BYTES
    storage_grace: float = DEFAULT_STORAGE_GRACE_SECONDS  # another writer's superseded versions live this long
    persist: str = "none"  # the default persist mode of a put: none, sync or async
    # reads
    endpoint_bytes: int = DEFAULT_ENDPOINT_BYTES
    max_endpoints: int = DEFAULT_MAX_ENDPOINTS
    # security and limits
    credentials: Auth | None = None  # None: open to anyone who reaches the port; Auth.from_file(path) for a file
    tls_cert: bytes | None = None  # PEM; with tls_key, serve grpc+tls
    tls_key: bytes | None = None
    limits: Limits = field(default_factory=Limits)
    sql: SqlLimits = field(default_factory=SqlLimits)
    middleware: Mapping[str, flight.ServerMiddlewareFactory] = field(default_factory=dict)  # more of your own
    # cluster mode: join the cluster whose catalog is in etcd (None: a single server, no etcd)
    cluster: ClusterSettings | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both a TLS certificate and its key, or neither")

    @property
    def scheme(self) -> str:
        return "grpc" if self.tls_cert is None else "grpc+tls"

    @property
    def location(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


def build_server(config: ServerConfig, server_class: type[FlightcacheServer] = FlightcacheServer) -> FlightcacheServer:
    """A running server as ``config`` says (``server_class``: a subclass, for benchmarks that add calls)."""
    from ..sql.service import SqlService

    storage = None
    if config.storage is not None:
        storage = Storage(
            config.storage,
            s3_endpoint=config.s3_endpoint,
            retries=config.storage_retries,
            backoff=config.storage_backoff,
            part_bytes=config.storage_part_bytes,
            grace_seconds=config.storage_grace,
        )
    cache = Cache(
        storage,
        memory_limit=config.memory_limit,
        batch_rows=config.batch_rows,
        retain_seconds=config.retain_seconds,
        max_datasets=config.limits.max_datasets,
        persist=config.persist,
        shm=resolve_shm(config.shm, config.memory_limit, group=config.shm_group),
    )
    try:
        options: dict[str, Any] = {}
        if config.tls_cert is not None and config.tls_key is not None:
            options["tls_certificates"] = [flight.CertKeyPair(config.tls_cert, config.tls_key)]
        if config.cluster is not None:
            # The catalog is etcd's: storage holds parts named there, so there is nothing to recover from it.
            if config.cluster.token is None and config.credentials is not None:
                raise ValueError("a cluster node with --auth-token-file needs --node-token for its calls to the others")
            from .cluster import ClusterCatalog
            from .etcd import Etcd
            from .node import ClusterServer

            options["cluster"] = config.cluster
            options["catalog"] = ClusterCatalog(Etcd(config.cluster.etcd), config.cluster.prefix)
            options["sql_limits"] = config.sql  # its SQL reads the cluster's datasets: the node makes the service
            if server_class is FlightcacheServer:
                server_class = ClusterServer
            sql = None
        else:
            cache.recover()
            sql = SqlService(cache, config.sql)
        return server_class(
            config.location,
            cache=cache,
            sql=sql,
            auth=config.credentials,
            limits=config.limits,
            endpoint_bytes=config.endpoint_bytes,
            max_endpoints=config.max_endpoints,
            middleware=config.middleware,
            **options,
        )
    except BaseException:
        cache.close(flush=False)
        raise
