"""Secure by default on every path: what a careless operator or a hostile caller gets without
setting anything. Real components throughout: the in-process API over HTTP, real SQLite files,
the real OTLP receiver, the ``moa`` CLI as an operator runs it."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from moa.auth import new_key, new_record
from moa.cache.sqlite_store import SQLiteCacheStore
from moa.cli import main
from moa.config import ConfigError, SimulatorMode, load_config, parse_config
from moa.exposure import from_beyond_loopback
from moa.simulator.server import SimulatorServer
from moa.state import KeyLimits
from moa.state.sqlite_store import SQLiteStore
from tests.helpers import ApiServer, by_name, non_loopback_address, sim_total_requests, wait_for_spans
from tests.otlp_receiver import OTLPReceiver
from tests.waiting import wait_until_sync

ADMIN = "adm-secure-defaults-" + "x" * 24


def _config(sim: SimulatorServer) -> Any:
    cfg = load_config(None)
    return cfg.model_copy(
        update={"simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON})}
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


# -- files under the state directory are the service user's alone -----------------------------------


@pytest.fixture
def open_umask() -> Iterator[None]:
    """A umask that takes nothing away, as a careless service unit may have: the modes must come
    from the code, not from the umask."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _modes(where: Path) -> dict[str, int]:
    """Every file's permission bits in ``where``, by name."""
    return {p.name: _mode(p) for p in where.iterdir()}


async def test_state_and_cache_files_are_created_private(tmp_path: Path, open_umask: None) -> None:
    where = tmp_path / "fresh" / "moa"  # neither directory exists yet
    state = SQLiteStore(where / "state.db")
    cache = SQLiteCacheStore(where / "cache.db", 1_000_000)
    try:
        await state.create_key(new_record("tenant", new_key(), KeyLimits()))
        await cache.put("k", b"a tenant's prompt and answer", 60)
        # While open, each database has its write-ahead log and shared-memory index beside it.
        files = _modes(where)
        for db in ("state.db", "cache.db"):
            assert {db, f"{db}-wal", f"{db}-shm"} <= set(files), files
        assert files == dict.fromkeys(files, 0o600), {n: oct(m) for n, m in files.items()}
        assert _mode(where) == 0o700
    finally:
        await state.close()
        await cache.close()


async def test_files_an_older_version_left_readable_are_narrowed(tmp_path: Path, open_umask: None) -> None:
    for name in ("state.db", "state.db-wal", "cache.db"):
        (tmp_path / name).touch(mode=0o644)
    os.chmod(tmp_path / "state.db", 0o644)
    state = SQLiteStore(tmp_path / "state.db")
    cache = SQLiteCacheStore(tmp_path / "cache.db", 1_000_000)
    try:
        assert await state.any_keys() is False
        assert await cache.get("k") is None
        modes = {n: m for n, m in _modes(tmp_path).items() if n.startswith(("state", "cache"))}
        assert set(modes.values()) == {0o600}, {n: oct(m) for n, m in modes.items()}
    finally:
        await state.close()
        await cache.close()


# -- a key pasted into a URL reaches no span and no log line ------------------------------------------


def test_a_key_in_the_url_is_named_by_its_route_template_never_exported(
    otlp: OTLPReceiver, served: ApiServer, log_lines: io.StringIO
) -> None:
    auth = {"Authorization": f"Bearer {ADMIN}"}
    made = httpx.post(served.url + "/admin/keys", json={"name": "pasted"}, headers=auth)
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    # Where a careless client pastes it: a route with a parameter, and paths no route matches.
    # (/v1/models/{id} is a route, models.retrieve's: the admin key is no API key there, so 401.)
    asked = {
        ("GET", f"/admin/keys/{key}"): ("GET /admin/keys/{name}", 404),
        ("GET", f"/v1/models/{key}"): ("GET /v1/models/{model_id:path}", 401),
        ("POST", f"/v1/chat/completions/{key}"): ("POST", 404),
        ("GET", f"/{key}"): ("GET", 404),
    }
    for (method, path), (name, status) in asked.items():
        r = httpx.request(method, served.url + path, headers=auth)
        assert r.status_code == status and r.json()["error"]["type"] == "invalid_request_error", r.text
        spans = wait_for_spans(otlp, r.headers["x-moa-trace-id"], {name})
        assert key not in json.dumps(spans), spans
        (server,) = by_name(spans, name)
        assert server["attributes"].get("http.route") == (name.split(" ", 1)[1] if " " in name else None)
    logged = log_lines.getvalue()
    assert key not in logged
    routes = [json.loads(line).get("route") for line in logged.splitlines() if '"event": "request"' in line]
    assert routes.count("(unmatched)") == 2 and "/admin/keys/{name}" in routes, routes


# -- /healthz: the status for probes, the detail for the admin key ------------------------------------


def test_healthz_shows_provider_detail_to_the_admin_key_only(served: ApiServer) -> None:
    url = served.url + "/healthz"
    made = httpx.post(
        served.url + "/admin/keys", json={"name": "tenant"}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    user_key = made.json()["key"]
    # A call, so that there are counts to hide.
    assert httpx.get(served.url + "/v1/models", headers={"Authorization": f"Bearer {user_key}"}).is_success
    for headers in ({}, {"Authorization": f"Bearer {user_key}"}, {"Authorization": f"Bearer {ADMIN}x"}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 200 and r.json() == {"status": "ok"}, (headers, r.text)
        assert httpx.head(url, headers=headers).status_code == 200
    full = httpx.get(url, headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert full["status"] == "ok" and set(full["providers"]) == {"openai", "anthropic", "gemini"}
    assert all("state" in p and "in_flight" in p for p in full["providers"].values()), full


def test_healthz_without_an_admin_key_set_shows_the_status_only(
    sim: SimulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MOA_ADMIN_KEY", raising=False)
    with ApiServer(_config(sim)) as server:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": f"Bearer {ADMIN}"}):
            assert httpx.get(server.url + "/healthz", headers=headers).json() == {"status": "ok"}


# -- no schema or docs pages: they would list the admin routes to anyone ------------------------------


@pytest.mark.parametrize("path", ["/openapi.json", "/docs", "/redoc", "/docs/oauth2-redirect"])
def test_no_schema_or_docs_page_is_served(served: ApiServer, path: str) -> None:
    for headers in ({}, {"Authorization": f"Bearer {ADMIN}"}):
        r = httpx.get(served.url + path, headers=headers)
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found" and "/admin" not in r.text


# -- exposure: no key, beyond loopback, not open on purpose: 503 until a key exists --------------------


@pytest.fixture
def beyond() -> str:
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no address beyond loopback")
    return address


def _exposed(sim: SimulatorServer, state_dir: Path, open_: bool = False) -> ApiServer:
    """The in-process app bound to every interface, as a container or a VM would run it."""
    cfg = _config(sim)
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"open": open_})})
    return ApiServer(cfg, store=lambda: SQLiteStore(state_dir / "state.db"), host="0.0.0.0")


CHAT = {"model": "single", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8}


def test_an_app_reachable_beyond_loopback_with_no_key_refuses_until_one_exists(
    sim: SimulatorServer,
    state_dir: Path,
    beyond: str,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MOA_ADMIN_KEY", ADMIN)
    caplog.set_level(logging.WARNING, logger="moa.api")
    with _exposed(sim, state_dir) as server:
        port = server.url.rsplit(":", 1)[1]
        remote, local = f"http://{beyond}:{port}", f"http://127.0.0.1:{port}"
        for path, send in (("/v1/chat/completions", CHAT), ("/v1/moa", {"preset": "single", **CHAT})):
            r = httpx.post(remote + path, json=send, timeout=30)
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert error["code"] == "no_api_key" and error["type"] == "service_unavailable", error
        assert httpx.get(remote + "/v1/models").status_code == 503
        assert sim_total_requests(sim) == 0  # nothing was spent
        # Probes and the admin API (its own key) are not behind it; loopback is served as before.
        assert httpx.get(remote + "/healthz").json() == {"status": "ok"}
        assert httpx.get(remote + "/admin/keys", headers={"Authorization": f"Bearer {ADMIN}"}).is_success
        assert httpx.post(local + "/v1/chat/completions", json=CHAT, timeout=30).status_code == 200
        # The operator is told how to fix it, once (not once a request).
        told = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "exposure_refused"]
        assert len(told) == 1 and "moa keys create NAME" in told[0] and "/admin/keys" in told[0], told

        # A key made while it runs, with the CLI on the same state: no restart needed.
        capsys.readouterr()
        assert main(["keys", "create", "first"]) == 0
        key = capsys.readouterr().out.strip()
        wait_until_sync(
            lambda: httpx.get(remote + "/v1/models").status_code,
            lambda s: s == 401,
            what="the key check to see the key (state.key_cache_s)",
        )
        ok = httpx.post(
            remote + "/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )
        assert ok.status_code == 200, ok.text


def test_server_open_serves_beyond_loopback_with_no_key(
    sim: SimulatorServer, state_dir: Path, beyond: str
) -> None:
    with _exposed(sim, state_dir, open_=True) as server:
        port = server.url.rsplit(":", 1)[1]
        r = httpx.post(f"http://{beyond}:{port}/v1/chat/completions", json=CHAT, timeout=30)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("server", "client", "beyond_loopback"),
    [
        (("127.0.0.1", 8000), ("127.0.0.1", 5555), False),
        (("::1", 8000), ("::1", 5555), False),
        (("::ffff:127.0.0.1", 8000), ("::ffff:127.0.0.1", 5555), False),
        (("10.0.0.5", 8000), ("10.0.0.9", 5555), True),
        (("127.0.0.1", 8000), ("10.0.0.9", 5555), True),  # forwarded to loopback from the network
        (("/run/moa.sock", None), None, True),  # no address to judge by: beyond
        (None, None, True),
    ],
)
def test_what_counts_as_beyond_loopback(server: Any, client: Any, beyond_loopback: bool) -> None:
    assert from_beyond_loopback(server, client) is beyond_loopback


# -- slow clients: a request's head must arrive within server.header_timeout_s -----------------------


def _slow_server(sim: SimulatorServer) -> ApiServer:
    cfg = _config(sim)
    server = cfg.server.model_copy(update={"header_timeout_s": 0.5, "keep_alive_s": 1})
    return ApiServer(cfg.model_copy(update={"server": server}))


def _read_until(sock: socket.socket, end: bytes) -> bytes:
    got = b""
    while end not in got:
        chunk = sock.recv(65536)
        assert chunk, got
        got += chunk
    return got


def _closed_after(sock: socket.socket) -> float:
    """Seconds until the server closes ``sock`` (reads to EOF); fails past the socket's timeout."""
    t0 = time.monotonic()
    while sock.recv(65536):
        pass
    return time.monotonic() - t0


@pytest.mark.parametrize(
    "sent",
    [b"", b"GET /v1/mod", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Le"],
    ids=["nothing", "half-a-request-line", "half-the-headers"],
)
def test_a_client_that_stalls_before_its_headers_end_is_disconnected(
    sim: SimulatorServer, sent: bytes
) -> None:
    with _slow_server(sim) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(sent)
            # The bound is 0.5 s; uvicorn's own default holds the connection for ever.
            assert _closed_after(sock) < 5


def test_the_head_bound_applies_again_to_the_next_request_on_a_kept_alive_connection(
    sim: SimulatorServer,
) -> None:
    with _slow_server(sim) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            _read_until(sock, b'{"status":"ok"}')  # a whole request is served
            sock.sendall(b"GET /heal")  # the next one stalls half-way
            assert _closed_after(sock) < 5


def test_an_idle_kept_alive_connection_is_closed_after_keep_alive_s(sim: SimulatorServer) -> None:
    with _slow_server(sim) as server, httpx.Client(base_url=server.url) as client:
        assert client.get("/healthz").status_code == 200
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_until(sock, b'{"status":"ok"}').startswith(b"HTTP/1.1 200")
            assert _closed_after(sock) < 5  # keep_alive_s 1


def test_a_head_too_large_is_a_400(sim: SimulatorServer) -> None:
    with _slow_server(sim) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
            with contextlib.suppress(OSError):  # the server may close before all of it is read
                sock.sendall(head)
            assert sock.recv(65536).startswith(b"HTTP/1.1 400")
