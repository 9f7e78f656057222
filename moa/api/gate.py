"""One request's spend gate: the key's rules, cost cap, token and budget holds, applied at the
points of a run the engine offers (before a paid classifier call, once the plan is routed, once
models will be called, and at every call). The gate is one object; ``hooks`` hands it to the
engine, which takes those points as separate options."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

from moa.api.access import Access, Spend
from moa.api.schemas import RunSpec
from moa.auth import Principal
from moa.engine.context import RunOptions
from moa.engine.cost import Projection, Routed, call_cost
from moa.plan import Plan, PlanShape
from moa.result import CallRecord
from moa.types import CallRequest, ChatMessage, HealthView

log = logging.getLogger("moa.api")


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
        spec: RunSpec,
        health: Callable[[], HealthView],
    ) -> None:
        self.access, self.principal, self.messages, self.health = access, principal, messages, health
        self.params, self.max_cost_usd = spec.params, spec.options.max_cost_usd
        self.param, self.choices = spec.param, spec.choices
        self.spend: Spend | None = None
        self.projection = Projection(0.0, 0)

    async def before_classifier(self, req: CallRequest) -> None:
        """The engine's hook before the router's LLM classifier calls its model: that call is
        paid, so a key's budget must hold it first (429 ``insufficient_quota``, and no call, for a
        key with nothing left). The reservation becomes the request's until ``reserve`` replaces
        it, so a request refused or answered from the cache after the call still pays for it."""
        key = self.principal.key
        if key is None or self.spend is not None:
            return
        held = None
        if key.limits.budget_usd is not None:
            held = await self.access.hold(self.principal, call_cost(self.access.config, req))
        self.spend = Spend(self.access, self.principal, held, 0.0)

    async def admit(self, routed: Routed, shape: PlanShape = Plan.as_run) -> Routed:
        """The engine's hook with the routed plan as it will run (every override applied): the
        key's rules and its cost cap are checked, and the cost projected, on that plan."""
        routed, projected = self.access.fit(
            self.principal,
            routed,
            self.messages,
            self.params,
            self.max_cost_usd,
            self.health,
            shape,
            self.choices,
        )
        # On the plan that will run: auto's tier may have moved to one the key may use.
        plan, decision, _ = routed
        self.principal.check_routed(plan, decision, self.param)
        # Nothing reserved yet: settling it writes nothing (a cache hit's whole settlement), or
        # settles the classifier's reservation to what its call cost.
        if self.spend is None:
            self.spend = Spend(self.access, self.principal, None, projected.cost_usd)
        self.spend.projected = projected.cost_usd
        self.projection = projected
        return routed

    async def reserve(self) -> None:
        """The engine's hook once models will be called (no cached answer): the projected tokens
        held against the key's TPM, then the projected cost against its budget."""
        spend = self.spend
        if spend is None:
            return
        classifier = spend.reservation  # held before the router's classifier call, if one was made
        try:
            spend.token_hold = await self.access.hold_tokens(self.principal, self.projection.tokens)
            spend.reservation = await self.access.hold(self.principal, spend.projected)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.access.release_tokens(self.principal, spend.token_hold)
            spend.token_hold = None  # given back: the settlement must not take it back again
            if classifier is None and not spend.cost_usd:
                self.spend = None  # refused (or cancelled): nothing to settle, as before admission
            # Otherwise the classifier's call was made: the request settles to what it cost.
            raise
        if classifier is not None:
            # Its cost is already in ``spend``, which settles against the new reservation.
            try:
                await self.access.store.settle(classifier, 0)
            except Exception:
                log.exception("could not release a classifier reservation (it expires on its own)")

    def record(self, rec: CallRecord) -> None:
        if self.spend is not None:
            self.spend.record(rec)

    def hooks(self) -> RunOptions:
        """The gate as the engine's run options: ``before_classifier``, ``admit``, ``reserve``
        and ``on_call`` (``record``)."""
        return {
            "before_classifier": self.before_classifier,
            "admit": self.admit,
            "reserve": self.reserve,
            "on_call": self.record,
        }
