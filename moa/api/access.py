"""Who may call, and what a call may spend: the API's key check, per-key limits, and the budget
reservation each request holds from before its fan-out until it settles.

Without a state store (or while no key exists) the service is open: every caller is the anonymous
principal, still held to ``moa.max_cost_usd``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence

from opentelemetry import trace

from moa.auth import Authenticator, InsufficientQuota, KeyRateLimited, Principal
from moa.config import MoAConfig
from moa.engine.cost import Routed, fit_cost_cap
from moa.engine.result import CallRecord
from moa.engine.router import HealthView
from moa.state import Reservation, StateStore, from_micro, to_micro, window_of
from moa.types import ChatMessage, GenerationParams
from moa_observability.metrics import KeyMetrics

log = logging.getLogger("moa.api")

# A reservation outlives any request (the longest deadline a request may ask for, plus slack):
# if its replica dies before settling, the money comes back after this long.
RESERVATION_TTL_S = 3600.0 + 300.0


class Spend:
    """One request's reservation and what its calls really cost so far; settled exactly once."""

    def __init__(
        self, access: Access, principal: Principal, reservation: Reservation | None, projected: float
    ) -> None:
        self.access, self.principal, self.reservation = access, principal, reservation
        self.projected = projected
        self.cost_usd = 0.0
        self.tokens = 0
        self._settled = False
        # The request's server span (current while the request is admitted): the key's usage
        # goes on it at settlement, which happens before the response's last byte, so it is open.
        self._span = trace.get_current_span()

    def record(self, call: CallRecord) -> None:
        """The engine's per-call hook: every call counts, answered, failed or cut short."""
        self.cost_usd += call.cost_usd
        self.tokens += call.usage.total_tokens

    async def settle(self) -> None:
        if self._settled:
            return
        self._settled = True
        key = self.principal.key
        if key is None:
            return
        store = self.access.store
        # Shielded: a request cancelled mid-settlement still settles.
        work = asyncio.ensure_future(self._write(store, key.id))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            await work
            raise
        self.access.metrics.record(self.principal.label, self.cost_usd, self.tokens)
        if self._span.is_recording():
            self._span.set_attributes({"moa.key.cost_usd": self.cost_usd, "moa.key.tokens": self.tokens})

    async def _write(self, store: StateStore, key_id: str) -> None:
        try:
            reservation = self.reservation
            if reservation is None and self.cost_usd:
                # Answered from the cache after paid calls (an ``auto`` request's classifier): no
                # reservation was made, but the money was spent; charge it, past any budget.
                lim = self.principal.limits
                window = window_of(lim.period, self.access.clock())
                got = await store.reserve(key_id, window, to_micro(self.cost_usd), None, RESERVATION_TTL_S)
                reservation = got if isinstance(got, Reservation) else None
            if reservation is not None:
                await store.settle(reservation, to_micro(self.cost_usd))
            if self.principal.limits.tpm is not None and self.tokens:
                await store.add_tokens(key_id, int(self.access.clock() // 60), self.tokens)
        except Exception:
            # The reservation expires on its own; the key's spend may then be understated.
            log.exception("could not settle a request's spend for key %s", self.principal.label)


class Access:
    def __init__(self, config: MoAConfig, store: StateStore | None) -> None:
        self.config = config
        self.store: StateStore = store  # type: ignore[assignment]  # used only with a key, i.e. a store
        self.auth = Authenticator(store, config.state.key_cache_s) if store is not None else None
        self.metrics = KeyMetrics()
        # The wall clock (Unix seconds) that puts a spend in its budget window (UTC day, month) and
        # a request in its minute: one place, so that a test can move it across a day or a month.
        self.clock: Callable[[], float] = time.time

    async def principal(self, authorization: str | None) -> Principal:
        if self.auth is None:
            return Principal(None)
        principal = await self.auth.authenticate(authorization)
        if principal.key is not None:
            trace.get_current_span().set_attribute("moa.key", principal.label)
            lim = principal.limits
            if lim.rpm is not None or lim.tpm is not None:
                wait = await self.store.take_request(
                    principal.key.id, int(self.clock() // 60), lim.rpm, lim.tpm
                )
                if wait is not None:
                    raise KeyRateLimited(
                        "This API key is over its requests or tokens per minute; retry later.", wait
                    )
        return principal

    def fit(
        self,
        principal: Principal,
        routed: Routed,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        max_cost_usd: float | None,
        health: Callable[[], HealthView],
    ) -> tuple[Routed, float]:
        """The plan held to the request's (or the key's) cost cap (a cheaper tier for ``auto``), and
        its projected worst-case cost. No I/O: a request the cache answers needs nothing more;
        ``hold`` then reserves that cost once models will be called."""
        cap = max_cost_usd if max_cost_usd is not None else principal.limits.max_cost_usd
        routed, projected = fit_cost_cap(self.config, routed, messages, params, cap, health)
        span = trace.get_current_span()
        span.set_attribute("moa.cost.projected_usd", projected)
        return routed, projected

    async def hold(self, principal: Principal, projected: float) -> Reservation | None:
        """Reserve ``projected`` against the key's budget (a write to the state store); 429
        ``insufficient_quota`` if it does not fit. None without a key."""
        key = principal.key
        if key is None:
            return None
        lim = key.limits
        budget = None if lim.budget_usd is None else to_micro(lim.budget_usd)
        window = window_of(lim.period, self.clock())
        got = await self.store.reserve(key.id, window, to_micro(projected), budget, RESERVATION_TTL_S)
        if not isinstance(got, Reservation):
            self.metrics.refused(principal.label)
            raise InsufficientQuota(
                f"This API key's budget is spent: ${from_micro(got.remaining_micro):.4f} of "
                f"${lim.budget_usd:g} ({lim.period}) is left, and this request may cost up to "
                f"${math.ceil(projected * 10_000) / 10_000:.4f}."
            )
        return got


async def settle_quietly(spend: Spend | None) -> None:
    if spend is not None:
        with contextlib.suppress(Exception):
            await spend.settle()


class SpendGate:
    """One request's admission through a key's rules, handed to the engine as its ``admit`` and
    ``reserve`` hooks: routing runs inside the run, so the plan is checked (and held to its cost
    cap) once it is known, and its cost reserved against the key's budget only once the cache has
    not answered: a cached answer costs nothing, so it writes nothing to the state store.
    ``spend`` is what to settle when the request ends (None until admitted, or if refused)."""

    def __init__(
        self,
        access: Access,
        principal: Principal,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        max_cost_usd: float | None,
        health: Callable[[], HealthView],
        param: str | None = None,
    ) -> None:
        self.access, self.principal = access, principal
        self.messages, self.params, self.max_cost_usd, self.health = messages, params, max_cost_usd, health
        self.param = param
        self.spend: Spend | None = None

    async def admit(self, routed: Routed) -> Routed:
        if self.param is None:
            self.principal.check_plan(routed[0])
        else:
            self.principal.check_plan(routed[0], self.param)
        routed, projected = self.access.fit(
            self.principal, routed, self.messages, self.params, self.max_cost_usd, self.health
        )
        # Nothing reserved yet: settling it writes nothing (a cache hit's whole settlement).
        self.spend = Spend(self.access, self.principal, None, projected)
        return routed

    async def reserve(self) -> None:
        """The engine's hook once models will be called (no cached answer): the budget reservation."""
        spend = self.spend
        if spend is None:
            return
        try:
            spend.reservation = await self.access.hold(self.principal, spend.projected)
        except BaseException:
            self.spend = None  # refused (or cancelled): nothing to settle, as before admission
            raise

    def record(self, rec: CallRecord) -> None:
        if self.spend is not None:
            self.spend.record(rec)
