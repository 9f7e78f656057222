"""Depth routing: how much mixture a request deserves, which specialists, which healthy models.

The policy is plain data plus functions so the Ray router actor can hold it and the in-process CLI
can use it directly.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from moa.caller import ModelCaller
from moa.config import MoAConfig
from moa.errors import NoHealthyProvider, UnknownPreset
from moa.plan import AggregatorSpec, Complexity, LayerSpec, ModelRef, Plan, ProposerSpec, TaskType
from moa.result import RouteDecision
from moa.tokens import approx_tokens
from moa.types import CallRequest, CallResult, ChatMessage, GenerationParams, HealthView

AUTO = "auto"

R = TypeVar("R", bound=ModelRef)

_CODE = re.compile(
    r"```|\b(def|class|function|lambda|return|import|async|await|regex|sql|python|javascript|typescript|"
    r"java|rust|golang|c\+\+|bash|compile|stack ?trace|exception|bug|refactor|api|algorithm|json|implement|"
    r"program|script)\b"
    r"|[{};]\s*$",
    re.IGNORECASE | re.MULTILINE,
)
_MATH = re.compile(
    r"\b(solve|prove|proof|equation|integral|derivative|probability|theorem|matrix|calculate|compute)\b|"
    r"\\frac|\\sum|\d+\s*[-+*/^=]\s*\d+|\$[^$]+\$",
    re.IGNORECASE,
)
_ANALYSIS = re.compile(
    r"\b(analy[sz]e|compare|contrast|evaluate|assess|critique|trade-?offs?|pros and cons|implications|"
    r"why|design|justify|argue|discuss|recommend|strategy)\b",
    re.IGNORECASE,
)
_CREATIVE = re.compile(
    r"\b(poem|story|haiku|lyrics|fiction|imagine|creative|slogan|novel|character|limerick|sonnet|essay|"
    r"blog|compose|headline|tagline|screenplay)\b",
    re.IGNORECASE,
)
# Verbs that signal a demanding task whatever its length.
_HARD = re.compile(r"\b(prove|proof|derive|optimi[sz]e|architect(ure)?|step[- ]by[- ]step)\b", re.IGNORECASE)
_CONSTRAINT = re.compile(
    r"\b(must|at least|at most|no more than|exactly|without using|in \d+ words|step by step|bullet|"
    r"format|constraints?|ensure)\b",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Classification:
    complexity: Complexity
    task: TaskType
    reason: str
    cached: bool = False  # the LLM classifier's answer came from its cache


# The regular expressions read at most this much of a prompt (its head and its tail), so that
# classifying a huge prompt costs what a long one does: it runs on the event loop.
CLASSIFY_HEAD_CHARS = 2_000
CLASSIFY_TAIL_CHARS = 1_000


def classify_heuristic(text: str) -> Classification:
    """Score a prompt on cheap surface features; fast enough to run on every request.

    Length counts the whole prompt; the features are read from a bounded window of it."""
    tokens = approx_tokens(text)
    if len(text) > CLASSIFY_HEAD_CHARS + CLASSIFY_TAIL_CHARS:
        text = text[:CLASSIFY_HEAD_CHARS] + "\n" + text[-CLASSIFY_TAIL_CHARS:]
    questions = text.count("?")
    code = len(_CODE.findall(text))
    math = len(_MATH.findall(text))
    analysis = len(_ANALYSIS.findall(text))
    creative = len(_CREATIVE.findall(text))
    constraints = len(_CONSTRAINT.findall(text))
    hard = len(_HARD.findall(text))

    score = 0.0
    score += 0 if tokens < 25 else 1 if tokens < 120 else 2 if tokens < 400 else 3
    score += min(max(questions - 1, 0), 2)
    # Code and maths are hard by nature: the first marker weighs most.
    score += (1.25 + min(code - 1, 2) * 0.5) if code else 0.0
    score += (1.0 + min(math - 1, 2) * 0.5) if math else 0.0
    score += min(analysis, 3) * 1.0 + min(constraints, 3) * 0.5
    score += min(creative, 2) * 0.75 + min(hard, 2) * 1.0

    complexity = Complexity.SIMPLE if score < 2 else Complexity.MEDIUM if score < 4.5 else Complexity.COMPLEX
    counts = {
        TaskType.CODE: code,
        TaskType.MATH: math,
        TaskType.CREATIVE: creative,
        TaskType.ANALYSIS: analysis,
    }
    best = max(counts, key=lambda t: counts[t])
    task = best if counts[best] > 0 else TaskType.GENERAL
    features = (
        f"tokens={tokens} questions={questions} code={code} math={math} analysis={analysis} "
        f"creative={creative} constraints={constraints} hard={hard}"
    )
    return Classification(complexity, task, f"heuristic score {score:.1f} ({features})")


CLASSIFIER_PROMPT = (
    "Classify the user request below. Answer with two words only: its complexity (simple, medium or "
    "complex) and its task type (code, math, creative, analysis or general).\n\nRequest:\n"
)


def parse_classifier_answer(text: str) -> tuple[Complexity, TaskType] | None:
    words = re.findall(r"[a-z]+", text.lower())
    complexity = next((Complexity(w) for w in words if w in {c.value for c in Complexity}), None)
    task = next((TaskType(w) for w in words if w in {t.value for t in TaskType}), TaskType.GENERAL)
    return (complexity, task) if complexity else None


def user_text(messages: Sequence[ChatMessage]) -> str:
    """The text the router judges: the last user message (earlier turns are context)."""
    for m in reversed(messages):
        if m.role == "user":
            return m.content
    return messages[-1].content if messages else ""


# Awaited before the router makes a paid call (the LLM classifier's), with its request; may refuse
# by raising (a key whose budget cannot pay for it), and then the call is not made.
BeforeCall = Callable[[CallRequest], Awaitable[None]]
# Whose request it is, outside the API (``moa ask``): the response cache's ``local`` scope.
LOCAL_TENANT = "local"


class Router(Protocol):
    """What the engine needs from a router: ``RouterPolicy``, which also runs in every ingress
    replica on Ray (over the health board's view), so a decision never costs a hop.

    ``tenant`` scopes whatever the router remembers of a request (the LLM classifier's answers),
    so one tenant cannot learn from it what another asked; ``before_call`` sees each paid call
    before it is made."""

    async def route(
        self,
        messages: Sequence[ChatMessage],
        preset: str | None = None,
        health: HealthView | None = None,
        *,
        tenant: str = LOCAL_TENANT,
        before_call: BeforeCall | None = None,
        tools: bool = False,
    ) -> tuple[Plan, RouteDecision, list[CallResult]]: ...


# The tiers from the cheapest to the deepest.
TIER_ORDER = (Complexity.SIMPLE, Complexity.MEDIUM, Complexity.COMPLEX)


class RouterPolicy:
    def __init__(self, config: MoAConfig, caller: ModelCaller | None = None) -> None:
        self.config = config
        self.caller = caller
        self._cache: OrderedDict[str, tuple[Complexity, TaskType]] = OrderedDict()

    # -- classification -------------------------------------------------------------------------

    async def classify(
        self, text: str, *, tenant: str = LOCAL_TENANT, before_call: BeforeCall | None = None
    ) -> tuple[Classification, list[CallResult]]:
        """Classify with the configured classifier; the LLM one falls back to the heuristic on failure.

        The LLM classifier's answers are cached per tenant: a shared cache would tell one tenant,
        by a faster answer marked cached, that another had asked the exact same question.
        ``before_call`` is awaited before the classifier's (paid) call and may refuse it."""
        rc = self.config.router
        if rc.classifier != "llm" or rc.classifier_model is None or self.caller is None:
            return classify_heuristic(text), []
        key = hashlib.sha256(f"{tenant}\0{text}".encode()).hexdigest()
        if key in self._cache:
            self._cache.move_to_end(key)
            c, t = self._cache[key]
            return Classification(c, t, f"llm classifier {rc.classifier_model} (cached)", cached=True), []
        req = CallRequest(
            provider=rc.classifier_model.provider,
            model=rc.classifier_model.model,
            messages=(ChatMessage(role="user", content=CLASSIFIER_PROMPT + text[:4000]),),
            params=GenerationParams(temperature=0.0, max_tokens=8),
            timeout_s=10.0,
        )
        if before_call is not None:
            await before_call(req)
        res = await self.caller.call(req)
        parsed = parse_classifier_answer(res.text) if res.ok else None
        if parsed is None:
            fallback = classify_heuristic(text)
            why = res.error.kind if res.error else "unparseable answer"
            return Classification(
                fallback.complexity, fallback.task, f"{fallback.reason}; llm classifier: {why}"
            ), [res]
        if rc.classifier_cache_size:
            self._cache[key] = parsed
            while len(self._cache) > rc.classifier_cache_size:
                self._cache.popitem(last=False)
        return Classification(parsed[0], parsed[1], f"llm classifier {rc.classifier_model}"), [res]

    # -- planning -------------------------------------------------------------------------------

    async def route(
        self,
        messages: Sequence[ChatMessage],
        preset: str | None = None,
        health: HealthView | None = None,
        *,
        tenant: str = LOCAL_TENANT,
        before_call: BeforeCall | None = None,
        tools: bool = False,
    ) -> tuple[Plan, RouteDecision, list[CallResult]]:
        """Pick the plan for a request: a forced preset, or the tier the classifier chooses (for a
        request carrying ``tools``, no deeper than ``router.tools_max_tier``)."""
        health = health or HealthView()
        calls: list[CallResult] = []
        name = preset or self.config.default_preset
        if name != AUTO:
            plan, decision = self.named_plan(name)
        else:
            cls, calls = await self.classify(user_text(messages), tenant=tenant, before_call=before_call)
            tier, cap = cls.complexity, self.config.router.tools_max_tier
            capped = tools and cap is not None and TIER_ORDER.index(tier) > TIER_ORDER.index(cap)
            if capped:
                assert cap is not None
                tier = cap
            name = self.config.router.tiers[tier]
            plan = self.config.presets[name]
            reason = f"{cls.complexity} request -> {name}: {cls.reason}"
            if capped:
                reason += f"; it carries tools, so at most the {tier} tier (router.tools_max_tier)"
            specialists = self.config.router.specialists.get(cls.task)
            if specialists and plan.layers:
                plan = with_first_layer(plan, specialists)
                reason += f"; {cls.task} specialists in layer 1"
            decision = RouteDecision(
                preset=name,
                forced=False,
                complexity=cls.complexity,
                task=cls.task,
                reason=reason,
                classifier_cached=cls.cached,
            )
        plan, subs = substitute_unavailable(plan, self.config, health)
        decision.substitutions = subs
        return plan, decision, calls

    def named_plan(self, name: str) -> tuple[Plan, RouteDecision]:
        """A preset by name, or a direct call to a configured model (``provider/model`` or ``model``)."""
        if name in self.config.presets:
            return self.config.presets[name], RouteDecision(
                preset=name, forced=True, reason="preset requested"
            )
        ref = self.resolve_model(name)
        if ref is None:
            raise UnknownPreset(
                f"unknown preset or model {name!r}; presets: {', '.join(self.preset_names())}; "
                f"models: {', '.join(f'{p}/{m}' for p, m in self.config.all_models())}"
            )
        plan = Plan(aggregators=(AggregatorSpec(provider=ref.provider, model=ref.model),))
        return plan, RouteDecision(preset=str(ref), forced=True, reason="direct model call")

    def resolve_model(self, name: str) -> ModelRef | None:
        provider, _, model = name.partition("/")
        if model and provider in self.config.providers and model in self.config.providers[provider].models:
            return ModelRef(provider=provider, model=model)
        owners = [p for p, m in self.config.all_models() if m == name]
        return ModelRef(provider=owners[0], model=name) if len(owners) == 1 else None

    def preset_names(self) -> list[str]:
        return [AUTO, *self.config.presets]


def with_first_layer(plan: Plan, proposers: Sequence[ProposerSpec]) -> Plan:
    first = plan.layers[0]
    quorum = min(first.needed, len(proposers))
    layer = LayerSpec(proposers=tuple(proposers), quorum=quorum)
    return plan.model_copy(update={"layers": (layer, *plan.layers[1:])})


def substitute_unavailable(plan: Plan, config: MoAConfig, health: HealthView) -> tuple[Plan, list[str]]:
    """Replace every model of a provider whose circuit is open by the nearest healthy model."""
    if not health.unavailable or not any(p in health.unavailable for p, _ in plan.model_refs()):
        return plan, []
    healthy = [(p, m) for p, m in config.all_models() if p not in health.unavailable]
    if not healthy:
        cooldown = min(p.circuit_breaker.cooldown_s for p in config.providers.values())
        raise NoHealthyProvider(
            f"every provider is unavailable (circuit open: {', '.join(sorted(health.unavailable))})",
            retry_after_s=cooldown,
        )
    subs: list[str] = []

    def pick(ref: ModelRef, taken: Collection[tuple[str, str]]) -> tuple[str, str]:
        price = config.price(ref.provider, ref.model).output_per_mtok

        def key(pm: tuple[str, str]) -> tuple[bool, float, float]:
            return (
                pm in taken,
                abs(config.price(*pm).output_per_mtok - price),
                health.latency_s.get(f"{pm[0]}/{pm[1]}", 0.0),
            )

        return min(healthy, key=key)

    def swap(ref: R, taken: Collection[tuple[str, str]]) -> R:
        if ref.provider not in health.unavailable:
            return ref
        p, m = pick(ref, taken)
        subs.append(f"{ref} -> {p}/{m} (circuit open)")
        return ref.model_copy(update={"provider": p, "model": m})

    layers = []
    for layer in plan.layers:
        taken: list[tuple[str, str]] = [(p.provider, p.model) for p in layer.proposers]
        new = []
        for prop in layer.proposers:
            swapped = swap(prop, taken)
            taken.append((swapped.provider, swapped.model))
            new.append(swapped)
        layers.append(layer.model_copy(update={"proposers": tuple(new)}))
    aggregators = _dedupe(swap(a, ()) for a in plan.aggregators)
    fallbacks = _dedupe(swap(f, ()) for f in plan.fallbacks)
    update = {"layers": tuple(layers), "aggregators": aggregators, "fallbacks": fallbacks, "self_moa": None}
    return plan.model_copy(update=update), subs


def _dedupe(refs: Iterable[R]) -> tuple[R, ...]:
    seen: set[tuple[str, str]] = set()
    out = []
    for r in refs:
        if (r.provider, r.model) not in seen:
            seen.add((r.provider, r.model))
            out.append(r)
    return tuple(out)
