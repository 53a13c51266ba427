"""Key-value with TTL: the narrow interface the response cache (and its leases) stand on.

Two implementations, one contract (``tests/test_state_kv.py`` runs the same suite on both):

- :class:`MemoryKV`: this process only. No background task: an entry past its TTL (read on
  the injected clock) is dropped when it is next touched, and the store is bounded — least
  recently used entries are evicted once the entries' bytes exceed ``max_bytes``.
- :class:`RedisKV`: every replica. Each call goes through :meth:`StateBackend.call`, so it
  is bounded by ``state.redis.timeout`` and a failure is counted for the feature and raised
  as :class:`~proxy.state.backend.StateError`. A logical key ``k`` is stored at
  ``<prefix>{<namespace>:k}``: each key is its own hash tag and every command touches one
  key, so entries spread over a Redis Cluster's slots. TTLs are Redis's own (``PX``).

Values are opaque bytes; callers never put secrets in keys or values. A ``ttl_s`` <= 0
means "already expired": ``set`` then deletes.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import TYPE_CHECKING, Protocol

from proxy.clock import Clock

if TYPE_CHECKING:
    from redis.commands.core import AsyncScript

    from proxy.state.backend import StateBackend

#: bytes charged per memory entry on top of its key and value (dict slot, tuple, float)
ENTRY_OVERHEAD = 96

# Delete the key only while it still holds the caller's value (a lease's owner token).
_DELETE_IF_EQUALS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class KV(Protocol):
    """Key-value with TTL. Every method may raise ``StateError`` (Redis only)."""

    async def get(self, key: str) -> bytes | None:
        """The live value of ``key``, or None (absent or expired)."""
        ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        """Store ``value`` for ``ttl_s`` seconds, replacing any value and TTL."""
        ...

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        """Store ``value`` only when ``key`` has no live value; True when stored."""
        ...

    async def delete(self, key: str) -> None:
        ...

    async def delete_if_equals(self, key: str, value: bytes) -> bool:
        """Delete ``key`` only while its value is ``value`` (atomically); True when deleted."""
        ...


class MemoryKV:
    """One process's KV: expiry on the injected clock, LRU-bounded by bytes."""

    def __init__(self, clock: Clock, max_bytes: int) -> None:
        self._clock = clock
        self.max_bytes = max_bytes
        self.size_bytes = 0
        self._data: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> bytes | None:
        return self._live(key)

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        self._put(key, value, ttl_s)

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        if self._live(key) is not None or ttl_s <= 0:
            return False
        self._put(key, value, ttl_s)
        return True

    async def delete(self, key: str) -> None:
        self._drop(key)

    async def delete_if_equals(self, key: str, value: bytes) -> bool:
        if self._live(key) != value:
            return False
        self._drop(key)
        return True

    def _live(self, key: str) -> bytes | None:
        found = self._data.get(key)
        if found is None:
            return None
        if self._clock.monotonic() >= found[1]:
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return found[0]

    def _put(self, key: str, value: bytes, ttl_s: float) -> None:
        self._drop(key)
        cost = _cost(key, value)
        if ttl_s <= 0 or cost > self.max_bytes:
            return  # expired at once, or could never fit: not stored
        self._data[key] = (value, self._clock.monotonic() + ttl_s)
        self.size_bytes += cost
        while self.size_bytes > self.max_bytes:
            old_key, (old_value, _) = self._data.popitem(last=False)
            self.size_bytes -= _cost(old_key, old_value)

    def _drop(self, key: str) -> None:
        found = self._data.pop(key, None)
        if found is not None:
            self.size_bytes -= _cost(key, found[0])

    #: :meth:`get` and :meth:`set` without a coroutine, for a caller that knows it holds a
    #: MemoryKV (the cache's hot path: no I/O, nothing to wait for)
    get_now = _live
    set_now = _put


def _cost(key: str, value: bytes) -> int:
    return len(key) + len(value) + ENTRY_OVERHEAD


class RedisKV:
    """The fleet's KV: one Redis command per call, bounded by ``state.redis.timeout``."""

    def __init__(self, backend: StateBackend, feature: str, namespace: str) -> None:
        assert backend.redis is not None, "RedisKV needs state.backend: redis"
        self._backend = backend
        self._redis = backend.redis
        self.feature = feature
        self._namespace = namespace
        self._delete_if_equals: AsyncScript = self._redis.register_script(_DELETE_IF_EQUALS)

    def redis_key(self, key: str) -> str:
        """Where ``key`` lives in Redis: ``<prefix>{<namespace>:<key>}``."""
        return self._backend.key(f"{self._namespace}:{key}")

    async def get(self, key: str) -> bytes | None:
        k = self.redis_key(key)
        value = await self._backend.call(self.feature, lambda: self._redis.get(k))
        assert value is None or isinstance(value, bytes)  # decode_responses=False
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        k = self.redis_key(key)
        if ttl_s <= 0:
            await self._backend.call(self.feature, lambda: self._redis.delete(k))
            return
        px = _ms(ttl_s)
        await self._backend.call(self.feature, lambda: self._redis.set(k, value, px=px))

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        if ttl_s <= 0:
            return False
        k = self.redis_key(key)
        px = _ms(ttl_s)
        stored = await self._backend.call(
            self.feature, lambda: self._redis.set(k, value, px=px, nx=True))
        return bool(stored)

    async def delete(self, key: str) -> None:
        k = self.redis_key(key)
        await self._backend.call(self.feature, lambda: self._redis.delete(k))

    async def delete_if_equals(self, key: str, value: bytes) -> bool:
        k = self.redis_key(key)
        deleted = await self._backend.call(
            self.feature, lambda: self._delete_if_equals(keys=[k], args=[value]))
        return bool(deleted)


def _ms(ttl_s: float) -> int:
    """A TTL in whole milliseconds, at least 1 (Redis refuses PX 0)."""
    return max(1, math.ceil(ttl_s * 1000))
