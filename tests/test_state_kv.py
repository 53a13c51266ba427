"""The KV-with-TTL contract: one suite, run against MemoryKV and RedisKV (a real redis-server).

Expiry is driven per implementation: the memory store reads the injected FakeClock (advanced
past the TTL), Redis expires keys itself (a short TTL, then a short real wait).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
import structlog

from proxy.clock import FakeClock
from proxy.config import StateConfig
from proxy.metrics import Metrics
from proxy.state.backend import StateBackend, StateError
from proxy.state.kv import ENTRY_OVERHEAD, KV, MemoryKV, RedisKV
from tests.conftest import RedisServer, free_port


@dataclass
class Store:
    kv: KV
    expire: Callable[[float], Awaitable[None]]  # let ttl_s pass for this implementation


def _state(url: str, timeout: str = "200ms", metrics: Metrics | None = None) -> StateBackend:
    cfg = StateConfig.model_validate(
        {"backend": "redis", "redis": {"url": url, "prefix": "t:", "timeout": timeout}})
    return StateBackend(cfg, metrics or Metrics(), structlog.get_logger(), FakeClock())


def _errors(metrics: Metrics, feature: str) -> float:
    return metrics.registry.get_sample_value("rp_state_errors_total", {"feature": feature}) or 0.0


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        clock = FakeClock()

        async def advance(ttl_s: float) -> None:
            clock.advance(ttl_s + 0.001)

        yield Store(MemoryKV(clock, 1024**2), advance)
        return
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    backend = _state(redis_server.url)

    async def wait(ttl_s: float) -> None:
        await asyncio.sleep(ttl_s + 0.05)

    yield Store(RedisKV(backend, "cache", "c"), wait)
    await backend.close()


# --------------------------------------------------------------------------- the contract


async def test_get_of_missing_key_is_none(store: Store) -> None:
    """An absent key reads as None, never raises."""
    assert await store.kv.get("nothing") is None


async def test_set_then_get_round_trips_any_bytes(store: Store) -> None:
    """Values are opaque bytes: every byte value and a 1 MiB value come back unchanged."""
    every_byte = bytes(range(256)) * 4
    big = b"x" * (1024 * 512)
    await store.kv.set("a", every_byte, 60)
    await store.kv.set("big", big, 60)
    assert await store.kv.get("a") == every_byte
    assert await store.kv.get("big") == big


async def test_set_overwrites_value(store: Store) -> None:
    """A second set replaces the value."""
    await store.kv.set("k", b"one", 60)
    await store.kv.set("k", b"two", 60)
    assert await store.kv.get("k") == b"two"


async def test_value_expires_after_ttl(store: Store) -> None:
    """A value is readable within its TTL and gone after it."""
    await store.kv.set("k", b"v", 0.1)
    await store.kv.set("long", b"v", 60)
    assert await store.kv.get("k") == b"v"
    await store.expire(0.1)
    assert await store.kv.get("k") is None
    assert await store.kv.get("long") == b"v"


async def test_set_replaces_ttl(store: Store) -> None:
    """Setting again replaces the TTL: a long-lived value re-set with a short TTL expires."""
    await store.kv.set("k", b"v", 60)
    await store.kv.set("k", b"v2", 0.1)
    await store.expire(0.1)
    assert await store.kv.get("k") is None


async def test_non_positive_ttl_deletes(store: Store) -> None:
    """A TTL <= 0 means already expired: the key is gone, not stored forever."""
    await store.kv.set("k", b"v", 60)
    await store.kv.set("k", b"v", 0)
    assert await store.kv.get("k") is None
    assert await store.kv.set_if_absent("k", b"v", 0) is False
    assert await store.kv.get("k") is None


async def test_delete(store: Store) -> None:
    """delete removes the key; deleting a missing key is fine."""
    await store.kv.set("k", b"v", 60)
    await store.kv.delete("k")
    await store.kv.delete("never")
    assert await store.kv.get("k") is None


async def test_set_if_absent_only_once(store: Store) -> None:
    """set_if_absent stores only when no live value: the first caller wins, others see False."""
    assert await store.kv.set_if_absent("lease", b"a", 60) is True
    assert await store.kv.set_if_absent("lease", b"b", 60) is False
    assert await store.kv.get("lease") == b"a"


async def test_set_if_absent_after_expiry(store: Store) -> None:
    """An expired value no longer blocks set_if_absent (a lease whose holder died)."""
    assert await store.kv.set_if_absent("lease", b"a", 0.1) is True
    await store.expire(0.1)
    assert await store.kv.set_if_absent("lease", b"b", 60) is True
    assert await store.kv.get("lease") == b"b"


async def test_set_if_absent_concurrent_has_one_winner(store: Store) -> None:
    """Of 20 concurrent set_if_absent calls exactly one wins."""
    won = await asyncio.gather(*(store.kv.set_if_absent("l", str(i).encode(), 60)
                                 for i in range(20)))
    assert sum(won) == 1


async def test_delete_if_equals_only_for_owner(store: Store) -> None:
    """delete_if_equals deletes only while the value is the caller's (a lease's token)."""
    await store.kv.set("lease", b"mine", 60)
    assert await store.kv.delete_if_equals("lease", b"theirs") is False
    assert await store.kv.get("lease") == b"mine"
    assert await store.kv.delete_if_equals("lease", b"mine") is True
    assert await store.kv.get("lease") is None
    assert await store.kv.delete_if_equals("lease", b"mine") is False


# --------------------------------------------------------------------------- memory only


async def test_memory_is_bounded_by_bytes_lru() -> None:
    """Past max_bytes the least recently used entries go; a read refreshes recency."""
    value = b"v" * 100
    per_entry = 1 + len(value) + ENTRY_OVERHEAD
    kv = MemoryKV(FakeClock(), max_bytes=per_entry * 3)
    for k in "abc":
        await kv.set(k, value, 60)
    assert await kv.get("a") == value  # a is now the most recently used
    await kv.set("d", value, 60)
    assert await kv.get("b") is None
    assert [await kv.get(k) for k in "acd"] == [value] * 3
    assert kv.size_bytes <= kv.max_bytes and len(kv) == 3


async def test_memory_refuses_value_larger_than_bound() -> None:
    """A value that can never fit is not stored and evicts nothing."""
    kv = MemoryKV(FakeClock(), max_bytes=1000)
    await kv.set("small", b"s", 60)
    await kv.set("huge", b"h" * 2000, 60)
    assert await kv.get("huge") is None
    assert await kv.get("small") == b"s"


async def test_memory_expired_entries_release_bytes() -> None:
    """An expired entry's bytes are released when it is read."""
    clock = FakeClock()
    kv = MemoryKV(clock, max_bytes=10_000)
    await kv.set("k", b"v" * 100, 1)
    clock.advance(2)
    assert await kv.get("k") is None
    assert kv.size_bytes == 0


# --------------------------------------------------------------------------- redis only


async def test_redis_key_layout_is_prefixed_and_hash_tagged(redis_server: RedisServer) -> None:
    """A logical key lives at <prefix>{<namespace>:<key>} with its TTL set by Redis."""
    backend = _state(redis_server.url)
    try:
        kv = RedisKV(backend, "cache", "c")
        await kv.set("abc", b"v", 30)
        assert kv.redis_key("abc") == "t:{c:abc}"
        assert backend.redis is not None
        assert await backend.redis.keys("*") == [b"t:{c:abc}"]
        assert 0 < await backend.redis.pttl("t:{c:abc}") <= 30_000
    finally:
        await backend.close()


async def test_redis_down_fails_within_timeout_and_counts() -> None:
    """With nothing listening, every call raises StateError quickly and is counted by feature."""
    metrics = Metrics()
    backend = _state(f"redis://127.0.0.1:{free_port()}/0", timeout="100ms", metrics=metrics)
    kv = RedisKV(backend, "cache", "c")
    started = time.monotonic()
    for op in (kv.get("k"), kv.set("k", b"v", 1), kv.set_if_absent("k", b"v", 1),
               kv.delete_if_equals("k", b"v")):
        with pytest.raises(StateError):
            await op
    assert time.monotonic() - started < 5  # never the client's default multi-second timeouts
    assert _errors(metrics, "cache") == 4
    await backend.close()


async def test_redis_unresponsive_is_cut_at_timeout() -> None:
    """A Redis that accepts but never answers is cut at state.redis.timeout (not hung)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        backend = _state(f"redis://127.0.0.1:{port}/0", timeout="100ms")
        kv = RedisKV(backend, "cache", "c")
        started = time.monotonic()
        with pytest.raises(StateError):
            await kv.get("k")
        assert time.monotonic() - started < 2
        await backend.close()


async def test_redis_recovers_after_restart(redis_server: RedisServer, logs: list) -> None:
    """Killed: calls fail (logged once); restarted: the next calls succeed with no error,
    pooled connections re-dialled, and the recovery is logged."""
    backend = _state(redis_server.url)
    kv = RedisKV(backend, "cache", "c")
    try:
        await kv.set("k", b"v", 60)
        redis_server.kill()
        for _ in range(3):
            with pytest.raises(StateError):
                await kv.get("k")
        redis_server.start()
        await kv.set("k", b"again", 60)
        assert await kv.get("k") == b"again"
        assert await kv.delete_if_equals("k", b"again") is True  # the script is re-loaded
        events = [e["event"] for e in logs if e.get("feature") == "cache"]
        assert events == ["state_unavailable", "state_recovered"]
    finally:
        await backend.close()


async def test_redis_pool_waits_instead_of_failing_past_max_connections(
        redis_server: RedisServer) -> None:
    """More concurrent calls than pooled connections queue for one (no 'too many connections')."""
    cfg = StateConfig.model_validate({"backend": "redis", "redis": {
        "url": redis_server.url, "timeout": "2s", "max_connections": 2}})
    metrics = Metrics()
    backend = StateBackend(cfg, metrics, structlog.get_logger(), FakeClock())
    kv = RedisKV(backend, "cache", "c")
    try:
        await asyncio.gather(*(kv.set(f"k{i}", b"v", 60) for i in range(50)))
        assert all(v == b"v" for v in await asyncio.gather(*(kv.get(f"k{i}") for i in range(50))))
        assert _errors(metrics, "cache") == 0
    finally:
        await backend.close()
