"""Duration and size strings from the config file.

Durations: ``250ms``, ``10s``, ``5m``, ``2h``, ``30d`` (also ``1.5s`` and compound Go-style
``6m0s`` as providers send in ``x-ratelimit-reset-*``). Returned as float seconds.
Sizes: ``512KiB``, ``16MiB``, ``1GiB``, ``100KB``, ``1000`` (bytes). Returned as int bytes.
"""

from __future__ import annotations

import re

_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|µs|ms|s|m|h|d)")
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:us|µs|ms|s|m|h|d))+")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|k|K|M|G)?")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "k": 1024, "K": 1024, "M": 1024**2, "G": 1024**3,
}


def parse_duration(value: str | float | int) -> float:
    """Parse a duration into seconds; a bare number is seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("a duration is a string like '250ms', '10s', '5m'")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration must not be negative")
        return float(value)
    text = value.strip()
    if _DURATION_FULL.fullmatch(text) is None:
        raise ValueError(f"'{value}' is not a duration (use e.g. 250ms, 10s, 5m, 2h, 30d)")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


def parse_size(value: str | int) -> int:
    """Parse a size into bytes; a bare number is bytes. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("a size is a string like '512KiB' or '16MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size must not be negative")
        return value
    m = _SIZE.fullmatch(value.strip())
    if m is None:
        raise ValueError(f"'{value}' is not a size (use e.g. 512KiB, 16MiB)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def format_duration(seconds: float) -> str:
    """Render seconds compactly for summaries (``1.5s``, ``250ms``, ``30d``)."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds >= 1:
        return f"{seconds:g}s"
    return f"{seconds * 1000:g}ms"
