"""Plan validation, reference injection and budget trimming: pure functions, property-tested."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from moa.config import ConfigError, load_config, parse_config
from moa.engine.prompts import TRUNCATION_MARK, render_references, trim_references, with_references
from moa.plan import LayerSpec, Plan, PlanMode, ProposerSpec, TemplatesConfig
from moa.tokens import approx_tokens
from moa.types import ChatMessage

TEMPLATES = TemplatesConfig()
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)


@given(
    n=st.integers(min_value=1, max_value=6),
    quorum=st.integers(min_value=1, max_value=8),
)
def test_quorum_never_exceeds_layer_size(n: int, quorum: int) -> None:
    proposers = [ProposerSpec(provider="openai", model="m")] * n
    if quorum <= n:
        assert LayerSpec(proposers=proposers, quorum=quorum).needed == quorum
    else:
        with pytest.raises(ValidationError, match="exceeds"):
            LayerSpec(proposers=proposers, quorum=quorum)


def test_self_moa_expands_into_one_layer_of_samples() -> None:
    plan = Plan.model_validate(
        {
            "self_moa": {"provider": "openai", "model": "gpt-4.1", "samples": 5, "quorum": 3},
            "aggregators": [{"provider": "openai", "model": "gpt-4.1"}],
        }
    )
    assert plan.mode is PlanMode.SELF_MOA
    (layer,) = plan.layers
    assert len(layer.proposers) == 5 and layer.needed == 3
    assert len({(p.temperature, p.seed) for p in layer.proposers}) == 5


def test_refine_needs_exactly_one_layer_and_rounds_need_refine() -> None:
    layer = {"proposers": [{"provider": "openai", "model": "m"}]}
    agg = [{"provider": "openai", "model": "m"}]
    with pytest.raises(ValidationError, match="exactly one layer"):
        Plan.model_validate({"mode": "refine", "rounds": 2, "layers": [layer, layer], "aggregators": agg})
    with pytest.raises(ValidationError, match="rounds"):
        Plan.model_validate({"rounds": 2, "layers": [layer], "aggregators": agg})
    with pytest.raises(ValidationError, match="aggregators"):
        Plan.model_validate({"layers": [layer], "aggregators": []})


@given(system=st.none() | text, user=text, answers=st.lists(text, max_size=5))
@settings(max_examples=200)
def test_references_are_injected_and_the_system_message_is_kept(
    system: str | None, user: str, answers: list[str]
) -> None:
    messages = [ChatMessage(role="user", content=user)]
    if system is not None:
        messages.insert(0, ChatMessage(role="system", content=system))
    out = with_references(messages, answers, TEMPLATES)
    # The user's turn is untouched and exactly one system message leads.
    assert out[-1] == messages[-1]
    assert [m.role for m in out].count("system") == (1 if system is not None or answers else 0)
    if system:
        assert out[0].content.startswith(system)
    for i, a in enumerate(answers, start=1):
        assert f'<reference id="{i}">\n{a}\n</reference>' in out[0].content
    if answers:
        assert "synthesize these responses" in out[0].content


def test_braces_in_answers_do_not_break_templates() -> None:
    rendered = render_references(["{text} {index} {references}", "a {0}"], TEMPLATES)
    assert '<reference id="1">\n{text} {index} {references}\n</reference>' in rendered
    assert '<reference id="2">\na {0}\n</reference>' in rendered


def test_role_prompt_goes_into_the_system_message() -> None:
    out = with_references([ChatMessage(role="user", content="q")], [], TEMPLATES, role="critical")
    assert out[0].role == "system" and TEMPLATES.roles["critical"] in out[0].content


@given(
    answers=st.lists(st.text(min_size=0, max_size=2000), min_size=1, max_size=6), budget=st.integers(1, 800)
)
@settings(max_examples=200)
def test_trimming_fits_the_budget_longest_first_and_says_so(answers: list[str], budget: int) -> None:
    trimmed = trim_references(answers, budget)
    sizes = [approx_tokens(a) for a in answers]
    if sum(sizes) <= budget:
        assert trimmed.answers == answers and trimmed.notes == []
        return
    # Something changed, and every change has a note.
    assert trimmed.notes
    dropped = sum("dropped" in n for n in trimmed.notes)
    assert len(trimmed.answers) == len(answers) - dropped
    assert sum(approx_tokens(a) for a in trimmed.answers) <= max(budget, 1) + 2 * len(trimmed.answers)
    # Shortest references survive untouched while longer ones are cut.
    kept_untouched = [a for a in trimmed.answers if not a.endswith(TRUNCATION_MARK)]
    cut = [a for a in trimmed.answers if a.endswith(TRUNCATION_MARK)]
    if kept_untouched and cut:
        assert max(approx_tokens(a) for a in kept_untouched) <= max(approx_tokens(a) for a in cut) + 1


def test_bundled_config_has_the_standard_presets() -> None:
    cfg = load_config(None)
    assert {"single", "moa-lite", "moa", "self-moa", "refine"} <= set(cfg.presets)
    providers = {p.provider for layer in cfg.presets["moa"].layers for p in layer.proposers}
    assert providers == {"openai", "anthropic", "gemini"}


def test_bad_config_names_the_file_and_the_field(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "bad.yaml"
    path.write_text("providers:\n  openai:\n    kind: openai\n    models: {m: {input_per_mtok: -1}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "providers.openai.models.m.input_per_mtok" in str(err.value)


def test_config_refuses_inline_keys_and_unknown_models() -> None:
    base = {"kind": "openai", "models": {"m": {}}}
    with pytest.raises(ConfigError, match="api_key_env"):
        parse_config({"providers": {"o": {**base, "api_key": "sk-123"}}})
    with pytest.raises(ConfigError, match="no model 'x'"):
        parse_config(
            {"providers": {"o": base}, "presets": {"p": {"aggregators": [{"provider": "o", "model": "x"}]}}}
        )
    with pytest.raises(ConfigError, match="base_url"):
        parse_config({"providers": {"c": {"kind": "openai_compatible", "models": {"m": {}}}}})
