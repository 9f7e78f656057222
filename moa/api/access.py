"""Who may call, and what a call may spend: the API's key check, per-key limits, and the budget
reservation each request holds from before its fan-out until it settles (applied to a run by
``moa.api.gate.SpendGate``).

Without a state store (or while no key exists) the service is open: every caller is the anonymous
principal, still held to ``moa.max_cost_usd``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace

from moa.auth import Authenticator, InsufficientQuota, KeyRateLimited, Principal
from moa.config import MoAConfig
from moa.engine.cost import Projection, Routed, fit_cost_cap
from moa.engine.receipts import RECEIPT_WAIT_S, ReceiptSource, late_charge
from moa.plan import Plan, PlanShape
from moa.result import CallRecord
from moa.state import KeyRecord, Reservation, StateStore, from_micro, to_micro, window_of
from moa.types import ChatMessage, GenerationParams, HealthView, Usage
from moa_observability.metrics import KeyMetrics

log = logging.getLogger("moa.api")

# How often a replica re-reads the budget use of the keys it served (the gauge
# moa_key_budget_used_ratio): other replicas spend too, and a new day or month starts at 0.
BUDGET_REFRESH_S = 30.0
# How often it sets the gauge again from what it read last: Ray's metrics agent drops a gauge
# value not set again within two export periods (2 x 10 s), so a value set once vanishes.
BUDGET_RESEND_S = 5.0
# At most one read per key this often on the request path's account (in the background).
BUDGET_READ_MIN_S = 1.0

# The ASGI scope's mark on a request a Batch API batch sends to its replica's own app: the hash
# of the key that created the batch, which the request is then sent as. It is set in the scope by
# the batch worker (``moa.api.batch_worker.as_key``), where no HTTP client can set anything.
BATCH_KEY_SCOPE = "moa.batch_key_hash"

# A reservation outlives any request (the longest deadline a request may ask for, plus slack):
# if its replica dies before settling, the money comes back after this long.
RESERVATION_TTL_S = 3600.0 + 300.0
# How much longer than ``RECEIPT_WAIT_S`` a settlement gives a receipt source that does not
# answer (a handle call to a restarting health board) before it settles at the estimates.
RECEIPT_GRACE_S = 2.0


@dataclass(frozen=True)
class TokenHold:
    """Tokens a request holds against its key's TPM, in the minute it was admitted in: settled
    there to what its calls really used (the budget's reservation, per minute)."""

    minute: int
    tokens: int


class Spend:
    """One request's reservation and what its calls really cost so far; settled exactly once.

    A call the request cut is counted at its estimate (``cut_result``) as it ends. With a receipt
    source (on Ray), the settlement then waits, in the background, for what those calls really
    consumed (``moa.engine.receipts``) and charges the larger: the reservation, which holds the
    request's whole projection, stays held until then, so the budget holds every late charge; the
    response waits for none of it."""

    def __init__(
        self, access: Access, principal: Principal, reservation: Reservation | None, projected: float
    ) -> None:
        self.access, self.principal, self.reservation = access, principal, reservation
        self.projected = projected
        self.cost_usd = 0.0
        self.tokens = 0
        self.token_hold: TokenHold | None = None
        # Calls billed at the estimate of the side that cut them, whose receipts may come later.
        self.cut: list[CallRecord] = []
        self._settled = False
        # The request's server span (current while the request is admitted): the key's usage
        # goes on it at settlement, which happens before the response's last byte, so it is open.
        self._span = trace.get_current_span()

    def record(self, call: CallRecord) -> None:
        """The engine's per-call hook: every call counts, answered, failed or cut short."""
        self.cost_usd += call.cost_usd
        self.tokens += call.usage.total_tokens
        if call.cut_id is not None:
            self.cut.append(call)

    async def settle(self) -> None:
        """Write what the request cost to the ledger and release its reservation: at once, or,
        when it cut calls whose receipts may come, in the background once they came (or
        ``RECEIPT_WAIT_S`` passed: a lost receipt leaves its call at the estimate)."""
        if self._settled:
            return
        self._settled = True
        key = self.principal.key
        if key is None:
            return
        if self._span.is_recording():  # what is known now: the span ends with the response
            self._span.set_attributes({"moa.key.cost_usd": self.cost_usd, "moa.key.tokens": self.tokens})
        receipts = self.access.receipts
        if self.cut and receipts is not None:
            self.access.later(self._settle_late(receipts, key))
            return
        # Shielded: a request cancelled mid-settlement still settles.
        work = asyncio.ensure_future(self._write(self.access.store, key.id))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            await work
            raise
        self.access.metrics.record(self.principal.label, self.cost_usd, self.tokens)
        self.access.watch_budget(key)

    async def _settle_late(self, receipts: ReceiptSource, key: KeyRecord) -> None:
        """Charge each cut call the larger of its estimate and its receipt, then write."""
        ids = [call.cut_id for call in self.cut if call.cut_id is not None]
        got: Mapping[str, Usage] = {}
        try:
            async with asyncio.timeout(RECEIPT_WAIT_S + RECEIPT_GRACE_S):
                got = await receipts.receipts(ids, RECEIPT_WAIT_S)
        except (Exception, asyncio.CancelledError):
            # A source that broke its word (it answers in time and never raises), or a wait cut
            # short: the calls keep their estimates, and the ledger is written all the same.
            log.warning("no receipts for a request's cut calls: charged at their estimates", exc_info=True)
        for call in self.cut:
            reported = got.get(call.cut_id or "")
            if reported is not None:
                tokens, cost = late_charge(self.access.config, call, reported)
                self.tokens += tokens
                self.cost_usd += cost
        await self._write(self.access.store, key.id)
        self.access.metrics.record(self.principal.label, self.cost_usd, self.tokens)
        self.access.watch_budget(key)
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError  # this settlement itself was cancelled: written first

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
            hold = self.token_hold or TokenHold(int(self.access.clock() // 60), 0)
            if self.principal.limits.tpm is not None and self.tokens != hold.tokens:
                await store.add_tokens(key_id, hold.minute, self.tokens - hold.tokens)
        except Exception:
            # The reservation expires on its own; the key's spend may then be understated.
            log.exception("could not settle a request's spend for key %s", self.principal.label)


class Access:
    def __init__(
        self, config: MoAConfig, store: StateStore | None, receipts: ReceiptSource | None = None
    ) -> None:
        self.config = config
        self.store: StateStore = store  # type: ignore[assignment]  # used only with a key, i.e. a store
        self.auth = Authenticator(store, config.state.key_cache_s) if store is not None else None
        self.metrics = KeyMetrics()
        # Where what cut calls really consumed comes from (None: they are charged the estimate),
        # and the settlements waiting for it.
        self.receipts = receipts
        self._later: set[asyncio.Task[None]] = set()
        # The wall clock (Unix seconds) that puts a spend in its budget window (UTC day, month) and
        # a request in its minute: one place, so that a test can move it across a day or a month.
        self.clock: Callable[[], float] = time.time
        # Keys with a budget this replica served, for the budget gauge: key id -> (record, last read),
        # and what it read last: key id -> (key name, ratio).
        self._budgeted: dict[str, tuple[KeyRecord, float]] = {}
        self._budget_used: dict[str, tuple[str, float]] = {}
        self._budget_tasks: set[asyncio.Task[None]] = set()
        self._budget_loop: asyncio.Task[None] | None = None

    def watch_budget(self, key: KeyRecord) -> None:
        """Publish ``key``'s budget use (settled spend over ``budget_usd`` in its current period)
        in the background, and keep it fresh while this replica runs: at most once a second per
        key on a request's account, and every ``BUDGET_REFRESH_S`` for every key it served, so a
        new period or another replica's spending shows without a request here; the gauge is set
        again every ``BUDGET_RESEND_S`` in between (Ray forgets a gauge that is not). Only where
        metrics are exported (a Serve replica): in-process it costs nothing."""
        if not self.metrics.live or key.limits.budget_usd is None:
            return
        now = time.monotonic()
        last = self._budgeted.get(key.id, (key, -math.inf))[1]
        self._budgeted[key.id] = (key, last)
        if now - last >= BUDGET_READ_MIN_S:
            self._budgeted[key.id] = (key, now)
            task = asyncio.ensure_future(self._publish_budget(key))
            self._budget_tasks.add(task)
            task.add_done_callback(self._budget_tasks.discard)
        if self._budget_loop is None:
            self._budget_loop = asyncio.ensure_future(self._refresh_budgets())

    async def _publish_budget(self, key: KeyRecord) -> None:
        budget = key.limits.budget_usd
        if budget is None:
            return
        try:
            spent = from_micro(await self.store.spent(key.id, window_of(key.limits.period, self.clock())))
        except Exception:  # the store may be briefly unreachable: the next read will do
            log.debug("could not read the budget use of key %s", key.name)
            return
        ratio = spent / budget if budget > 0 else 1.0
        self._budget_used[key.id] = (key.name, ratio)
        self.metrics.budget_used(key.name, ratio)

    async def _refresh_budgets(self) -> None:
        last_read = time.monotonic()
        while True:
            await asyncio.sleep(BUDGET_RESEND_S)
            if time.monotonic() - last_read >= BUDGET_REFRESH_S:
                last_read = time.monotonic()
                for key, _ in list(self._budgeted.values()):
                    await self._publish_budget(key)
                continue
            for name, ratio in list(self._budget_used.values()):
                self.metrics.budget_used(name, ratio)

    def later(self, settlement: Coroutine[Any, Any, None]) -> None:
        """Run a settlement in the background (it waits for receipts), held until it ends.

        In a context of its own, not its request's: it outlives the request, and what is tied to
        the request ends with it (on Ray, Serve cancels the handle calls a cancelled request made,
        and would cancel the settlement's call for its receipts)."""
        task = asyncio.get_running_loop().create_task(settlement, context=contextvars.Context())
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    async def settled(self) -> None:
        """Until every background settlement has written (each waits a bounded time): a drain
        ends with the ledger written, not with reservations left to expire in an hour."""
        if self._later:
            await asyncio.gather(*self._later, return_exceptions=True)

    async def principal(self, authorization: str | None, batch_key: str | None = None) -> Principal:
        """The caller, from its Authorization header; or, for a request a Batch API batch sends
        (``batch_key``: the ``BATCH_KEY_SCOPE`` mark), the key that created the batch, which
        must still be active. Either way the key's per-minute limits count the request."""
        if self.auth is None:
            return Principal(None)
        if batch_key is not None:
            principal = await self.auth.authenticate_hash(batch_key)
        else:
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

    # Eight parameters: everything ``fit_cost_cap`` reads, passed through as they are. The spend
    # gate holds them for its request; the auth-cost benchmark calls this with no gate.
    def fit(
        self,
        principal: Principal,
        routed: Routed,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
        max_cost_usd: float | None,
        health: Callable[[], HealthView],
        shape: PlanShape = Plan.as_run,
        choices: int = 1,
    ) -> tuple[Routed, Projection]:
        """The plan held to the request's (or the key's) cost cap and to the key's presets and
        models (a cheaper tier for ``auto``, put through ``shape``: the request's overrides), and
        its projected worst case (cost and tokens). No I/O: a request the cache answers needs
        nothing more; ``hold_tokens`` and ``hold`` then reserve it once models will be called."""
        cap = max_cost_usd if max_cost_usd is not None else principal.limits.max_cost_usd
        routed, projected = fit_cost_cap(
            self.config, routed, messages, params, cap, health, shape, principal.allows, choices
        )
        span = trace.get_current_span()
        span.set_attribute("moa.cost.projected_usd", projected.cost_usd)
        span.set_attribute("moa.tokens.projected", projected.tokens)
        return routed, projected

    async def hold_tokens(self, principal: Principal, tokens: int) -> TokenHold | None:
        """Hold ``tokens`` (the request's projection) against the key's tokens per minute (a
        write to the state store); 429 ``rate_limit_exceeded`` with Retry-After if the minute
        cannot take them. None without a key or a TPM limit."""
        key = principal.key
        if key is None or key.limits.tpm is None:
            return None
        minute = int(self.clock() // 60)
        wait = await self.store.reserve_tokens(key.id, minute, tokens, key.limits.tpm)
        if wait is not None:
            raise KeyRateLimited(
                f"This API key's tokens per minute ({key.limits.tpm}) cannot hold this request, which "
                f"may use up to {tokens} tokens; retry when the minute ends (or lower max_tokens).",
                wait,
            )
        return TokenHold(minute, tokens)

    async def release_tokens(self, principal: Principal, hold: TokenHold | None) -> None:
        """Give back a hold whose request was refused after it (its budget): it used nothing."""
        if hold is not None and principal.key is not None:
            await self.store.add_tokens(principal.key.id, hold.minute, -hold.tokens)

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
            self.watch_budget(key)
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
