"""Images in a request, whatever the wire: what each one is, its size, and what it costs in tokens.

Each protocol module parses its own image parts (OpenAI's ``image_url``, Anthropic's ``image``
blocks, Gemini's ``inlineData`` and ``fileData``) and refuses malformed ones in its API's words;
this module does what they share (the header decoding and the token rules live in ``moa.images``,
which the service reads images with too):

- decoding a base64 payload and reading the image's format and size from its header (PNG, JPEG,
  GIF, WebP), without any imaging library: a data URL's image is measured exactly;
- never fetching a URL: an image given by URL (or a Gemini file URI) is assumed to be
  ``ASSUMED_SIZE`` square, so its token count errs low for larger images and high for smaller;
- each provider's published token rule (``openai_tokens``, ``anthropic_tokens``,
  ``gemini_tokens``), so usage counts images as the real APIs bill them;
- which models see images at all (``vision_capable``: the well-known vision models by name; a
  profile's ``vision`` overrides it), and the sentence an answer opens with to acknowledge the
  images it was shown (``acknowledgement``), which is how a test sees that an image arrived.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# Shared with the service (moa.images): header decoding and the providers' token rules.
from moa.images import (
    ASSUMED_SIZE,
    GIF,
    JPEG,
    PNG,
    WEBP,
    anthropic_tokens,
    b64decode,
    gemini_tokens,
    openai_tokens,
    parse_data_url,
    sniff,
)

__all__ = [
    "ASSUMED_SIZE",
    "Image",
    "acknowledgement",
    "anthropic_tokens",
    "assumed",
    "b64decode",
    "gemini_tokens",
    "openai_tokens",
    "parse_data_url",
    "sniff",
    "vision_capable",
]

_SHORT = {PNG: "PNG", JPEG: "JPEG", GIF: "GIF", WEBP: "WebP"}

# Model names (fnmatch globs) known to take images, and those known not to, the latter checked
# first: OpenAI's GPT-4o, 4.1, 4.5, 5 and o-series reasoning models (not o1-mini or o3-mini),
# Claude 3 and 4 (not 3.5 Haiku, which launched text-only), every Gemini model. Anything else
# (a self-hosted model, a made-up name) is text-only unless its profile says ``vision: true``.
_TEXT_ONLY = ("gpt-3.5*", "gpt-4", "gpt-4-0*", "gpt-4-32k*", "o1-mini*", "o3-mini*", "claude-3-5-haiku*")
_VISION = (
    "gpt-4o*",
    "chatgpt-4o*",
    "gpt-4-turbo*",
    "gpt-4-vision*",
    "gpt-4.1*",
    "gpt-4.5*",
    "gpt-5*",
    "o1",
    "o1-20*",
    "o1-pro*",
    "o3",
    "o3-20*",
    "o3-pro*",
    "o4-mini*",
    "claude-3*",
    "claude-sonnet-4*",
    "claude-opus-4*",
    "claude-haiku-4*",
    "claude-4*",
    "gemini-*",
)


def vision_capable(model: str) -> bool:
    """Whether ``model``'s real API takes images, by its name (the simulator's default)."""
    if any(fnmatch.fnmatchcase(model, p) for p in _TEXT_ONLY):
        return False
    return any(fnmatch.fnmatchcase(model, p) for p in _VISION)


@dataclass(frozen=True, slots=True)
class Image:
    """One image a request carries, as the simulator understood it."""

    source: Literal["data", "url", "file"]
    media_type: str | None
    width: int
    height: int
    # Whether the size was read from the image itself (a data URL, base64 data); else assumed.
    measured: bool
    # Its input tokens by the provider's rule (set by the wire that parsed it).
    tokens: int = 0
    # Where the image sits in the request, in the API's own path syntax (for a refusal naming it).
    where: str = ""
    # The index of the transcript turn that carries it (the answer acknowledges the last turn's).
    turn: int = 0
    # OpenAI's detail level (low, high, auto); the other APIs have none.
    detail: str = "auto"

    def describe(self) -> str:
        """How the answer names it: "a 640x480 PNG", or, for an image it did not see, where from."""
        if not self.measured:
            how = {"url": "by URL, not fetched", "file": "by file reference, not fetched"}.get(
                self.source, f"in a format not read ({self.media_type})"
            )
            return f"an image {how} (counted as {self.width}x{self.height})"
        return f"a {self.width}x{self.height} {_SHORT.get(self.media_type or '', 'image')}"

    def summary(self) -> dict[str, object]:
        """What ``GET /admin/requests`` shows of it."""
        return {
            "source": self.source,
            "media_type": self.media_type,
            "width": self.width,
            "height": self.height,
            "measured": self.measured,
            "tokens": self.tokens,
        }


def assumed(source: Literal["url", "file"], media_type: str | None = None) -> Image:
    """An image the simulator does not see: ``ASSUMED_SIZE`` square."""
    return Image(source, media_type, ASSUMED_SIZE, ASSUMED_SIZE, measured=False)


def acknowledgement(images: Sequence[Image]) -> str:
    """The sentence an answer opens with when the question carried images, naming each one, so a
    test (and a reader) can tell the images arrived and how the simulator read them."""
    if not images:
        return ""
    said = "; ".join(i.describe() for i in images)
    if len(images) == 1:
        return f"Looking at the image you sent ({said}): "
    return f"Looking at the {len(images)} images you sent ({said}): "
