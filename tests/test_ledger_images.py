"""A request with images is billed as its providers bill it, even when it is cut: the estimate of a
call cut before its provider reported its usage counts the images' tokens by the provider's rule
(``moa.types.image_tokens``), as the simulator's invoice does. The text-only cases, and the
helpers used here, are in test_ledger.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from moa.config import load_config
from moa.simulator.server import SimulatorServer
from tests.helpers import ApiServer
from tests.test_ledger import billed_within_the_cut_margin, hang_up, slow_api, spend_of
from tests.test_simulator_structured import data_url

# A 2000x2000 PNG: 765 tokens on OpenAI's tile rule, about 1,600 on Anthropic's, 2,322 on Gemini's.
PICTURE = data_url(2000, 2000)


@pytest.fixture
def api(sim: SimulatorServer, state_dir: Path) -> Iterator[ApiServer]:
    with slow_api(sim, state_dir) as s:
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
    spent = spend_of(api, sim, state_dir, hang_up(preset, [{"role": "user", "content": content}]))
    cuts = billed_within_the_cut_margin(spent, sim, api.config)
    assert cuts >= 1


def test_the_estimate_of_a_cut_call_counts_its_images() -> None:
    """The engine's own estimate (what a cut call is charged when no receipt of it arrives, as on
    Ray when a provider replica is lost): the prompt's text and its images, by the provider's rule."""
    from moa.api.images import image_part
    from moa.engine.calls import cut_result
    from moa.tokens import approx_message_tokens
    from moa.types import CallRequest, ChatMessage, ErrorKind, image_tokens, prompt_texts

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
        text = approx_message_tokens(prompt_texts(messages))
        assert cut.usage.input_tokens == text + image_tokens(kind, (image,))
        assert image_tokens(kind, (image,)) >= 765
