"""Requests-per-minute and tokens-per-minute budgets as reservations.

A reservation takes its tokens at once (the bucket may go into debt) and tells the caller how long
to wait before sending, so the holder never blocks: one call per request, granted in arrival order.
That makes the same object usable in-process and inside one Ray actor shared by every replica of a
provider deployment (the cluster-wide budget).

A holder may also take a *lease*: a slice of what is available right now (never debt), which it
spends locally without asking again, and gives back what it did not spend. Leases are what keep the
shared budget off the request path (``moa.limits.LeasedRateBudget``).

Background calls (a batch's) never reserve: they take only what is free now above a ``reserve``
kept for interactive calls (``take_spare``), and are told when to look again otherwise. A
reservation puts the bucket in debt that every later call waits behind; a batch that did so would
make each interactive call queue behind the batch's. Taking only the spare, a batch still gets the
whole refill while nobody else asks (the bucket never climbs above the reserve), and an
interactive call finds the reserve there: the reserve refills first.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class Bucket:
    """A token bucket refilled continuously at ``per_minute / 60`` per second, up to ``per_minute``."""

    per_minute: float
    level: float
    updated: float

    @classmethod
    def full(cls, per_minute: float, now: float) -> Bucket:
        return cls(per_minute, per_minute, now)

    def refill(self, now: float) -> None:
        rate = self.per_minute / 60.0
        self.level = min(self.per_minute, self.level + (now - self.updated) * rate)
        self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until ``amount`` is covered (after a refill at the current time)."""
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing * 60.0 / self.per_minute


@dataclass(frozen=True)
class Reservation:
    granted: bool
    # granted: how long to wait before sending; refused: when a retry could succeed.
    wait_s: float


class ReservationLimiter:
    def __init__(
        self,
        rpm: int | None,
        tpm: int | None,
        clock: Callable[[], float] = time.monotonic,
        reserve: float = 0.0,
    ) -> None:
        """``reserve``: the share of each bucket background calls leave to the others (0 to 1)."""
        self.clock = clock
        now = clock()
        self.requests = Bucket.full(rpm, now) if rpm else None
        self.tokens = Bucket.full(tpm, now) if tpm else None
        self.reserve_share = reserve
        self.granted = 0
        self.refused = 0
        self.spare = 0  # background calls granted (counted in ``granted`` too)

    def _wait(self, tokens: int, above: float) -> float:
        """Seconds until every bucket holds its amount (one request, ``tokens`` tokens) above the
        share ``above`` of itself. A call larger than that waits for a full bucket, not forever."""
        now = self.clock()
        waits = [0.0]
        for bucket, amount in ((self.requests, 1), (self.tokens, tokens)):
            if bucket is not None:
                bucket.refill(now)
                waits.append(bucket.wait_for(min(amount + above * bucket.per_minute, bucket.per_minute)))
        return max(waits)

    def _take(self, tokens: int) -> None:
        """A granted call's request and tokens out of the buckets (a call larger than a bucket
        takes it whole)."""
        if self.requests is not None:
            self.requests.level -= 1
        if self.tokens is not None:
            self.tokens.level -= min(tokens, self.tokens.per_minute)
        self.granted += 1

    def reserve(self, tokens: int, max_wait_s: float) -> Reservation:
        wait = self._wait(tokens, 0.0)
        if wait > max_wait_s:
            self.refused += 1
            return Reservation(False, wait)
        self._take(tokens)
        return Reservation(True, wait)

    def take_spare(self, tokens: int) -> Reservation:
        """A background call's share: granted (no wait) only when every bucket holds its amount
        above the reserve now, never into debt; refused otherwise, with how long until the refill
        would cover it were nobody else to take any (the caller looks again then)."""
        wait = self._wait(tokens, self.reserve_share)
        if wait > 0:
            return Reservation(False, wait)
        self._take(tokens)
        self.spare += 1
        return Reservation(True, 0.0)

    def reserve_and_lease(
        self, tokens: int, max_wait_s: float, lease_requests: int, lease_tokens: int
    ) -> tuple[bool, float, int, int]:
        """A reservation, plus a lease when it needs no wait (one round trip for a lease holder):
        (granted, wait_s, leased requests, leased tokens)."""
        r = self.reserve(tokens, max_wait_s)
        leased = (0, 0)
        if r.granted and r.wait_s == 0 and (lease_requests or lease_tokens):
            leased = self.lease(lease_requests, lease_tokens)
        return r.granted, r.wait_s, *leased

    def lease(self, requests: int, tokens: int) -> tuple[int, int]:
        """Up to ``requests`` requests and ``tokens`` tokens that are free now, taken out of the
        buckets; (0, 0) unless every bucket asked for can give some (requests without tokens would
        serve no call). An unconfigured bucket, or one asked for 0, gives 0."""
        now = self.clock()
        got = []
        for bucket, wanted in ((self.requests, requests), (self.tokens, tokens)):
            if bucket is None or wanted <= 0:
                got.append(0)
                continue
            bucket.refill(now)
            got.append(max(0, min(wanted, math.floor(bucket.level))))
            if got[-1] < 1:
                return 0, 0
        if self.requests is not None:
            self.requests.level -= got[0]
        if self.tokens is not None:
            self.tokens.level -= got[1]
        return got[0], got[1]

    def give_back(self, requests: int, tokens: int) -> None:
        """Return the unspent part of a lease; a negative amount charges what a holder overspent."""
        now = self.clock()
        for bucket, amount in ((self.requests, requests), (self.tokens, tokens)):
            if bucket is not None and amount:
                bucket.refill(now)
                bucket.level = min(bucket.per_minute, bucket.level + amount)

    def settle(self, reserved_tokens: int, actual_tokens: int) -> None:
        """Correct the token bucket once real usage is known (refund or extra charge). A refund
        fills the bucket no further than a minute's budget, as a refill does: the bucket refilled
        while the call ran, and the two together must not let the next minute spend more."""
        if self.tokens is not None:
            self.tokens.refill(self.clock())
            self.tokens.level = min(
                self.tokens.per_minute, self.tokens.level + reserved_tokens - actual_tokens
            )

    def stats(self) -> dict[str, float]:
        return {"granted": self.granted, "refused": self.refused, "spare": self.spare}
