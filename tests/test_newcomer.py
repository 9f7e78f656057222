"""Issue 26, the newcomer's first hour: each thing a new user met, run as they run it (the ``moa``
command in a subprocess, the official OpenAI SDK over HTTP against the in-process app)."""

from __future__ import annotations

import io
import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from moa.config import ConfigError, MoAConfig, load_config
from moa.simulator.server import SimulatorServer
from tests.helpers import QUESTION, ApiServer, by_name, sim_requests, wait_for_spans
from tests.otlp_receiver import OTLPReceiver
from tests.test_cli import run_moa
from tests.waiting import wait_until_sync


def set_models(sim: SimulatorServer, models: dict[str, Any]) -> None:
    """Per-model simulator profiles on top of the session's fast default, until the next reset."""
    profile = {"default": {"ttft_s": 0.01, "tokens_per_s": 4000, "jitter": 0.0}, "models": models}
    httpx.put(f"{sim.url}/admin/profile", json=profile).raise_for_status()


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


# -- 6. every OpenAI parameter honoured or refused ------------------------------------------------


@pytest.fixture
def api(config: MoAConfig) -> Iterator[str]:
    """The API in-process (``moa serve --local``'s server) on the session simulator."""
    with ApiServer(config) as server:
        yield server.url


@pytest.fixture
def client(api: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=api + "/v1", api_key="unused", max_retries=0)


def test_penalties_logit_bias_and_reasoning_effort_reach_the_providers_that_take_them(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    """Each provider gets what its API has (OpenAI all four, Gemini the penalties) and every call
    says what was dropped for its model. Mutation caught: ChatCompletionRequest.params() leaving
    the new fields out (they reach no provider), or an adapter dropping one without a note."""
    completion = client.chat.completions.create(
        model="moa-lite",
        messages=QUESTION,  # type: ignore[arg-type]
        frequency_penalty=0.5,
        presence_penalty=-0.25,
        logit_bias={"1734": -100},
        reasoning_effort="low",
        extra_body={"moa": {"detail": True}},
    )
    calls = (completion.model_extra or {})["moa"]["calls"]
    by_model = {c["model"]: c for c in calls if c["stage"] == "proposer"}
    sent = {r["model"]: r["params"] for r in sim_requests(sim)}
    assert sent["gpt-4.1-mini"] == {
        "frequency_penalty": 0.5,
        "presence_penalty": -0.25,
        "logit_bias": {"1734": -100},
        "reasoning_effort": "low",
    }, sent
    assert sent["gemini-2.5-flash"] == {"frequency_penalty": 0.5, "presence_penalty": -0.25}, sent
    assert sent["claude-haiku-4-5"] == {"max_tokens": 1024}, sent  # the API requires max_tokens
    assert not by_model["gpt-4.1-mini"]["adjustments"]
    claude = by_model["claude-haiku-4-5"]["adjustments"]
    assert {note.split(" ")[0] for note in claude} == {
        "frequency_penalty",
        "presence_penalty",
        "logit_bias",
        "reasoning_effort",
    }, claude
    gemini = by_model["gemini-2.5-flash"]["adjustments"]
    assert {note.split(" ")[0] for note in gemini} == {"logit_bias", "reasoning_effort"}, gemini


def test_a_model_that_refuses_reasoning_effort_gets_it_dropped_with_a_note(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    """OpenAI's non-reasoning models refuse reasoning_effort with a 400: learned once, dropped with
    a note, and the call answers. Mutation caught: reasoning_effort left out of DroppableParam."""
    set_models(sim, {"gpt-4o-mini": {"refuses": ["reasoning_effort"]}})
    completion = client.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=QUESTION,  # type: ignore[arg-type]
        reasoning_effort="high",
        extra_body={"moa": {"detail": True}},
    )
    assert completion.choices[0].message.content
    (call,) = (completion.model_extra or {})["moa"]["calls"]
    assert call["adjustments"] == ["reasoning_effort dropped: refused by gpt-4o-mini (learned from its 400)"]


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logprobs": True}, "logprobs"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"store": True}, "store"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"verbosity": "low"}, "verbosity"),
    ],
)
def test_what_this_service_does_not_do_is_refused_by_name(
    client: openai.OpenAI, sim: SimulatorServer, extra: dict[str, Any], param: str
) -> None:
    """Mutation caught: an entry removed from NOT_IMPLEMENTED (the request would answer 200)."""
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.chat.completions.create(model="moa-lite", messages=QUESTION, extra_body=extra)  # type: ignore[arg-type]
    error = refused.value.body
    assert isinstance(error, dict) and error["param"] == param, error
    assert error["type"] == "invalid_request_error" and param in error["message"]
    assert sim_requests(sim) == []


def test_their_defaults_ask_for_nothing_and_are_accepted(client: openai.OpenAI) -> None:
    """A client that always sends the defaults (logprobs false, store false, n 1) still works."""
    completion = client.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=QUESTION,  # type: ignore[arg-type]
        logprobs=False,
        store=False,
        n=1,
        service_tier="auto",
        modalities=["text"],
        user="end-user-7",
    )
    assert completion.choices[0].message.content


def test_an_unknown_parameter_is_refused_as_openai_refuses_it(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    """A misspelt ``temprature`` is a 400 naming it, not a 200 at the default temperature.
    Mutation caught: the before-validator removed (extra="allow" takes it in silently)."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="moa-lite",
            messages=QUESTION,  # type: ignore[arg-type]
            extra_body={"temprature": 0.2},
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert error == {
        "message": "Unrecognized request argument supplied: temprature",
        "type": "invalid_request_error",
        "param": "temprature",
        "code": "unknown_parameter",
    }
    assert sim_requests(sim) == []


# -- 7. OpenAI's conventions: model_not_found, models.retrieve, X-Request-Id and user -------------


def test_an_unknown_model_is_openais_404_and_a_model_can_be_retrieved(client: openai.OpenAI) -> None:
    """Mutations caught: UnknownPreset back at 400 with no param; the /v1/models/{id} route removed."""
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=QUESTION)  # type: ignore[arg-type]
    error = missing.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"], error["type"]) == (
        "model_not_found",
        "model",
        "invalid_request_error",
    )
    assert client.models.retrieve("moa-lite").id == "moa-lite"
    assert client.models.retrieve("openai/gpt-4.1").owned_by == "openai"
    with pytest.raises(openai.NotFoundError) as gone:
        client.models.retrieve("gpt-9")
    assert isinstance(gone.value.body, dict) and gone.value.body["code"] == "model_not_found"


def test_the_request_id_and_the_user_are_on_the_log_line_and_the_span(
    api: str, otlp: OTLPReceiver, log_lines: io.StringIO
) -> None:
    """An incoming X-Request-Id is echoed and, with the body's ``user``, recorded on the request's
    log line and span; without one the service makes one. Mutation caught: the middleware not
    reading X-Request-Id (a fresh id is echoed instead) or not reading the end user."""
    body = {"model": "openai/gpt-4o-mini", "messages": QUESTION, "user": "end-user-42"}
    r = httpx.post(api + "/v1/chat/completions", json=body, headers={"X-Request-Id": "abc-123"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "abc-123"
    (server,) = by_name(
        wait_for_spans(otlp, r.headers["x-moa-trace-id"], {"POST /v1/chat/completions"}),
        "POST /v1/chat/completions",
    )
    assert server["attributes"]["moa.request_id"] == "abc-123"
    assert server["attributes"]["enduser.id"] == "end-user-42"
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    (line,) = [x for x in lines if x.get("event") == "request" and x.get("request_id") == "abc-123"]
    assert line["user"] == "end-user-42" and line["status"] == 200
    made = httpx.get(api + "/v1/models", headers={"X-Request-Id": "bad id with spaces"})
    assert made.headers["x-request-id"].startswith("req_")


# -- 5. the first example shows a mixture; auto names what answered -------------------------------

ROOT = Path(__file__).resolve().parent.parent


def test_the_readmes_first_moa_ask_shows_a_mixture(tmp_path: Path) -> None:
    """The README's first ``moa ask`` line, run as written (with a fast simulator profile laid
    over the bundled config, item 1), answers with proposers and an aggregator. Mutation caught:
    the first example without ``--preset moa-lite`` (auto sends it to one model)."""
    first = next(
        line.strip()
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.strip().startswith("moa ask ")
    )
    argv = shlex.split(first.split("#")[0])[1:]
    profile = tmp_path / "fast.yaml"
    profile.write_text("default: {ttft_s: 0.01, tokens_per_s: 4000, jitter: 0}\n")
    config = tmp_path / "moa.yaml"
    config.write_text(f"simulator: {{profile: '{profile}'}}\n")
    out = run_moa(*argv, "--json", env={"MOA_CONFIG": str(config)})
    assert out.returncode == 0, out.stderr
    stages = [c["stage"] for c in json.loads(out.stdout)["calls"]]
    assert stages.count("proposer") >= 2 and "aggregator" in stages, stages


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_auto_answers_name_the_preset_that_ran(client: openai.OpenAI, stream: bool) -> None:
    """``model`` is what auto resolved to, and ``x-moa-preset`` says it. Mutation caught: the
    body's ``model`` left at the requested ``auto`` (or the header not set)."""
    hard = "Design and analyse, step by step, a fault-tolerant distributed consensus protocol."
    simple = "Hi"
    for question, tier in ((simple, "single"), (hard, None)):
        messages = [{"role": "user", "content": question}]
        raw = client.chat.completions.with_raw_response.create(
            model="auto",
            messages=messages,  # type: ignore[arg-type]
            stream=stream,
        )
        ran = raw.headers["x-moa-preset"]
        assert ran in ("single", "moa-lite", "moa") and (tier is None or ran == tier), ran
        parsed = raw.parse()
        if stream:
            models = {chunk.model for chunk in parsed}  # type: ignore[union-attr]
            assert models == {ran}, models
        else:
            assert parsed.model == ran  # type: ignore[union-attr]
    named = client.chat.completions.with_raw_response.create(model="moa-lite", messages=QUESTION)  # type: ignore[arg-type]
    assert named.headers["x-moa-preset"] == "moa-lite" and named.parse().model == "moa-lite"


# -- 2. client commands: a key, what 401/403 mean, no success over errors -------------------------


def test_the_bench_app_gets_a_state_of_its_own_unless_given_a_key(state_dir: Path) -> None:
    """After ``moa keys create`` the bench's app read the same key store and sent no key: every
    request a 401. Without --api-key it now runs on an empty state of its own. Mutation caught:
    own_state yielding without switching MOA_STATE_DIR."""
    import asyncio

    from moa.auth import new_key, new_record
    from moa.benchmark.runner import own_state
    from moa.state import KeyLimits, describe, open_store

    async def keys() -> int:
        store = open_store(load_config(None).state)
        try:
            return len(await store.list_keys())
        finally:
            await store.close()

    async def make() -> None:
        store = open_store(load_config(None).state)
        try:
            await store.create_key(new_record("alice", new_key(), KeyLimits()))
        finally:
            await store.close()

    asyncio.run(make())
    assert asyncio.run(keys()) == 1
    with own_state(None):
        assert str(state_dir) not in describe(load_config(None).state)
        assert asyncio.run(keys()) == 0
    with own_state("sk-given"):
        assert asyncio.run(keys()) == 1  # a key was given: the store where it lives
    assert asyncio.run(keys()) == 1


def test_bench_failures_are_reported_with_what_401_and_403_mean() -> None:
    """A level with failures makes ``moa bench`` exit 1, naming them and what a 401 means.
    Mutation caught: failures() returning nothing for a level whose requests failed."""
    from moa.benchmark.runner import failures

    ok = {"target": "serve moa", "concurrency": 1, "errors": 0, "error_kinds": {}}
    bad = {"target": "serve moa-lite", "concurrency": 8, "errors": 2, "error_kinds": {"401": 2}}
    assert failures({"levels": [ok]}) == []
    lines = failures({"levels": [ok, bad], "scenarios": [{"errors": 3, "error_kinds": {"504": 3}}]})
    assert lines[0] == "serve moa-lite c=8: 2 failed (401: 2)"
    assert "--api-key" in lines[1] and "MOA_API_KEY" in lines[1] and "moa keys create" in lines[1]
    assert len(lines) == 2  # staged fault scenarios are not failures of the run


def test_eval_on_a_keyed_service_says_what_to_do(
    config: MoAConfig, state_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``moa eval --service``: no key is one line saying what a 401 means (not a table of n/a);
    a plain key answers with the cost unknown and says a --detail key gives it. Mutations
    caught: the AuthenticationError not turned into a TargetError; the note not printed."""
    from moa.cli import main
    from moa.state.sqlite_store import SQLiteStore

    work = tmp_path / "w.jsonl"
    work.write_text('{"id": 1, "prompt": "Why is the sky blue?"}\n')
    cfg_file = tmp_path / "moa.yaml"
    cfg_file.write_text(f"simulator: {{mode: 'on', url: '{config.simulator.url}'}}\n")
    with ApiServer(config, store=lambda: SQLiteStore(state_dir / "state.db")) as server:
        assert main(["keys", "create", "plain"]) == 0
        key = capsys.readouterr().out.strip()
        wait_until_sync(
            lambda: httpx.get(server.url + "/v1/models").status_code, lambda s: s == 401, what="keys on"
        )
        base = ["eval", "--config", str(cfg_file), "--workload", str(work), "--service", server.url]
        base += ["--targets", "moa-lite", "--reference", "single", "--judges", "openai/gpt-4.1-mini"]
        base += ["--no-progress", "--out", str(tmp_path)]
        assert main([*base, "--run-id", "nokey"]) == 2
        err = capsys.readouterr().err
        assert "401 means the service wants an API key" in err and "--api-key" in err, err
        assert main([*base, "--run-id", "plain", "--api-key", key]) == 0
        err = capsys.readouterr().err
        assert "may not use moa.detail" in err and "moa keys create NAME --detail" in err, err
