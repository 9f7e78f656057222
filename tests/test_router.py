"""Router policy: depth decisions on example prompts, specialists, forced presets, health substitution."""

from __future__ import annotations

import pytest

from moa.config import load_config
from moa.engine.router import RouterPolicy, classify_heuristic, parse_classifier_answer
from moa.errors import NoHealthyProvider, UnknownPreset
from moa.plan import Complexity, TaskType
from moa.types import ChatMessage, HealthView

EXAMPLES = [
    ("What is the capital of France?", Complexity.SIMPLE, TaskType.GENERAL),
    ("Hi!", Complexity.SIMPLE, TaskType.GENERAL),
    ("Translate 'good morning' into Spanish.", Complexity.SIMPLE, TaskType.GENERAL),
    ("Write a haiku about autumn.", Complexity.SIMPLE, TaskType.CREATIVE),
    ("Solve the equation 3x + 7 = 22 and explain each step.", Complexity.MEDIUM, TaskType.MATH),
    ("Prove that there are infinitely many primes.", Complexity.MEDIUM, TaskType.MATH),
    (
        "Compare the trade-offs between PostgreSQL and MongoDB for a write-heavy analytics workload, "
        "and recommend one.",
        Complexity.MEDIUM,
        TaskType.ANALYSIS,
    ),
    (
        "Write a Python function that parses ISO-8601 dates without using external libraries. It must "
        "handle time zones and return a datetime. Include tests.",
        Complexity.MEDIUM,
        TaskType.CODE,
    ),
    (
        "Analyze the economic implications of a four-day work week for small businesses. Discuss the pros "
        "and cons, evaluate evidence from trials, and recommend a strategy. Your answer must be at least "
        "500 words and use bullet points.",
        Complexity.COMPLEX,
        TaskType.ANALYSIS,
    ),
    (
        "Design the architecture of a rate limiter for a distributed API gateway. Compare token bucket and "
        "sliding window algorithms, analyze their failure modes under network partitions, and implement "
        "the chosen one in Python with async support. It must handle at least 10k requests per second.",
        Complexity.COMPLEX,
        TaskType.CODE,
    ),
]


@pytest.mark.parametrize(("prompt", "complexity", "task"), EXAMPLES)
def test_heuristic_classifier_on_examples(prompt: str, complexity: Complexity, task: TaskType) -> None:
    got = classify_heuristic(prompt)
    assert (got.complexity, got.task) == (complexity, task), got.reason


@pytest.fixture
def policy() -> RouterPolicy:
    return RouterPolicy(load_config(None))


def user(text: str) -> list[ChatMessage]:
    return [ChatMessage(role="user", content=text)]


async def test_auto_routes_by_tier(policy: RouterPolicy) -> None:
    expected_tier = {Complexity.SIMPLE: "single", Complexity.MEDIUM: "moa-lite", Complexity.COMPLEX: "moa"}
    for prompt, complexity, _task in EXAMPLES:
        plan, decision, calls = await policy.route(user(prompt), "auto")
        assert decision.preset == expected_tier[complexity] and not decision.forced and calls == []
        assert decision.complexity is complexity
        # The reason says what was decided (it used to be checked only for being non-empty).
        assert decision.reason.startswith(f"{complexity.value} request -> {decision.preset}: ")
        assert (len(plan.layers) == 0) == (complexity is Complexity.SIMPLE)


async def test_task_specialists_replace_the_first_layer(policy: RouterPolicy) -> None:
    prompt = EXAMPLES[-1][0]  # complex code request
    plan, decision, _ = await policy.route(user(prompt), None)  # default preset is auto
    specialists = policy.config.router.specialists[TaskType.CODE]
    assert plan.layers[0].proposers == specialists
    assert plan.layers[1:] == policy.config.presets["moa"].layers[1:]
    assert "code specialists" in decision.reason


async def test_forced_preset_and_direct_model(policy: RouterPolicy) -> None:
    plan, decision, _ = await policy.route(user("Hi"), "moa")
    assert decision.forced and decision.preset == "moa" and plan == policy.config.presets["moa"]
    plan, decision, _ = await policy.route(user("Hi"), "anthropic/claude-haiku-4-5")
    assert plan.is_single and plan.aggregators[0].model == "claude-haiku-4-5"
    plan, _, _ = await policy.route(user("Hi"), "gemini-2.5-flash")
    assert plan.aggregators[0].provider == "gemini"
    with pytest.raises(UnknownPreset, match="unknown preset or model 'nope'"):
        await policy.route(user("Hi"), "nope")


async def test_open_circuits_are_routed_around(policy: RouterPolicy) -> None:
    health = HealthView(unavailable=frozenset({"gemini"}))
    plan, decision, _ = await policy.route(user("Hi"), "moa", health)
    used = {p for p, _ in plan.model_refs()}
    assert "gemini" not in used
    assert len(decision.substitutions) == 3  # two proposers and one fallback
    # The substituted fallback became a duplicate of the other one and is kept once.
    assert [str(f) for f in plan.fallbacks] == ["openai/gpt-4.1"]
    # A layer keeps distinct models where it can.
    for layer in plan.layers:
        refs = [(p.provider, p.model) for p in layer.proposers]
        assert len(set(refs)) == len(refs)
    with pytest.raises(NoHealthyProvider) as err:
        await policy.route(user("Hi"), "moa", HealthView(unavailable=frozenset(policy.config.providers)))
    assert err.value.status_code == 503 and err.value.retry_after_s


def test_classifier_answer_parsing() -> None:
    assert parse_classifier_answer("Complex, code.") == (Complexity.COMPLEX, TaskType.CODE)
    assert parse_classifier_answer("medium") == (Complexity.MEDIUM, TaskType.GENERAL)
    assert parse_classifier_answer("I cannot tell") is None
