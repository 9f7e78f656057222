"""The Batch API's records on the cluster store's Redis (``moa.state.redis_store``).

A record is one JSON string per file or batch; a batch's status change is a ``WATCH``ed
transaction on its key (tried again if another replica changed it meanwhile), and a lease is the
usual Redis lock: a string holding its holder's name, set with an expiry, claimed and let go by
Lua scripts that check the holder first. Sorted sets keep each owner's batches and the open ones
in order of creation (a counter's value, so two batches created at once still have an order).
All keys share the ``{moa}`` hash tag, as the rest of the store's do.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from moa.state.batches import TERMINAL, BatchRecord, FileRecord

P = "{moa}"
SEQ, OPEN = f"{P}:batches:seq", f"{P}:batches:open"

# KEYS: the lease. ARGV: holder, ttl in ms.
CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


def _file_key(file_id: str) -> str:
    return f"{P}:batch_file:{file_id}"


def _batch_key(batch_id: str) -> str:
    return f"{P}:batch:{batch_id}"


def _owner_key(owner: str) -> str:
    return f"{P}:batches:owner:{owner}"


class RedisBatches:
    """``client``: the store's own (``decode_responses``)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._claim = client.register_script(CLAIM)
        self._release = client.register_script(RELEASE)

    async def add_file(self, record: FileRecord) -> None:
        await self.client.set(_file_key(record.id), record.model_dump_json())

    async def file(self, file_id: str) -> FileRecord | None:
        raw = await self.client.get(_file_key(file_id))
        return FileRecord.model_validate_json(raw) if raw else None

    async def add_batch(self, record: BatchRecord) -> None:
        seq = await self.client.incr(SEQ)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(_batch_key(record.id), record.model_dump_json())
            pipe.zadd(_owner_key(record.owner), {record.id: seq})
            if record.status not in TERMINAL:
                pipe.zadd(OPEN, {record.id: seq})
            await pipe.execute()

    async def batch(self, batch_id: str) -> BatchRecord | None:
        raw = await self.client.get(_batch_key(batch_id))
        return BatchRecord.model_validate_json(raw) if raw else None

    async def update_batch(
        self, batch_id: str, changes: dict[str, Any], when: Collection[str] | None = None
    ) -> BatchRecord | None:
        key = _batch_key(batch_id)
        result: list[BatchRecord | None] = [None]

        async def change(pipe: Any) -> None:
            result[0] = None  # a try after a conflict starts again from the record as it is
            raw = await pipe.get(key)
            if raw is None:
                return
            record = BatchRecord.model_validate_json(raw)
            if when is not None and record.status not in when:
                return
            new = record.changed(changes)
            pipe.multi()
            pipe.set(key, new.model_dump_json())
            if new.status in TERMINAL:
                pipe.zrem(OPEN, batch_id)
            result[0] = new

        await self.client.transaction(change, key)
        return result[0]

    async def list_batches(self, owner: str, after: str | None, limit: int) -> list[BatchRecord]:
        index = _owner_key(owner)
        if after is None:
            ids = await self.client.zrevrange(index, 0, limit - 1)
        else:
            seq = await self.client.zscore(index, after)
            if seq is None:  # not one of the owner's batches: nothing comes after it
                return []
            ids = await self.client.zrevrangebyscore(index, f"({int(seq)}", "-inf", start=0, num=limit)
        if not ids:
            return []
        raws = await self.client.mget([_batch_key(i) for i in ids])
        return [BatchRecord.model_validate_json(r) for r in raws if r]

    async def open_batches(self) -> list[str]:
        return [str(i) for i in await self.client.zrange(OPEN, 0, -1)]

    async def claim(self, name: str, holder: str, ttl_s: float) -> bool:
        ms = max(1, int(ttl_s * 1000))
        return bool(await self._claim(keys=[f"{P}:lease:{name}"], args=[holder, ms]))

    async def release(self, name: str, holder: str) -> None:
        await self._release(keys=[f"{P}:lease:{name}"], args=[holder])


__all__ = ["RedisBatches"]
