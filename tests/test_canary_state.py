"""One contract for the canary store, run against memory and against a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog

from proxy.clock import FakeClock
from proxy.config import StateConfig
from proxy.metrics import Metrics
from proxy.state.backend import StateBackend, StateError
from proxy.state.canary import (
    REPORT_SAMPLES,
    WINDOW_SAMPLES,
    ArmStats,
    CanaryStore,
    MemoryCanaryStore,
    RedisCanaryStore,
)

NOW = 1_767_225_600.0


def _batch(*entries: tuple[int, str, int, int, list[float], float]) -> dict[Any, ArmStats]:
    return {(wid, arm): ArmStats(req, err, cost, list(lat))
            for wid, arm, req, err, lat, cost in entries}


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[CanaryStore]:
    if request.param == "memory":
        yield MemoryCanaryStore()
        return
    redis = request.getfixturevalue("redis_server")
    backend = StateBackend(StateConfig.model_validate(
        {"backend": "redis", "redis": {"url": redis.url, "timeout": "500ms"}}),
        Metrics(), structlog.get_logger(), FakeClock())
    yield RedisCanaryStore(backend, "chat")
    await backend.close()


async def test_seed_publishes_the_file_weight_once(store):
    """Seeding publishes the file's weight; seeding again with the same weight keeps a later
    operator change; a different file weight wins over it."""
    assert await store.read() is None
    rec = await store.seed(5.0, NOW)
    assert (rec.weight, rec.state, rec.file_weight, rec.since) == (5.0, "active", 5.0, NOW)
    changed = await store.publish(20.0, "active", NOW + 1, file_weight=5.0, reset_windows=True)
    assert changed is not None and changed.version > rec.version
    again = await store.seed(5.0, NOW + 2)
    assert again.weight == 20.0 and again.version == changed.version
    moved = await store.seed(10.0, NOW + 3)
    assert (moved.weight, moved.file_weight, moved.state) == (10.0, 10.0, "active")
    assert (await store.read()) == moved


async def test_publish_compare_and_set(store):
    """With expect_version, only the first of two writers at the same version wins."""
    rec = await store.seed(5.0, NOW)
    first = await store.publish(0.0, "rolled_back", NOW + 5, file_weight=5.0,
                                reset_windows=True, expect_version=rec.version)
    second = await store.publish(10.0, "active", NOW + 5, file_weight=5.0,
                                 reset_windows=False, expect_version=rec.version)
    assert first is not None and second is None
    assert (first.weight, first.state, first.since, first.changed_at) == (0.0, "rolled_back",
                                                                          NOW + 5, NOW + 5)
    assert (await store.read()) == first


async def test_publish_without_reset_keeps_since(store):
    """A ramp step (no reset) moves changed_at but not the judging start (since)."""
    rec = await store.seed(5.0, NOW)
    step = await store.publish(10.0, "active", NOW + 60, file_weight=5.0, reset_windows=False,
                               expect_version=rec.version)
    assert step is not None and (step.since, step.changed_at) == (NOW, NOW + 60)


async def test_publish_only_if_absent(store):
    """expect_version=0 creates a missing record (a store that lost it) and nothing else."""
    made = await store.publish(0.0, "rolled_back", NOW, file_weight=5.0, reset_windows=False,
                               expect_version=0)
    assert made is not None and made.file_weight == 5.0 and made.state == "rolled_back"
    assert await store.publish(3.0, "active", NOW, file_weight=5.0, reset_windows=False,
                               expect_version=0) is None


async def test_batches_add_up_per_window_and_in_totals(store):
    """Two replicas' batches add up in each window and in the experiment's totals."""
    await store.add("e1", _batch((7, "variant", 3, 1, [10.0, 20.0, 30.0], 0.03),
                                 (7, "stable", 5, 0, [5.0] * 5, 0.05)), NOW, 600)
    await store.add("e1", _batch((7, "variant", 2, 2, [40.0, 50.0], 0.02),
                                 (8, "variant", 1, 0, [60.0], 0.01)), NOW, 600)
    wins = await store.windows("e1", [7, 8, 9])
    v7 = wins[7]["variant"]
    assert (v7.requests, v7.errors, sorted(v7.latencies_ms)) == (5, 3, [10, 20, 30, 40, 50])
    assert wins[7]["stable"].requests == 5 and wins[8]["variant"].requests == 1
    assert wins[9]["variant"].requests == 0 and wins[9]["stable"].latencies_ms == []
    totals = await store.totals("e1")
    assert (totals["variant"].requests, totals["variant"].errors) == (6, 3)
    assert totals["variant"].cost_usd == pytest.approx(0.06)
    assert totals["stable"].cost_usd == pytest.approx(0.05)
    assert len(totals["variant"].latencies_ms) == 6


async def test_epochs_are_separate_experiments(store):
    """A new epoch (a new variant definition) starts from zero."""
    await store.add("e1", _batch((7, "variant", 3, 1, [1.0, 2.0, 3.0], 0.0)), NOW, 600)
    await store.add("e2", _batch((7, "variant", 1, 0, [9.0], 0.0)), NOW, 600)
    totals = await store.totals("e2")
    assert totals["variant"].requests == 1 and totals["variant"].latencies_ms == [9.0]
    assert (await store.windows("e2", [7]))[7]["variant"].requests == 1


async def test_latency_reservoirs_are_bounded_and_keep_the_newest(store):
    """Latencies are capped per window and per experiment, keeping the newest samples."""
    n = REPORT_SAMPLES + 500
    for i in range(0, n, 500):
        await store.add("e1", _batch((1 + i // WINDOW_SAMPLES, "stable", 500, 0,
                                      [float(v) for v in range(i, i + 500)], 0.0)), NOW, 600)
    totals = await store.totals("e1")
    assert totals["stable"].requests == n
    assert len(totals["stable"].latencies_ms) == REPORT_SAMPLES
    assert max(totals["stable"].latencies_ms) == n - 1
    assert min(totals["stable"].latencies_ms) == n - REPORT_SAMPLES
    await store.add("e1", _batch((99, "variant", 1, 0, [float(v) for v in range(1500)], 0.0)),
                    NOW, 600)
    assert len((await store.windows("e1", [99]))[99]["variant"].latencies_ms) == WINDOW_SAMPLES


async def test_redis_down_raises_state_error_within_timeout(redis_server):
    """A dead Redis fails fast (StateError, counted as feature=canary), never hangs."""
    metrics = Metrics()
    backend = StateBackend(StateConfig.model_validate(
        {"backend": "redis", "redis": {"url": redis_server.url, "timeout": "200ms"}}),
        metrics, structlog.get_logger(), FakeClock())
    store = RedisCanaryStore(backend, "chat")
    await store.seed(5.0, NOW)
    redis_server.kill()
    try:
        async with asyncio.timeout(5):
            with pytest.raises(StateError):
                await store.read()
            with pytest.raises(StateError):
                await store.add("e1", _batch((1, "stable", 1, 0, [1.0], 0.0)), NOW, 60)
        assert metrics.state_errors.labels("canary")._value.get() >= 2
    finally:
        await backend.close()


async def test_redis_keys_share_the_route_tag(redis_server):
    """Every key of a route's canary carries the {canary:<route>} hash tag (Cluster-safe)."""
    backend = StateBackend(StateConfig.model_validate(
        {"backend": "redis", "redis": {"url": redis_server.url, "timeout": "500ms"}}),
        Metrics(), structlog.get_logger(), FakeClock())
    try:
        store = RedisCanaryStore(backend, "chat")
        await store.seed(5.0, NOW)
        await store.add("e1", _batch((3, "variant", 2, 1, [1.0, 2.0], 0.1)), NOW, 60)
        assert backend.redis is not None
        keys = sorted(k.decode() for k in await backend.redis.keys("*"))
        assert keys and all(k.startswith("rp:{canary:chat}:") for k in keys)
        assert await backend.redis.ttl("rp:{canary:chat}:e1:w:3") > 0
    finally:
        await backend.close()
