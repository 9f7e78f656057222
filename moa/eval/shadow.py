"""Shadow evaluation of live traffic (``eval.shadow``).

A sampled share of answered chat completions is answered again by a baseline model and judged
pairwise against the served answer, in both orders, in a background task started once the answer
is ready: the response never waits for it. Its calls go through the engine's own caller, so the
providers' concurrency and rate limits apply to them as to any call; at most ``max_in_flight``
run at once and their spend per rolling hour is capped (a sample that does not fit is skipped and
counted). The running win rate per preset is exported as a metric, every shadow evaluation is a
``moa.shadow`` span in the request's trace, and its cost is counted apart from the request's.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context

from moa.caller import ModelCaller
from moa.config import MoAConfig
from moa.eval.budget import Budget
from moa.eval.judging import Judge
from moa.eval.stats import wilson_interval
from moa.eval.verdict import pair_preference, side_preference
from moa.result import MoAResult
from moa.tokens import approx_message_tokens
from moa.types import CallRequest, ChatMessage, GenerationParams, prompt_texts
from moa_observability.metrics import ShadowMetrics
from moa_observability.tracing import tracer

HOUR_S = 3600.0


@dataclass
class PresetTally:
    """The running counts for one preset: the served answer against the baseline."""

    judged: int = 0
    preference_sum: float = 0.0  # 1 per win of the served answer, 0.5 per tie
    unparseable: int = 0
    failed: int = 0
    cost_usd: float = 0.0

    @property
    def win_rate(self) -> float | None:
        return self.preference_sum / self.judged if self.judged else None

    def add(self, preference: float) -> None:
        self.judged += 1
        self.preference_sum += preference

    def interval(self) -> tuple[float, float]:
        """A 95% interval for the win rate: Wilson's score interval, with ties counted a half
        success (a running figure to watch, not ``moa eval``'s bootstrap). Wilson's, not the
        normal approximation's: with few samples, or all of them wins, the normal one collapses
        to a point (two wins gave [1.0, 1.0]). Nothing judged yet: 0 to 1."""
        return wilson_interval(self.preference_sum, self.judged)


@dataclass
class ShadowStats:
    sampled: int = 0
    skipped_busy: int = 0
    skipped_budget: int = 0
    presets: dict[str, PresetTally] = field(default_factory=dict)
    # By the preset asked for and the one the router ran (``auto`` -> a tier): the metrics' labels.
    routes: dict[tuple[str, str], PresetTally] = field(default_factory=dict)


class HourlySpend:
    """Spend over the last hour, with reservations, so concurrent shadows cannot overshoot it."""

    def __init__(self, limit_usd: float | None) -> None:
        self.limit_usd = limit_usd
        self.reserved = 0.0
        self._spent: deque[tuple[float, float]] = deque()

    def spent(self, now: float) -> float:
        while self._spent and self._spent[0][0] < now - HOUR_S:
            self._spent.popleft()
        return sum(c for _, c in self._spent)

    def reserve(self, amount: float) -> bool:
        if (
            self.limit_usd is not None
            and self.spent(time.monotonic()) + self.reserved + amount > self.limit_usd
        ):
            return False
        self.reserved += amount
        return True

    def settle(self, reserved: float, cost: float) -> None:
        self.reserved = max(0.0, self.reserved - reserved)
        self._spent.append((time.monotonic(), cost))


class ShadowEvaluator:
    def __init__(self, cfg: MoAConfig, caller: ModelCaller, *, seed: int | None = None) -> None:
        sc = cfg.eval.shadow
        assert sc.baseline and sc.judge  # the config validates this when shadowing is enabled
        self.cfg = cfg
        self.settings = sc
        self.caller = caller
        self.provider, _, self.model = sc.baseline.partition("/")
        self.price = cfg.price(self.provider, self.model)
        self.judge = Judge(sc.judge, cfg, caller, sc.max_tokens)
        self.params = GenerationParams(max_tokens=sc.max_tokens)
        self.spend = HourlySpend(sc.max_cost_usd_per_hour)
        self.stats = ShadowStats()
        self.metrics = ShadowMetrics()
        self._rng = random.Random(seed)
        self._tasks: set[asyncio.Task[None]] = set()

    def eligible(self, preset: str) -> bool:
        if self.settings.presets is not None:
            return preset in self.settings.presets
        return preset == "auto" or preset in self.cfg.presets

    def _worst_case(self, messages: Sequence[ChatMessage]) -> float:
        tokens = approx_message_tokens(prompt_texts(messages))
        out = min(self.settings.max_tokens, self.price.max_output_tokens)
        baseline = self.price.cost(tokens, out)
        judged = self.judge.projected([*messages, ChatMessage(role="user", content="x" * 4 * (2 * out))])
        return baseline + 4 * judged  # two orders, each possibly retried once

    def offer(self, messages: Sequence[ChatMessage], result: MoAResult, requested: str) -> bool:
        """Maybe shadow this answered request; returns at once whether a shadow was started."""
        if not self.eligible(requested) or self._rng.random() >= self.settings.sample_rate:
            return False
        self.stats.sampled += 1
        if len(self._tasks) >= self.settings.max_in_flight:
            self.stats.skipped_busy += 1
            self.metrics.outcome(requested, result.decision.preset, "skipped_busy")
            return False
        worst = self._worst_case(messages)
        if not self.spend.reserve(worst):
            self.stats.skipped_budget += 1
            self.metrics.outcome(requested, result.decision.preset, "skipped_budget")
            return False
        ctx = otel_context.get_current()  # the request's trace: the shadow span joins it
        task = asyncio.get_running_loop().create_task(
            self._run(list(messages), result, requested, worst, ctx)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def wait_idle(self) -> None:
        """For tests and shutdown: wait for the shadows under way."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _run(
        self, messages: list[ChatMessage], result: MoAResult, preset: str, worst: float, ctx: Any
    ) -> None:
        tally = self.stats.presets.setdefault(preset, PresetTally())
        route = result.decision.preset  # what the router ran for ``preset``
        routed = self.stats.routes.setdefault((preset, route), PresetTally())
        cost = 0.0
        with tracer().start_as_current_span("moa.shadow", context=ctx) as span:
            span.set_attributes({"moa.preset": preset, "moa.shadow.baseline": self.settings.baseline or ""})
            try:
                base = await self.caller.call(
                    CallRequest(
                        provider=self.provider, model=self.model, messages=tuple(messages), params=self.params
                    )
                )
                cost += base.cost_usd
                self.metrics.cost(preset, route, "baseline", base.cost_usd)
                if not base.ok:
                    tally.failed += 1
                    self.metrics.outcome(preset, route, "failed")
                    span.set_attribute("moa.shadow.outcome", "failed")
                    return
                question = "\n\n".join(m.content for m in messages if m.role == "user")
                sides: dict[bool, float | None] = {}
                budget = Budget()  # the hourly reservation above already covers these calls
                for served_first in (True, False):
                    first, second = (result.text, base.text) if served_first else (base.text, result.text)
                    out = await self.judge.pairwise(question, first, second, budget)
                    cost += out.cost_usd
                    self.metrics.cost(preset, route, "judge", out.cost_usd)
                    sides[served_first] = side_preference(out.verdict, served_first)
                # Both orders read, or the sample is unparseable: one order alone would let the
                # judge's position bias into the win rate (the rule moa eval's report applies).
                pref = pair_preference(sides[True], sides[False])
                if pref is None:
                    tally.unparseable += 1
                    self.metrics.outcome(preset, route, "unparseable")
                    span.set_attribute("moa.shadow.outcome", "unparseable")
                    return
                tally.add(pref)
                routed.add(pref)
                outcome = "win" if pref > 0.5 else "loss" if pref < 0.5 else "tie"
                self.metrics.outcome(preset, route, outcome)
                self.metrics.win_rate(preset, route, routed.win_rate or 0.0, routed.interval())
                span.set_attributes(
                    {
                        "moa.shadow.outcome": outcome,
                        "moa.shadow.preference": pref,
                        "moa.shadow.judge": self.judge.name,
                    }
                )
            finally:
                tally.cost_usd += cost
                span.set_attribute("moa.shadow.cost_usd", cost)
                self.spend.settle(worst, cost)

    def snapshot(self) -> dict[str, Any]:
        s = self.stats
        return {
            "sampled": s.sampled,
            "in_flight": len(self._tasks),
            "skipped_busy": s.skipped_busy,
            "skipped_budget": s.skipped_budget,
            "presets": {
                p: {
                    "judged": t.judged,
                    "win_rate": t.win_rate,
                    "interval": list(t.interval()),
                    "unparseable": t.unparseable,
                    "failed": t.failed,
                    "cost_usd": t.cost_usd,
                }
                for p, t in s.presets.items()
            },
        }
