"""The outcome classifier: decisions, Retry-After in every format, backoff bounds."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from proxy.call import Reply
from proxy.classify import (
    CLIENT_ERRORS,
    Verdict,
    backoff_s,
    classify,
    provider_failure,
    rate_limit_headers,
    retry_after_s,
)
from proxy.config import BackoffConfig, RetryConfig
from proxy.errors import (
    CircuitOpen,
    InvalidResponse,
    RateLimited,
    Rejected,
    Timeout,
    UpstreamError,
)

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
RETRY = RetryConfig()


def reply(status: int, headers: dict[str, str] | None = None, body: bytes = b"{}") -> Reply:
    return Reply(status, list((headers or {}).items()), body=body)


# --------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("status", sorted(CLIENT_ERRORS))
def test_client_errors_are_relayed(status):
    """400/401/403/404/413/422 are relayed at once: neither retried nor sent to a next tier."""
    assert classify(reply(status), RETRY, NOW).verdict is Verdict.RELAY
    assert classify(reply(status), None, NOW).verdict is Verdict.RELAY


@pytest.mark.parametrize("status", sorted(CLIENT_ERRORS))
def test_config_refuses_client_errors_in_retry_on(status):
    """Listing a client error in retry.on is a config error, not a silent retry."""
    with pytest.raises(ValidationError, match="never retried"):
        RetryConfig(on=["timeout", status])


def test_listed_other_4xx_is_retried():
    """A 4xx outside the client-error set is retried only when retry.on lists it."""
    assert classify(reply(408), RetryConfig(on=[408]), NOW).verdict is Verdict.RETRY
    assert classify(reply(408), RETRY, NOW).verdict is Verdict.RELAY


def test_429_retry_with_hint_and_quota_is_not_retried():
    """A 429 is retried with its Retry-After; an insufficient_quota 429 moves on instead."""
    d = classify(reply(429, {"retry-after": "3"}), RETRY, NOW)
    assert (d.verdict, d.reason, d.wait_s) == (Verdict.RETRY, "429", 3.0)
    quota = reply(429, body=b'{"error": {"code": "insufficient_quota"}}')
    assert classify(quota, RETRY, NOW).verdict is Verdict.NEXT_TIER
    assert classify(reply(429), None, NOW).verdict is Verdict.NEXT_TIER


def test_5xx_and_errors():
    """5xx and transport errors retry when listed, else leave the tier; total timeout ends it."""
    assert classify(reply(503), RETRY, NOW).verdict is Verdict.RETRY
    assert classify(reply(501), RETRY, NOW).verdict is Verdict.NEXT_TIER
    assert classify(UpstreamError("x", kind="reset"), RETRY, NOW).verdict is Verdict.RETRY
    assert classify(UpstreamError("x"), RetryConfig(on=["reset"]), NOW).verdict is Verdict.NEXT_TIER
    assert classify(Timeout("first_byte", 1), RETRY, NOW).verdict is Verdict.RETRY
    assert classify(Timeout("total", 1), RETRY, NOW).verdict is Verdict.FAIL
    assert classify(CircuitOpen("x"), RETRY, NOW).verdict is Verdict.NEXT_TIER
    d = classify(RateLimited("x", retry_after_s=2.0), RETRY, NOW)
    assert (d.verdict, d.wait_s) == (Verdict.NEXT_TIER, 2.0)


def test_provider_failure_for_the_breaker():
    """Only signs of an unhealthy provider count as breaker failures."""
    assert provider_failure(reply(500)) is True
    assert provider_failure(reply(429)) is False
    assert provider_failure(reply(404)) is False
    assert provider_failure(reply(200)) is False
    assert provider_failure(UpstreamError("x")) is True
    assert provider_failure(UpstreamError("x", kind="reset")) is True
    assert provider_failure(Timeout("attempt", 1)) is True
    assert provider_failure(Timeout("first_byte", 1)) is True
    assert provider_failure(InvalidResponse("x")) is True
    assert provider_failure(Rejected("x", reply(200))) is False
    assert provider_failure(Timeout("total", 1)) is None
    assert provider_failure(RateLimited("x")) is None
    assert provider_failure(CircuitOpen("x")) is None


# --------------------------------------------------------------------------- Retry-After


@given(st.integers(min_value=0, max_value=10**7))
def test_retry_after_delta_seconds(seconds):
    """Retry-After as delta-seconds is that many seconds."""
    assert retry_after_s([("retry-after", str(seconds))], NOW) == float(seconds)


_DATES = st.integers(min_value=0, max_value=10**7).map(lambda s: (s, NOW + s))


def _imf(t: float) -> str:
    return format_datetime(datetime.fromtimestamp(t, UTC), usegmt=True)


def _rfc850(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%A, %d-%b-%y %H:%M:%S GMT")


def _asctime(t: float) -> str:
    d = datetime.fromtimestamp(t, UTC)
    return d.strftime("%a %b ") + f"{d.day:2d}" + d.strftime(" %H:%M:%S %Y")


@given(_DATES, st.sampled_from([_imf, _rfc850, _asctime]))
def test_retry_after_http_date_every_format(delta_when, fmt):
    """Retry-After as an HTTP date (IMF-fixdate, RFC 850, asctime) is the seconds until it."""
    delta, when = delta_when
    assert retry_after_s([("retry-after", fmt(when))], NOW) == pytest.approx(delta, abs=1.0)


@given(st.integers(min_value=1, max_value=10**6))
def test_retry_after_date_in_the_past_is_zero(ago):
    """A date already past means: retry now (never a negative wait)."""
    assert retry_after_s([("retry-after", _imf(NOW - ago))], NOW) == 0.0


@given(st.integers(min_value=0, max_value=10**8))
def test_retry_after_ms(ms):
    """retry-after-ms is milliseconds, and wins over Retry-After."""
    headers = [("retry-after", "999"), ("retry-after-ms", str(ms))]
    assert retry_after_s(headers, NOW) == pytest.approx(ms / 1000)


_RESET_PARTS = st.tuples(st.integers(0, 5), st.integers(0, 59), st.integers(0, 59),
                         st.integers(0, 999))


def _go_duration(h: int, m: int, s: int, ms: int) -> str:
    """As Go's time.Duration prints it (``6m0s``), with the milliseconds some providers add."""
    text = (f"{h}h" if h else "") + (f"{m}m" if h or m else "") + f"{s}s"
    return text + f"{ms}ms" if ms else text


@given(_RESET_PARTS, st.sampled_from(["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"]))
def test_ratelimit_reset_durations(parts, name):
    """x-ratelimit-reset-* Go-style durations (1s, 6m0s, 20ms, 1h2m3s) become seconds."""
    h, m, s, ms = parts
    expected = h * 3600 + m * 60 + s + ms / 1000
    assert retry_after_s([(name, _go_duration(h, m, s, ms))], NOW) == pytest.approx(expected)


@pytest.mark.parametrize("value,seconds", [("1s", 1.0), ("6m0s", 360.0), ("20ms", 0.02),
                                           ("7.66s", 7.66), ("2m59.56s", 179.56), ("0.5", 0.5)])
def test_ratelimit_reset_examples(value, seconds):
    """The formats OpenAI sends in its reset headers."""
    assert retry_after_s([("x-ratelimit-reset-requests", value)], NOW) == pytest.approx(seconds)


def test_reset_of_the_exhausted_dimension_wins():
    """With both resets, the wait is that of the dimension whose remaining count is 0."""
    headers = [("x-ratelimit-remaining-requests", "0"), ("x-ratelimit-reset-requests", "1s"),
               ("x-ratelimit-remaining-tokens", "5000"), ("x-ratelimit-reset-tokens", "6m0s")]
    assert retry_after_s(headers, NOW) == 1.0
    unknown = [("x-ratelimit-reset-requests", "1s"), ("x-ratelimit-reset-tokens", "6m0s")]
    assert retry_after_s(unknown, NOW) == 360.0


def test_precedence_and_epoch_reset():
    """Retry-After beats reset headers; a Unix-time x-ratelimit-reset is made relative."""
    assert retry_after_s([("x-ratelimit-reset-requests", "9s"), ("retry-after", "2")], NOW) == 2.0
    assert retry_after_s([("x-ratelimit-reset", str(int(NOW) + 30))], NOW) == 30.0
    info = rate_limit_headers([("x-ratelimit-remaining-requests", "3"),
                               ("x-ratelimit-reset-requests", "20ms")], NOW)
    assert (info.remaining_requests, info.reset_requests_s) == (3.0, 0.02)


@given(st.text(max_size=40), st.sampled_from(["retry-after", "retry-after-ms",
                                               "x-ratelimit-reset-tokens", "x-ratelimit-reset"]))
def test_garbage_never_raises(value, name):
    """Any header value yields None or a finite wait >= 0, never an exception."""
    got = retry_after_s([(name, value)], NOW)
    assert got is None or (got >= 0 and got != float("inf"))


# --------------------------------------------------------------------------- backoff


_BACKOFF = st.builds(
    BackoffConfig,
    initial=st.floats(min_value=0, max_value=10, allow_nan=False),
    max=st.floats(min_value=0, max_value=120, allow_nan=False),
    multiplier=st.floats(min_value=1, max_value=1000, allow_nan=False),
    jitter=st.sampled_from(["full", "equal"]),
)


@given(_BACKOFF, st.integers(min_value=0, max_value=5000), st.integers(min_value=0))
def test_backoff_bounds(cfg, n, seed):
    """A wait is in [0, min(max, initial*multiplier^n)] (equal jitter: at least half of it)."""
    rand = random.Random(seed)
    wait = backoff_s(n, cfg, rand)
    try:
        cap = min(cfg.max, cfg.initial * cfg.multiplier ** n)
    except OverflowError:
        cap = cfg.max if cfg.initial > 0 else 0.0
    assert 0.0 <= wait <= cap
    if cfg.jitter == "equal":
        assert wait >= cap / 2 - 1e-9


def test_backoff_full_jitter_spreads():
    """Full jitter: waits for the same retry spread over [0, cap], not one value."""
    cfg = BackoffConfig(initial=0.2, max=5, multiplier=2)
    rand = random.Random(7)
    waits = [backoff_s(3, cfg, rand) for _ in range(500)]
    assert max(waits) <= 1.6 and min(waits) < 0.2 and max(waits) > 1.4
    assert len({round(w, 6) for w in waits}) > 400


def test_http_date_vs_timedelta_sanity():
    """An IMF-fixdate 90 s ahead reads as 90 s (guards the time-zone handling)."""
    when = datetime.fromtimestamp(NOW, UTC) + timedelta(seconds=90)
    assert retry_after_s([("retry-after", format_datetime(when, usegmt=True))], NOW) == 90.0
