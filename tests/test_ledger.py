"""The budget ledger's contract, run against both implementations: memory and a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.clock import SystemClock
from proxy.config import RedisConfig, StateConfig
from proxy.metrics import Metrics
from proxy.state.backend import StateBackend, StateError
from proxy.state.ledger import (
    CounterRef,
    Ledger,
    Limits,
    MemoryLedger,
    RedisLedger,
    Totals,
    usd_to_nano,
)

NOW = 1_767_225_600.0
USD = usd_to_nano(1.0)
COUNTER = CounterRef("b:test:global", "m202601", NOW + 40 * 86400)
CAP_1USD = Limits(cap_nano=USD, refuse_flag="1:block")


async def _redis_backend(url: str) -> StateBackend:
    cfg = StateConfig(backend="redis", redis=RedisConfig(url=url, timeout=2.0))
    return StateBackend(cfg, Metrics(), structlog.get_logger(), SystemClock())


@pytest.fixture(params=["memory", "redis"])
async def ledger(request: Any) -> AsyncIterator[Ledger]:
    if request.param == "memory":
        yield MemoryLedger()
        return
    server = request.getfixturevalue("redis_server")
    backend = await _redis_backend(server.url)
    yield RedisLedger(backend)
    await backend.close()


async def reserve(ledger: Ledger, usd: float, limits: Limits = CAP_1USD, *, now: float = NOW,
                  hold_s: float = 60.0, counter: CounterRef = COUNTER, degraded_usd: float | None = None):
    est = usd_to_nano(usd)
    deg = est if degraded_usd is None else usd_to_nano(degraded_usd)
    return await ledger.reserve(counter, limits, est, deg, now, now + hold_s)


async def test_admits_up_to_the_cap_and_not_past_it(ledger):
    """Reservations fill the cap exactly; the next is refused and sets the refusal flag once."""
    results = [await reserve(ledger, 0.25) for _ in range(4)]
    assert all(r.admitted for r in results)
    assert results[-1].totals.reserved_nano == USD
    refused = await reserve(ledger, 0.25)
    assert not refused.admitted and refused.reservation is None
    assert refused.new_flags == ("1:block",)
    again = await reserve(ledger, 0.01)
    assert not again.admitted and again.new_flags == ()
    assert "1:block" in (await ledger.read(COUNTER)).flags


async def test_settle_moves_the_hold_to_spend(ledger):
    """Settling releases the estimate and adds the actual cost and the request."""
    r = await reserve(ledger, 0.30)
    res = await ledger.settle(r.reservation, usd_to_nano(0.10), True, CAP_1USD, NOW)
    assert res.totals == Totals(usd_to_nano(0.10), 0, 1, 0)
    assert await ledger.read(COUNTER) == Totals(usd_to_nano(0.10), 0, 1, 0)
    assert (await reserve(ledger, 0.90)).admitted  # 0.10 + 0.90 fits in 1.00
    assert not (await reserve(ledger, 0.01)).admitted


async def test_refund_releases_without_spend(ledger):
    """A refund gives the room back and adds nothing; a second refund changes nothing."""
    r = await reserve(ledger, 1.0)
    assert not (await reserve(ledger, 0.01)).admitted
    assert await ledger.refund(r.reservation, NOW) == Totals()
    assert await ledger.refund(r.reservation, NOW) == Totals()
    assert (await reserve(ledger, 1.0)).admitted


async def test_spend_at_the_cap_refuses_even_free_calls(ledger):
    """Once spend reaches the cap, a zero estimate is refused too."""
    r = await reserve(ledger, 0.5)
    await ledger.settle(r.reservation, USD, True, CAP_1USD, NOW)
    assert not (await reserve(ledger, 0.0)).admitted


async def test_concurrent_reservations_never_overshoot(ledger):
    """200 reservations at once against room for 50: exactly 50 are admitted."""
    results = await asyncio.gather(*(reserve(ledger, 0.02) for _ in range(200)))
    assert sum(r.admitted for r in results) == 50
    assert (await ledger.read(COUNTER)).reserved_nano == USD


async def test_request_cap_counts_in_flight_requests(ledger):
    """cap_requests bounds settled plus in-flight requests; a refund frees a place."""
    limits = Limits(cap_requests=3, refuse_flag="1:block")
    held = [await reserve(ledger, 0.0, limits) for _ in range(3)]
    assert all(r.admitted for r in held)
    assert not (await reserve(ledger, 0.0, limits)).admitted
    await ledger.refund(held[0].reservation, NOW)
    assert (await reserve(ledger, 0.0, limits)).admitted
    await ledger.settle(held[1].reservation, 0, True, limits, NOW)
    totals = await ledger.read(COUNTER)
    assert (totals.requests, totals.reserved_requests) == (1, 2)


async def test_degrade_point_switches_the_estimate(ledger):
    """Past degrade_nano the degraded estimate is held and the result says degraded."""
    limits = Limits(cap_nano=USD, degrade_nano=usd_to_nano(0.85))
    before = await reserve(ledger, 0.5, limits, degraded_usd=0.01)
    assert before.admitted and not before.degraded
    assert before.reservation.estimate_nano == usd_to_nano(0.5)
    await ledger.settle(before.reservation, usd_to_nano(0.9), True, limits, NOW)
    after = await reserve(ledger, 0.5, limits, degraded_usd=0.01)
    assert after.admitted and after.degraded
    assert after.reservation.estimate_nano == usd_to_nano(0.01)


async def test_thresholds_fire_once_per_window(ledger):
    """Each threshold flag is returned by exactly one settle, the first to reach it."""
    limits = Limits(cap_nano=USD, thresholds=(("0.7:alert", usd_to_nano(0.7), None),
                                              ("0.85:downgrade", usd_to_nano(0.85), None),
                                              ("1:block", USD, None)))
    fired: list[str] = []
    for _ in range(10):
        r = await reserve(ledger, 0.1, limits)
        res = await ledger.settle(r.reservation, usd_to_nano(0.1), True, limits, NOW)
        fired += res.new_flags
    assert fired == ["0.7:alert", "0.85:downgrade", "1:block"]
    assert (await ledger.read(COUNTER)).flags == {"0.7:alert", "0.85:downgrade", "1:block"}


async def test_request_thresholds(ledger):
    """A threshold on requests fires when the settled request count reaches it."""
    limits = Limits(cap_requests=10, thresholds=(("0.5:alert", None, 5),))
    fired = []
    for _ in range(6):
        r = await reserve(ledger, 0.0, limits)
        fired.append((await ledger.settle(r.reservation, 0, True, limits, NOW)).new_flags)
    assert fired == [(), (), (), (), ("0.5:alert",), ()]


async def test_expired_holds_are_released(ledger):
    """A hold past its deadline (a replica that died) no longer takes room; its late settle
    still adds the cost without releasing the hold twice."""
    stale = await reserve(ledger, 1.0, hold_s=30.0)
    assert not (await reserve(ledger, 0.5, now=NOW + 10)).admitted
    fresh = await reserve(ledger, 0.5, now=NOW + 31)
    assert fresh.admitted and fresh.totals.reserved_nano == usd_to_nano(0.5)
    res = await ledger.settle(stale.reservation, usd_to_nano(0.2), True, CAP_1USD, NOW + 40)
    assert res.totals == Totals(usd_to_nano(0.2), usd_to_nano(0.5), 1, 1)


async def test_settle_is_idempotent(ledger):
    """A settle retried after a timeout that had in fact run (the hold is gone, and it did not
    expire) changes nothing; a late settle of an expired hold applies once."""
    r = await reserve(ledger, 0.3)
    first = await ledger.settle(r.reservation, usd_to_nano(0.1), True, CAP_1USD, NOW)
    again = await ledger.settle(r.reservation, usd_to_nano(0.1), True, CAP_1USD, NOW)
    assert first.applied and not again.applied
    assert again.totals == first.totals == Totals(usd_to_nano(0.1), 0, 1, 0)
    late = await reserve(ledger, 0.3, hold_s=5)
    await reserve(ledger, 0.0, now=NOW + 6)  # purges the expired hold
    applied = [(await ledger.settle(late.reservation, usd_to_nano(0.2), True, CAP_1USD,
                                    NOW + 7)).applied for _ in range(2)]
    assert applied == [True, False]
    totals = await ledger.read(COUNTER)
    assert (totals.spend_nano, totals.requests) == (usd_to_nano(0.3), 2)


async def test_windows_and_keys_are_separate_counters(ledger):
    """Another window or another key starts from zero."""
    await reserve(ledger, 1.0)
    assert (await reserve(ledger, 1.0, counter=CounterRef(COUNTER.tag, "m202602",
                                                            COUNTER.expires_at))).admitted
    assert (await reserve(ledger, 1.0, counter=CounterRef("b:test:other", COUNTER.window,
                                                            COUNTER.expires_at))).admitted


async def test_large_amounts_stay_exact(ledger):
    """Spend past $1M (1e15 nano-USD) adds up to the nano-dollar."""
    limits = Limits(cap_nano=usd_to_nano(5_000_000))
    for cost in (1_234_567.891234567, 2_000_000.000000001):
        r = await reserve(ledger, 1.0, limits)
        await ledger.settle(r.reservation, usd_to_nano(cost), True, limits, NOW)
    assert (await ledger.read(COUNTER)).spend_nano == usd_to_nano(1_234_567.891234567) + \
        usd_to_nano(2_000_000.000000001)


async def test_redis_keys_share_a_tag_and_expire(redis_server):
    """Both keys of a counter carry one hash tag and expire after the window's grace."""
    backend = await _redis_backend(redis_server.url)
    try:
        ledger = RedisLedger(backend)
        await reserve(ledger, 0.1)
        assert backend.redis is not None
        keys = sorted(k.decode() for k in await backend.redis.keys("*"))
        assert keys == ["rp:{b:test:global}:w:m202601", "rp:{b:test:global}:w:m202601:holds"]
        for key in keys:  # the TTL is relative to the caller's clock, not Redis's
            assert abs(await backend.redis.ttl(key) - (COUNTER.expires_at - NOW)) <= 2
    finally:
        await backend.close()


async def test_redis_unreachable_raises_state_error(redis_server):
    """With Redis down, every operation raises StateError within the configured timeout."""
    backend = await _redis_backend(redis_server.url)
    try:
        ledger = RedisLedger(backend)
        redis_server.kill()
        with pytest.raises(StateError):
            await reserve(ledger, 0.1)
        with pytest.raises(StateError):
            await ledger.read(COUNTER)
    finally:
        await backend.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reserve", "settle", "refund"]),
                          st.integers(0, 400_000_000)), max_size=60))
def test_memory_ledger_never_exceeds_the_cap(ops):
    """Whatever the sequence, when calls cost their estimate, spend + reserved <= cap."""
    ledger = MemoryLedger()

    async def run() -> None:
        held = []
        for op, amount in ops:
            if op == "reserve":
                r = await ledger.reserve(COUNTER, CAP_1USD, amount, amount, NOW, NOW + 60)
                if r.admitted:
                    held.append(r.reservation)
            elif held:
                res = held.pop(0)
                if op == "settle":
                    await ledger.settle(res, res.estimate_nano, True, CAP_1USD, NOW)
                else:
                    await ledger.refund(res, NOW)
            t = await ledger.read(COUNTER)
            assert t.spend_nano + t.reserved_nano <= USD
            assert t.reserved_nano == sum(r.estimate_nano for r in held)

    asyncio.run(run())
