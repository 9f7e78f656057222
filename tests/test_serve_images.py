"""Images through the Ray app (the session cluster, two nodes): the same requests as
test_api_images.py's, through the ingress, the provider deployments on the worker node and back.
A user turn's images cross the object store with its text (``ChatMessage.images``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import openai
import pytest

from moa.simulator.server import SimulatorServer
from tests.helpers import RAY_MODULE, sim_requests
from tests.test_api_images import PNG, URL, ask

pytestmark = RAY_MODULE


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_images_on_the_ray_app(url: str, sim: SimulatorServer, cluster: dict[str, Any], stream: bool) -> None:
    """A data URL reaches every model of moa-lite and the answer is about it; a URL reaches every
    model but Gemini's, which is not tried."""
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for image, says, models in (
        (PNG, "(a 64x48 PNG)", {"gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash", "gpt-4.1"}),
        (URL, "(an image by URL, not fetched", {"gpt-4.1-mini", "claude-haiku-4-5", "gpt-4.1"}),
    ):
        before = len(sim_requests(sim))
        if stream:
            chunks = client.chat.completions.create(model="moa-lite", messages=ask(image), stream=True)  # type: ignore[arg-type]
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            r = client.chat.completions.create(model="moa-lite", messages=ask(image))  # type: ignore[arg-type]
            text = r.choices[0].message.content or ""
        assert text.startswith("Looking at the image you sent " + says), text
        sent = sim_requests(sim)[before:]
        assert set(Counter(r["model"] for r in sent)) == models
        assert all(r["images"] for r in sent)
