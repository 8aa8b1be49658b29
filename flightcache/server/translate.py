"""The one place where an exception becomes the Flight error a client sees: handlers and streams alike.

A handler's exception is translated by the ``translated`` decorator of ``flight.FlightcacheServer``; one
raised while a stream is being sent (a filter failing on a value, a SQL query failing mid-result) is
translated by ``translated_stream``, whose batches Flight sends through a ``GeneratorStream``: measured
with pyarrow 26, an error raised under a ``RecordBatchStream`` reaches the client without its
``extra_info`` (so without the code ``protocol.error_from_flight`` maps back to the exception).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

import pyarrow.flight as flight

from ..errors import FlightcacheError, SqlError
from ..protocol import error_to_flight

log = logging.getLogger("flightcache.server")

_SQL_ERROR_INFO = b'{"code":"SQL_ERROR"}'
T = TypeVar("T")


def flight_error(where: str, e: BaseException) -> flight.FlightError:
    """The Flight error for ``e`` raised in ``where`` (a handler's name): its code in ``extra_info``."""
    if isinstance(e, SqlError):
        # DuckDB's message unchanged, as DuckDB gives it locally; the class tells a timeout and a cancellation.
        cls: type[flight.FlightError] = getattr(e, "flight_class", flight.FlightServerError)
        return cls(str(e), extra_info=_SQL_ERROR_INFO)
    if isinstance(e, FlightcacheError):
        return error_to_flight(e)  # the request log line has its code and message
    if isinstance(e, flight.FlightError):
        return e
    log.error("%s failed", where, exc_info=e)
    return flight.FlightInternalError(
        f"[INTERNAL] internal server error in {where} ({type(e).__name__}: {e}); see the server log",
        extra_info=b'{"code":"INTERNAL"}',
    )


def translated_stream(where: str, batches: Iterable[T]) -> Iterator[T]:
    """``batches`` (record batches or tables), with an error raised while producing them translated like a
    handler's."""
    try:
        yield from batches
    except Exception as e:
        raise flight_error(where, e) from None
