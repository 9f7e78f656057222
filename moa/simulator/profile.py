"""How the simulated providers behave: latency per model and the faults they inject.

A profile is plain data (YAML or JSON on disk, JSON over the admin API). Model entries are keyed
by exact name or fnmatch glob (``claude-*``); an exact name beats a glob, and of several matching
globs the most specific (most literal characters) wins. ``faults`` holds fault overrides by the
same keys, so ``PUT /admin/faults/*`` can break every model without touching their latencies.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moa.config import ConfigError, format_validation_error, read_yaml_file
from moa.simulator.text import STYLES


class ProfileError(ConfigError):
    """A simulator profile that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FaultSpec(_Strict):
    """One fault: injected with probability ``rate``; with ``first_n``, only into the first N requests.

    ``first_n`` makes tests deterministic: ``FaultSpec(first_n=2)`` faults exactly the first two
    requests for a model (counted from when the fault was set), then never again.
    """

    rate: float = Field(default=1.0, ge=0.0, le=1.0)
    first_n: int | None = Field(default=None, ge=0)


class RateFault(FaultSpec):
    """A 429 in the provider's own rate-limit format; ``retry_after_s`` is the wait it asks for, said
    where that provider says it (Anthropic's ``retry-after``, OpenAI's rate-limit reset headers,
    Gemini's ``RetryInfo`` in the body)."""

    retry_after_s: float | None = Field(default=1.0, ge=0.0)


class HangFault(FaultSpec):
    """No answer until the client gives up, or, with ``hang_s``, a normal answer that late."""

    hang_s: float | None = Field(default=None, gt=0.0)


class SlowFault(FaultSpec):
    """Generation at ``tokens_per_s / factor``."""

    factor: float = Field(default=10.0, ge=1.0)


class StallFault(FaultSpec):
    """The answer stops after about ``after_tokens`` tokens, its connection left open, until the
    client gives up: a stream sends those and nothing more; a plain request never answers. Billed
    for those tokens. Nothing is in flight when the client leaves: what a caller cut is billed
    for is exactly what was sent (the ledger tests compare the two)."""

    after_tokens: int = Field(default=20, ge=0)


class Faults(_Strict):
    """The faults a model may inject; when several fire at once the first in field order wins."""

    error_429: RateFault | None = None
    error_500: FaultSpec | None = None
    error_503: FaultSpec | None = None
    hang: HangFault | None = None
    malformed_json: FaultSpec | None = None
    wrong_content_type: FaultSpec | None = None
    cut_stream: FaultSpec | None = None
    slow_stream: SlowFault | None = None
    stall: StallFault | None = None


FAULT_KINDS: tuple[str, ...] = tuple(Faults.model_fields)


class JudgeProfile(_Strict):
    """How a model answers the judge prompts of ``moa eval``: a scripted judge with known biases.

    The simulator knows which model wrote every answer it produced, so a judge can favour one
    model's answers with a known probability; the harness must then recover that probability.
    A pairwise verdict is drawn in this order: a tie (``tie_rate``); the answer shown first
    (``position_bias``); when exactly one answer is by ``favour``, that one with probability
    ``favour_p``; otherwise the longer one more often (``length_bias``), else a fair coin.
    """

    favour: str | None = Field(
        default=None, description="model name or glob whose answers this judge prefers (None: nobody)"
    )
    favour_p: float = Field(
        default=0.5, ge=0.0, le=1.0, description="probability that the favoured model's answer wins"
    )
    position_bias: float = Field(
        default=0.0, ge=0.0, le=1.0, description="probability of picking the answer shown first outright"
    )
    length_bias: float = Field(
        default=0.0,
        ge=0.0,
        description="log-odds of picking the first answer per 100 tokens it is longer than the second",
    )
    tie_rate: float = Field(default=0.0, ge=0.0, le=1.0, description="probability of a tie verdict")
    off_format: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="probability that a reply (a retry too) carries no verdict marker",
    )
    scores: dict[str, float] = Field(
        default_factory=dict, description="graded mode: mean 1-10 score by author model (name or glob)"
    )
    default_score: float = Field(default=6.0, ge=1.0, le=10.0, description="mean score of other authors")
    score_noise: int = Field(default=1, ge=0, le=4, description="scores vary uniformly by this many points")


class ToolErrors(_Strict):
    """How often this model gets a tool call wrong, each kind at its own rate (0 to 1), drawn per
    request from the request's model, conversation, tools and seed, so a run repeats exactly.
    When several fire at once the first in field order wins. They measure what voting and
    validation are worth: each is a fault a validator or a quorum of other models can catch."""

    wrong_function: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="calls another declared function (or, with one, an undeclared one)",
    )
    missing_argument: float = Field(
        default=0.0, ge=0.0, le=1.0, description="leaves out one required argument of the first call"
    )
    mistyped_argument: float = Field(
        default=0.0, ge=0.0, le=1.0, description="gives one argument of the first call the wrong JSON type"
    )
    malformed_json: float = Field(
        default=0.0, ge=0.0, le=1.0, description="writes the first call's arguments as text that is not JSON"
    )
    text_instead_of_call: float = Field(
        default=0.0, ge=0.0, le=1.0, description="answers in text where a call was needed (even when forced)"
    )


class JsonErrors(_Strict):
    """How often this model gets a structured answer (a JSON document for a response format)
    wrong, each kind at its own rate (0 to 1), drawn per request from the request's model,
    conversation, schema and seed, so a run repeats exactly; when several fire the first in field
    order wins. A format whose decoding is held to its schema (OpenAI's strict ``json_schema``,
    any Gemini schema, Anthropic's ``output_config.format``) never writes malformed or off-schema
    JSON, whatever these say: only a refusal can happen there."""

    malformed_json: float = Field(
        default=0.0, ge=0.0, le=1.0, description="writes a document that does not parse as JSON"
    )
    schema_violation: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="breaks the schema once: a required field missing, a wrong JSON type, or a value "
        "outside an enum",
    )
    refusal: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="refuses (OpenAI's message.refusal, Claude's refusal stop reason)",
    )


# Generation parameters by their common names (each protocol has its own: Anthropic's
# stop_sequences, Gemini's topP and maxOutputTokens...).
GenParam = Literal[
    "temperature",
    "top_p",
    "max_tokens",
    "stop",
    "seed",
    "frequency_penalty",
    "presence_penalty",
    "logit_bias",
    "reasoning_effort",
]


class ModelProfile(_Strict):
    ttft_s: float = Field(default=0.3, ge=0.0)
    tokens_per_s: float = Field(default=50.0, gt=0.0)
    # Prompt tokens read per second before the first token, on top of ttft_s: a long prompt (an
    # aggregator's references) waits longer for its first token, as on the real APIs, where it
    # adds about a second per ten thousand tokens. Tokens read from the prompt cache cost nothing.
    prefill_tokens_per_s: float = Field(default=10_000.0, gt=0.0)
    # Multiplicative, uniform in [1 - jitter, 1 + jitter], applied to ttft and generation time.
    jitter: float = Field(default=0.1, ge=0.0, lt=1.0)
    # Overrides the style derived from the model name (see moa.simulator.text.STYLES).
    style: str | None = None
    # Range of answer lengths in tokens; None derives a plausible length from the model and prompt.
    output_tokens: tuple[int, int] | None = None
    # Generation parameters this model refuses with a 400 in its API's own words, as OpenAI's
    # reasoning models refuse temperature and recent Claude models have deprecated it.
    refuses: tuple[GenParam, ...] = ()
    # Refuse temperature and top_p in one request, as recent Claude models do. None: as the API
    # does by default (the Anthropic protocol refuses the pair, OpenAI's and Gemini's accept it).
    exclusive_sampling: bool | None = None
    faults: Faults = Faults()
    # How this model answers moa eval's judge prompts (an unbiased judge by default).
    judge: JudgeProfile = JudgeProfile()
    # How this model errs when it calls tools (never, by default).
    tool_errors: ToolErrors = ToolErrors()
    # How this model errs when asked for a JSON document (never, by default).
    json_errors: JsonErrors = JsonErrors()
    vision: bool | None = Field(
        default=None,
        description="Whether this model takes images; a model without vision refuses one in its "
        "API's words. None: as its real API does, by name (moa.simulator.images.vision_capable: "
        "GPT-4o/4.1/5 and o-series, Claude 3 and 4, Gemini), text-only for any other name.",
    )
    context_window: int | None = Field(
        default=None,
        ge=16,
        description="The window (tokens) this model is served with on the OpenAI-compatible route: "
        "a prompt that does not fit is refused with a 400 in the words of `server`, and an answer "
        "stops (finish length) where the window is full. None: unlimited.",
    )
    server: Literal["openai", "llama.cpp", "vllm"] = Field(
        default="openai",
        description="Which server this model plays on the OpenAI-compatible route: how it refuses a "
        "prompt too long for context_window (OpenAI's context_length_exceeded, llama.cpp's "
        "exceed_context_size_error, vLLM's BadRequestError) and where it reports the window "
        "(vllm: max_model_len in GET /v1/models; llama.cpp: meta.n_ctx in GET /v1/models and n_ctx "
        "in GET /props). A llama.cpp model also answers in llama.cpp's own bodies (its timings, no "
        "logprobs or service_tier).",
    )

    @field_validator("style")
    @classmethod
    def _known_style(cls, v: str | None) -> str | None:
        if v is not None and v not in STYLES:
            raise ValueError(f"unknown style {v!r}; choose one of {', '.join(sorted(STYLES))}")
        return v

    @field_validator("output_tokens")
    @classmethod
    def _range(cls, v: tuple[int, int] | None) -> tuple[int, int] | None:
        if v is not None and not 1 <= v[0] <= v[1]:
            raise ValueError("output_tokens must be [low, high] with 1 <= low <= high")
        return v


def _is_glob(key: str) -> bool:
    return any(c in key for c in "*?[")


def match_pattern(table: Mapping[str, Any], name: str) -> Any | None:
    """Exact key first, else the most specific matching glob (most literal characters)."""
    if name in table:
        return table[name]
    best, best_score = None, -1
    for key, value in table.items():
        if _is_glob(key) and fnmatch.fnmatchcase(name, key):
            score = sum(c not in "*?[]" for c in key)
            if score > best_score:
                best, best_score = value, score
    return best


class SimProfile(_Strict):
    default: ModelProfile = ModelProfile()
    models: dict[str, ModelProfile] = Field(default_factory=dict)
    # Fault overrides by model name or glob; they replace the matching model entry's faults.
    faults: dict[str, Faults] = Field(default_factory=dict)
    # Seeds the random draws for fault rates and jitter, so a benchmark run can be repeated.
    seed: int = 0
    simulator_service_header: bool = Field(
        default=True,
        description=(
            "Send x-simulator-service-ms (the time the simulator spent, unrounded) on every wire, "
            "which benchmarks need; false leaves only the headers the real APIs send."
        ),
    )

    def for_model(self, name: str) -> ModelProfile:
        base: ModelProfile = match_pattern(self.models, name) or self.default
        override: Faults | None = match_pattern(self.faults, name)
        if override is not None:
            return base.model_copy(update={"faults": override})
        return base


def parse_profile(data: Any, source: str = "<dict>") -> SimProfile:
    if data is None:
        return SimProfile()
    if not isinstance(data, Mapping):
        raise ProfileError(f"{source}: the top level of a simulator profile must be a mapping")
    try:
        return SimProfile.model_validate(data)
    except ValidationError as err:
        raise ProfileError(format_validation_error(err, source, "simulator profile")) from None


def load_profile(path: str | os.PathLike[str]) -> SimProfile:
    """Read a profile from YAML or JSON (JSON is YAML); errors name the file and the field."""
    return parse_profile(read_yaml_file(path, "simulator profile", ProfileError), str(Path(path)))
