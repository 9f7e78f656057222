"""The admin HTTP API (``/admin/keys``) on the in-process API with a real SQLite state file, over
HTTP: httpx for the admin calls, the official ``openai`` client for the keys it makes."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from moa.cli import main
from moa.config import ConfigError, SimulatorMode, load_config
from moa.simulator.server import SimulatorServer
from moa.state.sqlite_store import SQLiteStore
from tests.helpers import ApiServer
from tests.test_keys_api import SHORT, client, create_key, wait_for_auth

ADMIN = "adm-" + secrets.token_urlsafe(32)


def _server(sim: SimulatorServer, state_dir: Path) -> ApiServer:
    cfg = load_config(None)
    cfg = cfg.model_copy(
        update={"simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON})}
    )
    return ApiServer(cfg, store=lambda: SQLiteStore(state_dir / "state.db"))


@pytest.fixture
def admin_server(
    sim: SimulatorServer, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[ApiServer]:
    monkeypatch.setenv("MOA_ADMIN_KEY", ADMIN)
    with _server(sim, state_dir) as s:
        yield s


def admin(server: ApiServer, key: str = ADMIN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url + "/admin", headers=headers, timeout=30)


def test_without_an_admin_key_the_admin_routes_do_not_exist(
    sim: SimulatorServer, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOA_ADMIN_KEY", raising=False)
    with _server(sim, state_dir) as server:
        for guess in ("", "anything", ADMIN):
            with admin(server, guess) as http:
                listed = http.get("/keys")
                made = http.post("/keys", json={"name": "intruder"})
                revoked = http.post("/keys/intruder/revoke")
            assert (listed.status_code, made.status_code, revoked.status_code) == (404, 404, 404)
            assert listed.json()["error"]["code"] == "not_found"
        # Nothing was created: the service is still open (no key exists).
        assert client(server, None).models.list().data


def test_a_short_admin_key_is_refused_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    from moa.api.admin import admin_key_from_env

    monkeypatch.setenv("MOA_ADMIN_KEY", "hunter2")
    with pytest.raises(ConfigError, match="shorter than") as refused:
        admin_key_from_env()
    assert "hunter2" not in str(refused.value)


def test_a_missing_or_wrong_admin_key_is_401_and_an_api_key_is_not_an_admin_key(
    admin_server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    user_key = create_key(capsys, "user")
    wait_for_auth(admin_server)
    wrong = [ADMIN[:-1] + ("x" if ADMIN[-1] != "x" else "y"), ADMIN + "x", user_key, ""]
    for key in wrong:
        with admin(admin_server, key) as http:
            for r in (
                http.get("/keys"),
                http.post("/keys", json={"name": "x"}),
                http.post("/keys/user/revoke"),
            ):
                assert r.status_code == 401, (key[:6], r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert ADMIN not in r.text and user_key not in r.text
    # The admin key in another scheme is refused too.
    r = httpx.get(admin_server.url + "/admin/keys", headers={"Authorization": f"Basic {ADMIN}"})
    assert r.status_code == 401
    # ... and the admin key is not an API key.
    with pytest.raises(openai.AuthenticationError):
        client(admin_server, ADMIN).models.list()
    # The user key still works, and was not revoked by any refused call.
    assert client(admin_server, user_key).models.list().data


def test_create_list_disable_enable_revoke_over_http(
    admin_server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    with admin(admin_server) as http:
        made = http.post(
            "/keys",
            json={
                "name": "team-a",
                "budget_usd": 5,
                "period": "month",
                "presets": ["single"],
                "detail": True,
            },
        )
        assert made.status_code == 201, made.text
        key = made.json()["key"]
        assert key.startswith("sk-moa-") and made.headers["cache-control"] == "no-store"
        assert made.json()["limits"]["presets"] == ["single"] and made.json()["status"] == "active"
        # The key is shown once: never by a listing, a lookup, or a status change.
        assert http.post("/keys", json={"name": "team-a"}).status_code == 409
        bad = http.post("/keys", json={"name": "no spaces", "rpm": 0})
        assert bad.status_code == 422 and bad.json()["error"]["param"] in ("name", "rpm")
        listed = http.get("/keys")
        assert [r["name"] for r in listed.json()["data"]] == ["team-a"]
        user = client(admin_server, key)
        # The admin's own replica forgot its cached "no key exists": auth applies at once.
        with pytest.raises(openai.AuthenticationError):
            client(admin_server, None).models.list()
        answer = user.chat.completions.create(model="single", messages=SHORT)  # type: ignore[arg-type]
        assert answer.choices[0].message.content
        with pytest.raises(openai.PermissionDeniedError):
            user.chat.completions.create(model="moa", messages=SHORT)  # type: ignore[arg-type]
        shown = http.get("/keys/team-a").json()
        assert shown["spent_usd"] > 0 and shown["status"] == "active"

        assert http.post("/keys/team-a/disable").json()["status"] == "disabled"
        with pytest.raises(openai.AuthenticationError) as disabled:
            user.models.list()
        assert "disabled" in disabled.value.message
        assert http.post("/keys/team-a/enable").json()["status"] == "active"
        assert user.models.list().data
        assert http.post("/keys/team-a/revoke").json()["status"] == "revoked"
        with pytest.raises(openai.AuthenticationError) as revoked:
            user.models.list()
        assert "revoked" in revoked.value.message
        again = http.post("/keys/team-a/enable")
        assert again.status_code == 409 and again.json()["error"]["code"] == "key_revoked"
        assert http.post("/keys/nobody/revoke").status_code == 404
        assert http.get("/keys/nobody").status_code == 404
        assert http.post("/keys/team-a/delete").status_code == 404
        everything = http.get("/keys").text
    assert key not in everything and key[len("sk-moa-") :] not in everything
    # One implementation: `moa keys` on the same state sees what the admin API did, and the
    # other way round.
    capsys.readouterr()
    assert main(["keys", "list", "--json"]) == 0
    assert '"revoked"' in capsys.readouterr().out
    cli_key = create_key(capsys, "from-cli")
    with admin(admin_server) as http:
        names = [r["name"] for r in http.get("/keys").json()["data"]]
    assert names == ["team-a", "from-cli"]
    assert client(admin_server, cli_key).models.list().data


def test_the_admin_key_needs_24_characters_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/SECURITY.md: ``MOA_ADMIN_KEY`` of at least 24 characters: 23 is refused, 24 is taken,
    and surrounding whitespace does not count towards the 24."""
    from moa.api.admin import admin_key_from_env

    for short in ("k" * 23, " " + "k" * 23 + "\n"):
        monkeypatch.setenv("MOA_ADMIN_KEY", short)
        with pytest.raises(ConfigError, match="shorter than 24"):
            admin_key_from_env()
    monkeypatch.setenv("MOA_ADMIN_KEY", "k" * 24)
    assert admin_key_from_env() == "k" * 24
