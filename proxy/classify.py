"""The one place where an attempt's outcome becomes a decision.

An outcome is a provider :class:`~proxy.call.Reply` (any status) or an attempt-level
:class:`~proxy.errors.ProxyError`. :func:`classify` turns it into a :class:`Decision`:

- ``OK``: hand the reply to the client.
- ``RETRY``: try the same tier again (if attempts, the retry budget and time allow);
  ``wait_s`` is the provider's own Retry-After / reset hint when it gave one.
- ``NEXT_TIER``: leave this tier (retries cannot help, or are not configured for it).
- ``RELAY``: the client's problem (400, 401, 403, 404, 413, 422 ...): relay it at once.
- ``FAIL``: the request is over (the total deadline expired).

The retry policy and the tiers policy both ask here; neither interprets statuses itself.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from proxy.call import Reply
from proxy.config import BackoffConfig, RetryConfig
from proxy.errors import (
    CircuitOpen,
    InvalidResponse,
    ProxyError,
    RateLimited,
    Rejected,
    Timeout,
    UpstreamError,
)
from proxy.units import parse_duration


class Verdict(enum.Enum):
    OK = "ok"
    RETRY = "retry"
    NEXT_TIER = "next_tier"
    RELAY = "relay"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    #: bounded vocabulary for metrics: "503", "429", "timeout", "connect_error", "reset",
    #: "invalid_response", "rejected", "circuit_open", "rate_limited", "429_quota", ...
    reason: str
    #: the provider's own wait hint in seconds (Retry-After and friends), if any
    wait_s: float | None = None


OK = Decision(Verdict.OK, "ok")
#: statuses that are the client's problem: never retried, never moved to another tier
CLIENT_ERRORS = frozenset({400, 401, 403, 404, 405, 409, 411, 413, 415, 422})


def classify(outcome: Reply | ProxyError, retry: RetryConfig | None, now_wall: float) -> Decision:
    """Decide what an attempt's outcome means. ``retry`` None: retries are off."""
    on = retry.on if retry is not None else ()
    if isinstance(outcome, Reply):
        status = outcome.status
        if status < 400:
            return OK
        if status == 429:
            if _quota_exhausted(outcome):
                return Decision(Verdict.NEXT_TIER, "429_quota")
            hint = retry_after_s(outcome.headers, now_wall)
            verdict = Verdict.RETRY if 429 in on else Verdict.NEXT_TIER
            return Decision(verdict, "429", hint)
        if status >= 500:
            verdict = Verdict.RETRY if status in on else Verdict.NEXT_TIER
            hint = retry_after_s(outcome.headers, now_wall) if status == 503 else None
            return Decision(verdict, str(status), hint)
        if status in on:  # e.g. 408 or 409 listed explicitly
            return Decision(Verdict.RETRY, str(status))
        return Decision(Verdict.RELAY, str(status))
    if isinstance(outcome, Timeout):
        if outcome.timer == "total":
            return Decision(Verdict.FAIL, "timeout")
        return Decision(Verdict.RETRY if "timeout" in on else Verdict.NEXT_TIER, "timeout")
    if isinstance(outcome, UpstreamError):
        return Decision(Verdict.RETRY if outcome.kind in on else Verdict.NEXT_TIER, outcome.kind)
    if isinstance(outcome, Rejected):
        return Decision(Verdict.NEXT_TIER, "rejected")
    if isinstance(outcome, InvalidResponse):
        return Decision(Verdict.NEXT_TIER, "invalid_response")
    if isinstance(outcome, CircuitOpen):
        return Decision(Verdict.NEXT_TIER, "circuit_open")
    if isinstance(outcome, RateLimited):
        return Decision(Verdict.NEXT_TIER, "rate_limited", outcome.retry_after_s)
    return Decision(Verdict.FAIL, outcome.type)


def _quota_exhausted(reply: Reply) -> bool:
    """OpenAI's ``insufficient_quota`` 429 will not clear by waiting."""
    body = reply.body
    return body is not None and b"insufficient_quota" in body[:4096]


def retry_after_s(headers: list[tuple[str, str]], now_wall: float) -> float | None:
    """The provider's wait hint in seconds, or None.

    ``retry-after-ms`` (ms), ``Retry-After`` (delta-seconds or an HTTP date) win; else the
    longest of ``x-ratelimit-reset-requests`` / ``x-ratelimit-reset-tokens`` (``1s``,
    ``6m0s``, ``20ms``, or bare seconds). Unparseable values are ignored.
    """
    ms = after = None
    resets: list[float] = []
    for name, value in headers:
        if name == "retry-after-ms":
            ms = _float(value)
        elif name == "retry-after":
            after = _retry_after_value(value, now_wall)
        elif name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens",
                      "x-ratelimit-reset"):
            v = _reset_value(value)
            if v is not None:
                resets.append(v)
    if ms is not None:
        return max(0.0, ms / 1000.0)
    if after is not None:
        return after
    return max(resets) if resets else None


def _float(value: str) -> float | None:
    try:
        f = float(value.strip())
    except ValueError:
        return None
    return f if f == f and f not in (float("inf"), float("-inf")) else None


def _retry_after_value(value: str, now_wall: float) -> float | None:
    value = value.strip()
    if value.isdigit():
        return float(value)
    seconds = _float(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now_wall)


def _reset_value(value: str) -> float | None:
    seconds = _float(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        return parse_duration(value.strip())
    except ValueError:
        return None


def backoff_s(retry_index: int, cfg: BackoffConfig, rand: random.Random) -> float:
    """Wait before retry number ``retry_index`` (0 = the first retry), with jitter.

    The cap is ``min(max, initial * multiplier**n)``; full jitter draws in [0, cap],
    equal jitter in [cap/2, cap].
    """
    cap = min(cfg.max, cfg.initial * cfg.multiplier ** min(retry_index, 64))
    if cfg.jitter == "full":
        return rand.uniform(0.0, cap)
    return cap / 2 + rand.uniform(0.0, cap / 2)


def as_outcome(exc: BaseException) -> ProxyError | None:
    """An attempt-level ProxyError, or None for anything the classifier does not own."""
    if isinstance(exc, ProxyError) and exc.attempt:
        return exc
    return None
