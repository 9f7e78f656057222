"""The cluster-wide RPM/TPM budget of one provider: a deployment-scoped actor shared by every
replica of that provider's deployment. Replicas lease slices of it (``LeasedRateBudget``), so a
call costs a round trip to this actor only when its replica's lease cannot cover it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import ray

from moa.ratelimit import ReservationLimiter
from moa_observability.metrics import control_plane_metrics

LIMITER_NAME = "rate-limiter"


@ray.remote(num_cpus=0.01, max_concurrency=1000)
class RateLimiterActor:
    """One per provider deployment (Serve's ``deployment_actors``); it never blocks on a caller."""

    def __init__(self, rpm: int | None, tpm: int | None, reserve: float = 0.0) -> None:
        self.limiter = ReservationLimiter(rpm, tpm, reserve=reserve)

    def reserve(
        self, tokens: int, max_wait_s: float, lease_requests: int = 0, lease_tokens: int = 0
    ) -> tuple[bool, float, int, int]:
        return self.limiter.reserve_and_lease(tokens, max_wait_s, lease_requests, lease_tokens)

    def lease(self, requests: int, tokens: int) -> tuple[int, int]:
        return self.limiter.lease(requests, tokens)

    def give_back(self, requests: int, tokens: int) -> None:
        self.limiter.give_back(requests, tokens)

    def take_spare(self, tokens: int) -> tuple[bool, float]:
        r = self.limiter.take_spare(tokens)
        return r.granted, r.wait_s

    def stats(self) -> dict[str, float]:
        return self.limiter.stats()


class LimiterAuthority:
    """``BudgetAuthority`` over the limiter actor; looks the actor up again if it was recreated."""

    def __init__(self, lookup: Callable[[], Any]) -> None:
        self._lookup = lookup
        self._actor: Any = None

    async def _call(self, method: str, *args: Any) -> Any:
        for attempt in range(2):
            try:
                if self._actor is None:  # inside the try: a limiter that is gone counts as unreachable
                    self._actor = self._lookup()
                answer = await getattr(self._actor, method).remote(*args)
            except (ray.exceptions.RayActorError, ValueError):
                control_plane_metrics().call("rate_limiter", ok=False)
                self._actor = None
                if attempt:
                    raise
                await asyncio.sleep(0.1)
            else:
                control_plane_metrics().call("rate_limiter", ok=True)
                return answer
        raise AssertionError("unreachable")

    async def reserve(
        self, tokens: int, max_wait_s: float, lease_requests: int, lease_tokens: int
    ) -> tuple[bool, float, int, int]:
        granted, wait, requests, leased_tokens = await self._call(
            "reserve", tokens, max_wait_s, lease_requests, lease_tokens
        )
        return granted, wait, requests, leased_tokens

    async def lease(self, requests: int, tokens: int) -> tuple[int, int]:
        got_requests, got_tokens = await self._call("lease", requests, tokens)
        return got_requests, got_tokens

    async def give_back(self, requests: int, tokens: int) -> None:
        await self._call("give_back", requests, tokens)

    async def take_spare(self, tokens: int) -> tuple[bool, float]:
        granted, wait = await self._call("take_spare", tokens)
        return granted, wait
