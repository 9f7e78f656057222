"""A model served with a smaller context window than the config declares (issue 33).

llama.cpp's ``llama-server`` divides its context among its slots and vLLM has ``--max-model-len``,
so a self-hosted model often reads less than the config says. The simulator plays such servers
(``ModelProfile.context_window`` and ``server``: their refusal bodies, their listings), the
official ``openai`` SDK talks to it over loopback, and the service must: read the window where the
server reports it, learn it from a refusal and retry at once with the references fitted (never
held against the provider's health), keep a useful share of a small window for the references,
and refuse with a 400 naming the numbers only a request that cannot fit whatever is trimmed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from moa import MoAEngine, Plan
from moa.config import MoAConfig, parse_config
from moa.engine.calls import WINDOWS
from moa.errors import AllProvidersFailed, ContextWindowExceeded
from moa.providers.openai_client import OpenAICompatibleTransport
from moa.providers.registry import ProviderPool
from moa.providers.wire import context_window_in
from moa.result import Stage
from moa.simulator.profile import ModelProfile
from moa.simulator.server import SimulatorServer
from moa.testing import ScriptedCaller
from moa.types import CallRequest, CallResult, ChatMessage, ErrorKind, GenerationParams, TextDelta
from tests.conftest import FAST_PROFILE
from tests.helpers import sim_requests
from tests.test_fidelity import (
    FixtureServer,
    Reply,
    assert_shape,
    chunk_kind,
    collapse,
    raw,
    read_body,
    sse_events,
)

FIXTURES = Path(__file__).parent / "fixtures" / "providers"
QUESTION = [ChatMessage(role="user", content="How do vaccines train the immune system?")]
MODEL = "smollm2"


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def serve_window(sim: SimulatorServer, server: str, window: int, output: tuple[int, int] = (20, 40)) -> None:
    """``MODEL`` is served with ``window`` tokens by a server of this kind."""
    spec = ModelProfile(
        ttft_s=0.01,
        tokens_per_s=5000.0,
        jitter=0.0,
        context_window=window,
        server=server,
        output_tokens=output,
    )  # type: ignore[arg-type]
    profile = FAST_PROFILE.model_copy(update={"models": {MODEL: spec}})
    httpx.put(f"{sim.url}/admin/profile", json=profile.model_dump(mode="json")).raise_for_status()


def local_config(sim: SimulatorServer | FixtureServer, declared: int = 4096) -> MoAConfig:
    """One OpenAI-compatible server, its model declared with ``declared`` tokens of window."""
    return parse_config(
        {
            "providers": {
                "local": {
                    "kind": "openai_compatible",
                    "base_url": sim.url + "/v1",
                    "models": {MODEL: {"context_window": declared}},
                    "retry": {"max_attempts": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.02},
                }
            },
            "simulator": {"mode": "off"},
        }
    )


def lite_plan() -> Plan:
    """moa-lite's shape on one local model: three proposers (quorum 2), one aggregator."""
    ref = {"provider": "local", "model": MODEL}
    return Plan.model_validate(
        {
            "layers": [{"proposers": [{**ref, "seed": n} for n in (1, 2, 3)], "quorum": 2}],
            "aggregators": [ref],
            "grace_s": 5,
        }
    )


# -- the servers' own words ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "reference"),
    [
        ("llama.cpp", "llamacpp/error_400_exceed_context_size.json"),
        ("vllm", "vllm/error_400_max_tokens_too_large.json"),
        ("openai", "openai/error_400_context_length_exceeded.json"),
    ],
)
def test_the_simulator_refuses_a_prompt_over_its_window_as_each_server_does(
    sim: SimulatorServer, server: str, reference: str
) -> None:
    """The 400 body has the real server's shape (llama.cpp's recorded from a running server,
    the others from their users' reports), and names the window the way a client can read it back."""
    serve_window(sim, server, 64)
    long = "word " * 400
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": long}]}
    if server == "vllm":  # vLLM's recorded body is its max_tokens form: a prompt that fits, a long answer
        body = {
            "model": MODEL,
            "messages": QUESTION[0:1] and [{"role": "user", "content": "hi"}],
            "max_tokens": 500,
        }
    r = httpx.post(f"{sim.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer x"})
    assert r.status_code == 400, r.text
    assert_shape(fixture(reference), r.json())
    assert context_window_in(r.json()["error"]["message"]) == 64
    assert context_window_in(fixture(reference)["error"]["message"]) in (1024, 4096, 128000)


def test_the_simulator_refuses_a_streamed_prompt_over_its_window_as_llama_cpp_does(
    sim: SimulatorServer,
) -> None:
    """llama.cpp refuses a streamed request before its stream starts: the same 400 JSON body, no
    event stream (as recorded)."""
    serve_window(sim, "llama.cpp", 64)
    body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "word " * 400}]}
    r = httpx.post(f"{sim.url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer x"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
    assert_shape(fixture("llamacpp/error_400_exceed_context_size.stream.json"), r.json())
    assert r.json()["error"]["n_ctx"] == 64


def test_the_simulator_lists_the_window_where_each_server_does(sim: SimulatorServer) -> None:
    serve_window(sim, "vllm", 2048)
    listing = httpx.get(f"{sim.url}/v1/models", headers={"Authorization": "Bearer x"}).json()
    (entry,) = [m for m in listing["data"] if m["id"] == MODEL]
    # vLLM's permission list is left out (a legacy field nobody reads).
    assert_shape(fixture("vllm/models.json")["data"][0], entry, frozenset({"$.permission"}))
    assert entry["max_model_len"] == 2048
    serve_window(sim, "llama.cpp", 1024)
    listing = httpx.get(f"{sim.url}/v1/models", headers={"Authorization": "Bearer x"}).json()
    recorded = fixture("llamacpp/models.json")
    (entry,) = [m for m in listing["data"] if m["id"] == MODEL]
    assert_shape(recorded["data"][0], entry)
    assert_shape(recorded["models"], listing["models"])
    assert entry["meta"]["n_ctx"] == 1024 and [m["name"] for m in listing["models"]] == [MODEL]
    props = httpx.get(f"{sim.url}/props").json()
    assert_shape(fixture("llamacpp/props.json"), props)
    assert props["default_generation_settings"]["n_ctx"] == 1024 and props["model_alias"] == MODEL


def test_the_simulator_answers_as_llama_cpp_does(sim: SimulatorServer) -> None:
    """A completion and a stream in the recorded server's own bodies: llama.cpp's ``timings``,
    none of OpenAI's ``logprobs``, ``refusal``, ``service_tier`` or ``obfuscation``, a null first
    delta, the usage chunk only where asked for."""
    serve_window(sim, "llama.cpp", 1024)
    auth = {"Authorization": "Bearer x"}
    request = fixture("llamacpp/chat_completion.request.json") | {"model": MODEL}
    r = httpx.post(f"{sim.url}/v1/chat/completions", json=request, headers=auth)
    assert r.status_code == 200 and "openai-processing-ms" not in r.headers
    assert_shape(fixture("llamacpp/chat_completion.response.json"), r.json())
    assert r.json()["model"] == MODEL
    request = fixture("llamacpp/chat_completion.stream.request.json") | {"model": MODEL}
    r = httpx.post(f"{sim.url}/v1/chat/completions", json=request, headers=auth)
    assert r.status_code == 200 and r.headers["content-type"] == "text/event-stream"
    ref = [data for _, data in sse_events(raw("llamacpp/chat_completion.stream.sse"))]
    got = [data for _, data in sse_events(r.content)]
    kinds = [chunk_kind(d) for d in ref]
    assert kinds[0] == "role" and kinds[-3:] == ["finish", "usage", "done"]
    assert collapse([chunk_kind(d) for d in got]) == collapse(kinds)
    by_kind = {chunk_kind(d): d for d in ref}
    for data in got:
        if data != "[DONE]":
            assert_shape(by_kind[chunk_kind(data)], data)


@pytest.mark.parametrize(("server", "window"), [("vllm", 2048), ("llama.cpp", 1024)])
async def test_the_adapter_reads_the_served_window_once_from_the_server(
    sim: SimulatorServer, server: str, window: int
) -> None:
    """vLLM lists ``max_model_len``, llama.cpp its per-slot ``meta.n_ctx`` (an older llama.cpp
    only in ``/props``: the recorded-listing tests below). Either way every later result carries it."""
    serve_window(sim, server, window)
    async with ProviderPool.from_config(local_config(sim)) as pool:
        client = pool.clients["local"].transport
        assert isinstance(client, OpenAICompatibleTransport)
        assert await client.served_window(MODEL) == window
        res = await pool.call(CallRequest(provider="local", model=MODEL, messages=tuple(QUESTION)))
    assert res.ok and res.context_window == window


async def test_a_server_that_lists_no_window_costs_a_call_nothing(sim: SimulatorServer) -> None:
    """An OpenAI-compatible server that reports no window (Ollama, a plain OpenAI-style listing):
    the listing says nothing, the call goes as always, the window is learned from a refusal."""
    serve_window(sim, "openai", 1024)
    async with ProviderPool.from_config(local_config(sim)) as pool:
        client = pool.clients["local"].transport
        assert isinstance(client, OpenAICompatibleTransport)
        assert await client.served_window(MODEL) is None
        res = await pool.call(CallRequest(provider="local", model=MODEL, messages=tuple(QUESTION)))
    assert res.ok and res.context_window is None


async def test_a_refusal_names_the_window_and_is_neutral_for_health(sim: SimulatorServer) -> None:
    """llama.cpp's refusal: typed bad_request, never retried, the window on the failure (so it
    reaches the ingress on Ray), and the provider's breaker untouched however often it happens."""
    serve_window(sim, "llama.cpp", 64)
    long = (ChatMessage(role="user", content="word " * 400),)
    async with ProviderPool.from_config(local_config(sim)) as pool:
        for _ in range(6):  # more than the breaker's failure threshold
            res = await pool.call(CallRequest(provider="local", model=MODEL, messages=long))
            assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST and res.attempts == 1
            assert (
                res.error.context_window == 64 and "exceeds the available context size" in res.error.message
            )
        assert pool.health()["local"]["state"] == "closed"


# -- the recorded llama-server, replayed -------------------------------------------------------------


class RecordedLlamaServer(FixtureServer):
    """Answers as the recorded ``llama-server`` did (tests/fixtures/providers/llamacpp): its listing
    at ``GET /v1/models``, its ``GET /props``, and ``chat`` (set by the test) for every completion,
    streamed or not."""

    def __init__(self) -> None:
        super().__init__()
        self.listing = raw("llamacpp/models.json")
        self.chat = Reply(200, raw("llamacpp/chat_completion.response.json"))

    async def app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        self.requests.append((f"{scope['method']} {scope['path']}", {}, json.loads(body) if body else None))
        reply = {
            "/v1/models": Reply(200, self.listing),
            "/props": Reply(200, raw("llamacpp/props.json")),
            "/v1/chat/completions": self.chat,
        }.get(
            scope["path"],
            Reply(404, b'{"error":{"code":404,"message":"File Not Found","type":"not_found_error"}}'),
        )
        headers = [(b"content-type", reply.content_type.encode()), (b"server", b"llama.cpp")]
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})


@pytest.fixture
def llama() -> Iterator[RecordedLlamaServer]:
    with RecordedLlamaServer() as server:
        yield server


def paths(server: FixtureServer) -> list[str]:
    return [p for p, _, _ in server.requests]


async def test_the_recorded_listing_names_the_slot_window_without_props(llama: RecordedLlamaServer) -> None:
    """A recent llama-server lists its per-slot window as ``meta.n_ctx`` (1,024 of the 4,096
    tokens shared by 4 slots): read from the listing, whatever name the config gives the model,
    and ``/props`` is not asked."""
    async with ProviderPool.from_config(local_config(llama)) as pool:
        client = pool.clients["local"].transport
        assert isinstance(client, OpenAICompatibleTransport)
        assert await client.served_window(MODEL) == 1024
    assert paths(llama) == ["GET /v1/models"]


async def test_an_older_listing_without_the_slot_window_falls_back_to_props(
    llama: RecordedLlamaServer,
) -> None:
    """Older builds list only the trained window (``n_ctx_train``: 8,192, never the one served):
    the per-slot window is then read from the recorded ``/props``. (The recorded listing with
    ``meta.n_ctx`` taken out: ours.)"""
    listing = fixture("llamacpp/models.json")
    for entry in listing["data"]:
        del entry["meta"]["n_ctx"]
    llama.listing = json.dumps(listing).encode()
    async with ProviderPool.from_config(local_config(llama)) as pool:
        client = pool.clients["local"].transport
        assert isinstance(client, OpenAICompatibleTransport)
        assert await client.served_window(MODEL) == 1024
    assert paths(llama) == ["GET /v1/models", "GET /props"]


@pytest.mark.parametrize("stream", [False, True])
async def test_the_recorded_answers_are_normalised(llama: RecordedLlamaServer, stream: bool) -> None:
    """The recorded completion and stream (a first delta with null content, a usage chunk with
    ``timings`` and the prompt cache's 35 tokens) read as any OpenAI-compatible answer."""
    if stream:
        llama.chat = Reply(200, raw("llamacpp/chat_completion.stream.sse"), "text/event-stream")
    async with ProviderPool.from_config(local_config(llama)) as pool:
        client = pool.clients["local"].transport
        assert isinstance(client, OpenAICompatibleTransport)
        await client.served_window(MODEL)
        call = CallRequest(provider="local", model=MODEL, messages=tuple(QUESTION))
        if stream:
            events = [ev async for ev in pool.stream(call)]
            res = events[-1]
            assert isinstance(res, CallResult)
            assert "".join(ev.text for ev in events if isinstance(ev, TextDelta)) == res.text
        else:
            res = await pool.call(call)
    assert res.ok, res.error
    assert res.text == "Hello, welcome to my little corner of the world!"
    assert (res.model, res.finish_reason, res.context_window) == (
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "stop",
        1024,
    )
    usage = (res.usage.input_tokens, res.usage.output_tokens, res.usage.cached_tokens)
    assert usage == ((36, 12, 35) if stream else (36, 12, 0))


@pytest.mark.parametrize("stream", [False, True])
async def test_the_recorded_refusal_is_typed_with_its_window(
    llama: RecordedLlamaServer, stream: bool
) -> None:
    """The recorded 400 (a streamed request is refused the same way, before its stream): a bad
    request, never retried, naming the 1,024-token window."""
    name = "error_400_exceed_context_size" + (".stream" if stream else "")
    llama.chat = Reply(400, raw(f"llamacpp/{name}.json"))
    long = (ChatMessage(role="user", content="word " * 1100),)
    async with ProviderPool.from_config(local_config(llama)) as pool:
        call = CallRequest(provider="local", model=MODEL, messages=long)
        res = [ev async for ev in pool.stream(call)][-1] if stream else await pool.call(call)
    assert isinstance(res, CallResult) and res.error is not None
    assert (res.error.kind, res.error.status_code, res.error.context_window, res.attempts) == (
        ErrorKind.BAD_REQUEST,
        400,
        1024,
        1,
    )
    assert "request (1131 tokens) exceeds the available context size (1024 tokens)" in res.error.message


async def test_messages_every_proposer_refuses_as_too_long_are_a_context_length_400(
    llama: RecordedLlamaServer,
) -> None:
    """The live run's first long request: before the window is known, every proposer's prompt
    (the client's own messages) is refused with the recorded 400. That is the client's request
    too long for the window, and answered as one, ``context_length_exceeded`` on ``messages``,
    as the same request is refused before any call once the window is known."""
    llama.chat = Reply(400, raw("llamacpp/error_400_exceed_context_size.json"))
    long = [ChatMessage(role="user", content="word " * 1100)]
    async with ProviderPool.from_config(local_config(llama)) as pool:
        engine = MoAEngine(local_config(llama), pool)
        with pytest.raises(AllProvidersFailed) as failed:
            await engine.run(long, plan=lite_plan())
        assert (failed.value.status_code, failed.value.code, failed.value.param) == (
            400,
            "context_length_exceeded",
            "messages",
        )
        assert "exceeds the available context size (1024 tokens)" in failed.value.message
        with pytest.raises(ContextWindowExceeded) as known:
            await engine.run(long, plan=lite_plan())
        assert known.value.code == "context_length_exceeded" and "1024 tokens" in known.value.message


# -- the engine: learn, fit, retry at once ---------------------------------------------------------


async def test_a_moa_lite_request_through_a_smaller_window_than_declared_is_answered(
    sim: SimulatorServer,
) -> None:
    """The issue's run: declared 4,096 tokens, served 1,024 by a server that lists nothing. The
    aggregator's prompt (three long proposals) is refused; the window it names is learned, the
    references are fitted to it and the same aggregator is called again at once: answered, not a
    400. The next request fits the first time."""
    serve_window(sim, "openai", 1024, output=(350, 400))
    async with ProviderPool.from_config(local_config(sim)) as pool:
        engine = MoAEngine(local_config(sim), pool)
        result = await engine.run(QUESTION, plan=lite_plan())
        aggs = [(c.ok, c.error_kind) for c in result.calls if c.stage is Stage.AGGREGATOR]
        assert aggs == [(False, ErrorKind.BAD_REQUEST), (True, None)]
        assert result.answer_source == "aggregator" and result.fallback is None
        assert any("refused the prompt for its 1024-token window" in n for n in result.notes)
        refused, answered = [r for r in sim_requests(sim) if r["model"] == MODEL][-2:]
        assert refused["refused"] and answered["refused"] is None and answered["prompt_tokens"] < 1024
        assert WINDOWS.get("local", MODEL) == 1024
        again = await engine.run(QUESTION, plan=lite_plan())
        assert [c.ok for c in again.calls if c.stage is Stage.AGGREGATOR] == [True]
        assert pool.health()["local"]["state"] == "closed"


@pytest.mark.parametrize("server", ["vllm", "llama.cpp"])
async def test_a_listed_window_is_fitted_before_the_aggregator_is_called(
    sim: SimulatorServer, server: str
) -> None:
    """Where the server lists its window, the proposers' results carry it and the aggregator's
    prompt fits the first time: no refusal at all."""
    serve_window(sim, server, 1024, output=(350, 400))
    async with ProviderPool.from_config(local_config(sim)) as pool:
        client = pool.clients["local"].transport
        assert isinstance(client, OpenAICompatibleTransport)
        await client.served_window(MODEL)  # the listing is read in the background; here, first
        result = await MoAEngine(local_config(sim), pool).run(QUESTION, plan=lite_plan())
    assert [c.ok for c in result.calls if c.stage is Stage.AGGREGATOR] == [True]
    assert all(r["refused"] is None for r in sim_requests(sim))


def scripted_config(window: int) -> MoAConfig:
    """Providers ``p`` and ``a`` (for ScriptedCaller), every model declared with ``window``."""
    models = {m: {"context_window": window} for m in ("one", "two", "three", "first")}
    return parse_config(
        {
            "providers": {
                "p": {"kind": "openai_compatible", "base_url": "http://127.0.0.1:1/v1", "models": models},
                "a": {"kind": "openai_compatible", "base_url": "http://127.0.0.1:1/v1", "models": models},
            },
            "simulator": {"mode": "off"},
        }
    )


def scripted_plan() -> Plan:
    return Plan.model_validate(
        {
            "layers": [{"proposers": [{"provider": "p", "model": m} for m in ("one", "two", "three")]}],
            "aggregators": [{"provider": "a", "model": "first"}],
        }
    )


async def test_a_small_window_keeps_a_useful_share_for_the_references() -> None:
    """With the right window declared (1,024) and no max_tokens, the answer's reservation was
    2,048 tokens: more than the window, so the references fell to a 64-token floor. Now the
    reservation is capped at half of what the messages leave, sent as max_tokens, and the rest
    goes to the references."""
    caller = ScriptedCaller()
    for n, model in enumerate(("one", "two", "three"), start=1):
        caller.script(f"p/{model}", " ".join(f"point{n}-{i}" for i in range(300)))
    caller.script("a/first", "the synthesis")
    result = await MoAEngine(scripted_config(1024), caller).run(QUESTION, plan=scripted_plan())
    assert result.text == "the synthesis"
    (agg,) = caller.calls_to("a/first")
    cap = agg.request.params.max_tokens
    assert cap is not None and 200 <= cap <= 512
    prompt = "\n".join(m.content for m in agg.request.messages)
    for n in (1, 2, 3):  # every reference kept, each well beyond the floor's ~20 tokens
        assert sum(f"point{n}-" in w for w in prompt.split()) >= 25
    assert any("answer capped at" in note for note in result.notes)


async def test_a_client_max_tokens_is_kept_and_never_capped() -> None:
    caller = ScriptedCaller(default="an answer")
    params = GenerationParams(max_tokens=300)
    await MoAEngine(scripted_config(1024), caller).run(QUESTION, plan=scripted_plan(), params=params)
    (agg,) = caller.calls_to("a/first")
    assert agg.request.params.max_tokens == 300


async def test_a_request_that_cannot_fit_is_a_400_naming_the_numbers() -> None:
    """The client's own messages exceed the window of every model that could answer: nothing to
    trim, so a 400 before any call, naming the tokens and the window."""
    caller = ScriptedCaller()
    long = [ChatMessage(role="user", content="word " * 400)]
    with pytest.raises(ContextWindowExceeded) as err:
        await MoAEngine(scripted_config(128), caller).run(long, plan=scripted_plan())
    assert err.value.status_code == 400 and err.value.code == "context_length_exceeded"
    assert "128 tokens (a/first)" in err.value.message and "in the messages" in err.value.message
    assert caller.calls == []
