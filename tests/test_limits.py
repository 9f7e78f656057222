"""Limits on a fake clock: reservation budgets (the math the cluster-wide limiter actor runs) and
the circuit breaker."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from moa.limits import LeasedRateBudget, RateBudgetExceeded
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
    assert lim.stats() == {"granted": 3, "refused": 1}


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
