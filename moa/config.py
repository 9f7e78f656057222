"""Typed configuration, loaded from YAML.

Secrets never live here: a provider names the environment variable that holds its key, and the key
is read at the moment an endpoint is resolved, wrapped in ``SecretStr`` so no repr or log shows it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from moa.caps import RequestCaps, check_plan
from moa.errors import OverCap
from moa.plan import Plan, PresetConfig, RouterConfig, TemplatesConfig
from moa.types import DroppableParam, GenerationParams


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the field."""


class ProviderKind(StrEnum):
    OPENAI = "openai"
    ANTHROPIC = "anthropic"
    GEMINI = "gemini"
    OPENAI_COMPATIBLE = "openai_compatible"


DEFAULT_BASE_URLS: dict[ProviderKind, str | None] = {
    ProviderKind.OPENAI: "https://api.openai.com/v1",
    ProviderKind.ANTHROPIC: "https://api.anthropic.com",
    ProviderKind.GEMINI: "https://generativelanguage.googleapis.com",
    ProviderKind.OPENAI_COMPATIBLE: None,
}


class _Strict(BaseModel):
    # A limit of .inf or .nan in a config file is no limit (a NaN passes every comparison).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


PositiveFloat = Annotated[float, Field(gt=0)]


class ModelPrice(_Strict):
    """One model's entry: prices in US dollars per million tokens, context window, and the
    generation parameters it refuses."""

    input_per_mtok: float = Field(default=0.0, ge=0, description="US dollars per million input tokens.")
    output_per_mtok: float = Field(default=0.0, ge=0, description="US dollars per million output tokens.")
    cached_input_per_mtok: float | None = Field(
        default=None,
        ge=0,
        description="US dollars per million input tokens the provider served from its prompt cache "
        "(null: the input price).",
    )
    context_window: int = Field(
        default=128_000,
        gt=0,
        description="Tokens the model reads at once: bounds the references an aggregator is given "
        "when the plan sets no reference_budget_tokens. A smaller window the server reports (an "
        "openai_compatible server's listing) or names in a refusal takes precedence.",
    )
    max_output_tokens: int = Field(
        default=32_768,
        gt=0,
        description="The most tokens the model produces in one answer: a call's rate-budget "
        "reservation never exceeds it, whatever max_tokens the request asks for.",
    )
    vision: bool = Field(
        default=False,
        description="Whether the model takes images. A request with images runs only on the models "
        "that do: the others leave their layer (its quorum counted over the rest), the aggregator "
        "chain and the fallbacks (docs/IMAGES.md).",
    )
    unsupported_params: list[DroppableParam] = Field(
        default_factory=list,
        description=(
            "Generation parameters this model refuses (temperature on reasoning models and on "
            "Claude models that dropped it, for example): never sent to it, and each call that "
            "asked for one records the drop. A refusal not listed here is learned from the "
            "provider's 400 at the first call and handled the same way."
        ),
    )

    def cost(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        cached_price = self.cached_input_per_mtok
        if cached_price is None:
            cached_price = self.input_per_mtok
        uncached = max(input_tokens - cached_tokens, 0)
        dollars = uncached * self.input_per_mtok + cached_tokens * cached_price
        return (dollars + output_tokens * self.output_per_mtok) / 1_000_000


class RetryConfig(_Strict):
    """Retries of one provider call (rate limits, server errors, timeouts), within its deadline."""

    max_attempts: int = Field(default=3, ge=1, le=20, description="Attempts per call, the first included.")
    backoff_base_s: float = Field(
        default=0.25,
        ge=0,
        description="The first retry's backoff cap; the cap doubles per attempt and the wait is "
        "random below it.",
    )
    backoff_max_s: float = Field(default=8.0, ge=0, description="The longest backoff between two attempts.")
    max_retry_after_s: float = Field(
        default=30.0,
        ge=0,
        description="A Retry-After longer than this is not waited for: the call fails as "
        "rate_limited at once.",
    )


class LimitsConfig(_Strict):
    """What one provider account allows: calls beyond it wait here instead of failing there."""

    concurrency: int = Field(default=32, ge=1, description="Calls in flight at once, per replica.")
    rpm: int | None = Field(
        default=None,
        ge=1,
        description="Requests per minute for the whole account, across replicas (null: none).",
    )
    tpm: int | None = Field(
        default=None,
        ge=1,
        description="Tokens per minute for the whole account, across replicas (null: none).",
    )
    interactive_reserve: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Share of rpm, tpm and concurrency that batch work (moa batch run to a service, "
        "the Batch API) leaves to interactive requests: a batch's calls take only what is spare "
        "above it, never queueing ahead of an interactive call (0: batch calls compete as equals).",
    )


class CircuitBreakerConfig(_Strict):
    """Stop calling a provider that keeps failing, then probe it again."""

    failure_threshold: int = Field(
        default=5,
        ge=1,
        description="Consecutive failures that count against health before the circuit opens.",
    )
    cooldown_s: float = Field(
        default=30.0,
        gt=0,
        description="How long an open circuit refuses calls before one probe is let through.",
    )


class AutoscalingOptions(_Strict):
    """Ray Serve autoscaling for one deployment (see Serve's ``autoscaling_config``)."""

    min_replicas: int = Field(default=1, ge=0, description="The fewest replicas kept running.")
    max_replicas: int = Field(default=4, ge=1, description="The most replicas started.")
    target_ongoing_requests: float = Field(
        default=16, gt=0, description="Requests in progress per replica that Serve scales towards."
    )
    upscale_delay_s: float = Field(
        default=10.0, ge=0, description="How long the load must call for more replicas before they start."
    )
    downscale_delay_s: float = Field(
        default=120.0, ge=0, description="How long the load must call for fewer replicas before they stop."
    )
    look_back_period_s: float = Field(
        default=30.0,
        gt=0,
        description="The window Serve averages the load over. Serve warns when it is not longer than "
        "its (deprecated) 10 s metrics interval.",
    )

    @model_validator(mode="after")
    def _order(self) -> AutoscalingOptions:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas exceeds max_replicas")
        return self


class DeploymentOptions(_Strict):
    """How one Serve deployment is scheduled and scaled. I/O-bound work needs little CPU.

    Plain data: the Ray side (``actors/options.py``) turns it into Serve's options."""

    num_cpus: float = Field(default=0.1, ge=0, description="CPUs reserved per replica.")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description='Custom Ray resources per replica, e.g. {"provider_node": 0.01} to keep replicas '
        "on one node type.",
    )
    num_replicas: int | None = Field(
        default=None, ge=1, description="A fixed replica count; when null, autoscaling decides."
    )
    autoscaling: AutoscalingOptions = Field(
        default=AutoscalingOptions(), description="Autoscaling, used when num_replicas is null."
    )
    max_ongoing_requests: int | None = Field(
        default=None,
        ge=1,
        description="Requests one replica accepts at once (Serve queues the rest); null: derived from "
        "the limits.",
    )
    max_replicas_per_node: int | None = Field(
        default=None,
        ge=1,
        description="At most this many replicas on one node, e.g. 1 to spread the ingress over the nodes.",
    )


# ``ProviderConfig.cut_margin_tokens``'s default. Measured per cut call by the spend audit on the
# loaded 2-CPU machine (docs/RELIABILITY.md, "What still errs low"): what the reader had not read
# was 0 for most, 3 to 5 for a quarter, and, when the machine starved the reader, a whole answer
# (21 to 118) now and then; averaged over a run, 1.8 to 8.8 tokens a cut call. 12 holds the ledger
# above the invoice over any run measured, for at most 12 tokens' over-charge a cut call.
CUT_MARGIN_TOKENS = 12


class ProviderConfig(_Strict):
    """One provider account: its wire protocol, where it is, its key's variable, limits and models."""

    kind: ProviderKind = Field(description="The wire protocol the provider speaks.")
    base_url: str | None = Field(
        default=None,
        description="Where its API is (null: the provider's public API; required for openai_compatible).",
    )
    api_key_env: str | None = Field(
        default=None,
        description="Name of the environment variable holding the API key; never the key itself.",
    )
    timeout_s: PositiveFloat = Field(
        default=60.0,
        description="A call's deadline, retries included; a shorter one from the plan or the "
        "request applies instead.",
    )
    connect_timeout_s: PositiveFloat = Field(default=5.0, description="Time to open a connection.")
    cut_margin_tokens: int = Field(
        default=CUT_MARGIN_TOKENS,
        ge=0,
        le=4096,
        description="Output tokens added to what a stream we cut (a straggler, a deadline, a client "
        "that left) is charged, for the text the provider had sent and we had not yet read when it "
        "was closed: with it the ledger is never below the provider's invoice, and a cut call is "
        "charged at most this many output tokens above what the provider billed for it. The "
        "default is measured in docs/RELIABILITY.md (spend audit); a faster provider, or a busier "
        "machine, leaves more unread.",
    )
    retry: RetryConfig = Field(default=RetryConfig(), description="Retries of failed calls.")
    limits: LimitsConfig = Field(default=LimitsConfig(), description="The account's limits.")
    circuit_breaker: CircuitBreakerConfig = Field(
        default=CircuitBreakerConfig(), description="When to stop calling a failing provider."
    )
    deployment: DeploymentOptions = Field(
        default=DeploymentOptions(), description="Scheduling of the provider's Serve deployment."
    )
    models: dict[str, ModelPrice] = Field(
        min_length=1, description="Model name -> its prices, context window and refused parameters."
    )

    @model_validator(mode="after")
    def _compatible_needs_url(self) -> ProviderConfig:
        if self.kind is ProviderKind.OPENAI_COMPATIBLE and not self.base_url:
            raise ValueError("an openai_compatible provider needs base_url")
        return self

    @model_validator(mode="before")
    @classmethod
    def _no_inline_secrets(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and any(k in data for k in ("api_key", "key", "token", "secret")):
            raise ValueError("API keys never go in the config file: set api_key_env to the variable's name")
        return data

    def price(self, model: str) -> ModelPrice:
        return self.models.get(model) or ModelPrice()


class SimulatorMode(StrEnum):
    AUTO = "auto"  # simulate when no provider key is set in the environment
    ON = "on"
    OFF = "off"


class SimulatorConfig(_Strict):
    """The built-in provider simulator, which speaks the providers' wire protocols."""

    mode: SimulatorMode = Field(
        default=SimulatorMode.AUTO,
        description="auto: simulate when no provider key is set in the environment; on; off.",
    )

    @field_validator("mode", mode="before")
    @classmethod
    def _yaml_booleans(cls, v: Any) -> Any:
        # YAML reads a bare `on`/`off` as a boolean; take it as the user meant it.
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    url: str | None = Field(
        default=None,
        description="Where a running simulator listens; when null, the CLI starts one on a free "
        "loopback port.",
    )
    profile: str | None = Field(default=None, description="Path of a simulator profile (latencies, faults).")


def _redis_url_without_password(url: str | None) -> str | None:
    """A Redis URL in a config file never carries a password (the state's and the cache's)."""
    from urllib.parse import urlsplit

    if url and urlsplit(url).password:
        raise ValueError("a password never goes in the config file: set MOA_REDIS_PASSWORD")
    return url


class SemanticCacheConfig(_Strict):
    """Semantic hits: a rephrased last user message answered from the cache (opt-in)."""

    presets: tuple[str, ...] = Field(
        default=(),
        description="Presets whose requests look up semantic hits without asking (a request opts in "
        "with moa.cache_semantic: true).",
    )
    threshold: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Cosine similarity of the last user messages above which a hit is served; measured "
        "in docs/CACHING.md (a wrong hit is worse than a miss). A hit also needs the same system "
        "prompt and earlier turns, plan and parameters, and the same numbers, negations, names and "
        "content words in the question.",
    )
    embedder: Literal["static", "provider"] = Field(
        default="static",
        description="static: the small static embedding model bundled in a PyPI package, on CPU, "
        "offline; provider: the embedding API of `provider` (OpenAI or Gemini kinds).",
    )
    provider: str | None = Field(default=None, description="The provider whose embedding API is used.")
    model: str = Field(default="text-embedding-3-small", description="The embedding model to ask for.")
    max_candidates: int = Field(
        default=256,
        ge=1,
        description="Entries kept per context (same scope, system prompt, earlier turns, plan and "
        "parameters) for the similarity scan; the oldest go first.",
    )


class CacheConfig(_Strict):
    """Response caching: final answers and proposer calls (see docs/CACHING.md)."""

    enabled: bool = Field(default=False, description="Serve and store cached answers at all.")
    store: Literal["auto", "memory", "sqlite", "redis"] = Field(
        default="auto",
        description="The shared store behind each replica's in-process LRU. auto: Redis when "
        "cache.redis_url or the state's Redis URL is set, else the SQLite file cache.db in the "
        "state directory. memory: the LRU alone (nothing survives a restart).",
    )
    redis_url: str | None = Field(
        default=None,
        description="A Redis server for the cache (redis://host:6379/1); default: the state's Redis. "
        "MOA_CACHE_REDIS_URL overrides it; a password never goes here.",
    )
    ttl_s: PositiveFloat = Field(default=3600.0, description="How long an entry may be served.")
    max_bytes: int = Field(
        default=512 * 2**20, ge=1024, description="Size bound of the shared store; the least recent go first."
    )
    memory_max_bytes: int = Field(
        default=64 * 2**20, ge=0, description="Size bound of each replica's in-process LRU (0: none)."
    )
    proposals: bool = Field(
        default=True, description="Also cache each proposer call, keyed by its own request."
    )
    sampled: Literal["bypass", "serve"] = Field(
        default="bypass",
        description="A request (or proposer call) with temperature > 0 and no seed asks for a fresh "
        "sample: bypass serves it from no cache unless the request says moa.cache_sampled: true; "
        "serve treats it like any other. A request that sets no temperature is cached.",
    )
    quorum_missed: bool = Field(
        default=False,
        description="Also store answers given by the fallback after a proposer layer missed its quorum.",
    )
    shared_scopes: dict[str, str] = Field(
        default_factory=dict,
        description="API key name -> scope name: keys given the same scope share cached answers. "
        "Otherwise each key sees only its own entries (and the open service its own scope).",
    )
    semantic: SemanticCacheConfig = Field(
        default=SemanticCacheConfig(), description="Semantic hits for rephrased questions (opt-in)."
    )

    @field_validator("redis_url")
    @classmethod
    def _no_password(cls, v: str | None) -> str | None:
        return _redis_url_without_password(v)


class ServerConfig(_Strict):
    """The HTTP service's own limits."""

    open: bool = Field(
        default=False,
        description="Serve requests from beyond loopback while no API key exists (moa serve "
        "--no-auth sets it). Off: until a key exists, such requests get 503 with a log line "
        "saying how to create one, however the app was started (moa serve, serve run, serve "
        "deploy, KubeRay); requests over loopback are served.",
    )

    max_request_bytes: int = Field(
        default=1_000_000,
        gt=0,
        description="Bodies larger than this are refused with 413 before any parsing.",
    )
    max_concurrent_requests: int = Field(
        default=256,
        ge=1,
        description="Requests in progress per ingress replica beyond which new ones get 429 with "
        "Retry-After.",
    )
    key_concurrency_share: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="An API key with no max_concurrent of its own (moa keys create --max-concurrent) "
        "may have at most this share of max_concurrent_requests in progress on each replica "
        "(rounded down, at least 1): past it, 429 concurrency_limit_exceeded, so one key cannot "
        "take every slot and starve the others.",
    )
    request_deadline_s: PositiveFloat = Field(
        default=120.0,
        description="Whole-request deadline (a request may ask for less with moa.deadline_s): 504 past it.",
    )
    drain_s: float = Field(
        default=20.0,
        ge=0,
        description="On shutdown (SIGTERM, Ctrl-C), how long requests in progress may still run "
        "while new ones get 503: after it, an unfinished stream ends with an error event "
        "(code shutting_down) and [DONE], an unfinished plain request gets that 503.",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="moa serve --local: a connection's request line and headers must arrive within "
        "this long from its first byte (or from the connection opening), or it is closed; a client "
        "that sends half a request and stalls holds nothing longer. On Ray, Serve's proxy has no "
        "such setting: put a load balancer that bounds header reads in front.",
    )
    keep_alive_s: int = Field(
        default=5,
        ge=1,
        le=3600,
        description="An idle kept-alive HTTP connection is closed after this long (moa serve, local "
        "and on Ray). Behind a load balancer, make it longer than the balancer's idle timeout.",
    )
    sse_keepalive_s: float = Field(
        default=5.0,
        gt=0,
        description="A stream with nothing to send for this long (its proposers still working) "
        "sends an SSE comment line, which clients ignore, so proxies with idle timeouts keep it.",
    )


class ObservabilityConfig(_Strict):
    """Traces and logs (metrics need no settings)."""

    capture_content: bool = Field(
        default=False,
        description="Record prompts and answers on provider spans (gen_ai.input/output.messages). Off "
        "by default: they may hold personal data. API keys are never recorded, whatever this says.",
    )
    json_logs: bool = Field(
        default=True, description="JSON log lines (with trace and span ids) from the service's loggers."
    )


class ShadowConfig(_Strict):
    """Quality on live traffic: a sampled share of answered requests is answered again by a
    baseline model in the background, after the response has gone out, and a judge compares the
    two (both orders); the running win rate per preset is exported as a metric."""

    enabled: bool = Field(default=False, description="shadow-evaluate live chat completions")
    sample_rate: float = Field(default=0.01, ge=0.0, le=1.0, description="share of requests shadowed")
    baseline: str | None = Field(default=None, description="provider/model answering the same request")
    judge: str | None = Field(default=None, description="provider/model comparing the two answers")
    presets: list[str] | None = Field(
        default=None, description="the presets to shadow (None: every preset, not direct model calls)"
    )
    max_in_flight: int = Field(
        default=4, ge=1, description="shadow evaluations running at once; a sample beyond it is skipped"
    )
    max_cost_usd_per_hour: float | None = Field(
        default=1.0, gt=0, description="shadow spend (baseline and judge) per rolling hour; None: no limit"
    )
    max_tokens: int = Field(default=1024, ge=1, description="max_tokens of the baseline and judge calls")

    @model_validator(mode="after")
    def _models_named(self) -> ShadowConfig:
        if self.enabled and not (self.baseline and self.judge):
            raise ValueError("eval.shadow needs baseline and judge (provider/model) when enabled")
        return self


# Judge prompts for ``moa eval`` (MT-Bench's wording, its [[A]]/[[B]]/[[C]] and [[rating]] verdict
# markers). The provider simulator recognises the default answer blocks, as it does references.
DEFAULT_JUDGE_PAIRWISE_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI "
    "assistants to the user question displayed below. You should choose the assistant that follows "
    "the user's instructions and answers the user's question better. Your evaluation should consider "
    "factors such as the helpfulness, relevance, accuracy, depth, creativity, and level of detail of "
    "their responses. Begin your evaluation by comparing the two responses and provide a short "
    "explanation. Avoid any position biases and ensure that the order in which the responses were "
    "presented does not influence your decision. Do not allow the length of the responses to "
    "influence your evaluation. Be as objective as possible. After providing your explanation, output "
    'your final verdict by strictly following this format: "[[A]]" if assistant A is better, "[[B]]" '
    'if assistant B is better, and "[[C]]" for a tie.'
)
DEFAULT_JUDGE_PAIRWISE = (
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n"
    "[The End of Assistant A's Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n"
    "[The End of Assistant B's Answer]"
)
DEFAULT_JUDGE_GRADED_SYSTEM = (
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. Your evaluation should consider factors such as "
    "the helpfulness, relevance, accuracy, depth, creativity, and level of detail of the response. "
    "Begin your evaluation by providing a short explanation. Be as objective as possible. After "
    "providing your explanation, you must rate the response on a scale of 1 to 10 by strictly "
    'following this format: "[[rating]]", for example: "Rating: [[5]]".'
)
DEFAULT_JUDGE_GRADED = (
    "[Question]\n{question}\n\n[The Start of Assistant's Answer]\n{answer}\n[The End of Assistant's Answer]"
)
DEFAULT_JUDGE_RETRY = (
    "Your reply did not end with a verdict in the required format. Reply again with only the verdict, "
    "exactly in the required format and nothing else: {format}"
)


class JudgeTemplates(_Strict):
    """The judges' prompts, for ``moa eval`` and shadow evaluation (``eval.shadow``)."""

    judge_pairwise_system: str = Field(
        default=DEFAULT_JUDGE_PAIRWISE_SYSTEM,
        description="moa eval's pairwise judge: the system prompt, which fixes the verdict format",
    )
    judge_pairwise: str = Field(
        default=DEFAULT_JUDGE_PAIRWISE,
        description="moa eval's pairwise judge: the user message, with {question}, {answer_a}, {answer_b}",
    )
    judge_graded_system: str = Field(
        default=DEFAULT_JUDGE_GRADED_SYSTEM,
        description="moa eval's grading judge (1-10): the system prompt, which fixes the rating format",
    )
    judge_graded: str = Field(
        default=DEFAULT_JUDGE_GRADED,
        description="moa eval's grading judge: the user message, with {question} and {answer}",
    )
    judge_retry: str = Field(
        default=DEFAULT_JUDGE_RETRY,
        description="sent once when a judge's verdict cannot be parsed; {format} names the format",
    )

    @model_validator(mode="after")
    def _placeholders(self) -> JudgeTemplates:
        needed = {
            "judge_pairwise": ("{question}", "{answer_a}", "{answer_b}"),
            "judge_graded": ("{question}", "{answer}"),
            "judge_retry": ("{format}",),
        }
        for name, placeholders in needed.items():
            missing = [p for p in placeholders if p not in getattr(self, name)]
            if missing:
                raise ValueError(
                    f"eval.templates.{name} must contain the {', '.join(missing)} placeholder(s)"
                )
        return self


# The judges' prompts as keys of the engine's ``templates``, where they were first.
JUDGE_TEMPLATE_KEYS = frozenset(JudgeTemplates.model_fields)


class EvalConfig(_Strict):
    """moa eval's settings: its judges' prompts, and shadow evaluation of live traffic."""

    shadow: ShadowConfig = Field(
        default_factory=ShadowConfig, description="shadow evaluation of live traffic"
    )
    templates: JudgeTemplates = Field(
        default_factory=JudgeTemplates,
        description="the judges' prompts (moa eval, shadow evaluation); the same keys under "
        "templates, where they were before, are still accepted",
    )


class ServeOptions(_Strict):
    """Scheduling of the service's own deployments (providers carry theirs in ``providers``)."""

    ingress: DeploymentOptions = Field(
        default=DeploymentOptions(num_cpus=0.2), description="The HTTP ingress (the API and the engine)."
    )
    health_board: DeploymentOptions = Field(
        default=DeploymentOptions(num_cpus=0.05, num_replicas=1),
        description="The health board: provider health reports in, the view the ingress routes with "
        "out (the old key serve.router is still accepted).",
    )
    fusion: Literal["ingress", "deployment"] = Field(
        default="ingress",
        description="Where the final fusion runs. ingress: the ingress builds the aggregator's prompt "
        "and calls its model's provider deployment itself (one sequential handle hop less per "
        "request, measured with moa bench). deployment: an aggregator deployment does it, scaled "
        "apart from the ingress (worth it only when fusion work is heavy, e.g. very long references "
        "to trim).",
    )
    aggregator: DeploymentOptions = Field(
        default=DeploymentOptions(num_cpus=0.1), description="The aggregator deployment (fusion: deployment)."
    )
    simulator: DeploymentOptions = Field(
        default=DeploymentOptions(num_cpus=0.2, num_replicas=1),
        description="The provider simulator's deployment, when the app runs against it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _old_router_key(cls, data: Any) -> Any:
        """``serve.router`` was this deployment's name before it was the health board (it never
        routed): still accepted, as ``serve.health_board``."""
        if isinstance(data, Mapping) and "router" in data:
            if "health_board" in data:
                raise ValueError("give serve.health_board only (serve.router is its old name)")
            data = {("health_board" if k == "router" else k): v for k, v in data.items()}
        return data


class StateConfig(_Strict):
    """Where API keys and the spend ledger live (see ``moa keys`` and the README's security section)."""

    dir: str | None = Field(
        default=None,
        description="Directory of the embedded SQLite state file (state.db). MOA_STATE_DIR overrides "
        "it; when neither is set, a per-user data directory ($XDG_DATA_HOME/moa or ~/.local/share/moa).",
    )
    redis_url: str | None = Field(
        default=None,
        description="A Redis server holding the state instead (redis://host:6379/0), shared by every "
        "replica on every node: required on a multi-node cluster. MOA_REDIS_URL overrides it; a "
        "password never goes here (MOA_REDIS_PASSWORD, or inside MOA_REDIS_URL).",
    )
    key_cache_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How long a replica trusts a key record it looked up: a revoked or disabled key "
        "stops working on every replica within this time.",
    )

    @field_validator("redis_url")
    @classmethod
    def _no_password(cls, v: str | None) -> str | None:
        return _redis_url_without_password(v)


class BatchApiConfig(_Strict):
    """The service's OpenAI Batch API (``/v1/files``, ``/v1/batches``): where its files live and
    how much of a replica its batches may take (docs/BATCH.md)."""

    files_dir: str | None = Field(
        default=None,
        description="Directory of the Batch API's file contents (inputs, outputs); the records are in "
        "the state store. Default: files/ in the state directory (state.dir). On a cluster every "
        "ingress replica must see the same directory (a shared file system): any replica may take "
        "a batch over.",
    )
    max_file_bytes: int = Field(
        default=100_000_000,
        gt=0,
        description="An uploaded file larger than this is refused with 413 (file_too_large).",
    )
    max_requests: int = Field(
        default=50_000,
        ge=1,
        description="Requests one batch may hold (OpenAI's limit): more fails validation.",
    )
    concurrency: int = Field(
        default=4,
        ge=1,
        le=256,
        description="Batch requests in progress at once on each ingress replica, all its batches "
        "together: batch work never takes more of a replica than this.",
    )
    max_running: int = Field(
        default=2, ge=1, le=64, description="Batches each ingress replica runs at once (the rest wait)."
    )
    yield_at: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Batch requests start only while the replica's requests in progress are fewer "
        "than this share of server.max_concurrent_requests: interactive traffic goes first.",
    )
    attempts: int = Field(
        default=4, ge=1, le=20, description="Tries per batch request (after a 408, 429, 5xx or no response)."
    )
    lease_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="A replica runs a batch while it holds the batch's lease in the state store, "
        "renewed every third of this; a replica that dies loses it after this long, and another "
        "takes the batch over from its checkpoint.",
    )
    poll_s: float = Field(
        default=2.0,
        gt=0,
        le=300,
        description="How often a replica looks for batches to run or take over, and for a "
        "cancellation of the batches it runs.",
    )


class MoAConfig(_Strict):
    """A moa-serve configuration file (YAML). Its JSON schema is docs/config.schema.json."""

    providers: dict[str, ProviderConfig] = Field(
        min_length=1,
        description="Provider name -> the account: kind, endpoint, key variable, limits, models.",
    )
    simulator: SimulatorConfig = Field(default=SimulatorConfig(), description="The provider simulator.")
    presets: dict[str, PresetConfig] = Field(
        default_factory=dict, description="Preset name -> a plan: proposer layers, aggregators, fallbacks."
    )
    default_preset: str = Field(
        default="auto", description="The preset a request without one runs (auto: the router chooses)."
    )
    router: RouterConfig = Field(
        default=RouterConfig(), description="How auto picks a preset: the classifier, tiers and specialists."
    )
    templates: TemplatesConfig = Field(
        default=TemplatesConfig(), description="Prompt templates: aggregation, refine and proposer roles."
    )
    cache: CacheConfig = Field(default=CacheConfig(), description="Response caching.")
    server: ServerConfig = Field(default=ServerConfig(), description="The HTTP service's own limits.")
    caps: RequestCaps = Field(default=RequestCaps(), description="Bounds on the work one request may cause.")
    serve: ServeOptions = Field(
        default=ServeOptions(), description="Scheduling of the service's deployments."
    )
    observability: ObservabilityConfig = Field(default=ObservabilityConfig(), description="Traces and logs.")
    state: StateConfig = Field(default=StateConfig(), description="Where API keys and the spend ledger live.")
    batch: BatchApiConfig = Field(
        default=BatchApiConfig(), description="The OpenAI Batch API: its files, and its share of a replica."
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="moa eval's live-traffic settings")

    @model_validator(mode="before")
    @classmethod
    def _old_judge_template_keys(cls, data: Any) -> Any:
        """The judges' prompts were ``templates.judge_*`` before they were ``eval.templates``
        (``templates`` holds the prompts the engine writes): still accepted there, and moved."""
        if not isinstance(data, Mapping) or not isinstance(data.get("templates"), Mapping):
            return data
        templates = dict(data["templates"])
        moved = {k: templates.pop(k) for k in sorted(JUDGE_TEMPLATE_KEYS & set(templates))}
        evals = data.get("eval") or {}
        given = (evals.get("templates") or {}) if isinstance(evals, Mapping) else None
        if not moved or not isinstance(given, Mapping):
            return data  # nothing to move, or no mapping to move it into: validation says why
        if both := sorted(set(given) & set(moved)):
            raise ValueError(
                f"give eval.templates only ({', '.join(both)} also under templates, the old place)"
            )
        return {**data, "templates": templates, "eval": {**evals, "templates": {**moved, **given}}}

    @model_validator(mode="after")
    def _references_exist(self) -> MoAConfig:
        for name, preset in self.presets.items():
            problems = self.unknown_models(preset)
            if problems:
                raise ValueError(f"presets.{name}: {'; '.join(problems)}")
            try:
                check_plan(self.caps, preset, GenerationParams())
            except OverCap as e:
                raise ValueError(f"presets.{name}: {e.message}") from None
        for task, proposers in self.router.specialists.items():
            for p in proposers:
                if p.provider not in self.providers or p.model not in self.providers[p.provider].models:
                    raise ValueError(f"router.specialists.{task}: unknown model {p.provider}/{p.model}")
        shadow = self.eval.shadow
        for what, ref in (("baseline", shadow.baseline), ("judge", shadow.judge)):
            provider, _, model = (ref or "").partition("/")
            if ref and (provider not in self.providers or model not in self.providers[provider].models):
                raise ValueError(f"eval.shadow.{what}: unknown model {ref!r} (provider/model)")
        unknown = [p for p in shadow.presets or [] if p != "auto" and p not in self.presets]
        if unknown:
            raise ValueError(f"eval.shadow.presets: unknown preset(s) {', '.join(unknown)}")
        if self.default_preset != "auto" and self.default_preset not in self.presets:
            raise ValueError(f"default_preset {self.default_preset!r} is not a preset")
        return self

    def unknown_models(self, plan: Plan) -> list[str]:
        """What a plan names that this config does not have (empty when the plan can run)."""
        problems = []
        for provider, model in plan.model_refs():
            if provider not in self.providers:
                problems.append(f"unknown provider {provider!r}")
            elif model not in self.providers[provider].models:
                problems.append(f"provider {provider!r} has no model {model!r}")
        roles = {p.role for layer in plan.layers for p in layer.proposers if p.role}
        problems += [f"unknown role {r!r}" for r in sorted(roles - set(self.templates.roles))]
        return list(dict.fromkeys(problems))

    def price(self, provider: str, model: str) -> ModelPrice:
        return self.providers[provider].price(model)

    def all_models(self) -> list[tuple[str, str]]:
        return [(p, m) for p, cfg in self.providers.items() for m in cfg.models]


# ---------------------------------------------------------------------------------------------------
# Loading


def format_validation_error(err: ValidationError, source: str, what: str = "configuration") -> str:
    """One line per problem, each naming the field, under a line naming the source."""
    lines = [f"invalid {what} in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_config(data: Mapping[str, Any], source: str = "<dict>") -> MoAConfig:
    try:
        return MoAConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def read_yaml_file(path: str | os.PathLike[str], what: str, error: type[ConfigError] = ConfigError) -> Any:
    """Parse a YAML (or JSON) file; failures raise ``error`` naming the file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise error(f"{what} {p} is not valid YAML: {e}") from None


BUNDLED_SOURCE = "the bundled default config"


def bundled_config_data() -> dict[str, Any]:
    """The bundled default config as raw YAML data, before validation."""
    data = yaml.safe_load(resources.files("moa").joinpath("default_config.yaml").read_text())
    assert isinstance(data, dict)
    return data


def merge_config(base: Any, override: Any) -> Any:
    """``override`` laid over ``base``: mappings are merged key by key, at every depth; anything
    else (a list, a number, a string) replaces what it overrides. A ``null`` where ``base`` holds a
    mapping or a list removes that entry (``providers: {gemini: null}``, ``router: {specialists:
    {math: null}}``), so the field's own default applies; a ``null`` over anything else is the
    value null.

    A config file names what it changes (``cache: {enabled: true}``) rather than restating the
    bundled config: replacing it wholesale made a one-line file fail on ``providers: Field
    required``. Lists are replaced rather than merged because a list (proposers, aggregators,
    fallbacks) is one ordered choice, not a set of independent entries."""
    if not (isinstance(base, Mapping) and isinstance(override, Mapping)):
        return override
    out = dict(base)
    for key, value in override.items():
        if value is None and isinstance(base.get(key), Mapping | list):
            out.pop(key, None)
        elif key in out:
            out[key] = merge_config(out[key], value)
        else:
            out[key] = value
    return out


def _config_layers(path: str | os.PathLike[str] | None) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The bundled data, the file's data (empty without a file) and the file's name."""
    if path is None:
        path = os.environ.get("MOA_CONFIG") or None
    if path is None:
        return bundled_config_data(), {}, BUNDLED_SOURCE
    data = read_yaml_file(path, "config file")
    if data is None:  # an empty file changes nothing
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return bundled_config_data(), dict(data), str(path)


def load_config(path: str | os.PathLike[str] | None = None) -> MoAConfig:
    """Load a YAML config; ``None`` (or ``MOA_CONFIG`` unset) gives the bundled default. A file
    overrides the bundled config where it says something (``merge_config``)."""
    bundled, override, source = _config_layers(path)
    return parse_config(merge_config(bundled, override), source)


def _leaves(data: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """Every leaf of nested mappings by its path; lists and empty mappings are leaves."""
    if isinstance(data, Mapping) and data:
        out: dict[tuple[str, ...], Any] = {}
        for k, v in data.items():
            out |= _leaves(v, (*prefix, str(k)))
        return out
    return {prefix: data}


def _given(layer: Mapping[str, Any], path: tuple[str, ...]) -> bool:
    """Whether a layer sets ``path`` itself, or a leaf (a list, a scalar) above it."""
    node: Any = layer
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
        if not isinstance(node, Mapping):
            return True
    return True


def config_sources(path: str | os.PathLike[str] | None = None) -> list[tuple[str, Any, str]]:
    """The effective config, one leaf per row: its dotted name, its value, and where it came from
    (the file, the bundled config, or the field's built-in default). ``moa config show`` prints
    it, so a user can see what a short file did to the whole."""
    bundled, override, source = _config_layers(path)
    cfg = parse_config(merge_config(bundled, override), source)
    rows = []
    for key, value in _leaves(cfg.model_dump(mode="json")).items():
        if override and _given(override, key):
            origin = source
        elif _given(bundled, key):
            origin = BUNDLED_SOURCE
        else:
            origin = "built-in default"
        rows.append((".".join(key), value, origin))
    return rows


# ---------------------------------------------------------------------------------------------------
# Endpoint resolution: real API or simulator, and the key from the environment


class Endpoint(BaseModel):
    """Where one provider's calls go. ``api_key`` is a SecretStr: its repr never shows the value."""

    model_config = ConfigDict(frozen=True)

    provider: str
    kind: ProviderKind
    base_url: str | None
    api_key: SecretStr | None
    simulated: bool


SIMULATOR_KEY = SecretStr("sim-key-not-secret")


def simulation_active(cfg: MoAConfig, env: Mapping[str, str] | None = None) -> bool:
    """True when calls go to the simulator: forced on, or auto with no provider key in the environment."""
    env = os.environ if env is None else env
    if cfg.simulator.mode is SimulatorMode.ON:
        return True
    if cfg.simulator.mode is SimulatorMode.OFF:
        return False
    return not any(p.api_key_env and env.get(p.api_key_env) for p in cfg.providers.values())


def simulator_base_url(kind: ProviderKind, sim_url: str) -> str:
    """The base_url each official SDK needs to reach the simulator's routes."""
    root = sim_url.rstrip("/")
    if kind in (ProviderKind.OPENAI, ProviderKind.OPENAI_COMPATIBLE):
        return root + "/v1"
    return root  # the Anthropic and Gemini SDKs add their own version prefixes


def resolve_endpoint(
    cfg: MoAConfig, provider: str, *, sim_url: str | None = None, env: Mapping[str, str] | None = None
) -> Endpoint:
    env = os.environ if env is None else env
    pcfg = cfg.providers[provider]
    if simulation_active(cfg, env):
        url = sim_url or cfg.simulator.url
        if not url:
            raise ConfigError("simulation is active but no simulator URL is known (simulator.url)")
        return Endpoint(
            provider=provider,
            kind=pcfg.kind,
            base_url=simulator_base_url(pcfg.kind, url),
            api_key=SIMULATOR_KEY,
            simulated=True,
        )
    key = env.get(pcfg.api_key_env) if pcfg.api_key_env else None
    return Endpoint(
        provider=provider,
        kind=pcfg.kind,
        base_url=pcfg.base_url or DEFAULT_BASE_URLS[pcfg.kind],
        api_key=SecretStr(key) if key else None,
        simulated=False,
    )


# ---------------------------------------------------------------------------------------------------
# The published schema


def config_schema() -> dict[str, Any]:
    """The config file's JSON schema: every field with its type, bounds, default and description.

    Published as docs/config.schema.json (``moa config schema`` prints it) so an editor can check
    and document a YAML config as it is written; a test keeps the file equal to this.
    """
    schema = MoAConfig.model_json_schema(mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
