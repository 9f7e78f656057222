"""Limits on a fake clock: reservation budgets (the math the cluster-wide limiter actor runs) and
the circuit breaker."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from moa.limits import (
    CircuitBreaker,
    LeasedRateBudget,
    LocalRateBudget,
    ProviderLimits,
    RateBudgetExceeded,
    UnlimitedBudget,
    reserved_slots,
)
from moa.ratelimit import ReservationLimiter
from tests.waiting import wait_until


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rpm_spreads_requests_over_the_minute() -> None:
    clock = Clock()
    lim = ReservationLimiter(rpm=60, tpm=None, clock=clock)
    waits = [lim.reserve(0, max_wait_s=100).wait_s for _ in range(62)]
    assert waits[:60] == [0.0] * 60  # the full bucket is the burst
    assert waits[60] == pytest.approx(1.0) and waits[61] == pytest.approx(2.0)  # then one per second
    clock.t += 10
    assert lim.reserve(0, 100).wait_s == pytest.approx(0.0)  # the debt of 2 is repaid after 2 s


def test_refusal_reserves_nothing_and_says_when() -> None:
    clock = Clock()
    lim = ReservationLimiter(rpm=2, tpm=None, clock=clock)
    assert lim.reserve(0, 0).granted and lim.reserve(0, 0).granted
    refused = lim.reserve(0, max_wait_s=5)
    assert not refused.granted and refused.wait_s == pytest.approx(30.0)
    # The refusal took nothing: a patient caller still waits only 30 s.
    assert lim.reserve(0, max_wait_s=60).wait_s == pytest.approx(30.0)
    assert lim.stats() == {"granted": 3, "refused": 1, "spare": 0}


def test_tokens_are_budgeted_and_settled() -> None:
    clock = Clock()
    lim = ReservationLimiter(rpm=None, tpm=6000, clock=clock)  # 100 tokens per second
    assert lim.reserve(6000, 0).granted
    assert lim.reserve(500, 10).wait_s == pytest.approx(5.0)
    lim.settle(reserved_tokens=500, actual_tokens=100)  # the call used less: refund 400
    assert lim.reserve(100, 10).wait_s == pytest.approx(2.0)  # level -100 after the refund
    # A single request bigger than the budget waits for a full bucket instead of forever.
    clock.t += 120
    assert lim.reserve(10_000, 0).granted


def test_a_refund_never_fills_the_bucket_past_a_minutes_budget() -> None:
    """A call's unused reservation comes back once it ends; the bucket refilled meanwhile. The two
    together never hold more than the per-minute budget, or the next minute could spend more than it
    allows (a long call of a large reservation would leave a burst behind it)."""
    clock = Clock()
    lim = ReservationLimiter(rpm=None, tpm=6000, clock=clock)  # 100 tokens per second
    assert lim.reserve(5000, 0).granted  # level 1000
    clock.t += 60  # the call runs a minute: the bucket refills to the full 6000 meanwhile
    lim.settle(reserved_tokens=5000, actual_tokens=100)  # the 4900 it did not use come back
    assert lim.tokens is not None and lim.tokens.level == 6000
    assert lim.reserve(6000, 0).granted
    assert not lim.reserve(1, 0).granted  # a minute's budget spent: nothing more at once


def test_circuit_breaker_states() -> None:
    from moa.limits import CircuitBreaker, CircuitState

    clock = Clock()
    b = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=clock)
    for _ in range(2):
        assert b.allow()
        b.record_failure()
    b.record_success()  # a success resets the count: failures must be consecutive
    for _ in range(3):
        assert b.allow()
        b.record_failure()
    assert b.state is CircuitState.OPEN and not b.allow()
    assert b.retry_after_s() == pytest.approx(10)
    clock.t += 10
    assert b.state is CircuitState.HALF_OPEN
    assert b.allow() and not b.allow()  # exactly one probe at a time
    b.record_failure()  # the probe failed: open for another cool-down
    assert b.state is CircuitState.OPEN and not b.allow()
    clock.t += 10
    assert b.allow()
    b.record_neutral()  # a cancelled probe frees the slot without a verdict
    assert b.allow()
    b.record_success()
    assert b.state is CircuitState.CLOSED and b.snapshot()["consecutive_failures"] == 0


# -- leases: a replica's share of a budget held elsewhere ------------------------------------------


class InProcessAuthority:
    """The limiter actor's three methods over the same ReservationLimiter, counting round trips."""

    def __init__(self, limiter: ReservationLimiter) -> None:
        self.limiter = limiter
        self.calls: Counter[str] = Counter()

    async def reserve(
        self, tokens: int, max_wait_s: float, lease_requests: int, lease_tokens: int
    ) -> tuple[bool, float, int, int]:
        self.calls["reserve"] += 1
        return self.limiter.reserve_and_lease(tokens, max_wait_s, lease_requests, lease_tokens)

    async def lease(self, requests: int, tokens: int) -> tuple[int, int]:
        self.calls["lease"] += 1
        return self.limiter.lease(requests, tokens)

    async def give_back(self, requests: int, tokens: int) -> None:
        self.calls["give_back"] += 1
        self.limiter.give_back(requests, tokens)

    async def take_spare(self, tokens: int) -> tuple[bool, float]:
        self.calls["take_spare"] += 1
        r = self.limiter.take_spare(tokens)
        return r.granted, r.wait_s


async def settle_background() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_lease_keeps_most_calls_local() -> None:
    limiter = ReservationLimiter(rpm=600, tpm=None, clock=Clock())  # frozen: no refill
    authority = InProcessAuthority(limiter)
    budget = LeasedRateBudget(authority, rpm=600, tpm=None)  # leases of 10 requests
    for _ in range(40):
        await budget.acquire(100, timeout_s=1)
        await settle_background()
    assert authority.calls["reserve"] == 1  # the first call; top-ups ran in the background
    assert authority.calls["lease"] <= 8
    # Every request granted or leased came out of the one budget.
    assert limiter.requests is not None and limiter.requests.level == 600 - 40 - budget.requests


async def test_the_shared_budget_holds_exactly_with_leases() -> None:
    limiter = ReservationLimiter(rpm=120, tpm=None, clock=Clock())
    replicas = [LeasedRateBudget(InProcessAuthority(limiter), rpm=120, tpm=None) for _ in range(3)]
    granted = refused = 0
    for i in range(200):
        try:
            await replicas[i % 3].acquire(10, timeout_s=0)
            granted += 1
        except RateBudgetExceeded as e:
            refused += 1
            assert e.retry_after_s == pytest.approx(0.5)
        await settle_background()
    assert granted == 120 and refused == 80


async def test_unspent_lease_and_token_refunds_go_back_when_held_idle() -> None:
    limiter = ReservationLimiter(rpm=None, tpm=60_000, clock=Clock())
    authority = InProcessAuthority(limiter)
    budget = LeasedRateBudget(authority, rpm=None, tpm=60_000, lease_s=0.1, hold_s=0.1)  # 100 tokens
    await budget.acquire(80, timeout_s=1)  # remote: reserves 80, leases 100
    await budget.acquire(50, timeout_s=1)  # local
    await budget.settle(reserved_tokens=50, actual_tokens=20)  # refund 30 onto the lease
    assert authority.calls == {"reserve": 1}
    # Held idle past hold_s, the lease goes back in the background.
    await wait_until(lambda: authority.calls["give_back"], what="the lease given back")
    assert authority.calls["give_back"] == 1 and budget.tokens == 0
    assert limiter.tokens is not None and limiter.tokens.level == 60_000 - 80 - 20


async def test_small_budgets_are_never_leased() -> None:
    limiter = ReservationLimiter(rpm=6, tpm=None, clock=Clock())
    authority = InProcessAuthority(limiter)
    budget = LeasedRateBudget(authority, rpm=6, tpm=None)  # 0.1 request per second: no lease
    for _ in range(6):
        await budget.acquire(10, timeout_s=0)
    with pytest.raises(RateBudgetExceeded):
        await budget.acquire(10, timeout_s=0)
    assert authority.calls == {"reserve": 7}


def test_a_lease_takes_only_what_is_asked_for() -> None:
    lim = ReservationLimiter(rpm=60, tpm=6000, clock=Clock())
    assert lim.lease(5, 0) == (5, 0)  # the holder still had tokens: requests alone
    assert lim.lease(0, 100) == (0, 100)
    assert lim.lease(100, 100) == (55, 100)  # no more than is free
    assert lim.lease(1, 100) == (0, 0)  # no request left: nothing at all
    lim.give_back(5, -50)  # unspent requests back, 50 overspent tokens charged
    assert lim.requests is not None and lim.requests.level == 5
    assert lim.tokens is not None and lim.tokens.level == 6000 - 200 - 50


def test_the_lease_is_one_second_of_refill_held_ten_seconds_and_60_rpm_is_the_smallest_sliced() -> None:
    """The defaults docs/OPERATIONS.md states: a lease is one second of the budget's refill (600 rpm:
    10 requests; 60,000 tpm: 1,000 tokens), given back after 10 s idle; 60 rpm (one request a
    second) is the smallest budget sliced, 59 is never."""
    authority = InProcessAuthority(ReservationLimiter(rpm=600, tpm=60_000, clock=Clock()))
    budget = LeasedRateBudget(authority, rpm=600, tpm=60_000)
    assert (budget.lease_requests, budget.lease_tokens, budget.hold_s) == (10, 1000, 10.0)
    assert budget.leasing
    sixty = LeasedRateBudget(
        InProcessAuthority(ReservationLimiter(rpm=60, tpm=None, clock=Clock())), 60, None
    )
    assert sixty.leasing and sixty.lease_requests == 1
    under = LeasedRateBudget(
        InProcessAuthority(ReservationLimiter(rpm=59, tpm=None, clock=Clock())), 59, None
    )
    assert not under.leasing and under.lease_requests == 0


# -- background calls: a batch's share, above the reserve kept for interactive calls ---------------


def test_a_background_call_takes_only_the_spare_above_the_reserve_and_never_goes_into_debt() -> None:
    clock = Clock()
    lim = ReservationLimiter(rpm=100, tpm=None, clock=clock, reserve=0.1)  # 10 requests kept back
    took = 0
    while lim.take_spare(0).granted:
        took += 1
    assert took == 90
    refused = lim.take_spare(0)
    assert not refused.granted and refused.wait_s == pytest.approx(0.6)  # one more above 10, at 100/min
    # The refusals took nothing: the reserve is whole, and interactive calls get it without a wait.
    assert [lim.reserve(0, 0).wait_s for _ in range(10)] == [0.0] * 10
    clock.t += 0.6
    # The refill goes to the reserve first: the batch waits until the reserve is whole again.
    assert lim.take_spare(0).wait_s == pytest.approx(6.0)
    assert lim.stats() == {"granted": 100, "refused": 0, "spare": 90}
    # A call larger than the spare waits for a full bucket, not forever.
    tokens = ReservationLimiter(rpm=None, tpm=6000, clock=clock, reserve=0.5)
    assert tokens.take_spare(5000).granted


def test_a_batch_taking_every_spare_request_never_makes_an_interactive_call_wait() -> None:
    """A batch takes every spare request of a 600 rpm budget, in 50 ms steps for two minutes, while
    an interactive call comes every second: with a reserve none of them waits, and the batch still
    gets all the rest (the first burst less the reserve, then the refill less the interactive
    calls). Without a reserve the interactive calls wait behind the batch."""

    def run(reserve: float) -> tuple[list[float], int]:
        clock = Clock()
        lim = ReservationLimiter(rpm=600, tpm=None, clock=clock, reserve=reserve)
        waits, batch = [], 0
        for step in range(2400):
            while lim.take_spare(0).granted:
                batch += 1
            if step % 20 == 0:
                waits.append(lim.reserve(0, 60).wait_s)
            clock.t += 0.05
        return waits, batch

    waits, batch = run(0.1)
    assert len(waits) == 120 and max(waits) == 0.0
    assert batch == pytest.approx(600 - 60 + 1200 - 120, abs=2)
    unreserved, _ = run(0.0)
    assert max(unreserved) > 0


async def test_a_local_background_call_gives_up_at_its_deadline_and_leaves_the_reserve_whole() -> None:
    budget = LocalRateBudget(rpm=60, tpm=None, clock=Clock(), reserve=0.5)  # frozen: no refill
    for _ in range(30):
        await budget.acquire(0, timeout_s=0, background=True)
    with pytest.raises(RateBudgetExceeded) as refused:
        await budget.acquire(0, timeout_s=0.05, background=True)
    assert refused.value.retry_after_s == pytest.approx(1.0)
    for _ in range(30):
        await budget.acquire(0, timeout_s=0)  # the reserve, for interactive calls, at once
    assert budget.limiter.stats() == {"granted": 60, "refused": 0, "spare": 30}


async def test_a_background_call_asks_the_authority_for_the_spare_and_never_spends_the_lease() -> None:
    limiter = ReservationLimiter(rpm=600, tpm=None, clock=Clock(), reserve=0.5)
    authority = InProcessAuthority(limiter)
    budget = LeasedRateBudget(authority, rpm=600, tpm=None)
    await budget.acquire(0, timeout_s=1)  # an interactive call: reserved, and a lease of 10 taken
    await settle_background()
    leased = budget.requests
    assert leased == 10
    for _ in range(5):
        await budget.acquire(0, timeout_s=1, background=True)
    assert budget.requests == leased and authority.calls["take_spare"] == 5
    assert limiter.stats()["spare"] == 5


async def test_background_calls_leave_the_reserved_slots_to_interactive_ones() -> None:
    limits = ProviderLimits(4, UnlimitedBudget(), CircuitBreaker(5, 30), reserve=0.25)  # one slot kept
    assert [await limits.enter(1, background=True) for _ in range(3)] == [True, True, True]
    assert not await limits.enter(0.05, background=True)
    assert await limits.enter(0)  # an interactive call takes the kept slot at once
    waiting = asyncio.create_task(limits.enter(5, background=True))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    limits.leave()  # the interactive call ends: the kept slot is free again, still not the batch's
    await asyncio.sleep(0.05)
    assert not waiting.done()
    limits.leave()  # a background call ends
    assert await waiting
    assert (limits.in_flight, limits.calls, limits.background_calls) == (3, 5, 4)
    # Rounded up, yet a provider allowed one call at a time still runs batches.
    assert (reserved_slots(32, 0.1), reserved_slots(4, 0.1), reserved_slots(1, 0.1)) == (4, 1, 0)


async def test_background_calls_are_granted_in_arrival_order_within_their_deadlines() -> None:
    """A call that came later does not take the spare an earlier one was waiting for, even if it
    looks just as the spare comes free; one whose deadline passes while it waits is refused."""
    from moa.limits import take_spare
    from moa.ratelimit import Reservation

    available, order = 0, []

    def taker(name: str) -> Any:
        async def take() -> Reservation:
            nonlocal available
            if available:
                available -= 1
                order.append(name)
                return Reservation(True, 0.0)
            return Reservation(False, 0.05)

        return take

    turn = asyncio.Lock()
    first = asyncio.create_task(take_spare(taker("first"), 5, turn))
    await asyncio.sleep(0.01)  # asked, refused, waiting
    available = 1
    later = asyncio.create_task(take_spare(taker("later"), 5, turn))
    with pytest.raises(RateBudgetExceeded):
        await take_spare(taker("hurried"), 0.02, turn)
    available += 1
    await asyncio.gather(first, later)
    assert order == ["first", "later"]


async def test_a_call_cancelled_while_it_waits_for_the_budget_gives_its_request_back() -> None:
    """A straggler its layer stopped waiting for is never sent: the request it had reserved goes
    back, and the next call waits no longer than it would have without it (here or through the
    shared budget's authority)."""
    local = LocalRateBudget(rpm=600, tpm=None, clock=Clock())  # frozen: 600 at once, then 0.1 s each
    limiter = ReservationLimiter(rpm=600, tpm=None, clock=Clock())
    shared = LeasedRateBudget(InProcessAuthority(limiter), rpm=6, tpm=None)  # never leased
    for budget, bucket in ((local, local.limiter.requests), (shared, limiter.requests)):
        assert bucket is not None
        bucket.level = 0.0
        waiting = asyncio.create_task(budget.acquire(0, timeout_s=10))
        await asyncio.sleep(0.02)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await settle_background()
        assert bucket.level == 0.0  # as if it had never asked
