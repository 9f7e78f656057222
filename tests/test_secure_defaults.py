"""Secure by default on every path: what a careless operator or a hostile caller gets without
setting anything. Real components throughout: the in-process API over HTTP, real SQLite files,
the real OTLP receiver, the ``moa`` CLI as an operator runs it."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from moa.cli import main
from moa.config import ConfigError, load_config, parse_config
from moa.simulator.server import SimulatorServer
from moa.state import KeyLimits
from moa.state.sqlite_store import SQLiteStore
from tests.helpers import ApiServer, sim_total_requests

ADMIN = "adm-secure-defaults-" + "x" * 24


def _config(sim: SimulatorServer) -> Any:
    cfg = load_config(None)
    return cfg.model_copy(
        update={"simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": "on"})}
    )


@pytest.fixture
def served(sim: SimulatorServer, state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ApiServer]:
    """The in-process API with a SQLite state file and the admin API on."""
    monkeypatch.setenv("MOA_ADMIN_KEY", ADMIN)
    with ApiServer(_config(sim), store=lambda: SQLiteStore(state_dir / "state.db")) as server:
        yield server


def _post(url: str, raw: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(url, content=raw, headers={"content-type": "application/json", **(headers or {})})


# -- non-finite numbers are a 400 everywhere ----------------------------------------------------------

HI = b'"messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e309", b"-1e999"])
def test_a_non_finite_number_in_a_body_is_a_400_before_any_call(
    served: ApiServer, sim: SimulatorServer, number: bytes
) -> None:
    bodies = {
        "/v1/chat/completions": b'{"model": "moa-lite", ' + HI + b', "moa": {"max_cost_usd": %s}}' % number,
        # The plan that used to call its models, charge, then fail with a 500 and a traceback.
        "/v1/moa": b'{"preset": null, ' + HI + b', "plan": {"layers": [{"proposers": '
        b'[{"provider": "openai", "model": "gpt-4.1-mini"}]}], "aggregators": [{"provider": '
        b'"openai", "model": "gpt-4.1-mini"}], "call_timeout_s": %s, "grace_s": %s}}' % (number, number),
    }
    for path, raw in bodies.items():
        r = _post(served.url + path, raw)
        assert r.status_code == 400, (path, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_number" and error["type"] == "invalid_request_error", error
        assert "finite" in error["message"]
    assert sim_total_requests(sim) == 0  # refused before any model was called


@pytest.mark.parametrize("budget", [b"1e309", b"Infinity", b"NaN", b"1" + b"0" * 400])
def test_the_admin_api_refuses_an_unlimited_budget(served: ApiServer, budget: bytes) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    r = _post(served.url + "/admin/keys", b'{"name": "team", "budget_usd": %s}' % budget, auth)
    # A float literal is refused where the body is read (400); an integer too large for a float,
    # by the key's model (422, naming the field).
    assert r.status_code in (400, 422), r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_number" if r.status_code == 400 else error["param"] == "budget_usd"
    assert httpx.get(served.url + "/admin/keys", headers=auth).json()["data"] == []  # no key made


@pytest.mark.parametrize("option", ["--budget-usd", "--max-cost-usd"])
@pytest.mark.parametrize("amount", ["inf", "nan", "-inf", "1e309"])
def test_moa_keys_create_refuses_a_non_finite_amount(
    state_dir: Path, capsys: pytest.CaptureFixture[str], option: str, amount: str
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["keys", "create", "careless", f"{option}={amount}"])
    assert exited.value.code == 2
    assert "not a finite amount" in capsys.readouterr().err
    assert main(["keys", "list", "--json"]) == 0
    assert "careless" not in capsys.readouterr().out


def test_limits_refuse_non_finite_amounts_however_they_are_built() -> None:
    for bad in (math.inf, math.nan):
        with pytest.raises(ValidationError):
            KeyLimits(budget_usd=bad)
        with pytest.raises(ValidationError):
            KeyLimits(max_cost_usd=bad)
    raw = load_config(None).model_dump(mode="json")
    raw["server"]["request_deadline_s"] = math.inf
    with pytest.raises(ConfigError):
        parse_config(raw, "a config with an infinite deadline")
