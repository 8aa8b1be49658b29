"""Dataset names: the grammar the client, the server and storage all check.

Names are paths of lowercase segments (``logs/2026-11-24/parsed``); a segment like ``v12`` or
``v12-0af3c9d1`` is reserved because storage keeps version 12 of a dataset in ``<name>/v12-<writer>/``.
"""

from __future__ import annotations

import re

from .errors import InvalidNameError

MAX_NAME_LENGTH = 200
_SEGMENT = r"[a-z0-9_][a-z0-9_.\-]*"
_NAME_RE = re.compile(rf"{_SEGMENT}(/{_SEGMENT})*")
VERSION_SEGMENT = r"v([0-9]+)(?:-([0-9a-f]{1,32}))?"  # storage keeps version N in <name>/vN-<writer>/ (or vN/)
_RESERVED = re.compile(VERSION_SEGMENT)
NAME_GRAMMAR = (
    "lowercase letters, digits, '_', '.' and '-', with '/' between namespace segments; "
    "each segment starts with a letter, digit or '_' and is not 'v' followed by digits (and '-' and hex digits); "
    "at most 200 characters "
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
