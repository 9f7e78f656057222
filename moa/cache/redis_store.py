"""The cluster's shared store: plain Redis (no modules), shared by every replica on every node.

Entries are strings with a TTL. A sorted set (by write time) and a hash of sizes bound the store
by bytes: each write runs one Lua script that also drops expired and, past ``max_bytes``, the
oldest entries. A semantic index is a hash (member -> vector and anchors) with a sorted set of
write times; the scan over it is done by the replica (the candidates share one exact context, so
there are few). Every key carries the ``{moa-cache}`` hash tag: the scripts work on a Redis
Cluster too (one slot).
"""

from __future__ import annotations

import time
from typing import Any

import redis.asyncio as aioredis

from moa.cache.store import StoreStats

P = "{moa-cache}"
REDIS_TIMEOUT_S = 1.0
BY_TIME, SIZES, BYTES = f"{P}:by-time", f"{P}:sizes", f"{P}:bytes"
# Bumped by every clear, after its deletions (see moa.cache.store.TieredStore).
GENERATION = f"{P}:generation"

# KEYS: entry, by-time zset, sizes hash, bytes counter. ARGV: value, ttl ms, now, max bytes, oldest alive
PUT = """
local old = redis.call('HGET', KEYS[3], KEYS[1])
if old then redis.call('DECRBY', KEYS[4], old) end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], string.len(ARGV[1]))
local total = redis.call('INCRBY', KEYS[4], string.len(ARGV[1]))
local function drop(k)
  local size = tonumber(redis.call('HGET', KEYS[3], k) or '0')
  redis.call('HDEL', KEYS[3], k)
  redis.call('ZREM', KEYS[2], k)
  redis.call('DEL', k)
  return redis.call('DECRBY', KEYS[4], size)
end
for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[5], 'LIMIT', 0, 64)) do
  total = drop(k)
end
while total > tonumber(ARGV[4]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #oldest == 0 then break end
  total = drop(oldest[1])
end
return total
"""

# KEYS: index hash, its by-time zset. ARGV: member, payload, now, ttl ms, keep, oldest alive
INDEX_ADD = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
local n = redis.call('ZCARD', KEYS[2]) - tonumber(ARGV[5])
if n > 0 then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[2], 0, n - 1)) do table.insert(stale, m) end
end
for _, m in ipairs(stale) do
  redis.call('HDEL', KEYS[1], m)
  redis.call('ZREM', KEYS[2], m)
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: by-time zset, sizes hash, bytes counter, then the entries to drop.
DROP = """
for i = 4, #KEYS do
  local size = tonumber(redis.call('HGET', KEYS[2], KEYS[i]) or '0')
  redis.call('HDEL', KEYS[2], KEYS[i])
  redis.call('ZREM', KEYS[1], KEYS[i])
  redis.call('DEL', KEYS[i])
  redis.call('DECRBY', KEYS[3], size)
end
return #KEYS - 3
"""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisCacheStore:
    def __init__(self, url: str, max_bytes: int, ttl_s: float, password: str | None = None) -> None:
        # A cache must never hold a request up: a Redis that stops answering makes a miss (the
        # caller logs it) within this long, not at the request's deadline.
        self.client: Any = aioredis.Redis.from_url(
            url,
            password=password,
            decode_responses=False,
            socket_timeout=REDIS_TIMEOUT_S,
            socket_connect_timeout=REDIS_TIMEOUT_S,
        )
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._put = self.client.register_script(PUT)
        self._index_add = self.client.register_script(INDEX_ADD)
        self._drop = self.client.register_script(DROP)

    @staticmethod
    def _entry(key: str) -> str:
        return f"{P}:e:{key}"

    @staticmethod
    def _index(index: str) -> tuple[str, str]:
        return f"{P}:i:{index}", f"{P}:it:{index}"

    async def get(self, key: str) -> bytes | None:
        value: bytes | None = await self.client.get(self._entry(key))
        return value

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        now = time.time()
        await self._put(
            keys=[self._entry(key), BY_TIME, SIZES, BYTES],
            args=[value, max(int(ttl_s * 1000), 1), now, self.max_bytes, now - self.ttl_s],
        )

    async def index_add(self, index: str, member: str, payload: bytes, ttl_s: float, keep: int) -> None:
        now = time.time()
        await self._index_add(
            keys=list(self._index(index)),
            args=[member, payload, now, max(int(ttl_s * 1000), 1), keep, now - ttl_s],
        )

    async def index_read(self, index: str) -> dict[str, bytes]:
        raw: dict[bytes, bytes] = await self.client.hgetall(self._index(index)[0])
        return {m.decode(): p for m, p in raw.items()}

    async def clear(self, scope: str | None) -> int:
        prefix = "" if scope is None else _glob_escape(scope) + "|"
        dropped = 0
        batch: list[bytes] = []
        async for k in self.client.scan_iter(match=f"{_glob_escape(P)}:e:{prefix}*", count=500):
            batch.append(k)
            if len(batch) >= 200:
                dropped += await self._drop(keys=[BY_TIME, SIZES, BYTES, *batch])
                batch = []
        if batch:
            dropped += await self._drop(keys=[BY_TIME, SIZES, BYTES, *batch])
        for pattern in (f"{_glob_escape(P)}:i:{prefix}*", f"{_glob_escape(P)}:it:{prefix}*"):
            async for k in self.client.scan_iter(match=pattern, count=500):
                await self.client.delete(k)
        # Last: a replica that saw the new value and refilled its LRU finds nothing cleared left.
        await self.client.incr(GENERATION)
        return int(dropped)

    async def generation(self) -> int:
        return int(await self.client.get(GENERATION) or 0)

    async def stats(self) -> StoreStats:
        n = await self.client.zcard(BY_TIME)
        size = int(await self.client.get(BYTES) or 0)
        pool = self.client.connection_pool.connection_kwargs
        where = f"redis://{pool.get('host', '?')}:{pool.get('port', 6379)}/{pool.get('db', 0)}"
        return StoreStats(entries=int(n), bytes=size, where=where)

    async def close(self) -> None:
        await self.client.aclose()
