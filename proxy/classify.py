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
The circuit breaker asks :func:`provider_failure` (does this outcome say the provider is
unhealthy?) and the adaptive rate limit reads :func:`rate_limit_headers`; both live here so
that every header and status is interpreted in exactly one place.
"""

from __future__ import annotations

import enum
import math
import random
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

from proxy.call import Reply
from proxy.config import NEVER_RETRIED_STATUSES, BackoffConfig, RetryConfig
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
#: statuses that are the client's problem: never retried, never moved to another tier, even
#: when listed in ``retry.on`` (the config rejects that). Other 4xx (405, 408, 409, ...) are
#: relayed too unless ``retry.on`` lists them.
CLIENT_ERRORS = NEVER_RETRIED_STATUSES


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
        if status in on and status not in CLIENT_ERRORS:  # e.g. 408 or 409 listed explicitly
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


def provider_failure(outcome: Reply | BaseException) -> bool | None:
    """For the circuit breaker: True when the outcome says the provider is unhealthy.

    Failures: connect errors, resets, ``attempt``/``first_byte`` timeouts, 5xx, invalid
    responses. Successes (False): any reply below 500, 429 and other 4xx included (the
    provider answered), and a 2xx that failed ``accept``. None (says nothing about the
    provider): a ``total`` timeout (the request ran out of time), the proxy's own rate limit
    or open circuit, a cancelled call.
    """
    if isinstance(outcome, Reply):
        return outcome.status >= 500
    if isinstance(outcome, Timeout):
        return None if outcome.timer == "total" else True
    if isinstance(outcome, (UpstreamError, InvalidResponse)):
        return True
    if isinstance(outcome, Rejected):
        return False
    return None


_RESET_HEADERS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens", "x-ratelimit-reset")


def retry_after_s(headers: list[tuple[str, str]], now_wall: float) -> float | None:
    """The provider's wait hint in seconds, or None.

    In order of precedence: ``retry-after-ms`` (milliseconds), ``Retry-After``
    (delta-seconds or an HTTP date in any of RFC 9110's three formats), then the
    ``x-ratelimit-reset-requests`` / ``-tokens`` durations (``1s``, ``6m0s``, ``20ms``, bare
    seconds): of the dimensions whose ``x-ratelimit-remaining-*`` is 0 when the provider says
    which, else the longest. Unparseable values are ignored; the result is never negative.
    """
    ms = after = None
    for name, value in headers:
        if name == "retry-after-ms" and ms is None:
            ms = _float(value)
        elif name == "retry-after" and after is None:
            after = _retry_after_value(value, now_wall)
    if ms is not None:
        return max(0.0, ms / 1000.0)
    if after is not None:
        return after
    info = rate_limit_headers(headers, now_wall)
    exhausted = [reset for remaining, reset in ((info.remaining_requests, info.reset_requests_s),
                                                (info.remaining_tokens, info.reset_tokens_s))
                 if remaining is not None and remaining <= 0 and reset is not None]
    if exhausted:
        return max(exhausted)
    known = [r for r in (info.reset_requests_s, info.reset_tokens_s, info.reset_s) if r is not None]
    return max(known) if known else None


@dataclass(frozen=True, slots=True)
class RateLimitInfo:
    """What a reply's ``x-ratelimit-*`` headers say (None: not sent or unparseable)."""

    limit_requests: float | None = None
    remaining_requests: float | None = None
    reset_requests_s: float | None = None
    remaining_tokens: float | None = None
    reset_tokens_s: float | None = None
    #: the generic ``x-ratelimit-reset`` (seconds, or a Unix time when it looks like one)
    reset_s: float | None = None


NO_RATE_LIMIT_INFO = RateLimitInfo()


def rate_limit_headers(headers: list[tuple[str, str]], now_wall: float) -> RateLimitInfo:
    """Read the OpenAI-style rate-limit headers of a reply (for the adaptive rate limit)."""
    found: dict[str, float | None] = {}
    for name, value in headers:
        if not name.startswith("x-ratelimit-") or name in found:
            continue
        if name in _RESET_HEADERS:
            found[name] = _reset_value(value, now_wall)
        elif name in ("x-ratelimit-remaining-requests", "x-ratelimit-remaining-tokens",
                      "x-ratelimit-limit-requests"):
            found[name] = _float(value)
    if not found:
        return NO_RATE_LIMIT_INFO
    return RateLimitInfo(
        limit_requests=found.get("x-ratelimit-limit-requests"),
        remaining_requests=found.get("x-ratelimit-remaining-requests"),
        reset_requests_s=found.get("x-ratelimit-reset-requests"),
        remaining_tokens=found.get("x-ratelimit-remaining-tokens"),
        reset_tokens_s=found.get("x-ratelimit-reset-tokens"),
        reset_s=found.get("x-ratelimit-reset"),
    )


def _float(value: str) -> float | None:
    try:
        f = float(value.strip())
    except ValueError:
        return None
    return f if math.isfinite(f) else None


def _retry_after_value(value: str, now_wall: float) -> float | None:
    value = value.strip()
    seconds = _float(value)
    if seconds is not None:
        return max(0.0, seconds)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # asctime and "-0000" dates are GMT by definition (RFC 9110)
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_wall)


#: a bare reset value above this is a Unix time, not a number of seconds (~year 2001)
_EPOCH_THRESHOLD_S = 1e9


def _reset_value(value: str, now_wall: float) -> float | None:
    seconds = _float(value)
    if seconds is not None:
        if seconds > _EPOCH_THRESHOLD_S:
            seconds -= now_wall
        return max(0.0, seconds)
    try:
        return parse_duration(value.strip())
    except ValueError:
        return None


def backoff_s(retry_index: int, cfg: BackoffConfig, rand: random.Random) -> float:
    """Wait in seconds before retry number ``retry_index`` (0 = the first retry).

    The cap is ``min(max, initial * multiplier**n)``; full jitter draws in [0, cap] (AWS's
    "full jitter": retries of many clients spread out instead of arriving in waves), equal
    jitter in [cap/2, cap].
    """
    try:
        grown = cfg.initial * cfg.multiplier ** max(retry_index, 0)
    except OverflowError:  # a float power past 1e308: the cap is `max` anyway
        grown = math.inf if cfg.initial > 0 else 0.0
    cap = min(cfg.max, grown)
    if cfg.jitter == "full":
        return min(cap, rand.uniform(0.0, cap))
    return min(cap, cap / 2 + rand.uniform(0.0, cap / 2))


def as_outcome(exc: BaseException) -> ProxyError | None:
    """An attempt-level ProxyError, or None for anything the classifier does not own."""
    if isinstance(exc, ProxyError) and exc.attempt:
        return exc
    return None
