"""Per-provider limits held by whoever runs the provider client (a process, or a Ray replica):
a concurrency limit, a requests/tokens-per-minute budget, and a circuit breaker."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Protocol

from moa.config import ProviderConfig
from moa.ratelimit import Reservation, ReservationLimiter

DEFAULT_OUTPUT_RESERVE = 512

log = logging.getLogger("moa.limits")


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

    async def acquire(self, tokens: int, timeout_s: float, background: bool = False) -> None:
        """Wait until one request of ``tokens`` fits; raise RateBudgetExceeded if not within
        timeout_s. ``background``: a batch's call, which takes only what is spare above the
        interactive reserve (``ReservationLimiter.take_spare``)."""
        ...

    async def settle(self, reserved_tokens: int, actual_tokens: int) -> None: ...


# The shortest a background call waits before it looks at the budget again.
SPARE_POLL_S = 0.01


async def take_spare(
    take: Callable[[], Awaitable[Reservation]], timeout_s: float, turn: asyncio.Lock
) -> None:
    """A background call's share of a budget: ``take`` asked again after each wait it is told,
    until it is granted; RateBudgetExceeded once the next wait would pass ``timeout_s``.

    The background calls of this process ask one at a time, in arrival order (``turn``, a FIFO
    lock): granted in the order they came, as reservations are, rather than to whichever of a
    crowd of pollers happens to look first (which would leave an unlucky one waiting past its
    deadline while later ones pass)."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    try:
        async with asyncio.timeout(timeout_s), turn:
            while True:
                r = await take()
                if r.granted:
                    return
                wait = max(r.wait_s, SPARE_POLL_S)
                if loop.time() + wait > end:
                    raise RateBudgetExceeded(r.wait_s)
                await asyncio.sleep(wait)
    except TimeoutError:
        # The calls ahead of it took the time: it would be granted a while after them.
        raise RateBudgetExceeded(max(SPARE_POLL_S, timeout_s)) from None


class LocalRateBudget:
    """The budget of one process: reservations in arrival order, then a sleep for the wait;
    background calls take the spare above ``reserve`` (a share of each bucket)."""

    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        clock: Callable[[], float] = time.monotonic,
        reserve: float = 0.0,
    ) -> None:
        self.limiter = ReservationLimiter(rpm, tpm, clock, reserve)
        self._spare_turn = asyncio.Lock()  # background calls ask in arrival order

    async def acquire(self, tokens: int, timeout_s: float, background: bool = False) -> None:
        if background:

            async def take() -> Reservation:
                return self.limiter.take_spare(tokens)

            await take_spare(take, timeout_s, self._spare_turn)
            return
        r = self.limiter.reserve(tokens, timeout_s)
        if not r.granted:
            raise RateBudgetExceeded(r.wait_s)
        if r.wait_s > 0:
            try:
                await asyncio.sleep(r.wait_s)
            except asyncio.CancelledError:
                # Cancelled while it waited (a straggler its layer stopped waiting for): it is
                # never sent, so its request goes back (its tokens go back with the settlement).
                self.limiter.give_back(1, 0)
                raise

    async def settle(self, reserved_tokens: int, actual_tokens: int) -> None:
        self.limiter.settle(reserved_tokens, actual_tokens)


class BudgetAuthority(Protocol):
    """Where a shared budget lives (in Ray, the provider's limiter actor); every call is a round trip."""

    async def reserve(
        self, tokens: int, max_wait_s: float, lease_requests: int, lease_tokens: int
    ) -> tuple[bool, float, int, int]:
        """A reservation for one call, plus a lease of the given size when it needs no wait:
        (granted, wait_s, leased requests, leased tokens)."""
        ...

    async def lease(self, requests: int, tokens: int) -> tuple[int, int]: ...

    async def give_back(self, requests: int, tokens: int) -> None: ...

    async def take_spare(self, tokens: int) -> tuple[bool, float]:
        """A background call's share (``ReservationLimiter.take_spare``): (granted, wait_s)."""
        ...


class LeasedRateBudget:
    """This process's share of a budget held elsewhere, so most calls cost no round trip.

    The holder leases ``lease_s`` worth of the budget's refill (``rpm/60`` requests and ``tpm/60``
    tokens per second) out of what is free now, spends it locally, tops it up in the background
    when half is gone, and gives back what is left once it has gone ``hold_s`` without a top-up
    (an idle replica keeps its slice a while, so a quiet service's next call is local too). So no
    replica holds more than ``lease_s`` of refill. Token settlements are booked on the lease. Calls
    the lease cannot cover go to the authority as plain reservations (waits and refusals as
    before); budgets smaller than one call per ``lease_s`` are never leased, so they stay exact.

    A background call never spends the lease (interactive capacity, taken to keep their calls
    local): it asks the authority for the spare above the reserve, a round trip per try.
    """

    def __init__(
        self,
        authority: BudgetAuthority,
        rpm: int | None,
        tpm: int | None,
        lease_s: float = 1.0,
        hold_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.authority = authority
        self.rpm, self.tpm = rpm, tpm
        self.hold_s = hold_s
        self.clock = clock
        self.lease_requests = int(rpm * lease_s / 60) if rpm else 0
        self.lease_tokens = int(tpm * lease_s / 60) if tpm else 0
        self.leasing = (not rpm or self.lease_requests >= 1) and (not tpm or self.lease_tokens >= 1)
        self.requests = 0  # leased and unspent; counted only when rpm is set
        self.tokens = 0  # leased and unspent (negative: overspent); counted only when tpm is set
        self.expires = -math.inf
        self._topping_up = False
        self._spare_turn = asyncio.Lock()  # this replica's background calls ask in arrival order
        self._expiry: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def acquire(self, tokens: int, timeout_s: float, background: bool = False) -> None:
        if background:

            async def take() -> Reservation:
                return Reservation(*await self.authority.take_spare(tokens))

            await take_spare(take, timeout_s, self._spare_turn)
            return
        if self._take(tokens):
            if self._low():
                self._spawn(self._top_up())
            return
        want = self._want() if not self._topping_up else (0, 0)
        self._topping_up = self._topping_up or want != (0, 0)
        try:
            granted, wait, requests, leased_tokens = await self.authority.reserve(tokens, timeout_s, *want)
        finally:
            if want != (0, 0):
                self._topping_up = False
        self._add(requests, leased_tokens)
        if not granted:
            raise RateBudgetExceeded(wait)
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except asyncio.CancelledError:
                self._spawn(self.authority.give_back(1, 0))  # never sent: as LocalRateBudget
                raise

    async def settle(self, reserved_tokens: int, actual_tokens: int) -> None:
        if not self.tpm or reserved_tokens == actual_tokens:
            return
        if self.clock() < self.expires:
            self.tokens += reserved_tokens - actual_tokens
        else:
            self._spawn(self.authority.give_back(0, reserved_tokens - actual_tokens))

    def _take(self, tokens: int) -> bool:
        if not self.leasing or self.clock() >= self.expires:
            return False
        if (self.rpm and self.requests < 1) or (self.tpm and self.tokens < tokens):
            return False
        self.requests -= 1 if self.rpm else 0
        self.tokens -= tokens if self.tpm else 0
        return True

    def _low(self) -> bool:
        return bool(
            (self.rpm and self.requests * 2 < self.lease_requests)
            or (self.tpm and self.tokens * 2 < self.lease_tokens)
        )

    def _want(self) -> tuple[int, int]:
        if not self.leasing:
            return 0, 0
        return max(0, self.lease_requests - self.requests), max(0, self.lease_tokens - self.tokens)

    def _add(self, requests: int, tokens: int) -> None:
        if not (requests or tokens):
            return
        self.requests += requests
        self.tokens += tokens
        self.expires = self.clock() + self.hold_s
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(self.hold_s, self._expire)

    def _expire(self) -> None:
        self._expiry = None
        left = self.expires - self.clock()
        if left > 0:  # topped up since: look again when that lease ends
            self._expiry = asyncio.get_running_loop().call_later(left, self._expire)
            return
        requests, tokens = self.requests, self.tokens
        self.requests = self.tokens = 0
        if requests or tokens:
            self._spawn(self.authority.give_back(requests, tokens))

    async def _top_up(self) -> None:
        if self._topping_up:
            return
        self._topping_up = True
        try:
            self._add(*await self.authority.lease(*self._want()))
        finally:
            self._topping_up = False

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # The authority may be restarting: the budget's next call goes to it directly anyway.
            log.debug("rate budget bookkeeping failed: %s", type(task.exception()).__name__)


class UnlimitedBudget:
    async def acquire(self, tokens: int, timeout_s: float, background: bool = False) -> None:
        return None

    async def settle(self, reserved_tokens: int, actual_tokens: int) -> None:
        return None


def reserved_slots(concurrency: int, reserve: float) -> int:
    """The concurrency slots background calls leave free: ``reserve`` of them, rounded up, yet
    never all (a batch must be able to run on a provider allowed one call at a time)."""
    return min(math.ceil(concurrency * reserve), concurrency - 1)


class ProviderLimits:
    """Everything that gates one provider's calls in this process. Background calls (a batch's)
    take a slot only while ``reserved_slots`` stay free for interactive ones."""

    def __init__(
        self, concurrency: int, budget: RateBudget, breaker: CircuitBreaker, reserve: float = 0.0
    ) -> None:
        self.concurrency = concurrency
        self.semaphore = asyncio.Semaphore(concurrency)
        self.budget = budget
        self.breaker = breaker
        self.background_cap = concurrency - reserved_slots(concurrency, reserve)
        self.in_flight = 0
        self.max_in_flight = 0
        self.calls = 0  # calls admitted through this process's gate, ever
        self.background_calls = 0  # of which background ones
        self._left: asyncio.Event | None = None  # set when a call leaves, while one waits for it

    @classmethod
    def from_config(cls, cfg: ProviderConfig, budget: RateBudget | None = None) -> ProviderLimits:
        reserve = cfg.limits.interactive_reserve
        if budget is None:
            rpm, tpm = cfg.limits.rpm, cfg.limits.tpm
            budget = LocalRateBudget(rpm, tpm, reserve=reserve) if (rpm or tpm) else UnlimitedBudget()
        breaker = CircuitBreaker(cfg.circuit_breaker.failure_threshold, cfg.circuit_breaker.cooldown_s)
        return cls(cfg.limits.concurrency, budget, breaker, reserve)

    async def enter(self, timeout_s: float, background: bool = False) -> bool:
        """Take a concurrency slot, waiting at most ``timeout_s``; False if none came free. A
        background call waits until fewer than ``background_cap`` calls are in flight."""
        try:
            async with asyncio.timeout(max(timeout_s, 0)):
                while background and self.in_flight >= self.background_cap:
                    self._left = self._left or asyncio.Event()
                    await self._left.wait()
                await self.semaphore.acquire()
        except TimeoutError:
            return False
        self.in_flight += 1
        self.calls += 1
        self.background_calls += background
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        self.semaphore.release()
        if self._left is not None:
            left, self._left = self._left, None
            left.set()

    def snapshot(self) -> dict[str, object]:
        return {
            **self.breaker.snapshot(),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "calls": self.calls,
            "background_calls": self.background_calls,
            "concurrency": self.concurrency,
        }
