"""The cluster-wide RPM/TPM budget of one provider: a deployment-scoped actor shared by every
replica of that provider's deployment, handing out reservations."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import ray

from moa.limits import RateBudgetExceeded
from moa.ratelimit import ReservationLimiter

LIMITER_NAME = "rate-limiter"


@ray.remote(num_cpus=0.01, max_concurrency=1000)
class RateLimiterActor:
    """One per provider deployment (Serve's ``deployment_actors``); it never blocks on a caller."""

    def __init__(self, rpm: int | None, tpm: int | None) -> None:
        self.limiter = ReservationLimiter(rpm, tpm)

    def reserve(self, tokens: int, max_wait_s: float) -> tuple[bool, float]:
        r = self.limiter.reserve(tokens, max_wait_s)
        return r.granted, r.wait_s

    def settle(self, reserved_tokens: int, actual_tokens: int) -> None:
        self.limiter.settle(reserved_tokens, actual_tokens)

    def stats(self) -> dict[str, float]:
        return self.limiter.stats()


class ClusterRateBudget:
    """``RateBudget`` backed by the limiter actor; looks the actor up again if it was recreated."""

    def __init__(self, lookup: Callable[[], Any]) -> None:
        self._lookup = lookup
        self._actor: Any = None

    async def _call(self, method: str, *args: Any) -> Any:
        for attempt in range(2):
            if self._actor is None:
                self._actor = self._lookup()
            try:
                return await getattr(self._actor, method).remote(*args)
            except (ray.exceptions.RayActorError, ValueError):
                self._actor = None
                if attempt:
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("unreachable")

    async def acquire(self, tokens: int, timeout_s: float) -> None:
        granted, wait = await self._call("reserve", tokens, timeout_s)
        if not granted:
            raise RateBudgetExceeded(retry_after_s=wait)
        if wait > 0:
            await asyncio.sleep(wait)

    async def settle(self, reserved_tokens: int, actual_tokens: int) -> None:
        if reserved_tokens != actual_tokens:
            await self._call("settle", reserved_tokens, actual_tokens)
