"""Reading usage from provider replies: what a reply (or one stream event) says about the
model that answered and the tokens it used, per the provider's ``format`` or its configured
``usage:`` JSON paths (see :mod:`proxy.metering`, which prices what is read here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from proxy.config import UsagePaths
from proxy.jsonpath import MISSING, JsonPath, compile_path

_MAX_SSE_LINE = 1024**2


@dataclass(slots=True)
class Found:
    """What a reply says about itself; None = not said."""

    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    text_chars: int = 0

    def merge(self, other: Found) -> None:
        self.model = other.model or self.model
        if other.input_tokens is not None:
            self.input_tokens = other.input_tokens
        if other.output_tokens is not None:
            self.output_tokens = other.output_tokens
        self.text_chars += other.text_chars


def as_count(v: Any) -> int | None:
    """``v`` when it is a token count (a non-negative int, not a bool), else None."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


def _sum(*values: Any) -> int | None:
    ints = [i for v in values if (i := as_count(v)) is not None]
    return sum(ints) if ints else None


def _str(v: Any) -> str | None:
    return v if isinstance(v, str) and v else None


def _chars(v: Any) -> int:
    return len(v) if isinstance(v, str) else 0


def _openai(data: dict[str, Any]) -> Found:
    """Chat completions (and their chunks) and the responses API (and its events)."""
    inner = data.get("response")
    if isinstance(inner, dict):  # responses API stream events: response.created/completed
        found = _openai(inner)
        found.text_chars = 0
    else:
        found = Found(_str(data.get("model")))
        usage = data.get("usage")
        if isinstance(usage, dict):
            found.input_tokens = as_count(usage.get("prompt_tokens", usage.get("input_tokens")))
            found.output_tokens = as_count(usage.get("completion_tokens",
                                                 usage.get("output_tokens")))
    delta = data.get("delta")
    if isinstance(delta, str) and str(data.get("type", "")).endswith(".delta"):
        found.text_chars += len(delta)
    for choice in data.get("choices") or ():
        if isinstance(choice, dict):
            part = choice.get("delta") or choice.get("message") or {}
            if isinstance(part, dict):
                found.text_chars += _chars(part.get("content"))
                for call in part.get("tool_calls") or ():
                    if isinstance(call, dict) and isinstance(call.get("function"), dict):
                        found.text_chars += _chars(call["function"].get("arguments"))
    for item in data.get("output") or ():
        for content in (item.get("content") or ()) if isinstance(item, dict) else ():
            if isinstance(content, dict):
                found.text_chars += _chars(content.get("text"))
    return found


def _anthropic(data: dict[str, Any]) -> Found:
    """Messages, and the stream events ``message_start``/``message_delta``/deltas."""
    kind = data.get("type")
    if kind == "message_start" and isinstance(data.get("message"), dict):
        found = _anthropic(data["message"])
        found.output_tokens = None  # provisional: message_delta carries the real count
        return found
    found = Found(_str(data.get("model")))
    usage = data.get("usage")
    if isinstance(usage, dict):
        found.input_tokens = _sum(usage.get("input_tokens"), usage.get("cache_read_input_tokens"),
                                  usage.get("cache_creation_input_tokens"))
        found.output_tokens = as_count(usage.get("output_tokens"))
    delta = data.get("delta")
    if kind == "content_block_delta" and isinstance(delta, dict):
        found.text_chars += (_chars(delta.get("text")) + _chars(delta.get("partial_json"))
                             + _chars(delta.get("thinking")))
    for block in data.get("content") or ():
        if isinstance(block, dict):
            found.text_chars += _chars(block.get("text"))
    return found


def _gemini(data: dict[str, Any]) -> Found:
    found = Found(_str(data.get("modelVersion")))
    usage = data.get("usageMetadata")
    if isinstance(usage, dict):
        found.input_tokens = _sum(usage.get("promptTokenCount"),
                                  usage.get("toolUsePromptTokenCount"))
        found.output_tokens = _sum(usage.get("candidatesTokenCount"),
                                   usage.get("thoughtsTokenCount"))
    for cand in data.get("candidates") or ():
        content = cand.get("content") if isinstance(cand, dict) else None
        for part in (content.get("parts") or ()) if isinstance(content, dict) else ():
            if isinstance(part, dict):
                found.text_chars += _chars(part.get("text"))
    return found


class UsageReader:
    """Reads a reply document (or one stream event) per the provider's ``format``."""

    __slots__ = ("_fmt", "_paths")

    def __init__(self, fmt: str, paths: UsagePaths | None) -> None:
        self._fmt = fmt
        self._paths: tuple[JsonPath | None, ...] | None = None
        if paths is not None:
            self._paths = tuple(None if p is None else compile_path(p)
                                for p in (paths.model, paths.input_tokens, paths.output_tokens))

    @property
    def reads_usage(self) -> bool:
        return self._fmt != "generic" or self._paths is not None

    def read(self, data: Any) -> Found:
        if isinstance(data, list):  # e.g. Gemini's streamGenerateContent without alt=sse
            found = Found()
            for item in data:
                found.merge(self.read(item))
            return found
        if not isinstance(data, dict):
            return Found()
        if self._paths is not None:
            model, tin, tout = (MISSING if p is None else p.find(data) for p in self._paths)
            return Found(_str(model), as_count(tin), as_count(tout))
        if self._fmt == "openai":
            return _openai(data)
        if self._fmt == "anthropic":
            return _anthropic(data)
        if self._fmt == "gemini":
            return _gemini(data)
        return Found()


class StreamMeter:
    """Watches one streamed reply: SSE ``data:`` events are read as they pass; anything
    else is only counted (its bytes stand for text when there is no usage)."""

    __slots__ = ("_buf", "_reader", "_sse", "bytes_seen", "found")

    def __init__(self, reader: UsageReader, sse: bool) -> None:
        self._reader = reader
        self._sse = sse
        self._buf = b""
        self.bytes_seen = 0
        self.found = Found()

    def feed(self, chunk: bytes) -> None:
        self.bytes_seen += len(chunk)
        if not self._sse:
            return
        buf = self._buf + chunk
        *lines, self._buf = buf.split(b"\n")
        if len(self._buf) > _MAX_SSE_LINE:
            self._buf = b""
        for line in lines:
            if line.startswith(b"data:"):
                payload = line[5:].strip()
                if payload and payload[:1] in b"{[":
                    try:
                        self.found.merge(self._reader.read(orjson.loads(payload)))
                    except orjson.JSONDecodeError:
                        pass

    def text_chars(self) -> int:
        return self.found.text_chars if self._sse else self.bytes_seen
