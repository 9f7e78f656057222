"""Each adapter sends a user turn's images in its API's own shape, held to the providers' published
image requests (tests/fixtures/providers: OpenAI's "Image input" example, Anthropic's vision
guide's URL and base64 examples, Gemini's multimodal REST prompt), streamed and not.

The official SDKs send them over HTTP to a loopback server that records each body; the part of
the body that carries the conversation must be the reference's, field for field. The images are
the references' own (their URLs, their base64 JPEG), read by ``moa.api.images`` as the API reads
a client's ``image_url`` part.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from moa.api.images import image_part
from moa.providers.client import ProviderClient
from moa.types import CallRequest, CallResult, ChatMessage, ErrorKind, TextDelta
from tests.test_fidelity import FixtureServer, load, raw, serve
from tests.test_providers import MODELS


async def call(client: ProviderClient, req: CallRequest, stream: bool) -> CallResult:
    if not stream:
        return await client.complete(req)
    result = None
    async for ev in client.stream(req):
        if not isinstance(ev, TextDelta):
            result = ev
    assert result is not None
    return result


def request(provider: str, text: str, url: str) -> CallRequest:
    message = ChatMessage(role="user", content=text, images=(image_part({"url": url}),))
    return CallRequest(provider=provider, model=MODELS[provider], messages=(message,))


def body(served: FixtureServer) -> dict[str, Any]:
    ((_, _, sent),) = served.requests
    assert isinstance(sent, dict)
    return sent


REPLIES = {
    "openai": ("openai/chat_completion_image.response.json", "openai/chat_completion.stream.sse"),
    "anthropic": ("anthropic/message.response.json", "anthropic/stream.sse"),
    "gemini": ("gemini/image.response.json", "gemini/stream.sse"),
}


def reply(served: FixtureServer, provider: str, stream: bool) -> None:
    serve(served, raw(REPLIES[provider][stream]))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_openai_sends_the_reference_image_url_part(
    served: FixtureServer, served_clients: dict[str, ProviderClient], stream: bool
) -> None:
    ref = load("openai/chat_completion_image.request.json")["messages"]
    (text, image) = ref[0]["content"]
    reply(served, "openai", stream)
    res = await call(
        served_clients["openai"], request("openai", text["text"], image["image_url"]["url"]), stream
    )
    assert res.ok, res.error
    assert body(served)["messages"] == ref


async def test_openai_sends_a_data_url_and_a_chosen_detail_as_given(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    jpeg = load("anthropic/image_base64.request.json")["messages"][0]["content"][0]["source"]["data"]
    url = "data:image/jpeg;base64," + jpeg
    message = ChatMessage(role="user", content="", images=(image_part({"url": url, "detail": "low"}),))
    reply(served, "openai", False)
    res = await served_clients["openai"].complete(
        CallRequest(provider="openai", model=MODELS["openai"], messages=(message,))
    )
    assert res.ok, res.error
    parts = [{"type": "image_url", "image_url": {"url": url, "detail": "low"}}]  # no empty text part
    assert body(served)["messages"] == [{"role": "user", "content": parts}]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("fixture", ["image_url", "image_base64"])
async def test_anthropic_sends_the_vision_guides_image_blocks(
    served: FixtureServer, served_clients: dict[str, ProviderClient], fixture: str, stream: bool
) -> None:
    """A URL as a ``url`` source, a data URL as a ``base64`` source with its media type: the
    guide's two examples, image first and the question after it."""
    ref = load(f"anthropic/{fixture}.request.json")["messages"]
    (image, text) = ref[0]["content"]
    source = image["source"]
    url = source.get("url") or f"data:{source['media_type']};base64,{source['data']}"
    reply(served, "anthropic", stream)
    res = await call(served_clients["anthropic"], request("anthropic", text["text"], url), stream)
    assert res.ok, res.error
    assert body(served)["messages"] == ref


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_gemini_sends_the_cookbooks_inline_data(
    served: FixtureServer, served_clients: dict[str, ProviderClient], stream: bool
) -> None:
    """The REST cookbook's multimodal prompt: the text, then the image as inline data (the SDK
    names the part ``inlineData`` and writes the bytes in base64's URL-safe alphabet: the REST
    API, which reads them as protobuf's JSON does, takes both spellings and both alphabets)."""
    ref = load("gemini/image.request.json")["contents"]
    (text, image) = ref[0]["parts"]
    inline = image["inline_data"]
    reply(served, "gemini", stream)
    url = f"data:{inline['mime_type']};base64,{inline['data']}"
    res = await call(served_clients["gemini"], request("gemini", text["text"], url), stream)
    assert res.ok, res.error
    (content,) = body(served)["contents"]
    (sent_text, sent_image) = content["parts"]
    assert content["role"] == "user" and sent_text == text and list(sent_image) == ["inlineData"]
    sent = sent_image["inlineData"]
    assert sent.keys() == inline.keys() and sent["mime_type"] == inline["mime_type"]
    assert base64.urlsafe_b64decode(sent["data"]) == base64.b64decode(inline["data"])


async def test_gemini_refuses_an_image_url_unsent(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    """Gemini's API takes no image URL and the service fetches none: a plan never sends one there
    (moa.engine.vision), and one that came anyway is refused before anything is sent."""
    reply(served, "gemini", False)
    res = await served_clients["gemini"].complete(
        request("gemini", "What is this?", "https://example.com/a.png")
    )
    assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST
    assert "not by URL" in res.error.message and served.requests == []


async def test_an_image_part_a_program_builds_itself_is_measured_and_sent_whole(
    served: FixtureServer, served_clients: dict[str, ProviderClient]
) -> None:
    """``moa.ImagePart(url=...)`` built by a program embedding the engine (not read by the API):
    a data URL's format and size are read from its header all the same, so Anthropic is sent the
    guide's base64 block; a data URL holding no image is refused when built."""
    import pydantic

    from moa import ImagePart

    ref = load("anthropic/image_base64.request.json")["messages"]
    (image, text) = ref[0]["content"]
    source = image["source"]
    part = ImagePart(url=f"data:{source['media_type']};base64,{source['data']}")
    assert (part.media_type, part.width, part.height) == ("image/jpeg", 64, 48)
    reply(served, "anthropic", False)
    message = ChatMessage(role="user", content=text["text"], images=(part,))
    res = await served_clients["anthropic"].complete(
        CallRequest(provider="anthropic", model=MODELS["anthropic"], messages=(message,))
    )
    assert res.ok, res.error
    assert body(served)["messages"] == ref
    with pytest.raises(pydantic.ValidationError, match="must hold a base64 PNG, JPEG, GIF or WebP"):
        ImagePart(url="data:image/png;base64,bm90IGFuIGltYWdl")
