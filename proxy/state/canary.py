"""Canary state: one route's published weight, and the two arms' observations.

Two implementations, one contract (``tests/test_canary_state.py`` runs one suite on both):

- :class:`MemoryCanaryStore`: this process only.
- :class:`RedisCanaryStore`: every replica. Each call goes through
  :meth:`~proxy.state.backend.StateBackend.call` (bounded by ``state.redis.timeout``,
  counted as ``rp_state_errors_total{feature="canary"}`` and raised as ``StateError`` on
  failure). Every key of one route shares the hash tag ``{canary:<route>}``, so the Lua
  scripts and MULTI blocks work on Redis Cluster.

What is stored (no secrets, no client keys: only counts, costs and latencies):

- the **published weight** — :class:`Published`: weight, state (``active`` |
  ``rolled_back``), a version bumped on every change (compare-and-set: of several replicas
  that judge the same windows, exactly one performs a rollback or a ramp step), when the
  weight last changed (the ramp's timer), ``since`` (windows that began before the last
  operator change or rollback are not judged) and the config weight the record follows.
- per **window** (``window id = floor(unix time / window)``) and arm: requests, errors and up
  to :data:`WINDOW_SAMPLES` latencies (the window's p95). Expire ``window_ttl_s`` after the
  last write.
- per **experiment** (``epoch``: a fingerprint of the variant's definition, so a new variant
  starts a new report) and arm: requests, errors, cost, and the newest
  :data:`REPORT_SAMPLES` latencies (a bounded sliding reservoir). Kept 30 days.

Replicas add observations in batches (:class:`Batch`), merged atomically (MULTI) with
those of every other replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from proxy.state.backend import StateBackend

ARMS = ("stable", "variant")
ACTIVE, ROLLED_BACK = "active", "rolled_back"
#: latencies kept per arm and window: the window's p95 is over (at most) these
WINDOW_SAMPLES = 1000
#: latencies kept per arm for the report: the newest ones
REPORT_SAMPLES = 2000
TOTALS_TTL_S = 30 * 86400


@dataclass(frozen=True, slots=True)
class Published:
    """The fleet's weight for one route's canary."""

    weight: float  # percent
    state: str  # ACTIVE | ROLLED_BACK
    version: int
    changed_at: float  # unix s of the last weight change (the ramp's timer)
    since: float  # unix s: windows that began earlier are not judged
    file_weight: float  # the config weight this record follows


@dataclass(slots=True)
class ArmStats:
    """One arm's observations (in a window, a batch, or the whole experiment)."""

    requests: int = 0
    errors: int = 0
    cost_usd: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)  # newest last

    def add(self, error: bool, latency_ms: float, cost_usd: float, cap: int) -> None:
        self.requests += 1
        self.errors += error
        self.cost_usd += cost_usd
        self.latencies_ms.append(latency_ms)
        if len(self.latencies_ms) > cap:
            del self.latencies_ms[: len(self.latencies_ms) - cap]

    def merge(self, other: ArmStats, cap: int) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.cost_usd += other.cost_usd
        self.latencies_ms.extend(other.latencies_ms)
        if len(self.latencies_ms) > cap:
            del self.latencies_ms[: len(self.latencies_ms) - cap]


#: observations by (window id, arm), waiting to be added to the store
Batch = dict[tuple[int, str], ArmStats]


class CanaryStore(Protocol):
    """Every method may raise ``StateError`` (Redis only)."""

    async def read(self) -> Published | None:
        """The published weight, or None before anything was published."""
        ...

    async def seed(self, file_weight: float, now: float) -> Published:
        """Publish ``file_weight`` (active) unless the record already follows it."""
        ...

    async def publish(self, weight: float, state: str, now: float, *, file_weight: float,
                      reset_windows: bool, expect_version: int | None = None
                      ) -> Published | None:
        """Set the weight; with ``expect_version``, only if the record is still at it
        (None when another replica changed it first)."""
        ...

    async def add(self, epoch: str, batch: Batch, now: float, window_ttl_s: float) -> None:
        """Add a batch to the windows and to the experiment's totals."""
        ...

    async def windows(self, epoch: str, ids: list[int]) -> dict[int, dict[str, ArmStats]]:
        """The windows' observations by id then arm (absent arms: empty stats)."""
        ...

    async def totals(self, epoch: str) -> dict[str, ArmStats]:
        """The experiment's observations by arm."""
        ...


# --------------------------------------------------------------------------- memory


class MemoryCanaryStore:
    """This process's canary state (``state.backend: memory``)."""

    def __init__(self) -> None:
        self._record: Published | None = None
        self._windows: dict[tuple[str, int], tuple[float, dict[str, ArmStats]]] = {}
        self._epoch = ""
        self._totals: dict[str, ArmStats] = {}

    async def read(self) -> Published | None:
        return self._record

    async def seed(self, file_weight: float, now: float) -> Published:
        rec = self._record
        if rec is None or rec.file_weight != file_weight:
            version = rec.version + 1 if rec is not None else 1
            rec = self._record = Published(file_weight, ACTIVE, version, now, now, file_weight)
        return rec

    async def publish(self, weight: float, state: str, now: float, *, file_weight: float,
                      reset_windows: bool, expect_version: int | None = None
                      ) -> Published | None:
        rec = self._record
        version = rec.version if rec is not None else 0
        if expect_version is not None and expect_version != version:
            return None
        since = now if reset_windows or rec is None else rec.since
        follows = rec.file_weight if rec is not None else file_weight
        self._record = Published(weight, state, version + 1, now, since, follows)
        return self._record

    async def add(self, epoch: str, batch: Batch, now: float, window_ttl_s: float) -> None:
        if epoch != self._epoch:
            self._epoch, self._totals = epoch, {}
            self._windows = {k: v for k, v in self._windows.items() if k[0] == epoch}
        for (wid, arm), stats in batch.items():
            _, arms = self._windows.get((epoch, wid), (0.0, {}))
            arms.setdefault(arm, ArmStats()).merge(stats, WINDOW_SAMPLES)
            self._windows[(epoch, wid)] = (now + window_ttl_s, arms)
            self._totals.setdefault(arm, ArmStats()).merge(stats, REPORT_SAMPLES)
        self._windows = {k: v for k, v in self._windows.items() if v[0] > now}

    async def windows(self, epoch: str, ids: list[int]) -> dict[int, dict[str, ArmStats]]:
        out = {}
        for wid in ids:
            arms = self._windows.get((epoch, wid), (0.0, {}))[1]
            out[wid] = {arm: _copy(arms.get(arm)) for arm in ARMS}
        return out

    async def totals(self, epoch: str) -> dict[str, ArmStats]:
        totals = self._totals if epoch == self._epoch else {}
        return {arm: _copy(totals.get(arm)) for arm in ARMS}


def _copy(stats: ArmStats | None) -> ArmStats:
    if stats is None:
        return ArmStats()
    return ArmStats(stats.requests, stats.errors, stats.cost_usd, list(stats.latencies_ms))


# --------------------------------------------------------------------------- redis

# KEYS[1] the record; ARGV: file_weight, now. Reset to the file's weight unless the record
# already follows it; returns the record.
_SEED = """
local fw = redis.call('HGET', KEYS[1], 'file_weight')
if (not fw) or tonumber(fw) ~= tonumber(ARGV[1]) then
  local v = redis.call('HINCRBY', KEYS[1], 'version', 1)
  redis.call('HSET', KEYS[1], 'weight', ARGV[1], 'state', 'active', 'changed_at', ARGV[2],
             'since', ARGV[2], 'file_weight', ARGV[1])
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS[1] the record; ARGV: expect_version ('' = any), weight, state, now, reset ('1'|'0'),
# file_weight (only when the record has none). Returns the record, or false.
_PUBLISH = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if ARGV[1] ~= '' and tonumber(ARGV[1]) ~= cur then return false end
redis.call('HSET', KEYS[1], 'version', cur + 1, 'weight', ARGV[2], 'state', ARGV[3],
           'changed_at', ARGV[4])
if ARGV[5] == '1' or redis.call('HEXISTS', KEYS[1], 'since') == 0 then
  redis.call('HSET', KEYS[1], 'since', ARGV[4])
end
redis.call('HSETNX', KEYS[1], 'file_weight', ARGV[6])
return redis.call('HGETALL', KEYS[1])
"""


class RedisCanaryStore:
    """The fleet's canary state for one route (``state.backend: redis``)."""

    def __init__(self, backend: StateBackend, route: str) -> None:
        assert backend.redis is not None
        self._backend = backend
        self._redis = backend.redis
        self._tag = f"canary:{route}"
        self._record_key = backend.key(self._tag, "weight")
        self._seed = self._redis.register_script(_SEED)
        self._publish = self._redis.register_script(_PUBLISH)

    def _key(self, *parts: str) -> str:
        return self._backend.key(self._tag, *parts)

    async def read(self) -> Published | None:
        raw = await self._backend.call("canary", lambda: self._redis.hgetall(self._record_key))
        return _published(raw) if raw else None

    async def seed(self, file_weight: float, now: float) -> Published:
        raw = await self._backend.call("canary", lambda: self._seed(
            keys=[self._record_key], args=[repr(file_weight), repr(now)]))
        rec = _published(_pairs(raw))
        assert rec is not None
        return rec

    async def publish(self, weight: float, state: str, now: float, *, file_weight: float,
                      reset_windows: bool, expect_version: int | None = None
                      ) -> Published | None:
        args = ["" if expect_version is None else str(expect_version), repr(weight), state,
                repr(now), "1" if reset_windows else "0", repr(file_weight)]
        raw = await self._backend.call("canary", lambda: self._publish(
            keys=[self._record_key], args=args))
        return None if not raw else _published(_pairs(raw))

    async def add(self, epoch: str, batch: Batch, now: float, window_ttl_s: float) -> None:
        if not batch:
            return
        ttl = max(1, int(window_ttl_s))
        totals = self._key(epoch, "tot")

        async def run() -> None:
            async with self._redis.pipeline(transaction=True) as p:
                for (wid, arm), s in batch.items():
                    win = self._key(epoch, "w", str(wid))
                    p.hincrby(win, f"{arm}:req", s.requests)
                    p.hincrby(win, f"{arm}:err", s.errors)
                    p.expire(win, ttl)
                    p.hincrby(totals, f"{arm}:req", s.requests)
                    p.hincrby(totals, f"{arm}:err", s.errors)
                    p.hincrbyfloat(totals, f"{arm}:cost", s.cost_usd)
                    if s.latencies_ms:
                        values = [f"{v:.3f}" for v in s.latencies_ms]
                        wlat = self._key(epoch, "wl", str(wid), arm)
                        p.rpush(wlat, *values)
                        p.ltrim(wlat, -WINDOW_SAMPLES, -1)
                        p.expire(wlat, ttl)
                        lat = self._key(epoch, "lat", arm)
                        p.rpush(lat, *values)
                        p.ltrim(lat, -REPORT_SAMPLES, -1)
                        p.expire(lat, TOTALS_TTL_S)
                p.expire(totals, TOTALS_TTL_S)
                await p.execute()

        await self._backend.call("canary", run)

    async def windows(self, epoch: str, ids: list[int]) -> dict[int, dict[str, ArmStats]]:
        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as p:
                for wid in ids:
                    p.hgetall(self._key(epoch, "w", str(wid)))
                    for arm in ARMS:
                        p.lrange(self._key(epoch, "wl", str(wid), arm), 0, -1)
                return list(await p.execute())

        raw = await self._backend.call("canary", run)
        out: dict[int, dict[str, ArmStats]] = {}
        step = 1 + len(ARMS)
        for i, wid in enumerate(ids):
            counts, *lists = raw[i * step:(i + 1) * step]
            out[wid] = {arm: _arm(counts, arm, lat) for arm, lat in zip(ARMS, lists, strict=True)}
        return out

    async def totals(self, epoch: str) -> dict[str, ArmStats]:
        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as p:
                p.hgetall(self._key(epoch, "tot"))
                for arm in ARMS:
                    p.lrange(self._key(epoch, "lat", arm), 0, -1)
                return list(await p.execute())

        counts, *lists = await self._backend.call("canary", run)
        return {arm: _arm(counts, arm, lat) for arm, lat in zip(ARMS, lists, strict=True)}


def _pairs(flat: list[Any]) -> dict[bytes, bytes]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def _published(raw: dict[Any, Any]) -> Published | None:
    if b"weight" not in raw:
        return None
    return Published(
        weight=float(raw[b"weight"]), state=raw.get(b"state", b"active").decode(),
        version=int(raw.get(b"version", b"0")),
        changed_at=float(raw.get(b"changed_at", b"0")), since=float(raw.get(b"since", b"0")),
        file_weight=float(raw.get(b"file_weight", raw[b"weight"])),
    )


def _arm(counts: dict[bytes, bytes], arm: str, latencies: list[bytes]) -> ArmStats:
    a = arm.encode()
    return ArmStats(
        requests=int(counts.get(a + b":req", b"0")), errors=int(counts.get(a + b":err", b"0")),
        cost_usd=float(counts.get(a + b":cost", b"0")),
        latencies_ms=[float(v) for v in latencies],
    )


def make_store(backend: StateBackend, route: str) -> CanaryStore:
    """The store the configured backend calls for."""
    if backend.redis is not None:
        return RedisCanaryStore(backend, route)
    return MemoryCanaryStore()
