"""Limits on a fake clock: reservation budgets (the math the cluster-wide limiter actor runs) and
the circuit breaker."""

from __future__ import annotations

import pytest

from moa.ratelimit import ReservationLimiter


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
