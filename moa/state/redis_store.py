"""The cluster store: Redis, shared by every replica on every node.

Every read-modify-write is one Lua script, which Redis runs atomically: the budget check and the
reservation are a single step whoever runs them. All keys share the ``{moa}`` hash tag, so the
scripts also work on a Redis Cluster (one slot).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis.asyncio as aioredis

from moa.state import KeyExists, KeyRecord, KeyStatus, Refused, Reservation
from moa.state.redis_batches import RedisBatches

P = "{moa}"
KEYS_BY_ID, KEYS_BY_HASH, KEYS_BY_NAME = f"{P}:keys", f"{P}:keys:hash", f"{P}:keys:name"
# A key's status lives apart from its (immutable) record, so changing it rewrites no JSON.
KEY_STATUS = f"{P}:keys:status"
KEYS = [KEYS_BY_ID, KEYS_BY_HASH, KEYS_BY_NAME, KEY_STATUS]

CREATE = """
if redis.call('HEXISTS', KEYS[3], ARGV[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[5])
return 1
"""

SET_STATUS = """
local id = redis.call('HGET', KEYS[3], ARGV[1])
if not id then return 0 end
if redis.call('HGET', KEYS[4], id) == 'revoked' then return 0 end
redis.call('HSET', KEYS[4], id, ARGV[2])
return 1
"""

# KEYS: spent counter, reservation amounts (hash), reservation expiries (sorted set)
# ARGV: now, expires_at, micro, budget (-1: none), reservation id
RESERVE = """
local now = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, rid in ipairs(expired) do redis.call('HDEL', KEYS[2], rid) end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local budget = tonumber(ARGV[4])
local micro = tonumber(ARGV[3])
if budget >= 0 then
  local spent = tonumber(redis.call('GET', KEYS[1]) or '0')
  local held = 0
  for _, v in ipairs(redis.call('HVALS', KEYS[2])) do held = held + tonumber(v) end
  local remaining = budget - spent - held
  if micro > remaining then return {0, remaining} end
end
redis.call('HSET', KEYS[2], ARGV[5], micro)
redis.call('ZADD', KEYS[3], tonumber(ARGV[2]), ARGV[5])
return {1, 0}
"""

# A reservation that already expired is still charged: the money was spent.
SETTLE = """
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('INCRBY', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# KEYS: the minute's counter hash. ARGV: rpm (-1: none), tpm (-1: none)
TAKE_REQUEST = """
local requests = tonumber(redis.call('HGET', KEYS[1], 'requests') or '0')
local tokens = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if (rpm >= 0 and requests >= rpm) or (tpm >= 0 and tokens >= tpm) then return 0 end
redis.call('HINCRBY', KEYS[1], 'requests', 1)
redis.call('EXPIRE', KEYS[1], 120)
return 1
"""

# KEYS: the minute's counter hash. ARGV: tokens, tpm. A minute that counts nothing yet takes any
# request, however big: the limit is then passed by at most one projection.
RESERVE_TOKENS = """
local used = tonumber(redis.call('HGET', KEYS[1], 'tokens') or '0')
local want, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
if used > 0 and used + want > tpm then return 0 end
redis.call('HINCRBY', KEYS[1], 'tokens', want)
redis.call('EXPIRE', KEYS[1], 120)
return 1
"""

# KEYS: the minute's counter hash. ARGV: tokens (negative: given back, never below zero; a
# minute already gone is not brought back to give tokens back to it).
ADD_TOKENS = """
local delta = tonumber(ARGV[1])
if delta < 0 and redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HINCRBY', KEYS[1], 'tokens', delta) < 0 then redis.call('HSET', KEYS[1], 'tokens', 0) end
redis.call('EXPIRE', KEYS[1], 120)
return 1
"""


def _record(raw: str, status: str | None) -> KeyRecord:
    record = KeyRecord.model_validate_json(raw)
    return record.model_copy(update={"status": status}) if status else record


def _ledger_keys(key_id: str, window: str) -> list[str]:
    base = f"{P}:spend:{key_id}:{window}"
    return [base, f"{base}:held", f"{base}:expiry"]


class RedisStore:
    def __init__(self, url: str, password: str | None = None) -> None:
        self.client: Any = aioredis.Redis.from_url(url, password=password, decode_responses=True)
        self._create = self.client.register_script(CREATE)
        self._set_status = self.client.register_script(SET_STATUS)
        self._reserve = self.client.register_script(RESERVE)
        self._settle = self.client.register_script(SETTLE)
        self._take = self.client.register_script(TAKE_REQUEST)
        self._reserve_tokens = self.client.register_script(RESERVE_TOKENS)
        self._add_tokens = self.client.register_script(ADD_TOKENS)
        # The Batch API's files, batches and leases, on the same server.
        self.batches = RedisBatches(self.client)

    async def create_key(self, record: KeyRecord) -> None:
        created = await self._create(
            keys=KEYS,
            args=[record.id, record.name, record.key_hash, record.model_dump_json(), record.status],
        )
        if not created:
            raise KeyExists(f"a key named {record.name!r} already exists")

    async def list_keys(self) -> list[KeyRecord]:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(KEYS_BY_ID)
            pipe.hgetall(KEY_STATUS)
            records, statuses = await pipe.execute()
        keys = [_record(raw, statuses.get(key_id)) for key_id, raw in records.items()]
        return sorted(keys, key=lambda k: k.created_at)

    async def _by_id(self, key_id: str | None) -> KeyRecord | None:
        if key_id is None:
            return None
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hget(KEYS_BY_ID, key_id)
            pipe.hget(KEY_STATUS, key_id)
            raw, status = await pipe.execute()
        return _record(raw, status) if raw else None

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None:
        return await self._by_id(await self.client.hget(KEYS_BY_HASH, key_hash))

    async def key_by_name(self, name: str) -> KeyRecord | None:
        return await self._by_id(await self.client.hget(KEYS_BY_NAME, name))

    async def set_status(self, name: str, status: KeyStatus) -> bool:
        done = await self._set_status(keys=KEYS, args=[name, status])
        return bool(done)

    async def any_keys(self) -> bool:
        return bool(await self.client.hlen(KEYS_BY_ID))

    async def reserve(
        self, key_id: str, window: str, micro: int, budget_micro: int | None, ttl_s: float
    ) -> Reservation | Refused:
        rid = uuid.uuid4().hex
        now = time.time()
        budget = -1 if budget_micro is None else budget_micro
        ok, remaining = await self._reserve(
            keys=_ledger_keys(key_id, window), args=[now, now + ttl_s, micro, budget, rid]
        )
        if not ok:
            return Refused(remaining_micro=max(int(remaining), 0))
        return Reservation(id=rid, key_id=key_id, window=window, micro=micro)

    async def settle(self, reservation: Reservation, actual_micro: int) -> None:
        await self._settle(
            keys=_ledger_keys(reservation.key_id, reservation.window), args=[reservation.id, actual_micro]
        )

    async def spent(self, key_id: str, window: str) -> int:
        return int(await self.client.get(_ledger_keys(key_id, window)[0]) or 0)

    async def take_request(self, key_id: str, minute: int, rpm: int | None, tpm: int | None) -> float | None:
        ok = await self._take(
            keys=[f"{P}:rate:{key_id}:{minute}"],
            args=[-1 if rpm is None else rpm, -1 if tpm is None else tpm],
        )
        return None if ok else max((minute + 1) * 60 - time.time(), 0.001)

    async def reserve_tokens(self, key_id: str, minute: int, tokens: int, tpm: int) -> float | None:
        ok = await self._reserve_tokens(keys=[f"{P}:rate:{key_id}:{minute}"], args=[tokens, tpm])
        return None if ok else max((minute + 1) * 60 - time.time(), 0.001)

    async def add_tokens(self, key_id: str, minute: int, tokens: int) -> None:
        await self._add_tokens(keys=[f"{P}:rate:{key_id}:{minute}"], args=[tokens])

    async def close(self) -> None:
        await self.client.aclose()


__all__ = ["RedisStore"]
