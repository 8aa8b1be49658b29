"""Walking nested Arrow types, for the client and the server alike."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa


def contains(t: pa.DataType, predicate: Callable[[pa.DataType], bool]) -> bool:
    """Whether ``t`` or any type nested in it (struct fields, list values, map keys and items) is one
    ``predicate`` accepts."""
    return predicate(t) or any(contains(t.field(i).type, predicate) for i in range(t.num_fields))


def schema_contains(schema: pa.Schema, predicate: Callable[[pa.DataType], bool]) -> bool:
    return any(contains(f.type, predicate) for f in schema)
