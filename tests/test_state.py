"""The state stores against the real thing: a SQLite file (two stores on it, as two replicas would
have) and a real redis-server (two clients). Same behaviour from both, held to the same tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from moa.auth import hash_key, new_key, new_record
from moa.state import KeyExists, KeyLimits, Refused, Reservation, StateStore, window_of
from moa.state.redis_store import RedisStore
from moa.state.sqlite_store import SQLiteStore
from tests.waiting import wait_until

BACKENDS = ["sqlite", "redis"]


async def _flush(url: str) -> None:
    store = RedisStore(url)
    await store.client.flushdb()
    await store.close()


@pytest.fixture(params=BACKENDS)
async def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[StateStore]]:
    """Two independent stores on the same state: what two replicas of the service hold."""
    if request.param == "sqlite":
        stores: list[StateStore] = [SQLiteStore(tmp_path / "state.db"), SQLiteStore(tmp_path / "state.db")]
    else:
        url = request.getfixturevalue("redis_server")
        await _flush(url)
        stores = [RedisStore(url), RedisStore(url)]
    yield stores
    for s in stores:
        await s.close()


async def test_keys_are_shared_stored_as_hashes_and_revocation_is_final(replicas: list[StateStore]) -> None:
    a, b = replicas
    assert not await a.any_keys()
    key = new_key()
    assert key.startswith("sk-")
    limits = KeyLimits(budget_usd=5, period="month", presets=("single",), models=(), detail=True)
    record = new_record("team-a", key, limits)
    await a.create_key(record)
    with pytest.raises(KeyExists):
        await b.create_key(new_record("team-a", new_key(), KeyLimits()))
    assert await b.any_keys()
    seen = await b.key_by_hash(hash_key(key))
    assert seen is not None and seen.name == "team-a" and seen.limits == limits
    assert key not in seen.model_dump_json()  # only the hash is stored
    assert await b.key_by_hash(hash_key(new_key())) is None
    assert await b.set_status("team-a", "disabled")
    assert (await a.key_by_name("team-a")).status == "disabled"  # type: ignore[union-attr]
    assert await a.set_status("team-a", "active")
    assert await a.set_status("team-a", "revoked")
    assert not await b.set_status("team-a", "active")  # revoked stays revoked
    assert [k.status for k in await b.list_keys()] == ["revoked"]
    assert not await a.set_status("nobody", "revoked")


async def test_many_concurrent_reservations_never_overspend(replicas: list[StateStore]) -> None:
    """Two hundred requests race for a budget that holds 33 of them, through two replicas: exactly
    33 get through, whatever the interleaving, and the ledger never passes the budget."""
    budget, cost = 1000, 30
    window = window_of("total", time.time())

    async def request(i: int) -> bool:
        store = replicas[i % 2]
        got = await store.reserve("k1", window, cost, budget, ttl_s=600)
        if isinstance(got, Refused):
            assert 0 <= got.remaining_micro < cost
            return False
        await asyncio.sleep(0.001 * (i % 5))
        await store.settle(got, cost)
        return True

    results = await asyncio.gather(*(request(i) for i in range(200)))
    assert sum(results) == budget // cost
    assert await replicas[0].spent("k1", window) == cost * (budget // cost) <= budget


async def test_settlement_charges_the_real_cost_and_frees_the_rest(replicas: list[StateStore]) -> None:
    a, b = replicas
    held = await a.reserve("k2", "total", 600, 1000, ttl_s=600)
    assert isinstance(held, Reservation)
    assert isinstance(await b.reserve("k2", "total", 500, 1000, ttl_s=600), Refused)
    await a.settle(held, 120)  # the request cost less than its worst case
    assert await b.spent("k2", "total") == 120
    assert isinstance(await b.reserve("k2", "total", 880, 1000, ttl_s=600), Reservation)
    # No budget: always reserved, still counted.
    free = await a.reserve("k3", "total", 10**9, None, ttl_s=600)
    assert isinstance(free, Reservation)
    await b.settle(free, 7)
    assert await a.spent("k3", "total") == 7


async def test_an_unsettled_reservation_expires(replicas: list[StateStore]) -> None:
    """A replica that dies holding a reservation does not lock the budget for ever."""
    a, b = replicas
    assert isinstance(await a.reserve("k4", "total", 900, 1000, ttl_s=0.2), Reservation)

    async def fits() -> bool:
        return isinstance(await b.reserve("k4", "total", 900, 1000, ttl_s=600), Reservation)

    await wait_until(fits, what="the dead reservation to expire")


async def test_requests_per_minute_are_counted_across_replicas(replicas: list[StateStore]) -> None:
    a, b = replicas
    minute = int(time.time() // 60)
    assert await a.take_request("k5", minute, 2, None) is None
    assert await b.take_request("k5", minute, 2, None) is None
    wait = await a.take_request("k5", minute, 2, None)
    assert wait is not None and 0 < wait <= 60
    assert await a.take_request("k5", minute + 1, 2, None) is None  # a new minute
    await b.add_tokens("k6", minute, 500)
    assert await a.take_request("k6", minute, None, 500) is not None
    assert await a.take_request("k6", minute, None, 501) is None


async def test_sqlite_state_survives_a_restart(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "state.db")
    key = new_key()
    await store.create_key(new_record("ops", key, KeyLimits(budget_usd=1)))
    held = await store.reserve("k7", "total", 300, 1000, ttl_s=600)
    assert isinstance(held, Reservation)
    await store.settle(held, 250)
    await store.close()
    reopened = SQLiteStore(tmp_path / "state.db")
    try:
        assert (await reopened.key_by_hash(hash_key(key))) is not None
        assert await reopened.spent("k7", "total") == 250
        assert isinstance(await reopened.reserve("k7", "total", 751, 1000, ttl_s=600), Refused)
    finally:
        await reopened.close()


def test_windows_follow_the_utc_calendar() -> None:
    t = 1_767_225_599.0  # 2025-12-31T23:59:59Z
    assert window_of("day", t) == "day:2025-12-31"
    assert window_of("day", t + 1) == "day:2026-01-01"
    assert window_of("month", t) == "month:2025-12"
    assert window_of("total", t) == "total"


async def test_tokens_per_minute_are_held_at_admission_and_settled(replicas: list[StateStore]) -> None:
    """A request holds its projected tokens in its key's minute, atomically across replicas, and
    settles to what it used; a request bigger than the whole TPM runs only alone in its minute."""
    a, b = replicas
    minute = int(time.time() // 60)

    async def hold(i: int) -> bool:
        return await replicas[i % 2].reserve_tokens("t1", minute, 30, 1000) is None

    assert sum(await asyncio.gather(*(hold(i) for i in range(100)))) == 1000 // 30
    await b.add_tokens("t1", minute, 100 - 30 * (1000 // 30))  # they settle to 100 tokens in all
    assert await a.reserve_tokens("t1", minute, 900, 1000) is None
    wait = await b.reserve_tokens("t1", minute, 1, 1000)
    assert wait is not None and 0 < wait <= 60
    # Alone in its minute, a request over the whole limit runs; nothing after it does.
    assert await a.reserve_tokens("t2", minute, 5000, 1000) is None
    assert await b.reserve_tokens("t2", minute, 1, 1000) is not None
    # Giving back more than was counted leaves zero, not a credit.
    await a.add_tokens("t3", minute, 10)
    await b.add_tokens("t3", minute, -50)
    assert await a.reserve_tokens("t3", minute, 1000, 1000) is None
    assert await b.reserve_tokens("t3", minute, 1, 1000) is not None
