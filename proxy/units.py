"""Duration and size strings from the config file.

Durations: ``250ms``, ``10s``, ``5m``, ``2h``, ``30d`` (also ``1.5s``, ``100us`` and compound
Go-style ``1h30m`` / ``6m0s`` as providers send in ``x-ratelimit-reset-*``). Returned as
float seconds; a bare number is seconds. Sizes: ``512KiB``, ``16MiB``, ``1GiB`` (binary),
``100KB``, ``1MB`` (decimal), ``1000`` or ``1000B`` (bytes). Returned as int bytes.

Every malformed, negative or non-finite value raises ``ValueError`` (never another
exception), so the config loader can report it at its YAML path. ``format_duration`` and
``format_size`` render values back in a form these parsers read to the same value.
"""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
                   "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(us|µs|ms|s|m|h|d)")
_DURATION_FULL = re.compile(r"(?:\d+(?:\.\d+)?(?:us|µs|ms|s|m|h|d))+")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB|TB|TiB|k|K|M|G)?")
_SIZE_UNITS = {
    None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "TB": 1000**4,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4,
    "k": 1024, "K": 1024, "M": 1024**2, "G": 1024**3,
}
#: no timer, window or TTL in a config needs more than ~100 years
_MAX_DURATION_S = 100 * 365 * 86400.0
_MAX_SIZE = 1024**5


def parse_duration(value: str | float | int) -> float:
    """Parse a duration into seconds; a bare number is seconds. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("a duration is a string like '250ms', '10s', '5m'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > 64 or _DURATION_FULL.fullmatch(text) is None:
            raise ValueError(f"'{value[:64]}' is not a duration (use e.g. 250ms, 10s, 5m, 2h, 30d)")
        seconds = sum(_scaled(float(n), u) for n, u in _DURATION_PART.findall(text))
    else:
        raise ValueError("a duration is a string like '250ms', '10s', '5m'")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError("a duration must be a finite, non-negative time")
    if seconds > _MAX_DURATION_S:
        raise ValueError("a duration must not exceed 100 years")
    return seconds


def _scaled(n: float, unit: str) -> float:
    # divide for sub-second units: 1751/1000 is the float nearest 1.751, 1751*0.001 is not
    factor = _DURATION_UNITS[unit]
    return n / round(1 / factor) if factor < 1 else n * factor


def parse_size(value: str | int) -> int:
    """Parse a size into bytes; a bare number is bytes. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("a size is a string like '512KiB' or '16MiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE.fullmatch(value.strip()) if len(value) <= 64 else None
        if m is None:
            raise ValueError(f"'{value[:64]}' is not a size (use e.g. 512KiB, 16MiB)")
        number, unit = m.group(1), _SIZE_UNITS[m.group(2)]
        if "." in number:
            whole, frac = number.split(".")
            part, rest = divmod(int(frac) * unit, 10 ** len(frac))
            if rest:
                raise ValueError(f"'{value}' is not a whole number of bytes")
            size = int(whole) * unit + part
        else:
            size = int(number) * unit
    else:
        raise ValueError("a size is a string like '512KiB' or '16MiB'")
    if size < 0:
        raise ValueError("a size must not be negative")
    if size > _MAX_SIZE:
        raise ValueError("a size must not exceed 1PiB")
    return size


def _number(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


def format_duration(seconds: float) -> str:
    """Render seconds compactly (``30d``, ``5m``, ``1.5s``, ``250ms``); exact to the
    nanosecond, and read back by :func:`parse_duration`."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    if seconds >= 1:
        return _number(seconds) + "s"
    return _number(seconds * 1000) + "ms"


def format_size(size: int) -> str:
    """Render bytes with the largest binary unit that divides them (``16MiB``, ``1000B``);
    read back by :func:`parse_size` to the same value."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        factor = _SIZE_UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"
