"""Structured logging: one JSON line per request, plus event lines.

structlog renders with orjson to bytes; loggers are cached on first use. Lines carry no
bodies, no secrets and no client keys. Strings are JSON-escaped, so newlines in a
client-controlled value (a path, a request id) cannot forge a line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog


def configure(level: str = "info", *, cache: bool = True) -> None:
    """Process-wide structlog setup (JSON lines on stdout); tests pass ``cache=False`` so
    ``structlog.testing.capture_logs`` sees every line."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=cache,
    )



def _dumps(obj: Any, **kwargs: Any) -> bytes:
    """orjson, but a line is never lost to a string that is not valid UTF-8: header bytes
    that are not UTF-8 reach us as lone surrogates (``surrogateescape``), which orjson
    refuses; such a line is written again with those characters backslash-escaped."""
    try:
        return orjson.dumps(obj, **kwargs)
    except TypeError:
        return orjson.dumps(_escaped(obj), **kwargs)


def _escaped(obj: Any) -> Any:
    if isinstance(obj, str):
        return obj.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(obj, dict):
        return {_escaped(k): _escaped(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_escaped(v) for v in obj]
    return obj


def get_logger(name: str = "resilience_proxy") -> Any:
    return structlog.get_logger(name)
