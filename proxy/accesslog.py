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
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)),
        logger_factory=structlog.BytesLoggerFactory(sys.stdout.buffer),
        cache_logger_on_first_use=cache,
    )


def get_logger(name: str = "resilience_proxy") -> Any:
    return structlog.get_logger(name)
