"""Where cache entries live: the protocol, the in-process LRU, and the two-level store.

Each replica keeps an in-process LRU bounded by bytes in front of a shared store (Redis on a
cluster, a SQLite file on one node), so a repeat served by the same replica costs no I/O and
entries survive replica restarts. Keys start with their scope, so a scope can be cleared alone.

Clearing the shared store (``moa cache clear``, another process) cannot reach into a replica's
memory, so the shared store keeps a generation counter that every clear bumps; each replica's
``TieredStore`` reads it at most once per ``CLEAR_CHECK_S`` (one cheap read, on a lookup) and
empties its LRU when it moved.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("moa.cache")

# How often a replica asks the shared store whether it was cleared: a clear reaches every
# replica's LRU within this long (one small read per replica per interval, never one per hit).
CLEAR_CHECK_S = 1.0
# How long an entry copied from the shared store stays in the LRU: the bound on serving a cleared
# entry while the shared store cannot be read (the generation check then cannot run).
FILLED_TTL_S = 60.0


@dataclass
class StoreStats:
    entries: int
    bytes: int
    where: str


class CacheStore(Protocol):
    """Entries (opaque bytes with a TTL) and small per-context indexes for the semantic scan."""

    async def get(self, key: str) -> bytes | None: ...

    async def put(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def index_add(self, index: str, member: str, payload: bytes, ttl_s: float, keep: int) -> None:
        """Add ``member`` to ``index``; keep the ``keep`` newest members, none older than ``ttl_s``."""
        ...

    async def index_read(self, index: str) -> dict[str, bytes]: ...

    async def clear(self, scope: str | None) -> int:
        """Drop every entry (and index) of ``scope``, or everything, then bump the generation;
        returns how many entries went."""
        ...

    async def generation(self) -> int:
        """A counter every ``clear`` moves (after its deletions): a replica whose LRU was filled
        under another value must forget it."""
        ...

    async def stats(self) -> StoreStats: ...

    async def close(self) -> None: ...


def scope_of(key: str) -> str:
    return key.split("|", 1)[0]


class MemoryStore:
    """The in-process LRU, bounded by the bytes of its values (keys and bookkeeping not counted)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()
        self._indexes: dict[str, OrderedDict[str, tuple[bytes, float]]] = {}
        self._bytes = 0
        self._generation = 0

    def _now(self) -> float:
        return time.monotonic()

    async def get(self, key: str) -> bytes | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        value, expires = hit
        if expires <= self._now():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return value

    def _drop(self, key: str) -> None:
        value, _ = self._entries.pop(key)
        self._bytes -= len(value)

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        if len(value) > self.max_bytes:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (value, self._now() + ttl_s)
        self._bytes += len(value)
        while self._bytes > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    async def index_add(self, index: str, member: str, payload: bytes, ttl_s: float, keep: int) -> None:
        members = self._indexes.setdefault(index, OrderedDict())
        members.pop(member, None)
        members[member] = (payload, self._now() + ttl_s)
        while len(members) > keep:
            members.popitem(last=False)

    async def index_read(self, index: str) -> dict[str, bytes]:
        now = self._now()
        members = self._indexes.get(index, OrderedDict())
        return {m: p for m, (p, expires) in members.items() if expires > now}

    async def clear(self, scope: str | None) -> int:
        doomed = [k for k in self._entries if scope is None or scope_of(k) == scope]
        for k in doomed:
            self._drop(k)
        for index in [i for i in self._indexes if scope is None or scope_of(i) == scope]:
            del self._indexes[index]
        self._generation += 1
        return len(doomed)

    async def generation(self) -> int:
        return self._generation

    async def stats(self) -> StoreStats:
        return StoreStats(entries=len(self._entries), bytes=self._bytes, where="memory")

    async def close(self) -> None:
        return None


class TieredStore:
    """The replica's LRU in front of the shared store: reads fill the LRU, writes go to both.

    Before using its LRU (at most once per ``check_s``) it reads the shared store's generation;
    a value other than the one its entries were filled under means a clear happened somewhere
    (``moa cache clear``, another replica), and the whole LRU is dropped: a clear is rare, and
    the LRU refills from the shared store at one read per entry."""

    def __init__(self, local: MemoryStore, shared: CacheStore, check_s: float = CLEAR_CHECK_S) -> None:
        self.local, self.shared = local, shared
        self.check_s = check_s
        self._seen: int | None = None  # the generation the LRU's entries belong to
        self._checked = -math.inf
        self._resets = 0  # LRU drops so far: a fill begun before one must not land after it

    async def _check(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.check_s:
            return
        self._checked = now  # before the read: concurrent lookups do not all ask
        try:
            generation = await self.shared.generation()
        except Exception as e:
            # The LRU goes on serving (the store's failures make misses, never errors); entries
            # copied from the store still leave it after FILLED_TTL_S.
            log.warning("cache generation check failed: %s: %s", type(e).__name__, e)
            return
        if generation != self._seen:
            # Also on the first read: entries put while the store could not be read are of an
            # unknown generation.
            if (await self.local.stats()).entries:
                await self.local.clear(None)
                self._resets += 1
            self._seen = generation

    async def get(self, key: str) -> bytes | None:
        await self._check()
        value = await self.local.get(key)
        if value is None:
            resets = self._resets
            value = await self.shared.get(key)
            if value is not None and resets == self._resets:
                # The entry says how old it is; the cache checks its age against the TTL.
                await self.local.put(key, value, FILLED_TTL_S)
        return value

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._check()
        await self.local.put(key, value, ttl_s)
        await self.shared.put(key, value, ttl_s)

    async def index_add(self, index: str, member: str, payload: bytes, ttl_s: float, keep: int) -> None:
        await self.shared.index_add(index, member, payload, ttl_s, keep)

    async def index_read(self, index: str) -> dict[str, bytes]:
        return await self.shared.index_read(index)

    async def clear(self, scope: str | None) -> int:
        await self.local.clear(scope)
        return await self.shared.clear(scope)

    async def generation(self) -> int:
        return await self.shared.generation()

    async def stats(self) -> StoreStats:
        return await self.shared.stats()

    async def close(self) -> None:
        await self.shared.close()
