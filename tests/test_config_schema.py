"""The config's published JSON schema: up to date, and documenting every field of the config models."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from moa.cli import main
from moa.cli.config import schema_text
from moa.config import MoAConfig

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "docs" / "config.schema.json"


def test_the_committed_schema_is_up_to_date() -> None:
    """Regenerate with: moa config schema > docs/config.schema.json"""
    assert SCHEMA_FILE.read_text() == schema_text()


def test_moa_config_schema_prints_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "schema"]) == 0
    assert capsys.readouterr().out == SCHEMA_FILE.read_text()


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> None:
    if model in seen:
        return
    seen.add(model)
    for field in model.model_fields.values():
        stack: list[object] = [field.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                _models(tp, seen)
            stack.extend(typing.get_args(tp))


def test_every_field_of_the_config_models_is_described() -> None:
    """Each field the YAML may hold (every model of the project it reaches: the config's, and the
    plans, router and templates of moa.plan) says what it is in the schema."""
    seen: set[type[BaseModel]] = set()
    _models(MoAConfig, seen)
    ours = [m for m in seen if m.__module__.startswith("moa.")]
    assert {m.__module__ for m in ours} >= {"moa.config", "moa.plan"}
    assert len(ours) >= 15  # the walk reached the nested models
    missing = [
        f"{m.__name__}.{name}" for m in ours for name, f in m.model_fields.items() if not f.description
    ]
    assert missing == []


def test_moa_config_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "check"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: {openai: {timeout_s: -1}}\n")  # laid over the bundled config
    assert main(["config", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration in {bad}" in err and "providers.openai.timeout_s:" in err
