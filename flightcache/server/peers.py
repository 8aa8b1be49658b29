"""Calls from one cluster node to another, over Flight, with the same token and TLS as any client.

A node reads a part another node holds (a client redeemed the ticket at the wrong node, or SQL needs
it) and asks the part's node to persist, pin or describe it. Errors come back as the flightcache
exception the other node raised (``protocol.error_from_flight``), so they reach the client unchanged.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from ..errors import ServerUnavailableError
from ..protocol import error_from_flight


class Peers:
    """One Flight connection per other node, made on first use and dropped when it fails."""

    def __init__(self, token: str | None = None, tls_ca: bytes | None = None, timeout: float = 30.0) -> None:
        headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self._options = flight.FlightCallOptions(headers=headers, timeout=timeout)
        self._stream_options = flight.FlightCallOptions(headers=headers)  # a long read has no deadline
        self._tls_ca = tls_ca
        self._clients: dict[str, flight.FlightClient] = {}
        self._lock = threading.Lock()

    def _client(self, location: str) -> flight.FlightClient:
        with self._lock:
            client = self._clients.get(location)
            if client is None:
                options: dict[str, Any] = {}
                if location.startswith("grpc+tls") and self._tls_ca is not None:
                    options["tls_root_certs"] = self._tls_ca
                client = self._clients[location] = flight.connect(location, **options)
            return client

    def _forget(self, location: str) -> None:
        with self._lock:
            client = self._clients.pop(location, None)
        if client is not None:
            client.close()

    def do_get(self, location: str, ticket: bytes) -> flight.FlightStreamReader:
        try:
            return self._client(location).do_get(flight.Ticket(ticket), self._stream_options)
        except flight.FlightError as e:
            raise self._error(location, e) from e

    def read_all(self, location: str, ticket: bytes) -> pa.Table:
        try:
            return self.do_get(location, ticket).read_all()
        except flight.FlightError as e:  # failed mid-stream
            raise self._error(location, e) from e

    def action(self, location: str, kind: str, body: dict[str, Any]) -> Any:
        """The JSON answer of action ``kind`` on the node at ``location``."""
        try:
            call = flight.Action(kind, json.dumps(body).encode())
            results = list(self._client(location).do_action(call, self._options))
        except flight.FlightError as e:
            raise self._error(location, e) from e
        return json.loads(results[0].body.to_pybytes()) if results else None

    def _error(self, location: str, e: flight.FlightError) -> Exception:
        error = error_from_flight(e, location)
        if isinstance(error, ServerUnavailableError) or isinstance(e, flight.FlightUnavailableError):
            self._forget(location)
            return ServerUnavailableError(f"cluster node at {location} is unreachable: {error}")
        return error

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
