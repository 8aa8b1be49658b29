"""Dataset names: the grammar the client, the server and storage all check.

Names are paths of lowercase segments (``logs/2026-11-24/parsed``); a segment like ``v12`` is reserved
because storage keeps version 12 of a dataset in ``<name>/v12/``.
"""

from __future__ import annotations

import re

from .errors import InvalidNameError

MAX_NAME_LENGTH = 200
_SEGMENT = r"[a-z0-9_][a-z0-9_.\-]*"
_NAME_RE = re.compile(rf"{_SEGMENT}(/{_SEGMENT})*")
_RESERVED = re.compile(r"v[0-9]+")  # storage keeps version N of a dataset in <name>/vN/
NAME_GRAMMAR = (
    "lowercase letters, digits, '_', '.' and '-', with '/' between namespace segments; "
    "each segment starts with a letter, digit or '_' and is not 'v' followed by digits; at most 200 characters "
    "(for example 'logs/2026-11-24/parsed')"
)


def validate_name(name: object) -> str:
    """Return ``name`` if it follows the dataset-name grammar, else raise InvalidNameError."""
    if not isinstance(name, str) or not name:
        raise InvalidNameError(f"dataset name must be a non-empty string, got {name!r}: use {NAME_GRAMMAR}")
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(f"invalid dataset name {name!r}: use {NAME_GRAMMAR}")
    if any(_RESERVED.fullmatch(segment) for segment in name.split("/")):
        raise InvalidNameError(f"invalid dataset name {name!r}: segments like 'v12' name stored versions")
    return name
