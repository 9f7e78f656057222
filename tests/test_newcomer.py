"""Issue 26, the newcomer's first hour: each thing a new user met, run as they run it (the ``moa``
command in a subprocess, the official OpenAI SDK over HTTP against the in-process app)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moa.config import ConfigError, load_config
from tests.test_cli import run_moa

# -- 1. a config file overrides what it names ----------------------------------------------------


def test_a_one_line_config_turns_the_cache_on_over_the_bundled_config(tmp_path: Path) -> None:
    """``cache: {enabled: true}`` alone is a working config: the file is laid over the bundled
    one (mappings merged, lists replaced), and ``moa config show`` says where each value is from.
    Mutation caught: load_config validating the file alone (``providers: Field required``)."""
    path = tmp_path / "moa.yaml"
    path.write_text("cache: {enabled: true}\n")
    cfg = load_config(path)
    assert cfg.cache.enabled and cfg.cache.ttl_s == 3600
    assert set(cfg.providers) == {"openai", "anthropic", "gemini"}
    check = run_moa("config", "check", str(path))
    assert check.returncode == 0, check.stderr
    show = run_moa("config", "show", str(path))
    assert show.returncode == 0, show.stderr
    lines = show.stdout.splitlines()
    assert f"cache.enabled: true  # {path}" in lines
    assert "cache.ttl_s: 3600.0  # built-in default" in lines
    assert 'providers.openai.kind: "openai"  # the bundled default config' in lines


def test_lists_are_replaced_and_a_null_mapping_entry_removes_it(tmp_path: Path) -> None:
    """A list is one ordered choice, so a file's list replaces the bundled one; ``null`` over a
    bundled mapping entry removes it. Mutation caught: merging lists element-wise."""
    path = tmp_path / "moa.yaml"
    path.write_text(
        "router:\n  specialists:\n    code: [{provider: openai, model: gpt-4.1}]\n    math: null\n"
        "providers:\n  openai:\n    limits: {rpm: 10}\n"
    )
    cfg = load_config(path)
    assert [p.model for p in cfg.router.specialists["code"]] == ["gpt-4.1"]
    assert "math" not in cfg.router.specialists and "creative" in cfg.router.specialists
    openai = cfg.providers["openai"]
    assert openai.limits.rpm == 10 and openai.limits.tpm == 1_000_000  # merged, not replaced
    assert "gpt-4.1-mini" in openai.models
    path.write_text("providers: {gemini: null}\n")
    with pytest.raises(ConfigError, match="unknown provider 'gemini'"):
        load_config(path)  # the presets still name it: the error says so
