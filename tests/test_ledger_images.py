"""A request with images is billed as its providers bill it, even when it is cut: the estimate of a
call cut before its provider reported its usage counts the images' tokens by the provider's rule
(``moa.types.image_tokens``), as the simulator's invoice does. The text-only cases, and the
helpers used here, are in test_ledger.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from moa.config import SimulatorMode, load_config
from moa.simulator.server import SimulatorServer
from moa.state import to_micro
from moa.state.sqlite_store import SQLiteStore
from tests.helpers import ApiServer, set_pace, sim_stats
from tests.test_ledger import invoice, margin_usd, spend_of
from tests.test_simulator_structured import data_url

# A 2000x2000 PNG: 765 tokens on OpenAI's tile rule, about 1,600 on Anthropic's, 2,322 on Gemini's.
PICTURE = data_url(2000, 2000)


@pytest.fixture
def api(sim: SimulatorServer, state_dir: Path) -> Iterator[ApiServer]:
    set_pace(sim, ttft_s=0.02, tokens_per_s=40.0)  # slow enough to hang up mid-answer
    cfg = load_config(None)
    cfg = cfg.model_copy(
        update={"simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON})}
    )
    with ApiServer(cfg, store=lambda: SQLiteStore(state_dir / "state.db")) as s:
        yield s


@pytest.mark.parametrize("preset", ["single", "moa-lite"])
def test_a_stream_with_an_image_the_client_hangs_up_on_is_billed_as_the_provider_bills_it(
    api: ApiServer, sim: SimulatorServer, state_dir: Path, preset: str
) -> None:
    """The client reads three chunks and hangs up: the key is charged at least the simulator's
    invoice, every image token of every prompt included, and at most the cut margin above it."""
    content = [
        {"type": "text", "text": "Describe this picture in detail."},
        {"type": "image_url", "image_url": {"url": PICTURE}},
    ]

    async def hang_up(http: httpx.AsyncClient) -> None:
        messages = [{"role": "user", "content": content}]
        body = {"model": preset, "messages": messages, "stream": True, "max_tokens": 300}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                    chunks += 1
                    if chunks == 3:
                        break

    spent = spend_of(api, sim, state_dir, hang_up)
    billed, _ = invoice(sim, api.config)
    cuts = sum(s["cancelled"] for s in sim_stats(sim).values())
    assert cuts >= 1
    most = to_micro(billed) + margin_usd(api.config, cuts) + 2  # rounding: a micro-dollar a request
    assert to_micro(billed) <= spent <= most, (spent, billed)


def test_the_estimate_of_a_cut_call_counts_its_images() -> None:
    """The engine's own estimate (what a cut call is charged when no receipt of it arrives, as on
    Ray when a provider replica is lost): the prompt's text and its images, by the provider's rule."""
    from moa.api.images import image_part
    from moa.engine.calls import cut_result, prompt_tokens
    from moa.types import CallRequest, ChatMessage, ErrorKind, image_tokens

    config = load_config(None)
    image = image_part({"url": PICTURE})
    messages = (ChatMessage(role="user", content="Describe it.", images=(image,)),)
    for provider, model in (
        ("openai", "gpt-4.1"),
        ("anthropic", "claude-haiku-4-5"),
        ("gemini", "gemini-2.5-flash"),
    ):
        req = CallRequest(provider=provider, model=model, messages=messages)
        cut = cut_result(config, req, "", ErrorKind.CANCELLED, "cut", 0.1)
        kind = config.providers[provider].kind.value
        assert cut.usage.input_tokens == prompt_tokens(messages) + image_tokens(kind, (image,))
        assert image_tokens(kind, (image,)) >= 765
