"""What a MoA run does, as data: plans, presets, router and prompt-template settings.

A plan is one mechanism for every mode: proposer layers feeding a final model. ``single`` is a plan
with no layers; Self-MoA is one layer of the same model sampled several times; ``refine`` repeats a
layer for several rounds, each seeing the previous round's synthesis.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    # Timeouts and counts are limits: an infinite or NaN one would be none.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelRef(_Strict):
    provider: str = Field(description="A provider named under providers.")
    model: str = Field(description="One of that provider's models.")

    def __str__(self) -> str:
        return f"{self.provider}/{self.model}"


class ProposerSpec(ModelRef):
    role: str | None = Field(
        default=None,
        description="A role name from templates.roles (analytical, creative, practical, critical), "
        "or null for none.",
    )
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="This proposer's temperature (null: the request's)."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="This proposer's output cap (null: the request's, or the model's)."
    )
    seed: int | None = Field(default=None, description="A sampling seed, where the provider takes one.")


class LayerSpec(_Strict):
    proposers: tuple[ProposerSpec, ...] = Field(
        min_length=1, description="The layer's proposers, run in parallel."
    )
    quorum: int | None = Field(
        default=None, ge=1, description="How many proposers must succeed; null means all of them."
    )

    @model_validator(mode="after")
    def _quorum_fits(self) -> LayerSpec:
        if self.quorum is not None and self.quorum > len(self.proposers):
            raise ValueError(f"quorum {self.quorum} exceeds the layer's {len(self.proposers)} proposers")
        return self

    @property
    def needed(self) -> int:
        return self.quorum if self.quorum is not None else len(self.proposers)


class AggregatorSpec(ModelRef):
    temperature: float | None = Field(
        default=None, ge=0.0, le=2.0, description="The aggregator's temperature (null: the request's)."
    )
    max_tokens: int | None = Field(
        default=None, ge=1, description="The aggregator's output cap (null: the request's, or the model's)."
    )


class PlanMode(StrEnum):
    LAYERED = "layered"  # layers in sequence, each seeing the previous layer's answers
    REFINE = "refine"  # the single layer repeated `rounds` times, each round seeing the last synthesis
    SELF_MOA = "self_moa"  # informational: one model sampled N times (expanded into one layer)


# When the final aggregator may start: once the layer is done (quorum, then up to grace_s for the
# rest: every answer that comes in time is used), as soon as the quorum is met (the stragglers
# are cancelled at once: a faster first token, from fewer answers), or in steps while the
# proposers are still streaming, each later layer stepping over the one before (staircase: see
# moa.engine.staircase).
AggregationMode = Literal["final", "early", "staircase"]

# What answers when every aggregator failed after the proposers answered (see
# ``Plan.on_aggregators_failed``).
AggregatorsFailed = Literal["fallbacks", "proposal", "fail"]


class SelfMoASpec(_Strict):
    """Shorthand expanded into one layer: the same model at spread temperatures and seeds."""

    provider: str = Field(description="A provider named under providers.")
    model: str = Field(description="The model sampled.")
    samples: int = Field(default=4, ge=2, le=16, description="How many samples (proposers) the layer has.")
    temperatures: tuple[float, ...] = Field(
        default=(0.3, 0.7, 1.0, 1.2), description="Temperatures given to the samples in turn."
    )
    quorum: int | None = Field(default=None, description="How many samples must succeed; null: all.")


class Plan(_Strict):
    mode: PlanMode = Field(
        default=PlanMode.LAYERED,
        description="layered: layers in sequence, each seeing the previous layer's answers; refine: "
        "the one layer repeated for rounds rounds, each seeing the last synthesis; self_moa: set by "
        "self_moa (one model sampled N times).",
    )
    description: str = Field(default="", description="What the plan is for (shown in /v1/models).")
    layers: tuple[LayerSpec, ...] = Field(default=(), description="Proposer layers; none: a single model.")
    self_moa: SelfMoASpec | None = Field(
        default=None, description="Shorthand for one layer of one model sampled at spread temperatures."
    )
    rounds: int = Field(default=1, ge=1, le=8, description="Rounds of a refine plan.")
    aggregators: tuple[AggregatorSpec, ...] = Field(
        min_length=1,
        description="The first aggregator synthesises; the rest are its fallback chain, tried in order.",
    )
    fallbacks: tuple[ModelRef, ...] = Field(
        default=(),
        description="The single-model answer chain used when a layer misses its quorum (and, with "
        "on_aggregators_failed: fallbacks, when every aggregator failed).",
    )
    on_aggregators_failed: AggregatorsFailed = Field(
        # The default keeps the operator's stated choice first: the fallback chain is the model(s)
        # they picked to answer alone (in the shipped presets stronger than any proposer), and it
        # answers the question afresh. Only when it fails too, or the plan has none, does a
        # proposal answer: already paid for, and better than an error that discards it.
        default="fallbacks",
        description="When every aggregator failed after the proposers answered (or a refine "
        "round's synthesis failed): fallbacks: the fallback chain answers the question afresh, and "
        "should it fail too (or be empty) the best proposal answers; proposal: the best proposal "
        "answers at once (no further call, no wait); fail: the request fails (502) rather than "
        "answer unaggregated. The best proposal is the first answer in the layer's proposer order "
        "that finished on its own (finish_reason stop), else the first in that order. A proposal "
        "answer is marked in moa.detail (answer_source) and the x-moa-answer-source header, and is "
        "never stored in the response cache.",
    )
    call_timeout_s: float = Field(
        default=60.0, gt=0, description="One model call's deadline, retries included."
    )
    layer_deadline_s: float = Field(
        default=90.0, gt=0, description="A layer's deadline: proposers still running then are cut."
    )
    grace_s: float = Field(
        default=2.0,
        ge=0,
        description="Once the quorum is met, wait at most this long for the remaining proposers.",
    )
    reference_budget_tokens: int | None = Field(
        default=None,
        ge=64,
        description="Token budget for the references handed to one aggregator (null: the model's "
        "context window decides).",
    )
    aggregation: AggregationMode = Field(
        default="final",
        description="final: each layer waits for its quorum and then up to grace_s for the rest "
        "before the next layer (or the aggregator) starts; early: it moves on as soon as the quorum "
        "is met and cancels the rest; staircase: every layer streams, and each later layer's "
        "proposers and the aggregator write in steps as the answers they read grow (streaming "
        "requests; others run final). "
        "A request can choose with moa.aggregation.",
    )
    tools: Literal["vote", "aggregate"] = Field(
        default="vote",
        description="How a request with tools gets its final calls: vote: when a quorum of the last "
        "layer's proposals make the same calls (functions and arguments, order aside), those are "
        "the answer, with no aggregator call; otherwise the aggregator decides; aggregate: the "
        "aggregator always decides, reading the proposed calls as references. Every final call is "
        "validated against its declared schema either way. A request can choose with moa.tools.",
    )
    structured: Literal["aggregator", "proposers"] = Field(
        default="aggregator",
        description="Who is asked for a request's response_format (a JSON object or a JSON Schema's "
        "document): aggregator: only the models that write the final answer (the aggregators, a "
        "single model, the fallbacks), the proposers answering freely, their reasoning the "
        "aggregator's references; proposers: the proposers too, and when a quorum of the last "
        "layer's proposals write the same document (canonical JSON), it is the answer, with no "
        "aggregator call. The final document is validated against the schema either way.",
    )
    staircase_chunk_chars: int = Field(
        # Measured (docs/BENCHMARKS.md): 200 brings moa's first token to under a fifth of final's
        # at no more tokens than 400, while each step still reads a few sentences of every answer.
        default=200,
        ge=20,
        description="Staircase: a boundary every this many characters of each answer a stepped "
        "writer reads (and, in a layer that writes in steps itself, one at each step's end); the "
        "writer's step k starts once the quorum of them reached its k-th boundary (or finished) "
        "and sees each answer up to it.",
    )
    staircase_steps: int = Field(
        default=3,
        ge=1,
        le=16,
        description="Staircase: the most intermediate steps before the final one (each is one more "
        "call of the aggregator and of every proposer of each layer after the first, counted in "
        "caps.max_calls and in a request's projected cost).",
    )
    staircase_step_tokens: int = Field(
        default=48,
        ge=1,
        description="Staircase: the most tokens an intermediate step writes before the next step "
        "continues the answer.",
    )

    @model_validator(mode="after")
    def _expand_self_moa(self) -> Plan:
        if self.self_moa is not None:
            s = self.self_moa
            temps = s.temperatures or (0.7,)
            proposers = tuple(
                ProposerSpec(
                    provider=s.provider, model=s.model, temperature=temps[i % len(temps)], seed=1000 + i
                )
                for i in range(s.samples)
            )
            expanded = (LayerSpec(proposers=proposers, quorum=s.quorum),)
            # A plan validated again (copied, serialised) already carries its expansion.
            if self.layers and self.layers != expanded:
                raise ValueError("give either layers or self_moa, not both")
            object.__setattr__(self, "layers", expanded)
            object.__setattr__(self, "mode", PlanMode.SELF_MOA)
        if self.mode is PlanMode.REFINE and len(self.layers) != 1:
            raise ValueError("a refine plan has exactly one layer, repeated for `rounds` rounds")
        if self.mode is not PlanMode.REFINE and self.rounds != 1:
            raise ValueError("rounds is only meaningful for mode: refine")
        return self

    def model_refs(self) -> list[tuple[str, str]]:
        refs = [(p.provider, p.model) for layer in self.layers for p in layer.proposers]
        refs += [(a.provider, a.model) for a in self.aggregators]
        refs += [(f.provider, f.model) for f in self.fallbacks]
        return refs

    @property
    def is_single(self) -> bool:
        return not self.layers

    def as_run(self, aggregation: AggregationMode | None = None, stream: bool = True) -> Plan:
        """This plan as a request runs it: in the aggregation mode the request chose, if any, and
        with staircase run as final where it cannot climb (a plain request, or a refine plan,
        whose rounds do not stream). Projections, cost caps and call caps are all made on this,
        never on the plan as configured: staircase makes moa up to 25 calls instead of 10."""
        mode = aggregation or self.aggregation
        if mode == "staircase" and (not stream or self.mode is PlanMode.REFINE):
            mode = "final"
        return self if mode == self.aggregation else self.model_copy(update={"aggregation": mode})


# Turns any plan (a routed preset, a cheaper tier) into the plan one request would run.
PlanShape = Callable[[Plan], Plan]


class PresetConfig(Plan):
    """A named plan in the config."""


class Complexity(StrEnum):
    SIMPLE = "simple"
    MEDIUM = "medium"
    COMPLEX = "complex"


class TaskType(StrEnum):
    CODE = "code"
    MATH = "math"
    CREATIVE = "creative"
    ANALYSIS = "analysis"
    GENERAL = "general"


class RouterConfig(_Strict):
    classifier: Literal["heuristic", "llm"] = Field(
        default="heuristic",
        description="How auto classifies a request: heuristic (no call) or llm (asks classifier_model; "
        "falls back to the heuristic when its answer cannot be parsed).",
    )
    classifier_model: ModelRef | None = Field(
        default=None,
        description="The cheap model the llm classifier asks; its answers are cached per API key and prompt.",
    )
    classifier_cache_size: int = Field(default=4096, ge=0, description="Classifier answers kept in memory.")
    tiers: dict[Complexity, str] = Field(
        default_factory=lambda: {
            Complexity.SIMPLE: "single",
            Complexity.MEDIUM: "moa-lite",
            Complexity.COMPLEX: "moa",
        },
        description="Which preset each complexity tier runs.",
    )
    specialists: dict[TaskType, tuple[ProposerSpec, ...]] = Field(
        default_factory=dict,
        description="Task type -> a proposer set replacing the chosen preset's first layer.",
    )
    tools_max_tier: Complexity | None = Field(
        default=None,
        description="auto: the deepest tier a request carrying tools is sent to (its classified tier, "
        "or this one if that is deeper); null: tool requests are routed like any other. See "
        "docs/TOOLS.md for what depth buys on tool calls.",
    )

    @model_validator(mode="after")
    def _classifier_model(self) -> RouterConfig:
        if self.classifier == "llm" and self.classifier_model is None:
            raise ValueError("classifier: llm needs classifier_model")
        return self


DEFAULT_ROLES: dict[str, str] = {
    "analytical": "Reason step by step, check each claim, and make the logic of your answer explicit.",
    "creative": "Look for original angles and vivid, concrete examples; avoid the obvious answer.",
    "practical": "Focus on what the reader can act on: concrete steps, trade-offs and pitfalls.",
    "critical": "Look for flaws, edge cases and hidden assumptions; say where the obvious answer fails.",
}

DEFAULT_AGGREGATE_SYSTEM = (
    "You have been provided with a set of responses from various models to the latest user query. "
    "Your task is to synthesize these responses into a single, high-quality response. It is crucial "
    "to critically evaluate the information provided in these responses, recognizing that some of it "
    "may be biased or incorrect. Your response should not simply replicate the given answers but "
    "should offer a refined, accurate, and comprehensive reply to the instruction. Ensure your "
    "response is well-structured, coherent, and adheres to the highest standards of accuracy and "
    "reliability.\n\nResponses from models:\n{references}"
)

DEFAULT_REFINE_SYSTEM = (
    "A previous round produced the synthesis below. Review it critically: correct any errors, add "
    "what is missing, and give an improved, complete answer to the user's query.\n\n"
    "Previous synthesis:\n{references}"
)

DEFAULT_REFERENCE = '<reference id="{index}">\n{text}\n</reference>'

DEFAULT_CONTINUE_USER = (
    "Your previous answer was cut off. Continue it exactly from where it stops: do not repeat any "
    "of it and do not comment on it, as your text is appended to it as it is."
)


class TemplatesConfig(_Strict):
    """Every prompt the engine writes lives here, so a deployment can tune them in its config."""

    aggregate_system: str = Field(
        default=DEFAULT_AGGREGATE_SYSTEM,
        description="The aggregator's system prompt (the MoA paper's), with {references}; an existing "
        "system message is extended, not replaced.",
    )
    refine_system: str = Field(
        default=DEFAULT_REFINE_SYSTEM,
        description="A refine round's proposers' system prompt, with {references} (the last synthesis).",
    )
    reference: str = Field(
        default=DEFAULT_REFERENCE,
        description="How one reference is rendered, with {text} (and {index}); the simulator recognises the "
        "default <reference> form.",
    )
    roles: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_ROLES),
        description="Role name -> the instruction a proposer with that role gets.",
    )
    continue_user: str = Field(
        default=DEFAULT_CONTINUE_USER,
        description="When an aggregator's stream breaks after text went out and the next "
        "aggregator's API has no assistant-prefix continuation (OpenAI, Gemini), it gets the text "
        "so far as an assistant turn followed by this user turn.",
    )

    @model_validator(mode="after")
    def _placeholders(self) -> TemplatesConfig:
        for name in ("aggregate_system", "refine_system"):
            if "{references}" not in getattr(self, name):
                raise ValueError(f"templates.{name} must contain the {{references}} placeholder")
        if "{text}" not in self.reference:
            raise ValueError("templates.reference must contain the {text} placeholder")
        return self
