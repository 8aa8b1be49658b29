"""The friendly Python API over plain Arrow Flight.

    import flightcache
    with flightcache.connect("grpc://127.0.0.1:8815") as fc:
        fc.put("logs/raw", table)
        df = fc.to_pandas("logs/raw", columns=["status"], filter="status >= 500")

A ``Client`` pickles as its settings only and connects lazily, again after a fork, so it can be
shipped to Spark or multiprocessing workers. Its settings include its credentials (``token``,
``username``/``password``): treat a pickled client as a secret.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import functools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

import pyarrow as pa
import pyarrow.flight as flight
from pyarrow.flight import (
    FlightCallOptions,
    FlightClient,
    FlightEndpoint,
    FlightInfo,
)  # in Client, `flight` is a property

from .errors import (
    InvalidRequestError,
    MemoryFullError,
    NotImplementedByServerError,
    ServerUnavailableError,
    UnauthenticatedError,
    UnauthorizedError,
)
from .names import validate_name
from .protocol import (
    ACTIONS,
    AbortRequest,
    AdoptRequest,
    CommitRequest,
    EndOfStream,
    LoadRequest,
    NameRequest,
    PersistRequest,
    PutOptions,
    ReadRequest,
    ShmRequest,
    Ticket,
    encode_schema,
    error_from_flight,
)
from .shm import SharedVersion, read_shared
from .units import DEFAULT_BATCH_ROWS

if TYPE_CHECKING:
    import pyarrow.compute as pc  # loaded where a filter is used: ~8 MiB an idle server does without

DEFAULT_URI = "grpc://127.0.0.1:8815"
Progress = Callable[[int, int], None]  # (rows, bytes) just transferred
T = TypeVar("T")


def default_uri() -> str:
    return os.environ.get("FLIGHTCACHE_URI") or DEFAULT_URI


def default_shm() -> bool:
    """Whether clients map same-host data from shared memory: yes unless $FLIGHTCACHE_SHM is 0, false or off."""
    return os.environ.get("FLIGHTCACHE_SHM", "").strip().lower() not in ("0", "false", "off", "no")


def connect(uri: str | None = None, **kwargs: Any) -> Client:
    """A client for the server at ``uri`` (default: $FLIGHTCACHE_URI, else grpc://127.0.0.1:8815).

    ``token=`` (default: $FLIGHTCACHE_TOKEN) or ``username=``/``password=`` authenticate; ``tls_ca=``
    (a PEM file or its bytes; default: $FLIGHTCACHE_TLS_CA) is the CA that signed a ``grpc+tls://``
    server's certificate, when it is not one the system trusts.
    """
    return Client(uri, **kwargs)


class Client:
    """Put, get, list, describe and drop datasets on a flightcache server.

    ``shm``: on the server's host, reads map the data from its shared memory instead of streaming it
    (default: on, unless $FLIGHTCACHE_SHM is 0); elsewhere they stream it as usual.
    """

    def __init__(
        self,
        uri: str | None = None,
        *,
        token: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | os.PathLike[str] | bytes | None = None,  # a PEM file, PEM text or bytes
        timeout: float | None = None,
        parallelism: int = 4,
        batch_rows: int = DEFAULT_BATCH_ROWS,
        shm: bool | None = None,
    ) -> None:
        self.uri = uri or default_uri()
        if username is not None and (password is None or token is not None):
            raise InvalidRequestError(f"user {username!r}: give a password, and no token")
        self.username, self.password = username, password
        self.token = token if token is not None or username is not None else os.environ.get("FLIGHTCACHE_TOKEN")
        if tls_ca is None and os.environ.get("FLIGHTCACHE_TLS_CA"):
            tls_ca = os.environ["FLIGHTCACHE_TLS_CA"]
        self.tls_ca = read_ca(tls_ca)
        self.timeout = timeout
        self.parallelism = max(1, parallelism)
        self.batch_rows = batch_rows
        self.shm = default_shm() if shm is None else shm
        self._conn: flight.FlightClient | None = None
        self._header: _Authorization | None = None  # the connection's authorization, renewed with its session
        self._pid = -1
        self._workers: ThreadPoolExecutor | None = None  # kept: fresh threads per get page-fault their memory in again
        self._no_shm_pid = -1  # the process in which shared memory proved unreachable
        self._no_adopt_pid = -1  # the process in which puts proved unable to write the server's shared memory
        self._peers: dict[str, Client] = {}  # clients of the other nodes of a cluster, by location
        self._peers_pid = -1

    # -- connection, pickling --------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "token": self.token,
            "username": self.username,
            "password": self.password,
            "tls_ca": self.tls_ca,
            "timeout": self.timeout,
            "parallelism": self.parallelism,
            "batch_rows": self.batch_rows,
            "shm": self.shm,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)  # type: ignore[misc]

    @property
    def flight(self) -> FlightClient:
        """The underlying ``pyarrow.flight.FlightClient`` (re-created after a fork)."""
        if self._conn is None or self._pid != os.getpid():
            self._workers = None  # a forked child has the pool object but none of its threads
            header = _Authorization(f"Bearer {self.token}" if self.token else None)
            try:
                credentials = [header] if self.token or self.username is not None else None
                conn = flight.connect(self.uri, tls_root_certs=self.tls_ca, middleware=credentials)
            except (pa.ArrowInvalid, ValueError) as e:
                raise InvalidRequestError(
                    f"invalid flightcache URI {self.uri!r}: {e}; use grpc://HOST:PORT or grpc+tls://HOST:PORT"
                ) from e
            if self.username is not None:
                self._open_session(conn, header)
            self._conn, self._header, self._pid = conn, header, os.getpid()
        return self._conn

    def _open_session(self, conn: FlightClient, header: _Authorization) -> None:
        """Basic auth the Flight way: a handshake answered with a bearer session token for later calls."""
        assert self.username is not None and self.password is not None
        try:
            _, bearer = conn.authenticate_basic_token(self.username, self.password, self._options())
        except pa.ArrowNotImplementedError:
            raise NotImplementedByServerError(
                f"the server at {self.uri} takes no credentials (it runs without --auth-token-file); "
                "connect without username and password"
            ) from None
        except flight.FlightError as e:
            raise error_from_flight(e, self.uri) from None
        header.value = bearer.decode()

    def _pool(self) -> ThreadPoolExecutor:
        """Threads for parallel endpoint reads, made on first use and again after a fork."""
        self.flight  # noqa: B018 -- notices a fork and resets the connection and the pool
        if self._workers is None:
            self._workers = ThreadPoolExecutor(self.parallelism, thread_name_prefix="flightcache-get")
        return self._workers

    def _options(self) -> FlightCallOptions:
        return flight.FlightCallOptions(timeout=self.timeout)

    def _redeem(self, endpoint: FlightEndpoint, call: Callable[[Client], T]) -> T:
        """``call`` on the client of the endpoint's location (a cluster node holding its part), else this one.

        A location that cannot be reached (its node just died) is read here instead: this server fetches the
        part from storage, or says why it cannot (protocol §4.3).
        """
        location = _location(endpoint)
        if location is None or location == self.uri:
            return self._call(lambda: call(self))
        try:
            peer = self._peer(location)
            return peer._call(lambda: call(peer))
        except ServerUnavailableError:
            return self._call(lambda: call(self))

    def _shared_part(self, endpoint: FlightEndpoint, filter: str | pc.Expression | None) -> pa.Table | None:
        """A cluster endpoint's part mapped from the shared memory of its node, when that node is on this
        host (projected and filtered here, as its do_get would); None: stream it."""
        if not self.shm:
            return None
        try:
            t = Ticket.from_bytes(endpoint.ticket.ticket)
        except InvalidRequestError:
            return None  # not a flightcache ticket: only its server can read it
        if t.part is None:
            return None
        location = _location(endpoint)
        node = self if location is None or location == self.uri else self._peer(location)
        try:
            shared = node.shared(t.part)
        except ServerUnavailableError:
            return None
        if shared is None:
            return None
        expression = filter
        if isinstance(filter, str):
            from .filters import parse_filter

            expression = parse_filter(filter)
        return shared.table(t.columns, expression, (t.start, t.end))

    def _peer(self, location: str) -> Client:
        """A client like this one (same credentials, TLS, timeout) for another node of the cluster."""
        with _PEERS_LOCK:
            if self._peers_pid != os.getpid():
                self._peers, self._peers_pid = {}, os.getpid()
            peer = self._peers.get(location)
            if peer is None:
                state = {**self.__getstate__(), "uri": location}
                peer = self._peers[location] = Client(**state)
            return peer

    def close(self) -> None:
        if self._pid == os.getpid():
            if self._conn is not None:
                self._conn.close()
            if self._workers is not None:
                self._workers.shutdown(wait=False)
        self._conn = None
        self._header = None
        self._workers = None
        for peer in self._peers.values():
            peer.close()
        self._peers = {}

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.uri!r})"

    def _call(self, fn: Callable[[], T], retry: bool = True) -> T:
        """``fn()`` with Flight errors as flightcache's. A basic-auth session that ended (it expired, or the
        server restarted) is opened again once and, with ``retry``, the call retried (only for calls that
        can run again from the start); tokens are the caller's to renew."""
        try:
            return fn()
        except flight.FlightError as e:
            error = error_from_flight(e, self.uri)
        if not isinstance(error, UnauthenticatedError) or self.username is None or self._header is None or not retry:
            raise error
        assert self._conn is not None
        self._open_session(self._conn, self._header)  # wrong credentials by now: raises that, plainly
        try:
            return fn()
        except flight.FlightError as e:
            raise error_from_flight(e, self.uri) from None

    # -- writing ---------------------------------------------------------------------------

    def put(
        self,
        name: str,
        data: Any,
        mode: str = "overwrite",
        *,
        persist: str | None = None,
        ttl: float | None = None,
        txn: str | None = None,
        progress: Progress | None = None,
        shm: bool | None = None,
    ) -> dict[str, Any]:
        """Store ``data`` as dataset ``name``; returns {name, version, rows, bytes}.

        ``data``: a pyarrow Table, RecordBatch or RecordBatchReader, a pandas or polars DataFrame,
        or anything that exports the Arrow C stream interface. ``mode``: ``overwrite`` (default),
        ``append`` (the schema must match) or ``create`` (fails if the name exists). The new version
        becomes visible only once every row has arrived. ``persist``: ``none`` (memory only),
        ``sync`` (returns once the Parquet version has committed to storage) or ``async`` (persisted
        in the background); default: the server's. ``ttl``: seconds in memory before the dataset is
        evicted (if persisted) or dropped (if memory-only). With ``txn``, the data is staged as one
        part of that transaction instead ({txn, part, rows, bytes} is returned) and becomes visible
        with the others at ``commit``. ``shm`` (default: the client's): on the server's host, a table
        is written straight into the server's shared memory and handed over (``flightcache.adopt``)
        instead of streamed; elsewhere, or for a stream or dictionary columns, it is streamed.
        """
        validate_name(name)
        source = _as_arrow(data)
        rows = source.num_rows if isinstance(source, pa.Table) else None
        if isinstance(source, pa.Table) and (self.shm if shm is None else shm):
            adopted = self._put_adopted(name, source, mode, persist=persist, ttl=ttl, txn=txn)
            if adopted is not None:
                if progress is not None:
                    progress(source.num_rows, source.nbytes)
                return adopted
        options = PutOptions(mode=mode, expect_rows=rows, txn=txn, persist=persist, ttl=ttl, trailer=True)
        if rows is None and self.username is not None:
            # A one-shot stream cannot be sent again if its session turns out to have ended mid-put:
            # a call that renews an ended session first.
            self._call(lambda: list(self.flight.list_actions(self._options())))

        def run() -> dict[str, Any]:
            reader = source.to_reader(max_chunksize=self.batch_rows) if isinstance(source, pa.Table) else source
            writer, results = self.flight.do_put(flight.FlightDescriptor.for_path(name), reader.schema, self._options())
            try:
                writer.write_metadata(options.to_bytes())
                sent = 0
                for batch in reader:
                    writer.write_batch(batch)
                    sent += batch.num_rows
                    if progress is not None:
                        progress(batch.num_rows, batch.nbytes)
                writer.write_metadata(EndOfStream(True, sent).to_bytes())
                writer.done_writing()
                answer = results.read()
            except BaseException:
                # Closing without the end-of-stream message makes the server publish nothing; the
                # caller sees what went wrong here, not the server's refusal that follows from it.
                with contextlib.suppress(flight.FlightError, pa.ArrowException):
                    writer.close()
                raise
            writer.close()
            result: dict[str, Any] = json.loads(answer.to_pybytes()) if answer is not None else {"name": name}
            return result

        return self._call(run, retry=rows is not None)  # a Table is streamed afresh by each attempt

    def _put_adopted(
        self, name: str, table: pa.Table, mode: str, *, persist: str | None, ttl: float | None, txn: str | None
    ) -> dict[str, Any] | None:
        """Put ``table`` by writing it into the server's shared memory (same host); None: stream it instead."""
        from .arrowtypes import schema_contains
        from .shm import NONCE_KEY

        if self._no_adopt_pid == os.getpid() or schema_contains(table.schema, pa.types.is_dictionary):
            return None
        try:
            ticket = self._action("adopt", AdoptRequest(name, nbytes=table.nbytes))
        except InvalidRequestError:  # a server that predates adoption: unknown action
            self._no_adopt_pid = os.getpid()
            return None
        except UnauthorizedError:
            return None  # the streamed put is refused in its own words ("put of dataset ... needs the write role")
        path = ticket.get("path")
        if path is None or not os.path.isdir(os.path.dirname(path)):
            self._no_adopt_pid = os.getpid()  # shared memory off, or another host: stream from now on
            return None
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        except OSError:  # not the server's user (its directory is not ours to write)
            self._no_adopt_pid = os.getpid()
            return None
        try:
            try:  # the file exists with its mode (in a directory only the server's user writes): Arrow opens it
                with (
                    pa.OSFile(path, "w") as sink,
                    pa.ipc.new_file(sink, table.schema, metadata={NONCE_KEY: ticket["nonce"].encode()}) as writer,
                ):
                    for batch in table.to_batches(max_chunksize=self.batch_rows):
                        writer.write_batch(batch)
            except OSError as e:
                raise MemoryFullError(
                    f"put of dataset {name!r}: cannot write to the server's shared memory {path} ({e}); "
                    "free space in /dev/shm, or put with shm=False"
                ) from e
            request = AdoptRequest(name, path=path, rows=table.num_rows, mode=mode, txn=txn, persist=persist, ttl=ttl)
            return self._action("adopt", request)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # adopted files have another name by now: this removes only a refused one

    def commit(
        self,
        txn: str,
        name: str,
        mode: str = "overwrite",
        *,
        parts: list[str] | None = None,
        schema: pa.Schema | None = None,
        persist: str | None = None,
        ttl: float | None = None,
    ) -> dict[str, Any]:
        """Publish the parts staged under ``txn`` (all, or those listed) as one version of ``name``."""
        request = CommitRequest(
            txn, validate_name(name), mode, parts, encode_schema(schema) if schema else None, persist, ttl
        )
        return self._action("commit", request)

    def abort(self, txn: str) -> dict[str, Any]:
        """Discard the parts staged under ``txn``."""
        return self._action("abort", AbortRequest(txn))

    # -- reading ---------------------------------------------------------------------------

    def flight_info(
        self,
        name: str,
        columns: list[str] | None = None,
        filter: str | pc.Expression | None = None,
        version: int | None = None,
        endpoints: int | None = None,
    ) -> FlightInfo:
        """The FlightInfo (schema, rows, endpoints) of a read of ``name``; ``endpoints``: at least that many
        where the dataset has enough batches (the server otherwise splits by size)."""
        validate_name(name)
        if columns is None and filter is None and version is None and endpoints is None:
            descriptor = flight.FlightDescriptor.for_path(name)
        else:
            request = ReadRequest(
                name, list(columns) if columns is not None else None, version=version, endpoints=endpoints
            )
            if filter is not None and not isinstance(filter, str):
                import pyarrow.compute as pc  # loaded already by whoever built an Expression

                if not isinstance(filter, pc.Expression):
                    raise TypeError(f"filter must be a string or a pyarrow compute Expression, not {filter!r}")
                full = self._call(
                    lambda: self.flight.get_flight_info(flight.FlightDescriptor.for_path(name), self._options())
                )
                if version is None:
                    version = Ticket.from_bytes(full.endpoints[0].ticket.ticket).version
                encoded = base64.b64encode(filter.to_substrait(full.schema)).decode()
                request = ReadRequest(
                    name, request.columns, filter_substrait=encoded, version=version, endpoints=endpoints
                )
            elif filter is not None:
                from .filters import parse_filter

                parse_filter(str(filter))  # a syntax error is reported before any round trip
                request = ReadRequest(name, request.columns, filter=str(filter), version=version, endpoints=endpoints)
            descriptor = flight.FlightDescriptor.for_command(request.to_bytes())
        return self._call(lambda: self.flight.get_flight_info(descriptor, self._options()))

    def get(
        self,
        name: str,
        columns: list[str] | None = None,
        filter: str | pc.Expression | None = None,
        *,
        version: int | None = None,
        progress: Progress | None = None,
    ) -> pa.Table:
        """Read dataset ``name`` as a pyarrow Table, fetching its endpoints in parallel.

        ``columns`` projects; ``filter`` is a pyarrow compute expression or the string form
        (``"status >= 500 and method == 'GET'"``, see ``flightcache.filters``), applied on the server, or
        here on a zero-copy mapping when the client shares the server's host (see ``shm``).
        """
        table = self._read_shared(name, columns, filter, version)
        if table is not None:
            if progress is not None:
                progress(table.num_rows, table.nbytes)
            return table
        info = self.flight_info(name, columns, filter, version)

        def fetch(endpoint: flight.FlightEndpoint) -> pa.Table:
            table = self._shared_part(endpoint, filter)
            if table is None:
                table = self._redeem(endpoint, lambda c: c.flight.do_get(endpoint.ticket, c._options()).read_all())
            if progress is not None:
                progress(table.num_rows, table.nbytes)
            return table

        endpoints = list(info.endpoints)
        if len(endpoints) == 1:
            tables = [fetch(endpoints[0])]
        else:
            tables = list(self._pool().map(fetch, endpoints))
        return pa.concat_tables(tables) if tables else info.schema.empty_table()

    def stream(
        self,
        name: str,
        columns: list[str] | None = None,
        filter: str | pc.Expression | None = None,
        *,
        version: int | None = None,
    ) -> Iterator[pa.RecordBatch]:
        """Yield the record batches of a read one endpoint after another (bounded memory)."""
        table = self._read_shared(name, columns, filter, version)
        if table is not None:
            yield from table.to_batches()
            return
        info = self.flight_info(name, columns, filter, version)
        for endpoint in info.endpoints:
            stream = self._redeem(endpoint, functools.partial(_do_get, endpoint))
            while True:
                try:
                    chunk = self._call(stream.read_chunk)
                except StopIteration:
                    break
                if chunk.data is not None:
                    yield chunk.data

    def shared(self, name: str, version: int | None = None) -> SharedVersion | None:
        """A version mapped zero-copy from the server's shared memory; None when this client cannot map
        it (another host, shared memory off, the file gone): then read it with ``get`` or ``do_get``."""
        if not self.shm or self._no_shm_pid == os.getpid():
            return None
        try:
            answer = self._action("shm", ShmRequest(validate_name(name), version))
        except InvalidRequestError:  # a server that predates shared-memory reads: unknown action
            self._no_shm_pid = os.getpid()
            return None
        if answer["files"] is None:
            if not answer.get("enabled", True):
                self._no_shm_pid = os.getpid()  # the server keeps nothing in shared memory
            return None
        shared = read_shared(answer)
        if shared is None and answer["files"] and not os.path.isdir(os.path.dirname(answer["files"][0]["path"])):
            self._no_shm_pid = os.getpid()  # another host (or /dev/shm namespace): stream from now on
        return shared

    def _read_shared(
        self, name: str, columns: list[str] | None, filter: str | pc.Expression | None, version: int | None
    ) -> pa.Table | None:
        expression = filter
        if isinstance(filter, str):
            from .filters import parse_filter

            expression = parse_filter(filter)  # a syntax error is reported before any call
        shared = self.shared(name, version)
        if shared is None:
            return None
        try:
            return shared.table(columns, expression)
        except (pa.ArrowException, KeyError):
            return None  # an unknown column or a filter that does not bind: the server words the error

    def to_pandas(
        self, name: str, columns: list[str] | None = None, filter: str | pc.Expression | None = None, **kwargs: Any
    ) -> Any:
        """Read a dataset into a pandas DataFrame (keyword arguments go to ``Table.to_pandas``)."""
        return self.get(name, columns, filter).to_pandas(**kwargs)

    def to_polars(self, name: str, columns: list[str] | None = None, filter: str | pc.Expression | None = None) -> Any:
        """Read a dataset into a polars DataFrame."""
        import polars as pl

        return pl.from_arrow(self.get(name, columns, filter))

    # -- catalog ---------------------------------------------------------------------------

    # "list" is the one action whose answer is a JSON array; a Literal overload of str "overlaps" by design.
    @overload
    def _action(self, kind: Literal["list", "nodes"]) -> builtins.list[dict[str, Any]]: ...  # type: ignore[overload-overlap]

    @overload
    def _action(
        self, kind: str, request: Any = None, on_progress: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]: ...

    def _action(
        self,
        kind: str,
        request: Any = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """Call the action ``kind`` of ``protocol.ACTIONS`` with its request message (None: an empty body)."""
        spec = ACTIONS[kind]
        if spec.request is not None and not isinstance(request, spec.request):
            raise TypeError(f"action {kind!r} takes a {spec.request.__name__}, got {type(request).__name__}")
        payload = request.to_bytes() if request is not None else b""

        def run() -> Any:
            answer = None
            for result in self.flight.do_action(flight.Action(kind, payload), self._options()):
                answer = json.loads(result.body.to_pybytes())
                if isinstance(answer, dict) and "progress" in answer and on_progress is not None:
                    on_progress(answer["progress"])
            return answer

        return self._call(run)

    def load(
        self,
        name: str,
        uri: str,
        mode: str = "overwrite",
        *,
        persist: str | None = None,
        ttl: float | None = None,
        progress: Callable[[int, int], None] | None = None,
        refresh: str | float | None = None,
        refresh_min_interval: float | None = None,
    ) -> dict[str, Any]:
        """Have the server load external Parquet (a file or a directory, hive partitions too) as ``name``.

        ``uri``: any pyarrow filesystem URI the server can reach (``s3://bucket/path/``, a path), or an
        Iceberg table ``iceberg://CATALOG/NAMESPACE.TABLE`` (a catalog of pyiceberg's configuration on the
        server). ``progress(files_done, files)`` is called as the server reads the files, in parallel.
        ``refresh``: how the dataset follows its source: ``"manual"`` (default: only ``refresh()``),
        ``"on-read"`` (a read checks first, at most once per ``refresh_min_interval`` seconds, default 5)
        or a period in seconds (the server checks in the background).
        """
        request = LoadRequest(validate_name(name), uri, mode, persist, ttl, refresh, refresh_min_interval)
        report = (lambda p: progress(p["files_done"], p["files"])) if progress is not None else None
        return self._action("load", request, on_progress=report)

    def refresh(self, name: str) -> dict[str, Any]:
        """Check a loaded dataset's source now: new files are appended, changed or removed ones reloaded.

        Returns ``{"name", "refreshed": "none"|"incremental"|"full", "version", "files_added", "bytes_read"}``;
        a failed check raises (the server keeps the version it holds and marks the dataset stale).
        """
        return self._action("refresh", NameRequest(validate_name(name)))

    def persist(self, name: str, wait: bool = True) -> dict[str, Any]:
        """Persist a dataset's current version to storage now; with ``wait``, return once committed."""
        return self._action("persist", PersistRequest(validate_name(name), wait))

    def pin(self, name: str) -> dict[str, Any]:
        """Keep a dataset in memory: it is never evicted."""
        return self._action("pin", NameRequest(validate_name(name)))

    def unpin(self, name: str) -> dict[str, Any]:
        """Let a pinned dataset be evicted again."""
        return self._action("unpin", NameRequest(validate_name(name)))

    def evict(self, name: str) -> dict[str, Any]:
        """Free the memory of a persisted dataset; it stays in storage and loads on the next read."""
        return self._action("evict", NameRequest(validate_name(name)))

    def list(self) -> list[dict[str, Any]]:
        """Every dataset's info (name, version, rows, bytes, schema, times)."""
        return self._action("list")

    def info(self, name: str) -> dict[str, Any]:
        """One dataset's schema, rows, bytes, version, created and last-read times."""
        return self._action("info", NameRequest(validate_name(name)))

    def drop(self, name: str) -> dict[str, Any]:
        """Remove a dataset from the cache."""
        return self._action("drop", NameRequest(validate_name(name)))

    def stats(self) -> dict[str, Any]:
        """Server figures: memory used and limit, datasets, request counters."""
        return self._action("stats")

    def nodes(self) -> builtins.list[dict[str, Any]]:
        """The live members of the server's cluster (id, location, host, memory, load, state); a single
        server answers one entry, with no location."""
        return self._action("nodes")

    def healthcheck(self) -> dict[str, Any]:
        """The server's health: status (ok or draining), version, uptime, memory, datasets, pending persists."""
        return self._action("healthcheck")

    def ping(self) -> dict[str, Any]:
        """``healthcheck`` plus ``latency_s``; ServerUnavailableError if unreachable, too slow or draining."""
        started = time.perf_counter()
        try:
            health = self.healthcheck()
        except flight.FlightTimedOutError:
            raise ServerUnavailableError(
                f"the flightcache server at {self.uri} did not answer within {self.timeout} s"
            ) from None
        if health["status"] != "ok":
            raise ServerUnavailableError(f"the flightcache server at {self.uri} is {health['status']}: shutting down")
        return {**health, "latency_s": round(time.perf_counter() - started, 6)}

    # -- SQL -------------------------------------------------------------------------------

    def sql(
        self,
        query: str,
        params: builtins.list[Any] | tuple[Any, ...] | dict[str, Any] | None = None,
        *,
        into: str | None = None,
        mode: str = "overwrite",
        persist: str | None = None,
        ttl: float | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Run ``query`` on the server (DuckDB, every dataset a table by its name) and return a pyarrow Table.

        Quote names with ``/``: ``SELECT status, count(*) FROM "logs/raw" GROUP BY ALL``. ``params`` fill
        ``?`` / ``$1`` (a list) or ``$name`` (a dict) with strings, numbers, booleans or None. With ``into``,
        the result is stored as that dataset instead (``mode``, ``persist`` and ``ttl`` as in ``put``) and
        {name, version, rows, bytes} is returned. ``timeout`` (seconds) shortens the server's limit. A failed
        query raises ``SqlError`` with DuckDB's message.
        """
        from .flightsql import SqlRequest

        if into is None:
            with self.sql_reader(query, params, timeout=timeout) as reader:
                return reader.read_all()
        request = SqlRequest(query, self._sql_params(params), validate_name(into), mode, persist, ttl, timeout)
        return self._action("sql", request)

    def sql_reader(
        self,
        query: str,
        params: builtins.list[Any] | tuple[Any, ...] | dict[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run ``query`` and stream its result: a ``SqlReader`` (``schema``, iteration over record batches,
        ``read_all()``); its ``cancel()``, from any thread, interrupts the query on the server."""
        from .flightsql import SqlReader, SqlRequest

        command = SqlRequest(query, self._sql_params(params), timeout=timeout).to_command()
        info = self._call(
            lambda: self.flight.get_flight_info(flight.FlightDescriptor.for_command(command), self._options())
        )
        stream = self._call(lambda: self.flight.do_get(info.endpoints[0].ticket, self._options()))
        return SqlReader(stream, self.uri)

    @staticmethod
    def _sql_params(params: Any) -> builtins.list[Any] | dict[str, Any] | None:
        if params is None or isinstance(params, (list, dict)):
            return params
        if isinstance(params, tuple):
            return list(params)
        raise InvalidRequestError(f"sql params must be a list, tuple or dict, got {type(params).__name__}")


class _Authorization(flight.ClientMiddlewareFactory):
    """Sends ``authorization: <value>`` on every call, including those made on ``Client.flight`` directly."""

    def __init__(self, value: str | None) -> None:
        super().__init__()
        self.value = value

    def start_call(self, info: flight.CallInfo) -> flight.ClientMiddleware | None:
        return _Header(self.value) if self.value else None


class _Header(flight.ClientMiddleware):
    def __init__(self, value: str) -> None:
        super().__init__()
        self.value = value

    def sending_headers(self) -> dict[str, str]:
        return {"authorization": self.value}


def read_ca(ca: str | os.PathLike[str] | bytes | None) -> bytes | None:
    """PEM bytes of a CA certificate given as bytes, PEM text or a file path (read once, here: a
    pickled client then needs no copy of the file)."""
    if not ca:
        return None
    if isinstance(ca, bytes):
        return ca
    if isinstance(ca, str) and ca.lstrip().startswith("-----BEGIN"):
        return ca.encode()
    try:
        with open(ca, "rb") as f:
            return f.read()
    except OSError as e:
        raise InvalidRequestError(f"cannot read the TLS CA certificate {os.fspath(ca)!r}: {e.strerror}") from e


def _as_arrow(data: Any) -> pa.Table | pa.RecordBatchReader:
    """``data`` as a Table (its rows known up front, streamable again) or a one-shot RecordBatchReader."""
    if isinstance(data, pa.RecordBatch):
        data = pa.Table.from_batches([data])
    if not isinstance(data, (pa.Table, pa.RecordBatchReader)):
        module = type(data).__module__.split(".")[0]
        if module == "pandas":
            data = pa.Table.from_pandas(data, preserve_index=False)
        elif module == "polars":
            data = data.to_arrow()
        elif hasattr(data, "__arrow_c_stream__"):
            data = pa.RecordBatchReader.from_stream(data)
        else:
            raise InvalidRequestError(
                f"cannot put a {type(data).__name__}: give a pyarrow Table, RecordBatch or "
                "RecordBatchReader, or a pandas or polars DataFrame"
            )
    return data


_PEERS_LOCK = threading.Lock()


def _do_get(endpoint: FlightEndpoint, client: Client) -> flight.FlightStreamReader:
    return client.flight.do_get(endpoint.ticket, client._options())


def _location(endpoint: FlightEndpoint) -> str | None:
    """The first location of an endpoint, as a URI; None: redeem at the server that answered."""
    if not endpoint.locations:
        return None
    uri = endpoint.locations[0].uri
    return uri.decode() if isinstance(uri, bytes) else str(uri)
