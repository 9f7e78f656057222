"""Images through the ensemble (issue 28), as a client sends them: the official ``openai`` client
against the in-process API (``moa serve --local``'s app) over the simulator, whose models see the
images on each provider's own wire and say so in their answers (docs/SIMULATOR.md "Images").

What is proven here: a data URL and an https URL answer on a vision preset, streamed and not, on
both endpoints; the models without vision leave the plan (the simulator's per-model counts show
who was called), a URL never reaches Gemini, a layer left short of its quorum is a 400 naming it;
the caps on images; the cost projection counting image tokens; the response cache keyed by the
image. The adapters' wire shapes are in test_images_adapters.py.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from moa.api.images import image_part
from moa.cache.keys import final_key, proposal_key
from moa.config import MoAConfig, load_config
from moa.engine.cost import project
from moa.plan import Plan
from moa.simulator.server import SimulatorServer
from moa.types import CallRequest, ChatMessage, GenerationParams
from tests.helpers import ApiServer, sim_requests, sim_total_requests
from tests.test_simulator_structured import data_url

URL = "https://example.com/photo.jpg"
PNG = data_url(64, 48)
QUESTION = "What is in this picture?"
# A model the bundled table does not have, declared without vision (a text-only model).
TEXT_ONLY = "gpt-3.5-turbo"


def ask(*urls: str, detail: str | None = None, text: str = QUESTION) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": text}]
    for url in urls:
        image: dict[str, Any] = {"url": url} if detail is None else {"url": url, "detail": detail}
        parts.append({"type": "image_url", "image_url": image})
    return [{"role": "user", "content": parts}]


def configured(sim: SimulatorServer, tmp_path: Path, **override: Any) -> MoAConfig:
    """The bundled config over the simulator, with a text-only OpenAI model and two presets that
    use it beside vision models (``mixed``: quorum 2 of three, one text-only; ``short``: quorum 2
    of three, one text-only and one Gemini), plus ``override`` laid over it."""
    layer = [{"provider": "openai", "model": TEXT_ONLY}, {"provider": "openai", "model": "gpt-4.1-mini"}]
    doc = {
        "simulator": {"url": sim.url, "mode": "on"},
        "providers": {"openai": {"models": {TEXT_ONLY: {"input_per_mtok": 0.5, "output_per_mtok": 1.5}}}},
        "presets": {
            "mixed": {
                "layers": [
                    {
                        "quorum": 2,
                        "proposers": [*layer, {"provider": "anthropic", "model": "claude-haiku-4-5"}],
                    }
                ],
                "aggregators": [
                    {"provider": "openai", "model": TEXT_ONLY},
                    {"provider": "anthropic", "model": "claude-haiku-4-5"},
                ],
                "fallbacks": [{"provider": "openai", "model": TEXT_ONLY}],
            },
            "short": {
                "layers": [
                    {"quorum": 2, "proposers": [*layer, {"provider": "gemini", "model": "gemini-2.5-flash"}]}
                ],
                "aggregators": [{"provider": "anthropic", "model": "claude-haiku-4-5"}],
            },
        },
        **override,
    }
    path = tmp_path / "moa.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_config(path)


@pytest.fixture
def server(sim: SimulatorServer, tmp_path: Path) -> Iterator[ApiServer]:
    with ApiServer(configured(sim, tmp_path)) as api:
        yield api


@pytest.fixture
def client(server: ApiServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def requests_by_model(sim: SimulatorServer) -> dict[str, int]:
    """The requests each model was sent, as the simulator parsed them: those its model refused
    (a text-only model sent an image) included."""
    return dict(Counter(r["model"] for r in sim_requests(sim)))


def answer_of(client: openai.OpenAI, preset: str, messages: list[dict[str, Any]], stream: bool) -> str:
    if not stream:
        r = client.chat.completions.create(model=preset, messages=messages)  # type: ignore[arg-type]
        return r.choices[0].message.content or ""
    chunks = client.chat.completions.create(model=preset, messages=messages, stream=True)  # type: ignore[arg-type]
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_data_url_image_is_seen_by_every_model_of_a_vision_preset(
    client: openai.OpenAI, sim: SimulatorServer, stream: bool
) -> None:
    """moa-lite's models all see images (the bundled table says vision: true): each of the three
    proposers and the aggregator is sent the image, and the answer is about it."""
    text = answer_of(client, "moa-lite", ask(PNG), stream)
    assert text.startswith("Looking at the image you sent (a 64x48 PNG)"), text
    sent = sim_requests(sim)
    assert {r["model"] for r in sent} == {"gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash", "gpt-4.1"}
    assert all(r["images"] == [{**r["images"][0], "width": 64, "height": 48, "measured": True}] for r in sent)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_url_image_never_reaches_gemini(client: openai.OpenAI, sim: SimulatorServer, stream: bool) -> None:
    """Gemini's API takes no image URL, and the service fetches none: Gemini's proposer leaves the
    layer, whose quorum of 2 the other two still meet; they get the URL itself."""
    text = answer_of(client, "moa-lite", ask(URL), stream)
    assert text.startswith("Looking at the image you sent (an image by URL, not fetched"), text
    assert requests_by_model(sim) == {"gpt-4.1-mini": 1, "claude-haiku-4-5": 1, "gpt-4.1": 1}
    assert all(r["images"][0]["source"] == "url" for r in sim_requests(sim))


def test_gemini_is_not_even_tried_for_a_url_image(client: openai.OpenAI) -> None:
    """Not a call refused on the way out (the Gemini adapter's own guard): no call at all, so no
    failure is recorded against the layer or the provider."""
    r = client.chat.completions.create(
        model="moa-lite", messages=ask(URL), extra_body={"moa": {"detail": True}}
    )  # type: ignore[arg-type]
    calls = r.model_extra["moa"]["calls"]  # type: ignore[index]
    assert {c["model"] for c in calls} == {"gpt-4.1-mini", "claude-haiku-4-5", "gpt-4.1"}
    assert all(c.get("error_kind") is None for c in calls)


def test_a_model_without_vision_leaves_its_layer_and_the_chain(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    """``mixed``: the text-only model is a proposer, the first aggregator and the fallback; with
    an image it is called for none of them (the layer's quorum of 2 met by the other two, the
    second aggregator answering). Without an image it is called as before."""
    answer_of(client, "mixed", ask(PNG), stream=False)
    assert requests_by_model(sim) == {"gpt-4.1-mini": 1, "claude-haiku-4-5": 2}
    answer_of(client, "mixed", [{"role": "user", "content": QUESTION}], stream=False)
    assert requests_by_model(sim)[TEXT_ONLY] == 2  # proposer and aggregator


def test_a_layer_that_cannot_meet_its_quorum_is_a_400_naming_it(
    client: openai.OpenAI, sim: SimulatorServer
) -> None:
    """``short`` with a URL image: the text-only model and Gemini leave, one proposer remains for a
    quorum of 2. Refused before any call, naming the layer and why each model left; the same
    preset with a data URL (which Gemini takes) runs."""
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="short", messages=ask(URL), stream=stream)  # type: ignore[arg-type]
        error = err.value.body
        assert isinstance(error, dict) and error["param"] == "messages", error
        assert error["code"] == "images_not_supported"
        assert "layer 1 cannot meet its quorum of 2" in error["message"]
        assert f"openai/{TEXT_ONLY} (no vision)" in error["message"]
        assert "gemini/gemini-2.5-flash (its API takes no image URL)" in error["message"]
    assert sim_total_requests(sim) == 0
    answer_of(client, "short", ask(PNG), stream=False)
    assert requests_by_model(sim) == {"gpt-4.1-mini": 1, "gemini-2.5-flash": 1, "claude-haiku-4-5": 1}


def test_an_aggregator_chain_without_vision_is_a_400(sim: SimulatorServer, tmp_path: Path) -> None:
    blind = {"presets": {"blind": {"aggregators": [{"provider": "openai", "model": TEXT_ONLY}]}}}
    with ApiServer(configured(sim, tmp_path, **blind)) as api:
        r = httpx.post(api.url + "/v1/chat/completions", json={"model": "blind", "messages": ask(PNG)})
    assert r.status_code == 400, r.text
    assert "no aggregator of the plan sees the request's images" in r.json()["error"]["message"]
    assert sim_total_requests(sim) == 0


def test_the_moa_endpoint_takes_images_too(server: ApiServer, sim: SimulatorServer) -> None:
    r = httpx.post(server.url + "/v1/moa", json={"preset": "moa-lite", "messages": ask(PNG)}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["text"].startswith("Looking at the image you sent (a 64x48 PNG)")
    bad = httpx.post(server.url + "/v1/moa", json={"preset": "short", "messages": ask(URL)})
    assert bad.status_code == 400 and "layer 1" in bad.json()["error"]["message"]


@pytest.mark.parametrize(
    ("part", "says"),
    [
        (
            {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}},
            "https:// URL or a data: URL",
        ),
        (
            {"type": "image_url", "image_url": {"url": URL, "detail": "huge"}},
            "image_url.detail must be one of",
        ),
        (
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}},
            "unsupported image",
        ),
        ({"type": "image_url", "image_url": {"url": "data:image/png,plain"}}, "must hold base64 data"),
        ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "not input_audio"),
    ],
)
def test_a_malformed_image_part_is_a_400_naming_it(
    server: ApiServer, part: dict[str, Any], says: str
) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, part]}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "moa-lite", "messages": messages})
    assert r.status_code == 400, r.text
    assert says in r.json()["error"]["message"] and r.json()["error"]["param"] == "messages.0.content"


def test_an_image_outside_a_user_message_is_refused(server: ApiServer) -> None:
    image = {"type": "image_url", "image_url": {"url": URL}}
    messages = [{"role": "system", "content": [image]}, {"role": "user", "content": QUESTION}]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "moa-lite", "messages": messages})
    assert r.status_code == 400 and "in a system message" in r.json()["error"]["message"]


def test_the_caps_bound_images_by_count_and_bytes(sim: SimulatorServer, tmp_path: Path) -> None:
    size = image_part({"url": PNG}).nbytes
    caps = {"caps": {"max_images": 2, "max_image_bytes": 2 * size}}
    with ApiServer(configured(sim, tmp_path, **caps)) as api:
        chat = api.url + "/v1/chat/completions"
        ok = httpx.post(chat, json={"model": "single", "messages": ask(PNG, PNG)}, timeout=30)
        assert ok.status_code == 200, ok.text
        three = httpx.post(chat, json={"model": "single", "messages": ask(URL, URL, URL)})
        assert three.status_code == 400 and three.json()["error"]["param"] == "messages"
        assert "3 images, over the cap of 2 (caps.max_images)" in three.json()["error"]["message"]
        big = data_url(64, 49)  # a larger image: the two are over the bytes cap
        heavy = httpx.post(chat, json={"model": "single", "messages": ask(PNG, big)})
        assert heavy.status_code == 400 and "(caps.max_image_bytes)" in heavy.json()["error"]["message"]
    assert sim_total_requests(sim) == 1  # only the request within the caps was sent


def test_a_cost_cap_counts_the_image_tokens(
    client: openai.OpenAI, server: ApiServer, sim: SimulatorServer
) -> None:
    """A cap between what moa-lite may cost for the question alone and for the question with a
    2000x2000 image (each provider's rule: OpenAI's tiles, Anthropic's w*h/750, Gemini's 258 per
    tile): the question alone runs, with the image it is refused before any call."""
    big = data_url(2000, 2000)
    plan, params = server.config.presets["moa-lite"], GenerationParams(max_tokens=64)
    text = [ChatMessage(role="user", content=QUESTION)]
    pictured = [ChatMessage(role="user", content=QUESTION, images=(image_part({"url": big}),))]
    alone = project(server.config, plan, text, params).cost_usd
    with_image = project(server.config, plan, pictured, params).cost_usd
    assert with_image > alone * 1.5
    cap = {"moa": {"max_cost_usd": (alone + with_image) / 2}}
    client.chat.completions.create(
        model="moa-lite", messages=[{"role": "user", "content": QUESTION}], max_tokens=64, extra_body=cap
    )
    before = sim_total_requests(sim)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="moa-lite", messages=ask(big), max_tokens=64, extra_body=cap)  # type: ignore[arg-type]
    assert isinstance(err.value.body, dict) and err.value.body["param"] == "moa.max_cost_usd"
    assert sim_total_requests(sim) == before


def test_image_tokens_follow_each_providers_rule() -> None:
    """A 2000x2000 data URL: OpenAI (high) scales to 768x768, 4 tiles: 765; Anthropic scales to
    about 1,600 tokens; Gemini: 9 tiles of 258. A URL (size unknown) counts the largest image each
    rule bills: the projection errs high."""
    from moa.config import ProviderKind
    from moa.types import image_tokens

    big = (image_part({"url": data_url(2000, 2000)}),)
    assert image_tokens(ProviderKind.OPENAI, big) == 765
    assert image_tokens(ProviderKind.OPENAI, (image_part({"url": PNG, "detail": "low"}),)) == 85
    assert 1590 <= image_tokens(ProviderKind.ANTHROPIC, big) <= 1601
    assert image_tokens(ProviderKind.GEMINI, big) == 258 * 9
    url = (image_part({"url": URL}),)
    assert (
        image_tokens(ProviderKind.OPENAI, url) == 1445 and image_tokens(ProviderKind.ANTHROPIC, url) >= 1600
    )


def test_cache_keys_hash_the_image() -> None:
    plan = Plan(aggregators=({"provider": "openai", "model": "gpt-4.1"},))  # type: ignore[arg-type]
    params = GenerationParams()

    def keys(*urls: str) -> tuple[str, str]:
        images = tuple(image_part({"url": u}) for u in urls)
        messages = (ChatMessage(role="user", content=QUESTION, images=images),)
        req = CallRequest(provider="openai", model="gpt-4.1", messages=messages)
        return final_key("s", messages, plan, params), proposal_key("s", req)

    plain = keys()
    one, other, again = keys(PNG), keys(data_url(64, 49)), keys(PNG)
    assert one == again and len({plain[0], one[0], other[0], keys(URL)[0]}) == 4
    assert len({plain[1], one[1], other[1], keys(URL)[1]}) == 4


def test_a_cached_answer_is_served_only_for_the_same_image(sim: SimulatorServer, tmp_path: Path) -> None:
    cache = {"cache": {"enabled": True, "store": "sqlite"}, "state": {"dir": str(tmp_path / "state")}}
    with ApiServer(configured(sim, tmp_path, **cache)) as api:
        chat = api.url + "/v1/chat/completions"

        def status(url: str) -> str:
            r = httpx.post(chat, json={"model": "single", "messages": ask(url), "temperature": 0}, timeout=30)
            assert r.status_code == 200, r.text
            return r.headers["x-moa-cache"]

        assert [status(PNG), status(PNG), status(data_url(64, 49))] == ["miss", "hit-exact", "miss"]


def test_the_plan_a_request_with_images_runs(sim: SimulatorServer, tmp_path: Path) -> None:
    """moa.engine.vision on its own: every bundled model sees images (so every bundled preset runs
    whole); in ``mixed`` the text-only model leaves the layer, the chain and the fallbacks; a layer
    with no quorum set needs all that remain; without images a plan is left as it is."""
    from moa.engine.vision import for_images

    config = configured(sim, tmp_path)
    bundled = load_config(None)
    assert all(m.vision for p in bundled.providers.values() for m in p.models.values())
    shown = [ChatMessage(role="user", content=QUESTION, images=(image_part({"url": PNG}),))]
    assert all(for_images(bundled, preset, shown) is preset for preset in bundled.presets.values())
    pictured = [ChatMessage(role="user", content=QUESTION, images=(image_part({"url": URL}),))]
    mixed = for_images(config, config.presets["mixed"], pictured)
    assert [str(p) for p in mixed.layers[0].proposers] == [
        "openai/gpt-4.1-mini",
        "anthropic/claude-haiku-4-5",
    ]
    assert [str(a) for a in mixed.aggregators] == ["anthropic/claude-haiku-4-5"] and mixed.fallbacks == ()
    everyone = config.presets["mixed"].model_copy(
        update={"layers": (config.presets["mixed"].layers[0].model_copy(update={"quorum": None}),)}
    )
    assert for_images(config, everyone, pictured).layers[0].needed == 2
    text = [ChatMessage(role="user", content=QUESTION)]
    assert for_images(config, config.presets["mixed"], text) is config.presets["mixed"]


def test_a_question_with_images_gets_no_semantic_hit_and_its_format_is_the_images_own() -> None:
    """The semantic cache compares the last question's text: with an image, it has nothing to
    compare, so the question is never a rephrasing. A data URL that names another format than its
    bytes have is sent as what the bytes are (Anthropic and Gemini refuse a mismatch)."""
    from moa.cache.keys import split_last_user

    jpeg = data_url(16, 16, "JPEG").split(",", 1)[1]
    part = image_part({"url": "data:image/png;base64," + jpeg})
    assert part.media_type == "image/jpeg" and (part.width, part.height) == (16, 16)
    assert split_last_user([ChatMessage(role="user", content=QUESTION)]) is not None
    assert split_last_user([ChatMessage(role="user", content=QUESTION, images=(part,))]) is None


def test_auto_passes_over_a_cheaper_tier_that_cannot_see_the_image(
    sim: SimulatorServer, tmp_path: Path
) -> None:
    """``auto`` held to a cost cap moves to the nearest cheaper tier that fits: a tier whose
    aggregators cannot see the request's image is passed over, not a 400 for the whole request."""
    from moa.engine import vision
    from moa.engine.cost import fit_cost_cap
    from moa.plan import Complexity
    from moa.result import RouteDecision

    blind = {"presets": {"blind": {"aggregators": [{"provider": "openai", "model": TEXT_ONLY}]}}}
    tiers = {"router": {"tiers": {"simple": "single", "medium": "blind", "complex": "moa"}}}
    config = configured(sim, tmp_path, **blind, **tiers)
    messages = [ChatMessage(role="user", content=QUESTION, images=(image_part({"url": PNG}),))]
    params = GenerationParams(max_tokens=64)
    decision = RouteDecision(preset="moa", forced=False, complexity=Complexity.COMPLEX, reason="hard")
    shape = vision.shaped(config, Plan.as_run, messages)
    routed = (shape(config.presets["moa"]), decision, [])
    single = project(config, shape(config.presets["single"]), messages, params).cost_usd
    (_, chosen, _), projected = fit_cost_cap(config, routed, messages, params, single * 1.01, shape=shape)
    assert chosen.preset == "single" and projected.cost_usd == single
