"""Per-provider limits held by whoever runs the provider client (a process, or a Ray replica):
a concurrency limit, a requests/tokens-per-minute budget, and a circuit breaker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Protocol

from moa.config import ProviderConfig
from moa.ratelimit import ReservationLimiter
from moa.tokens import approx_message_tokens

DEFAULT_OUTPUT_RESERVE = 512


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failure_threshold`` consecutive failures; after ``cooldown_s`` one probe is let
    through (half-open): its success closes the circuit, its failure opens it for another cool-down."""

    def __init__(
        self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.clock = clock
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> CircuitState:
        if self._opened_at is None:
            return CircuitState.CLOSED
        if self._probing or self.clock() - self._opened_at >= self.cooldown_s:
            return CircuitState.HALF_OPEN
        return CircuitState.OPEN

    def allow(self) -> bool:
        state = self.state
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.HALF_OPEN and not self._probing:
            self._probing = True
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._opened_at = None
        self._probing = False

    def record_failure(self) -> None:
        self._failures += 1
        if self._probing or self._failures >= self.failure_threshold:
            self._opened_at = self.clock()
        self._probing = False

    def record_neutral(self) -> None:
        """The call ended saying nothing about health (cancelled, bad request): free the probe slot."""
        self._probing = False

    def retry_after_s(self) -> float:
        if self._opened_at is None:
            return 0.0
        return max(self.cooldown_s - (self.clock() - self._opened_at), 0.0)

    def snapshot(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "consecutive_failures": self._failures,
            "retry_after_s": round(self.retry_after_s(), 3),
        }


class RateBudgetExceeded(Exception):
    def __init__(self, retry_after_s: float) -> None:
        super().__init__(f"rate budget exhausted; retry in {retry_after_s:.1f}s")
        self.retry_after_s = retry_after_s


class RateBudget(Protocol):
    """Requests/tokens-per-minute budget. In-process it is local; in Ray, one actor per provider."""

    async def acquire(self, tokens: int, timeout_s: float) -> None:
        """Wait until one request of ``tokens`` fits; raise RateBudgetExceeded if not within timeout_s."""
        ...

    async def settle(self, reserved_tokens: int, actual_tokens: int) -> None: ...


class LocalRateBudget:
    """The budget of one process: reservations in arrival order, then a sleep for the wait."""

    def __init__(self, rpm: int | None, tpm: int | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limiter = ReservationLimiter(rpm, tpm, clock)

    async def acquire(self, tokens: int, timeout_s: float) -> None:
        r = self.limiter.reserve(tokens, timeout_s)
        if not r.granted:
            raise RateBudgetExceeded(r.wait_s)
        if r.wait_s > 0:
            await asyncio.sleep(r.wait_s)

    async def settle(self, reserved_tokens: int, actual_tokens: int) -> None:
        self.limiter.settle(reserved_tokens, actual_tokens)


class UnlimitedBudget:
    async def acquire(self, tokens: int, timeout_s: float) -> None:
        return None

    async def settle(self, reserved_tokens: int, actual_tokens: int) -> None:
        return None


class ProviderLimits:
    """Everything that gates one provider's calls in this process."""

    def __init__(self, concurrency: int, budget: RateBudget, breaker: CircuitBreaker) -> None:
        self.concurrency = concurrency
        self.semaphore = asyncio.Semaphore(concurrency)
        self.budget = budget
        self.breaker = breaker
        self.in_flight = 0
        self.max_in_flight = 0

    @classmethod
    def from_config(cls, cfg: ProviderConfig, budget: RateBudget | None = None) -> ProviderLimits:
        if budget is None:
            rpm, tpm = cfg.limits.rpm, cfg.limits.tpm
            budget = LocalRateBudget(rpm, tpm) if (rpm or tpm) else UnlimitedBudget()
        breaker = CircuitBreaker(cfg.circuit_breaker.failure_threshold, cfg.circuit_breaker.cooldown_s)
        return cls(cfg.limits.concurrency, budget, breaker)

    async def enter(self, timeout_s: float) -> bool:
        """Take a concurrency slot, waiting at most ``timeout_s``; False if none came free."""
        try:
            await asyncio.wait_for(self.semaphore.acquire(), timeout=max(timeout_s, 0))
        except TimeoutError:
            return False
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        self.semaphore.release()

    def snapshot(self) -> dict[str, object]:
        return {
            **self.breaker.snapshot(),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "concurrency": self.concurrency,
        }


def estimate_tokens(contents: Iterable[str], max_tokens: int | None) -> int:
    """What a call may consume, reserved against the TPM budget before it is sent."""
    return approx_message_tokens(contents) + (max_tokens or DEFAULT_OUTPUT_RESERVE)
