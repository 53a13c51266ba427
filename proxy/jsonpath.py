"""A small, strict JSONPath subset for ``accept`` and ``validate``: compiled once at load.

Supported (RFC 9535 syntax, singular queries only — each path names at most one value)::

    $                    the whole document
    $.name               member by name ([A-Za-z_][A-Za-z0-9_-]*)
    $["any key"]         member by quoted name ('...' or "..."; JSON escapes, \\uXXXX too)
    $[0]  $.items[-1]    array element by index (negative counts from the end)

Chains combine freely: ``$.choices[0].message.content``, ``$["data"]["confidence"]``.
Wildcards, slices, filters and recursive descent are refused at load: a condition on a reply
must point at one value, and a typo must fail ``check``, not every request.

Why not a library: ``jsonpath-ng`` (PLY parser) and ``jsonpath-rfc9535`` answer node lists
for full queries; ``accept``/``validate`` only ever need one value per path, and this subset
is ~100 lines with no dependency, precompiled into a tuple of steps that cost a dict or list
lookup each on the hot path.
"""

from __future__ import annotations

import re
from typing import Any, Final

__all__ = ["MISSING", "JsonPath", "compile_path"]


class _Missing:
    """The path does not resolve (distinct from a JSON ``null``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_INDEX = re.compile(r"-?(?:0|[1-9][0-9]*)")
_HEX4 = re.compile(r"\\u([0-9A-Fa-f]{4})")
_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "/": "/", "b": "\b", "f": "\f", "n": "\n",
            "r": "\r", "t": "\t"}


class JsonPath:
    """A compiled path: ``find(doc)`` returns the value or :data:`MISSING`."""

    __slots__ = ("expr", "steps")

    def __init__(self, expr: str, steps: tuple[str | int, ...]) -> None:
        self.expr = expr
        #: str = object member, int = array index
        self.steps = steps

    def find(self, doc: Any) -> Any:
        node = doc
        for step in self.steps:
            if isinstance(step, str):
                if not isinstance(node, dict):
                    return MISSING
                node = node.get(step, MISSING)
                if node is MISSING:
                    return MISSING
            else:
                if not isinstance(node, list):
                    return MISSING
                if not -len(node) <= step < len(node):
                    return MISSING
                node = node[step]
        return node

    def __repr__(self) -> str:
        return f"JsonPath({self.expr!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JsonPath) and other.steps == self.steps

    def __hash__(self) -> int:
        return hash(self.steps)


def compile_path(expr: str) -> JsonPath:
    """Compile ``expr``; raises ``ValueError`` naming the position of the first problem."""
    if not isinstance(expr, str) or not expr.startswith("$"):
        raise ValueError(f"JSONPath '{expr}' must start with '$'")
    steps: list[str | int] = []
    i, n = 1, len(expr)
    while i < n:
        c = expr[i]
        if c == ".":
            m = _NAME.match(expr, i + 1)
            if m is None:
                raise ValueError(_bad(expr, i + 1, "a member name after '.' "
                                      "(use $[\"...\"] for other keys; no wildcards)"))
            steps.append(m.group())
            i = m.end()
        elif c == "[":
            i = _bracket(expr, i + 1, steps)
        else:
            raise ValueError(_bad(expr, i, "'.' or '['"))
    return JsonPath(expr, tuple(steps))


def _bracket(expr: str, i: int, steps: list[str | int]) -> int:
    """Parse one ``[...]`` selector starting after ``[``; returns the index after ``]``."""
    n = len(expr)
    if i < n and expr[i] in "'\"":
        quote, i, out = expr[i], i + 1, []
        while True:
            if i >= n:
                raise ValueError(_bad(expr, i, f"a closing {quote}"))
            c = expr[i]
            if c == quote:
                i += 1
                break
            if c == "\\":
                if expr.startswith("u", i + 1):
                    ch, i = _unicode_escape(expr, i)
                    out.append(ch)
                    continue
                if i + 1 >= n or expr[i + 1] not in _ESCAPES:
                    raise ValueError(_bad(expr, i, "a valid escape"))
                out.append(_ESCAPES[expr[i + 1]])
                i += 2
                continue
            out.append(c)
            i += 1
        steps.append("".join(out))
    else:
        m = _INDEX.match(expr, i)
        if m is None:
            raise ValueError(_bad(expr, i, "an index or a quoted name "
                                  "(wildcards, slices and filters are not supported)"))
        steps.append(int(m.group()))
        i = m.end()
    if i >= n or expr[i] != "]":
        raise ValueError(_bad(expr, i, "']'"))
    return i + 1


def _unicode_escape(expr: str, i: int) -> tuple[str, int]:
    """``\\uXXXX`` at ``i`` (a surrogate pair as two escapes): (character, next index)."""
    m = _HEX4.match(expr, i)
    if m is None:
        raise ValueError(_bad(expr, i, "\\u and four hex digits"))
    code = int(m.group(1), 16)
    if 0xD800 <= code < 0xDC00:
        low = _HEX4.match(expr, m.end())
        if low is not None and 0xDC00 <= int(low.group(1), 16) < 0xE000:
            code = 0x10000 + ((code - 0xD800) << 10) + (int(low.group(1), 16) - 0xDC00)
            return chr(code), low.end()
    return chr(code), m.end()


def _bad(expr: str, at: int, wanted: str) -> str:
    return f"JSONPath '{expr}': expected {wanted} at position {at}"
