"""The service on a real two-node Ray cluster (both nodes on this machine), called over HTTP with the
official openai client. One cluster and one deployment serve the whole module."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from moa.config import parse_config
from moa.engine.fusion import FuseJob, FuseStart, FuseStep
from moa.plan import AggregatorSpec
from moa.simulator.server import SimulatorServer
from moa.types import ChatMessage, TextDelta
from tests.helpers import (
    ADMIN_HEADERS,
    QUESTION,
    RAY_MODULE,
    delete_app,
    set_fault,
    sim_stats,
    trimmed_config,
)
from tests.waiting import wait_until, wait_until_sync

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

pytestmark = RAY_MODULE


@pytest.fixture
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_non_streaming_and_detail(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="moa-lite",
        messages=QUESTION,  # type: ignore[arg-type]
        extra_body={"moa": {"detail": True}},
    )
    assert (completion.choices[0].message.content or "").startswith("Synthesis of 3 references")
    detail = (completion.model_extra or {})["moa"]
    calls = detail["calls"]
    assert [c["stage"] for c in calls] == ["proposer"] * 3 + ["aggregator"]
    assert {c["provider"] for c in calls} == {"openai", "anthropic", "gemini"}
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == sum(c["usage"]["input_tokens"] for c in calls)
    assert completion.usage.completion_tokens == sum(c["usage"]["output_tokens"] for c in calls)


def test_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="moa",
        messages=QUESTION,  # type: ignore[arg-type]
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = chunk.usage or usage
    assert text.startswith("Synthesis of 3 references") and usage is not None and usage.total_tokens > 0


def test_auto_routing_and_models(client: openai.OpenAI) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"auto", "moa", "narrow/narrow-model"} <= ids
    simple = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "Hi!"}],
        extra_body={"moa": {"detail": True}},
    )
    assert (simple.model_extra or {})["moa"]["preset"] == "single"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{oops", 400),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}', 404),  # model_not_found
        (b'{"model": "moa"}', 422),
        (b'{"model": "moa", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}', 422),
        (b'{"model": "moa", "messages": [{"role": "user", "content": "' + b"x" * 30_000 + b'"}]}', 413),
    ],
)
def test_bad_input_statuses_through_serve(url: str, body: bytes, status: int) -> None:
    r = httpx.post(url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) >= {"message", "type", "code"}


def test_quorum_met_despite_a_failing_provider(client: openai.OpenAI, sim: SimulatorServer) -> None:
    set_fault(sim, "gemini-2.5-flash", error_500={"rate": 1.0})
    completion = client.chat.completions.create(
        model="moa-lite",
        messages=QUESTION,  # type: ignore[arg-type]
        extra_body={"moa": {"detail": True}},
    )
    assert (completion.choices[0].message.content or "").startswith("Synthesis of 2 references")
    failed = [c for c in (completion.model_extra or {})["moa"]["calls"] if not c["ok"]]
    assert [(c["model"], c["error_kind"]) for c in failed] == [("gemini-2.5-flash", "server_error")]


def test_fallback_when_quorum_is_missed(client: openai.OpenAI, sim: SimulatorServer) -> None:
    set_fault(sim, "claude-haiku-4-5", error_503={"rate": 1.0})
    set_fault(sim, "gemini-2.5-flash", error_503={"rate": 1.0})
    completion = client.chat.completions.create(
        model="moa-lite",
        messages=QUESTION,  # type: ignore[arg-type]
        extra_body={"moa": {"detail": True}},
    )
    detail = (completion.model_extra or {})["moa"]
    assert detail["fallback"] == "layer 1 missed its quorum" and detail["answered_by"] == "openai/gpt-4.1"


def test_clean_errors_when_all_fail(client: openai.OpenAI, url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "*", error_500={"rate": 1.0})
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="moa-lite", messages=QUESTION)  # type: ignore[arg-type]
    assert err.value.status_code == 502 and "every provider failed" in err.value.message
    set_fault(sim, "*", hang={"rate": 1.0})
    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "single", "messages": QUESTION, "moa": {"deadline_s": 1}},
        timeout=30,
    )
    assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"


def test_client_disconnect_cancels_the_fan_out(url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "*", hang={"rate": 1.0})
    body = {"model": "moa-lite", "messages": QUESTION}

    def in_flight() -> int:
        return sum(m["in_flight"] for m in sim_stats(sim).values())

    async def scenario() -> None:
        async with httpx.AsyncClient(timeout=60) as c:
            task = asyncio.create_task(c.post(url + "/v1/chat/completions", json=body))
            # The client leaves once the three proposers are waiting on the providers.
            await wait_until(in_flight, lambda n: n == 3, what="the fan-out in flight")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(scenario())
    # Across the cluster: ingress, router and provider replicas let every hanging call go.
    stats = wait_until_sync(
        lambda: sim_stats(sim),
        lambda s: all(m["in_flight"] == 0 for m in s.values()),
        what="no request in flight at the simulator",
    )
    assert sum(m["requests"] for m in stats.values()) == sum(m["cancelled"] for m in stats.values()) == 3


def test_fan_out_crosses_nodes(cluster: dict[str, Any], client: openai.OpenAI) -> None:
    """Ingress and router live on the head node, every provider replica on the worker."""
    for name in ("openai", "anthropic", "gemini"):
        handle = serve.get_deployment_handle(f"provider-{name}", app_name="moa")
        health = handle.health.remote().result(timeout_s=30)
        assert health["node_id"] == cluster["worker_node"]
    completion = client.chat.completions.create(model="moa-lite", messages=QUESTION)  # type: ignore[arg-type]
    assert (completion.choices[0].message.content or "").startswith("Synthesis of 3 references")


def _burst(url: str, body: dict[str, Any], n: int) -> list[int]:
    async def go() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as c:
            rs = await asyncio.gather(*(c.post(url + "/v1/chat/completions", json=body) for _ in range(n)))
            return [r.status_code for r in rs]

    return asyncio.run(go())


def test_concurrency_limit_holds_across_replicas(url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "narrow-model", hang={"rate": 1.0, "hang_s": 0.5})
    statuses = _burst(url, {"model": "narrow/narrow-model", "messages": QUESTION}, 12)
    assert statuses == [200] * 12
    stats = sim_stats(sim)["narrow-model"]
    assert stats["requests"] == 12 and stats["max_in_flight"] <= 2 * 2


def test_cluster_wide_rpm_holds_with_two_replicas(url: str, sim: SimulatorServer) -> None:
    # Two seconds each: the bucket's sixty leave the limiter at once, but on a busy machine a
    # request granted its call late in a one-second deadline missed it (29 of the 30 asserted).
    body = {"model": "metered/metered-model", "messages": QUESTION, "moa": {"deadline_s": 2}}
    t0 = time.monotonic()
    statuses = _burst(url, body, 100)
    elapsed = time.monotonic() - t0
    # Sixty a minute for the account, whichever replica served and whatever it leased: the calls
    # that reached the provider are the full bucket plus what refilled (one a second) while the
    # burst ran or could wait, no more. A call that went out just before its request's two-second
    # deadline may still complete after the client got its 504, so the provider may have served
    # a few more calls than were answered 200, never more than the budget allows.
    answered = statuses.count(200)
    reached = wait_until_sync(
        lambda: sim_stats(sim)["metered-model"],
        lambda m: m["in_flight"] == 0,
        what="the burst's calls finished at the provider",
    )
    assert answered <= reached["requests"] <= 60 + elapsed + 2, (answered, reached, elapsed)
    assert answered >= 30, (answered, Counter(statuses))  # the budget did let its bucket through
    # The rest were refused by the budget (429), or granted a wait for it that their two-second
    # deadline could not outlast (504).
    assert set(Counter(statuses)) <= {200, 429, 504}, Counter(statuses)
    # Both replicas served part of it: the budget held across them, not inside one.
    per_replica = answered_by_replica("provider-metered", replicas=2)
    assert all(n > 0 for n in per_replica.values()), per_replica
    # Every answer the clients got was a call a replica answered; the provider may have finished
    # a few more whose replica was cut first (their request's deadline passed as the end of the
    # answer crossed: calls are streamed, and a cut one is billed for what had arrived).
    assert answered <= sum(per_replica.values()) <= reached["completed"], (per_replica, reached)


def answered_by_replica(deployment: str, replicas: int) -> dict[str, int]:
    """Each replica's own count of answered calls, asked of every replica through the handle."""
    handle = serve.get_deployment_handle(deployment, app_name="moa")
    seen: dict[str, int] = {}

    def ask() -> int:
        health = handle.health.remote().result(timeout_s=30)
        seen[health["replica"]] = health["answered"]
        return len(seen)

    # Serve spreads handle calls over the replicas; ask until every one has answered for itself.
    wait_until_sync(ask, lambda n: n >= replicas, interval=0, what=f"every replica of {deployment}")
    return seen


def test_provider_deployments_scale_independently(url: str, sim: SimulatorServer) -> None:
    set_fault(sim, "gpt-4o-mini", hang={"rate": 1.0, "hang_s": 1.0})

    def replicas(name: str) -> int:
        status = serve.status().applications["moa"].deployments[name]
        return int(status.replica_states.get("RUNNING", 0))

    assert replicas("provider-openai") == 1
    body = {"model": "openai/gpt-4o-mini", "messages": QUESTION}

    def load_then_count() -> int:
        _burst(url, body, 12)  # keeps the openai deployment busy while Serve decides
        return replicas("provider-openai")

    wait_until_sync(load_then_count, lambda n: n >= 2, within_s=120, interval=0, what="a second replica")
    assert replicas("provider-anthropic") == 1 and replicas("provider-gemini") == 1


def test_ingress_routes_over_the_health_boards_view(client: openai.OpenAI) -> None:
    """Routing happens in the ingress, with its own policy over the health board's view: a plain
    greeting is a single-model plan, decided with no classifier call, every provider available."""
    from moa_actors.health_board import HEALTH_BOARD_NAME

    answer = client.chat.completions.create(
        model="auto",
        messages=[{"role": "user", "content": "Hi!"}],
        extra_body={"moa": {"detail": True}},
    )
    detail = (answer.model_extra or {})["moa"]
    stages = [c["stage"] for c in detail["calls"]]
    assert detail["preset"] == "single" and "proposer" not in stages and "classifier" not in stages
    board = serve.get_deployment_handle(HEALTH_BOARD_NAME, app_name="moa")
    view = board.health_view.remote().result(timeout_s=30)
    assert view.unavailable == frozenset()


def test_healthz_reports_every_provider(url: str) -> None:
    body = wait_until_sync(
        lambda: httpx.get(url + "/healthz", headers=ADMIN_HEADERS).json(),
        lambda b: all(p["replicas"] >= 1 for p in b["providers"].values()),
        interval=0.5,
        what="every provider with a running replica",
    )
    assert body["status"] == "ok"
    assert set(body["providers"]) == {"openai", "anthropic", "gemini", "narrow", "metered", "tokened"}
    assert body["providers"]["narrow"]["replicas"] == 2


# The idle provider: Serve starts it at min_replicas, none, until a request asks for one.
IDLE = {
    "kind": "openai",
    "api_key_env": "IDLE_API_KEY",
    "deployment": {
        "num_cpus": 0.01,
        "autoscaling": {"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0, "downscale_delay_s": 600},
        "resources": {"worker_node": 0.01},
    },
    "models": {"idle-model": {}},
}


@pytest.fixture(scope="module")
def side(cluster: dict[str, Any]) -> Iterator[str]:
    """One side app for the tests that need a config of their own and leave it healthy: openai
    alone with a mixture of its three models (``trio``) fused in the aggregator deployment
    (``serve.fusion: deployment``), plus the ``idle`` provider autoscaled to no replica. Each app
    deployed costs the session its replicas' start. The module's last test deletes it, as its
    scenario (test_serve_stopping_the_ingress_lets_a_stream_in_progress_finish); its URL."""
    from moa_actors.app import build_from_config

    raw = trimmed_config(cluster["config"], ("openai",))
    raw["providers"]["idle"] = IDLE
    raw["serve"]["fusion"] = "deployment"
    proposers = [{"provider": "openai", "model": m} for m in ("gpt-4.1-mini", "gpt-4o-mini", "gpt-4.1")]
    raw["presets"]["trio"] = {
        "layers": [{"proposers": proposers, "quorum": 3}],
        "aggregators": [{"provider": "openai", "model": "gpt-4.1"}],
    }
    serve.run(build_from_config(parse_config(raw, "the side config")), name="moa-side", route_prefix="/side")
    try:
        yield str(cluster["url"]) + "/side"
    finally:
        delete_app("moa-side")


def test_fusion_in_an_aggregator_deployment(side: str, sim: SimulatorServer) -> None:
    """``serve.fusion: deployment`` adds the aggregator deployment; the default app has none."""
    assert "aggregator" not in serve.status().applications["moa"].deployments
    assert "aggregator" in serve.status().applications["moa-side"].deployments
    body = {"model": "trio", "messages": QUESTION, "moa": {"detail": True}}
    r = httpx.post(side + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"].startswith("Synthesis of 3 references")
    assert [c["stage"] for c in r.json()["moa"]["calls"]][-1] == "aggregator"
    # The aggregator deployment fuses on its own, through the provider deployments.
    aggregator = serve.get_deployment_handle("aggregator", app_name="moa-side").options(stream=True)
    job = FuseJob(
        chain=(AggregatorSpec(provider="openai", model="gpt-4.1"),),
        messages=(ChatMessage(role="user", content="Why is the sky blue?"),),
        references=("Rayleigh scattering.", "Shorter wavelengths scatter more."),
        call_timeout_s=30,
    )
    events = list(aggregator.fuse.remote(job))
    # The attempt announces itself (so a cut one can be billed), streams unseen, then steps.
    assert isinstance(events[0], FuseStart) and events[0].model == "gpt-4.1"
    steps = [e for e in events if isinstance(e, FuseStep)]
    assert len(steps) == 1 and steps[0].result.ok and events[-1] is steps[0]
    assert steps[0].result.text.startswith("Synthesis of 2 references")
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == steps[0].result.text


def test_bench_floor_app_times_every_probe(url: str) -> None:
    """``moa bench --targets floor``: the bare app deploys beside the service, answers, and goes
    (ten timed requests a probe: the figures themselves are ``moa bench``'s, not this test's)."""
    from rich.progress import Progress

    from moa.benchmark.runner import ray_targets

    measure_floor = ray_targets().measure_floor

    with Progress(disable=True) as progress:
        rows = asyncio.run(measure_floor(url, progress, progress.add_task("floor", total=None), requests=10))
    assert [r["path"] for r in rows] == ["/http", "/hop", "/fan-out", "/chain"]
    assert all(0 < r["p50_ms"] <= r["p99_ms"] and r["requests"] == 10 for r in rows)
    assert "floor" not in serve.status().applications


def _side_app(cluster: dict[str, Any], provider: str, spec: dict[str, Any]) -> str:
    """The session config with openai alone, plus ``provider`` as ``spec`` says, deployed as app
    ``moa-<provider>`` beside the session's (without waiting for it); its URL."""
    from moa_actors.app import build_from_config

    raw = trimmed_config(cluster["config"], ("openai",))
    raw["providers"][provider] = spec
    cfg = parse_config(raw, f"the {provider} config")
    app = serve.RunTarget(build_from_config(cfg), name=f"moa-{provider}", route_prefix=f"/{provider}")
    serve.run_many([app], wait_for_applications_running=False)
    return str(cluster["url"]) + f"/{provider}"


def _health(url: str) -> tuple[int, dict[str, Any]]:
    """An app's ``/healthz``: its status and body; (0, {}) while Serve does not route to it yet."""
    try:
        r = httpx.get(url + "/healthz", headers=ADMIN_HEADERS, timeout=30)
    except httpx.TransportError:
        return 0, {}
    return r.status_code, (r.json() if r.status_code in (200, 503) else {})


def _health_reported(url: str, provider: str) -> tuple[int, dict[str, Any]]:
    """``/healthz`` once every provider but ``provider`` has a replica reporting and ``provider``
    is listed: what a side app's health says once start-up is over."""

    def reported(h: tuple[int, dict[str, Any]]) -> bool:
        providers = h[1].get("providers", {})
        others = [p for name, p in providers.items() if name != provider]
        return bool(others) and all(p["replicas"] >= 1 for p in others) and provider in providers

    return wait_until_sync(lambda: _health(url), reported, within_s=120, interval=0.5, what="health reported")


def test_a_provider_autoscaled_to_none_is_reported_and_a_request_brings_it_back(
    side: str, sim: SimulatorServer
) -> None:
    """docs/API.md: ``/healthz`` says ``scaled_to_zero`` for a provider Serve's autoscaling took to no
    replica (``min_replicas: 0``), which is not a fault: the status stays ``ok``, nothing routes
    around it, and a request naming it starts a replica and is answered by it."""

    url = side
    status, body = _health_reported(url, "idle")
    assert body["providers"]["idle"]["replicas"] == 0
    assert body["providers"]["idle"]["state"] == "scaled_to_zero"
    assert (status, body["status"]) == (200, "ok")  # not degraded: a request brings it back

    r = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "idle/idle-model", "messages": QUESTION, "moa": {"detail": True}},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    detail = r.json()["moa"]
    assert detail["answered_by"] == "idle/idle-model"
    assert not detail["decision"]["substitutions"]
    _, body = wait_until_sync(
        lambda: _health(url),
        lambda h: h[1].get("providers", {}).get("idle", {}).get("replicas", 0) == 1,
        within_s=60,
        interval=0.5,
        what="the started replica to report",
    )
    assert body["providers"]["idle"]["state"] == "closed"


def test_a_provider_with_no_replica_is_reported_and_never_waited_for(
    cluster: dict[str, Any], sim: SimulatorServer
) -> None:
    """``serve deploy`` on a cluster without the nodes a provider needs: its replicas never start.
    Health must say so, and no request may wait for it past its deadline."""
    from moa.types import CallRequest, ErrorKind
    from moa_actors.handles import HandleCaller

    url = _side_app(
        cluster,
        "ghost",
        {
            "kind": "openai",
            "api_key_env": "GHOST_API_KEY",
            # No node has this resource: the replica stays pending for ever.
            "deployment": {"num_cpus": 0.01, "num_replicas": 1, "resources": {"no_such_node_type": 1}},
            "models": {"ghost-model": {}},
        },
    )
    try:
        # A handle call to the deployment with no replica ends at the call's own deadline.
        ghost = serve.get_deployment_handle("provider-ghost", app_name="moa-ghost")
        hi = (ChatMessage(role="user", content="Hi"),)
        req = CallRequest(provider="ghost", model="ghost-model", messages=hi, timeout_s=1.0)
        result = asyncio.run(asyncio.wait_for(HandleCaller({"ghost": ghost}).call(req), timeout=120))
        assert result.error is not None and result.error.kind is ErrorKind.TIMEOUT
        assert "no replica of provider-ghost answered" in result.error.message

        status, body = _health_reported(url, "ghost")
        # Not "ok": one provider has no replica at all; the others still answer.
        assert (status, body["status"]) == (200, "degraded")
        assert body["providers"]["ghost"]["replicas"] == 0
        assert body["providers"]["ghost"]["state"] == "no_replicas"
        from moa_actors.health_board import HEALTH_BOARD_NAME

        # Once the health board counts it unavailable, a request naming it is answered by a substitute.
        board = serve.get_deployment_handle(HEALTH_BOARD_NAME, app_name="moa-ghost")
        wait_until_sync(
            lambda: board.health_view.remote().result(timeout_s=30).unavailable,
            lambda unavailable: "ghost" in unavailable,
            within_s=120,
            interval=0.5,
            what="the health board to count the ghost provider out",
        )
        # Each ingress replica takes the board's view on its next check-in (every 0.5 s): until
        # then a request naming the provider waits for it, here for a short deadline of its own.
        ask = {"model": "ghost/ghost-model", "messages": QUESTION, "moa": {"detail": True, "deadline_s": 5}}
        r = wait_until_sync(
            lambda: httpx.post(url + "/v1/chat/completions", json=ask, timeout=120),
            lambda r: r.status_code != 504,
            within_s=120,
            interval=0.5,
            what="the ingress to take the board's view",
        )
        assert r.status_code == 200, r.text
        detail = r.json()["moa"]
        assert not detail["answered_by"].startswith("ghost/")
        (substitution,) = detail["decision"]["substitutions"]
        assert substitution.startswith("ghost/ghost-model -> ")
    finally:
        serve.delete("moa-ghost", _blocking=False)


def test_serve_stopping_the_ingress_lets_a_stream_in_progress_finish(side: str, sim: SimulatorServer) -> None:
    """docs/OPERATIONS.md: under ``serve deploy`` Serve stops an ingress replica (redeploy, scale-down,
    ``serve shutdown``: each deletes replicas as this test deletes the app) with its own graceful
    shutdown. The stream in progress when the app is deleted runs to its end and ``[DONE]``; with
    direct ingress, the session's mode as cluster.yaml's, the replica's own port still answers
    after that stream ended, while Serve's proxy no longer routes to it: its ``/-/healthz`` says
    503 ``DRAINING`` for Serve's draining period (30 s by default, 8 s on the test cluster: the
    stream is shorter), so load balancers deregister it."""
    import threading

    from moa_actors.cache_bench import direct_url

    # The side app, deleted here: this test is the module's last to use it.
    url = side
    direct = wait_until_sync(
        lambda: direct_url("moa-side"), bool, within_s=60, what="the ingress replica's own port"
    )
    # Serve's own health check on that port, the one load balancers poll.
    assert httpx.get(f"{direct}/-/healthz", timeout=30).status_code == 200
    # A direct call that streams at thirty tokens a second: about 3 s (85 tokens), under way when
    # the app goes and over well inside the draining period.
    profile = httpx.get(f"{sim.url}/admin/profile").json()
    profile["models"] = {"gpt-4.1-mini": {"ttft_s": 0.05, "tokens_per_s": 30.0, "jitter": 0.0}}
    httpx.put(f"{sim.url}/admin/profile", json=profile).raise_for_status()
    body = {
        "model": "openai/gpt-4.1-mini",
        "messages": QUESTION,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    lines: list[str] = []
    first_text = threading.Event()

    def read() -> None:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                lines.append(line)
                chunk = json.loads(line[6:]) if line.startswith("data: {") else {}
                if any(c["delta"].get("content") for c in chunk.get("choices", [])):
                    first_text.set()

    reader = threading.Thread(target=read, daemon=True)
    try:
        reader.start()
        assert first_text.wait(60), lines
        serve.delete("moa-side", _blocking=False)
        wait_until_sync(
            lambda: serve.status().applications.get("moa-side"),
            lambda a: a is None or a.status == "DELETING",
            within_s=60,
            what="Serve to start deleting the app",
        )
        reader.join(120)
        assert not reader.is_alive()
        data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
        assert data[-1] == "[DONE]", data[-3:]
        chunks = [json.loads(d) for d in data[:-1]]
        assert not [c for c in chunks if "error" in c]
        # The whole answer, not a cut one: it finished, and the usage chunk came after it.
        assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] > 0
        # The stream is over; the proxy no longer routes to the app, but the replica's own port
        # still answers, telling load balancers it is draining.
        assert httpx.get(url + "/healthz", timeout=30).status_code == 404
        drained = httpx.get(f"{direct}/-/healthz", timeout=30)
        assert (drained.status_code, drained.text) == (503, "DRAINING")
    finally:
        if reader.is_alive():
            reader.join(120)
        serve.delete("moa-side", _blocking=False)
