"""Structured logging: one JSON line per request, plus event lines.

structlog renders with orjson to bytes; loggers are cached on first use. Lines carry no
bodies, no secrets and no client keys. Strings are JSON-escaped, so newlines in a
client-controlled value (a path, a request id) cannot forge a line.

The access-log line (one per request, the hot path) skips structlog's processor chain:
:class:`AccessLog` renders the same line (the fields, then ``event``, ``level``,
``timestamp``) with one orjson call into stdout's buffer, flushed within
``FLUSH_INTERVAL_S`` (or when the buffer fills, or with any other log line) rather
than once per line: like nginx's ``access_log ... buffer= flush=``, a write per batch. That
holds under ``PYTHONUNBUFFERED=1`` / ``python -u`` too (set in the image, as in most Python
images), where ``sys.stdout.buffer`` is the raw file: the log lines then go through a
buffered writer of their own (``BUFFER_BYTES``) on a duplicate of the descriptor, not one
write per line. It goes through structlog whenever the chain is not the one
:func:`configure` installed (``structlog.testing.capture_logs`` in tests) or context
variables are bound, so what tests capture and what production writes agree.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime
import io
import logging
import os
import sys
from typing import IO, Any, BinaryIO

import orjson
import structlog

_UTC = datetime.UTC
#: the longest an access-log line waits in stdout's buffer
FLUSH_INTERVAL_S = 0.05
#: the log lines' own buffer when stdout is unbuffered (a write per this many bytes at most)
BUFFER_BYTES = 64 * 1024


class _Sink:
    """What :func:`configure` installed: the access log writes there directly."""

    __slots__ = ("level", "out", "processors", "renderer")

    def __init__(self, level: int, out: IO[bytes], processors: list[Any], renderer: Any) -> None:
        self.level = level
        self.out = out
        self.processors = processors
        self.renderer = renderer


_sink: _Sink | None = None
#: stdout's raw file -> the buffered writer the log lines use instead (made once, kept)
_buffered: dict[int, BinaryIO] = {}


def _log_out() -> BinaryIO:
    """Where log lines go: ``sys.stdout.buffer``, unless that is the raw, unbuffered file
    (``PYTHONUNBUFFERED=1``): then a buffered writer on a duplicate of its descriptor (closing
    it closes only the duplicate; lines reach the same file, in order, at each flush)."""
    out = sys.stdout.buffer
    if not isinstance(out, io.RawIOBase):
        return out
    fd = out.fileno()
    found = _buffered.get(fd)
    if found is None:
        found = _buffered[fd] = open(os.dup(fd), "wb", buffering=BUFFER_BYTES)
        atexit.register(found.flush)
    return found


def flush() -> None:
    """Write out the buffered log lines (before the process ends)."""
    for out in (*_buffered.values(), sys.stdout):
        try:
            out.flush()
        except (OSError, ValueError):
            pass


def configure(level: str = "info", *, cache: bool = True) -> None:
    """Process-wide structlog setup (JSON lines on stdout); tests pass ``cache=False`` so
    ``structlog.testing.capture_logs`` sees every line."""
    global _sink
    level_no = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        renderer,
    ]
    out = _log_out()
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.BytesLoggerFactory(out),  # an event line flushes: in order
        cache_logger_on_first_use=cache,
    )
    _sink = _Sink(level_no, out, processors, renderer)


class AccessLog:
    """Writes each request's access-log line (``event: request``, level info)."""

    __slots__ = ("_flush_pending", "_log", "_sink")

    def __init__(self, log: Any, sink: _Sink | None = None) -> None:
        self._log = log
        self._sink = sink if sink is not None else _sink
        self._flush_pending = False

    def write(self, fields: dict[str, Any]) -> None:
        sink = self._sink
        if (sink is None or sink.processors[-1] is not sink.renderer
                or structlog.contextvars.get_contextvars()):
            self._log.info("request", **fields)  # capture_logs, or another configuration
            return
        if sink.level > logging.INFO:
            return
        fields["event"] = "request"
        fields["level"] = "info"
        fields["timestamp"] = datetime.datetime.now(_UTC)
        sink.out.write(_dumps(fields, option=orjson.OPT_UTC_Z | orjson.OPT_APPEND_NEWLINE))
        if not self._flush_pending:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                sink.out.flush()
                return
            self._flush_pending = True
            loop.call_later(FLUSH_INTERVAL_S, self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        sink = self._sink
        if sink is not None:
            sink.out.flush()



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
