"""Bounds on the work one request may cause: the config's ``caps`` section and its checks.

Every preset is checked here when the config is loaded. A request chooses its plan directly
(``/v1/moa``), by preset, or through the router; each plan is checked here after routing, and the
messages before it, so every way in is held to the same caps.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, ConfigDict, Field

from moa.errors import OverCap
from moa.plan import Plan, PlanMode
from moa.types import ChatMessage, GenerationParams, request_images


class RequestCaps(BaseModel):
    """Bounds on the work one request may cause, whoever chose its plan (a preset, an explicit
    plan on /v1/moa, or the router). Over a cap is a 400 naming it, before any model is called."""

    # As every section of the config: unknown keys refused, and no limit of .inf or .nan.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_layers: int = Field(default=4, ge=1, description="Proposer layers (refine: rounds) in one plan.")
    max_proposers_per_layer: int = Field(default=8, ge=1, description="Proposers in one layer.")
    max_calls: int = Field(
        # Room for moa with aggregation: staircase (25: its steps call both aggregators and the
        # three layer-2 proposers three times more), plus the router's classifier call.
        default=32,
        ge=1,
        description="Model calls one request may make in the worst case: every proposer of every "
        "layer or round, every aggregator of the chain (and each intermediate synthesis), every "
        "staircase step (of the aggregators and of each later layer's proposers), every fallback, "
        "and the router's classifier call.",
    )
    max_n: int = Field(
        default=4,
        ge=1,
        description="Answers one request may ask for (n): the proposers run once, and each answer "
        "is one more final call (and, should it fail, its own fallback chain), counted in max_calls "
        "and in the request's projected cost.",
    )
    max_tokens_per_call: int = Field(
        default=32_768, ge=1, description="The largest max_tokens a request or plan may ask of one call."
    )
    max_messages: int = Field(default=512, ge=1, description="Messages in one request.")
    max_input_chars: int = Field(
        default=400_000,
        ge=1,
        description="Characters of message text in one request (about 100k tokens at 4 per token).",
    )
    max_images: int = Field(
        default=20, ge=0, description="Images (image_url parts) in one request; 0 refuses every image."
    )
    max_image_bytes: int = Field(
        default=20_000_000,
        ge=0,
        description="Bytes of the images sent as data URLs in one request, decoded (an image by URL "
        "is never fetched, so counts none). server.max_request_bytes bounds the body first.",
    )


def worst_case_calls(plan: Plan, classifier_calls: int = 0, choices: int = 1) -> int:
    """Calls the plan makes if everything that can be tried is tried, for ``choices`` answers
    (``n``: the proposer stages run once, the final chain and the fallbacks once per answer)."""
    proposers = sum(len(layer.proposers) for layer in plan.layers)
    syntheses = 0
    if plan.mode is PlanMode.REFINE:
        proposers *= plan.rounds
        syntheses = (plan.rounds - 1) * len(plan.aggregators)
    steps = 0
    if plan.aggregation == "staircase":
        # Each intermediate step is one more call of every aggregator of the chain and, in a
        # layered plan, of every proposer of each layer after the first (they step too).
        steppers = len(plan.aggregators)
        if plan.mode is not PlanMode.REFINE:
            steppers += sum(len(layer.proposers) for layer in plan.layers[1:])
        steps = plan.staircase_steps * steppers
    final = (len(plan.aggregators) + len(plan.fallbacks)) * choices
    return classifier_calls + proposers + syntheses + steps + final


def check_messages(caps: RequestCaps, messages: Sequence[ChatMessage]) -> None:
    if len(messages) > caps.max_messages:
        raise OverCap(
            f"{len(messages)} messages exceed the cap of {caps.max_messages} (caps.max_messages)",
            "messages",
        )
    chars = sum(len(m.content) for m in messages)
    if chars > caps.max_input_chars:
        raise OverCap(
            f"the messages hold {chars} characters, over the cap of {caps.max_input_chars} "
            "(caps.max_input_chars)",
            "messages",
        )
    images = request_images(messages)
    if len(images) > caps.max_images:
        raise OverCap(
            f"the messages carry {len(images)} images, over the cap of {caps.max_images} (caps.max_images)",
            "messages",
        )
    size = sum(image.nbytes for image in images)
    if size > caps.max_image_bytes:
        raise OverCap(
            f"the messages' images hold {size} bytes, over the cap of {caps.max_image_bytes} "
            "(caps.max_image_bytes)",
            "messages",
        )


def check_choices(caps: RequestCaps, choices: int) -> None:
    """``n`` within ``caps.max_n`` (checked before the request is routed: before any paid call).
    The API's schema refuses ``n`` below 1; the engine's callers are held to it here."""
    if choices < 1:
        raise OverCap(f"n={choices}: a request asks for at least one answer", "n")
    if choices > caps.max_n:
        raise OverCap(f"n={choices} answers exceed the cap of {caps.max_n} (caps.max_n)", "n")


def check_plan(
    caps: RequestCaps, plan: Plan, params: GenerationParams, classifier_calls: int = 0, choices: int = 1
) -> None:
    layers = len(plan.layers) * (plan.rounds if plan.mode is PlanMode.REFINE else 1)
    if layers > caps.max_layers:
        raise OverCap(f"the plan runs {layers} layers, over the cap of {caps.max_layers} (caps.max_layers)")
    for index, layer in enumerate(plan.layers, start=1):
        if len(layer.proposers) > caps.max_proposers_per_layer:
            raise OverCap(
                f"layer {index} has {len(layer.proposers)} proposers, over the cap of "
                f"{caps.max_proposers_per_layer} (caps.max_proposers_per_layer)"
            )
    calls = worst_case_calls(plan, classifier_calls, choices)
    if calls > caps.max_calls:
        raise OverCap(
            f"the plan may make {calls} model calls, over the cap of {caps.max_calls} (caps.max_calls)"
        )
    asked = [("max_tokens", params.max_tokens)]
    asked += [("plan", getattr(ref, "max_tokens", None)) for ref in _refs(plan)]
    for param, value in asked:
        if value is not None and value > caps.max_tokens_per_call:
            raise OverCap(
                f"max_tokens {value} is over the cap of {caps.max_tokens_per_call} per call "
                "(caps.max_tokens_per_call)",
                param,
            )


def _refs(plan: Plan) -> list[object]:
    return [*(p for layer in plan.layers for p in layer.proposers), *plan.aggregators]
