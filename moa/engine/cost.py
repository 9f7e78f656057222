"""What a request may cost at worst, before any model is called.

The walk mirrors ``caps.worst_case_calls``: every proposer of every layer (or round), every
intermediate synthesis, every aggregator of the chain, every staircase step (of the aggregators
and of each later layer's proposers) and every fallback is assumed to run and to write its whole
``max_tokens`` (or the model's ``max_output_tokens``; a step's ``staircase_step_tokens``). Each
later stage reads the prompt plus every answer before it, and a staircase call the steps before it
(never more than the model's context window). Prices come from
the config's ``ModelPrice`` entries. The projection is what a request reserves against its key's
budget and what ``moa.max_cost_usd`` is compared with; the same walk counts the tokens every call
may read and write, which a request reserves against its key's tokens per minute.

Images count by each provider's published rule (``moa.types.image_tokens``), on top of the
prompt's text.

Both are made on the plan as it will run (``Plan.as_run``: the request's aggregation override,
staircase only for a stream) and, for ``auto``, on the tier it will really use: ``fit_plan``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moa.config import MoAConfig
from moa.engine.calls import TEMPLATE_OVERHEAD_TOKENS, merge_params
from moa.engine.router import substitute_unavailable
from moa.engine.vision import NoVisionModel
from moa.errors import OverCap
from moa.plan import Complexity, ModelRef, Plan, PlanMode, PlanShape
from moa.providers.consumption import prompt_read
from moa.result import RouteDecision
from moa.tokens import approx_message_tokens
from moa.types import (
    CallRequest,
    CallResult,
    ChatMessage,
    GenerationParams,
    HealthView,
    image_tokens,
    prompt_texts,
    request_images,
)

# The <reference id="N"> wrapper around each answer.
REFERENCE_OVERHEAD_TOKENS = 16

Routed = tuple[Plan, RouteDecision, list[CallResult]]


@dataclass(frozen=True)
class Projection:
    """A plan's worst case for one request, from one walk over its calls: what it may cost (US
    dollars) and how many tokens its calls may read and write in all (what a key's TPM counts)."""

    cost_usd: float
    tokens: int


def projected_cost(
    config: MoAConfig, plan: Plan, messages: Sequence[ChatMessage], params: GenerationParams
) -> float:
    """The most the plan can cost in US dollars for these messages and parameters."""
    return project(config, plan, messages, params).cost_usd


def project(
    config: MoAConfig,
    plan: Plan,
    messages: Sequence[ChatMessage],
    params: GenerationParams,
    choices: int = 1,
) -> Projection:
    """The most the plan can cost, and the most tokens it can use, for these messages and
    parameters (a model without a price counts for neither: it has no limits to project with).
    ``choices`` answers (``n``): the proposer stages once, every final call and fallback once per
    answer."""
    prompt = approx_message_tokens(prompt_texts(messages))
    images = request_images(messages)
    total = 0.0
    tokens = 0

    def call(ref: ModelRef, references: Sequence[int], step: bool = False, written: int = 0) -> int:
        """Price one call reading ``references`` (their token counts) and ``written`` tokens of
        its own answer so far (a staircase continues it); a ``step`` writes at most
        ``staircase_step_tokens``."""
        nonlocal total, tokens
        price = config.price(ref.provider, ref.model) if ref.provider in config.providers else None
        if price is None:
            return 0
        asked = merge_params(params, ref).max_tokens
        if step:
            asked = min(asked or plan.staircase_step_tokens, plan.staircase_step_tokens)
        out = min(asked or price.max_output_tokens, price.max_output_tokens)
        read = prompt + written + image_tokens(config.providers[ref.provider].kind, images)
        if references:
            read += sum(references) + REFERENCE_OVERHEAD_TOKENS * len(references) + TEMPLATE_OVERHEAD_TOKENS
        read = min(read, price.context_window)
        total += price.cost(read, out)
        tokens += read + out
        return out

    # Staircase: every intermediate step reads (at most) the whole references and the steps
    # before it, and writes a step; the last call reads every step's text too.
    steps = plan.staircase_steps if plan.aggregation == "staircase" else 0
    stepped = steps * plan.staircase_step_tokens
    previous: list[int] = []
    if plan.mode is PlanMode.REFINE:
        layer = plan.layers[0]
        for rnd in range(plan.rounds):
            previous = [call(p, previous) for p in layer.proposers]
            if rnd < plan.rounds - 1:
                previous = [max(call(a, previous) for a in plan.aggregators)]
    else:
        for index, layer in enumerate(plan.layers):
            if index == 0:
                previous = [call(p, previous) for p in layer.proposers]
                continue
            # A later layer's proposers step over the layer before theirs.
            for k in range(steps):
                for p in layer.proposers:
                    call(p, previous, step=True, written=k * plan.staircase_step_tokens)
            previous = [call(p, previous, written=stepped) for p in layer.proposers]
    for k in range(steps):
        for agg in plan.aggregators:
            call(agg, previous, step=True, written=k * plan.staircase_step_tokens)
    for _ in range(choices):
        for agg in plan.aggregators:
            call(agg, previous, written=stepped)
        for fallback in plan.fallbacks:
            call(fallback, [])
    return Projection(total, tokens)


_CHEAPER: dict[Complexity, tuple[Complexity, ...]] = {
    Complexity.COMPLEX: (Complexity.MEDIUM, Complexity.SIMPLE),
    Complexity.MEDIUM: (Complexity.SIMPLE,),
    Complexity.SIMPLE: (),
}


def _anything(decision: RouteDecision, plan: Plan) -> bool:
    return True


# Nine parameters: the request (messages, params, choices), what it was routed to, and the three rules it is
# held to (cap, the key's access, the request's overrides), each a plain value or function so the
# fit stays pure and testable without a key, a store or an API.
def fit_cost_cap(
    config: MoAConfig,
    routed: Routed,
    messages: Sequence[ChatMessage],
    params: GenerationParams,
    cap_usd: float | None,
    health: Callable[[], HealthView] = HealthView,
    shape: PlanShape = Plan.as_run,
    allowed: Callable[[RouteDecision, Plan], bool] = _anything,
    choices: int = 1,
) -> tuple[Routed, Projection]:
    """The routed plan and its projection (cost and tokens), held to ``cap_usd`` and to what the
    caller may use.

    A routed (``auto``) request whose tier the caller may not use (``allowed``: a key's presets and
    models), or over the cap, moves to the nearest cheaper tier it may use that fits: never to a
    dearer one, so a key's rules never make ``auto`` spend more than its classifier chose. A plan
    the caller chose itself, or one with no such tier, is refused with ``OverCap`` when over the
    cap, or returned as it is when only not allowed: the caller's own check then refuses it,
    naming what it may not use. ``routed`` is the plan as it will run; ``shape`` makes a cheaper
    tier into the plan that would run in its place (the request's overrides), so that is what is
    checked and projected, for ``choices`` answers (``n``).
    """
    plan, decision, pre = routed
    projection = project(config, plan, messages, params, choices)
    cost = projection.cost_usd
    over = cap_usd is not None and cost > cap_usd
    permitted = allowed(decision, plan)
    if permitted and not over:
        return routed, projection
    if not decision.forced and decision.complexity is not None:
        why = [] if permitted else [f"this key may not use {decision.preset}"]
        if over:
            why.append(f"{decision.preset} may cost up to ${cost:.4f}, over the cost cap of ${cap_usd:g}")
        for tier in _CHEAPER[decision.complexity]:
            name = config.router.tiers[tier]
            candidate, subs = substitute_unavailable(config.presets[name], config, health())
            try:
                candidate = shape(candidate)
            except NoVisionModel:
                continue  # a tier whose models cannot see the request's images (moa.engine.vision)
            reason = f"{decision.reason}; {name} instead: {'; '.join(why)}"
            new = decision.model_copy(update={"preset": name, "reason": reason, "substitutions": subs})
            cheaper = project(config, candidate, messages, params, choices)
            if allowed(new, candidate) and (cap_usd is None or cheaper.cost_usd <= cap_usd):
                return (candidate, new, pre), cheaper
    if not permitted:
        return routed, projection
    raise OverCap(
        f"the request may cost up to ${cost:.4f}, over its cost cap of ${cap_usd:g} "
        "(moa.max_cost_usd; lower max_tokens or choose a smaller preset)",
        "moa.max_cost_usd",
    )


def call_cost(config: MoAConfig, req: CallRequest) -> float:
    """The most one call can cost: its prompt read whole and its ``max_tokens`` (or the model's
    ``max_output_tokens``) written. What a key reserves before the router's classifier call."""
    if req.provider not in config.providers:
        return 0.0
    price = config.price(req.provider, req.model)
    prompt = prompt_read(req, config.providers[req.provider].kind)
    out = min(req.params.max_tokens or price.max_output_tokens, price.max_output_tokens)
    return price.cost(min(prompt, price.context_window), out)
