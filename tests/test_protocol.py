"""Wire messages and the string filter form, without a server."""

from __future__ import annotations

import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest

from flightcache.errors import InvalidRequestError
from flightcache.filters import parse_filter
from flightcache.protocol import (
    ACTIONS,
    CORE,
    READ,
    WRITE,
    WRITE_ACTIONS,
    NameRequest,
    PutOptions,
    ReadRequest,
    Ticket,
    descriptor_name,
)


@pytest.mark.parametrize(
    "message",
    [
        ReadRequest("a/b"),
        ReadRequest("a", columns=["x", "y"], filter="x > 1", version=3),
        ReadRequest("a", filter_substrait="AAAA"),
        Ticket("a", 1, 0, 5),
        Ticket("a", 7, 2, 3, columns=["x"], filter="x is None"),
        PutOptions(),
        PutOptions(name="a", mode="append", expect_rows=10),
    ],
)
def test_messages_round_trip(message: object) -> None:
    assert type(message).from_bytes(message.to_bytes()) == message  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00",
        b"null",
        b"1",
        b'"s"',
        b"[1]",
        b'{"v": 99, "name": "a"}',
        b'{"name": 1}',
        b'{"name": "a", "columns": [1]}',
        b'{"name": "a", "columns": "x"}',
        b'{"name": "a", "version": 1.5}',
        b'{"name": "a", "version": false}',
        b'{"name": "a", "extra": 1}',
        b"{}",
        b"x" * 70_000,
    ],
)
def test_hostile_read_requests_refused(raw: bytes) -> None:
    with pytest.raises(InvalidRequestError):
        ReadRequest.from_bytes(raw)


def test_put_options_reject_bool_for_int() -> None:
    with pytest.raises(InvalidRequestError, match="expect_rows"):
        PutOptions.from_bytes(b'{"expect_rows": true}')


def test_action_bodies() -> None:
    """A one-dataset action takes {"name": ...} or the bare name; anything else is refused."""
    assert NameRequest.from_bytes(b'{"name": "a/b"}').name == "a/b"
    assert NameRequest.from_bytes(b"a/b").name == "a/b"
    for bad in (b'{"name": "a", "x": 1}', b'{"name": 1}', b"\xff"):
        with pytest.raises(InvalidRequestError):
            NameRequest.from_bytes(bad)
    with pytest.raises(InvalidRequestError, match="empty body"):
        ACTIONS["list"].decode(b"x")


def test_every_action_is_declared_once_with_role_and_handler() -> None:
    """The registry is the one list: the server has a handler for each core action, and nothing else."""
    from flightcache.server.flight import FlightcacheServer

    handlers = {n.removeprefix("_do_") for n in dir(FlightcacheServer) if n.startswith("_do_")}
    assert handlers == {name for name, a in ACTIONS.items() if a.service == CORE}
    writes = {"drop", "load", "refresh", "persist", "pin", "unpin", "evict", "commit", "abort", "adopt", "sql"}
    assert writes == WRITE_ACTIONS
    for a in ACTIONS.values():
        assert a.role in (READ, WRITE) and "Body:" in a.describe() and "Role:" in a.describe()


def test_descriptors() -> None:
    assert descriptor_name(flight.FlightDescriptor.for_path("a/b")) == ("a/b", None)
    command = b'{"name": "a", "mode": "append"}'
    assert descriptor_name(flight.FlightDescriptor.for_command(command)) == ("a", command)
    with pytest.raises(InvalidRequestError, match="exactly one path element"):
        descriptor_name(flight.FlightDescriptor.for_path("a", "b"))
    with pytest.raises(InvalidRequestError, match="name"):
        descriptor_name(flight.FlightDescriptor.for_command(b'{"mode": "x"}'))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("a > 1", pc.field("a") > 1),
        ("a >= 1 and b == 'x'", (pc.field("a") >= 1) & (pc.field("b") == "x")),
        ("not a < 0 or b != 'y'", (~(pc.field("a") < 0)) | (pc.field("b") != "y")),
        ("a in (1, 2)", pc.field("a").isin([1, 2])),
        ("a not in [1]", ~pc.field("a").isin([1])),
        ("a is None", pc.field("a").is_null()),
        ("a is not None", ~pc.field("a").is_null()),
        ("0 < a <= 5", (pc.scalar(0) < pc.field("a")) & (pc.field("a") <= 5)),
        ("col('odd name') == -2.5", pc.field("odd name") == -2.5),
        ("flag", pc.field("flag")),
    ],
)
def test_filter_strings_parse(text: str, expected: pc.Expression) -> None:
    assert parse_filter(text).equals(expected)


@pytest.mark.parametrize(
    "text",
    [
        "a >",
        "a + 1 > 2",
        "f(a) == 1",
        "a is 1",
        "a in b",
        "a == -'x'",
        "__import__('os').system('x')",
        "lambda: 1",
        "(" * 5000 + "a" + ")" * 5000,
        "a" * 10_001,
    ],
)
def test_bad_filter_strings_refused(text: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_filter(text)
