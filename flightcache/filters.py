"""The string form of row filters, for the CLI and plain Flight clients.

A filter is a Python-style boolean expression over column names and literals, parsed (never
evaluated) into a ``pyarrow.compute`` expression:

    status >= 500 and method == 'GET'
    country in ('DE', 'FR') or not (bytes < 1024)
    user_id is not None and 0 < latency_ms <= 250

Operators: ``== != < <= > >=``, ``in`` / ``not in`` a tuple or list of literals, ``is None`` /
``is not None``, ``and``, ``or``, ``not``, parentheses. Literals: numbers, strings, True, False,
None. Column names that are not Python identifiers are written ``col('name with spaces')``.
"""

from __future__ import annotations

import ast
import operator
from typing import Any

import pyarrow.compute as pc

from .errors import InvalidRequestError

MAX_FILTER_LENGTH = 10_000
_COMPARE = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}


def parse_filter(text: str) -> pc.Expression:
    """Parse the string form into a pyarrow compute expression; InvalidRequestError if malformed."""
    if len(text) > MAX_FILTER_LENGTH:
        raise InvalidRequestError(f"filter is longer than {MAX_FILTER_LENGTH} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise InvalidRequestError(
            f"cannot parse filter {text!r}: {e.msg}; example: \"status >= 500 and method == 'GET'\""
        ) from e
    try:
        return _expr(tree.body)
    except RecursionError as e:
        raise InvalidRequestError(f"filter {text[:80]!r} is nested too deeply") from e
    except _Unsupported as e:
        raise InvalidRequestError(f"unsupported filter {text!r}: {e}; see 'flightcache get --help'") from e


class _Unsupported(Exception):
    pass


def _expr(node: ast.expr) -> pc.Expression:
    if isinstance(node, ast.BoolOp):
        parts = [_expr(v) for v in node.values]
        result = parts[0]
        for p in parts[1:]:
            result = (result & p) if isinstance(node.op, ast.And) else (result | p)
        return result
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_expr(node.operand)
    if isinstance(node, ast.Compare):
        terms = [node.left, *node.comparators]
        result = None
        for left, op, right in zip(terms, node.ops, terms[1:], strict=False):
            part = _comparison(left, op, right)
            result = part if result is None else result & part
        assert result is not None
        return result
    if isinstance(node, (ast.Name, ast.Call)):  # a bare boolean column
        return _operand(node)
    raise _Unsupported(f"'{ast.unparse(node)}' is not a comparison")


def _comparison(left: ast.expr, op: ast.cmpop, right: ast.expr) -> pc.Expression:
    if isinstance(op, (ast.Is, ast.IsNot)):
        if not (isinstance(right, ast.Constant) and right.value is None):
            raise _Unsupported("'is' only compares with None")
        test = _operand(left).is_null()
        return test if isinstance(op, ast.Is) else ~test
    if isinstance(op, (ast.In, ast.NotIn)):
        if not isinstance(right, (ast.Tuple, ast.List, ast.Set)):
            raise _Unsupported("'in' takes a tuple or list of literals, e.g. status in (404, 500)")
        test = _operand(left).isin([_literal(e) for e in right.elts])
        return test if isinstance(op, ast.In) else ~test
    fn = _COMPARE.get(type(op))
    if fn is None:
        raise _Unsupported(f"operator {type(op).__name__} is not supported")
    return fn(_operand(left), _operand(right))


def _operand(node: ast.expr) -> Any:
    if isinstance(node, ast.Name):
        return pc.field(node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "col":
        if (
            len(node.args) == 1
            and not node.keywords
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            return pc.field(node.args[0].value)
        raise _Unsupported("col() takes one string, the column name")
    return pc.scalar(_literal(node))


def _literal(node: ast.expr) -> Any:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = _literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value
    elif isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool, type(None))):
        return node.value
    raise _Unsupported(f"'{ast.unparse(node)}' is not a column or a literal")
