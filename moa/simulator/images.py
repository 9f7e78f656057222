"""Images in a request, whatever the wire: what each one is, its size, and what it costs in tokens.

Each protocol module parses its own image parts (OpenAI's ``image_url``, Anthropic's ``image``
blocks, Gemini's ``inlineData`` and ``fileData``) and refuses malformed ones in its API's words;
this module does what they share:

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

import base64
import binascii
import fnmatch
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# The size assumed for an image the simulator cannot see (a URL it never fetches, a Gemini file
# URI): a typical upload. Larger images cost more on the real APIs, smaller ones less.
ASSUMED_SIZE = 1024

# Formats by the media type each API names them with, and by their header's magic bytes.
PNG, JPEG, GIF, WEBP = "image/png", "image/jpeg", "image/gif", "image/webp"
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


_B64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


def b64decode(data: str, *, lenient: bool = False) -> bytes | None:
    """Strict base64 (RFC 4648, padded), or None when it is not. ``lenient``: as protobuf's JSON
    reader takes bytes (Gemini), the URL-safe alphabet and missing padding are accepted too."""
    text = data
    if lenient:
        text = text.replace("-", "+").replace("_", "/")
        text += "=" * (-len(text.rstrip("=")) % 4) if not text.endswith("=") else ""
    if not _B64.match(text) or len(text) % 4:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


_DATA_URL = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),(.*)$", re.DOTALL)


def parse_data_url(url: str) -> tuple[str, bool, str] | None:
    """A data URL's media type, whether it says base64, and its payload; None if not one."""
    m = _DATA_URL.match(url)
    if m is None:
        return None
    params = [p.strip().lower() for p in m.group(2).split(";") if p.strip()]
    return m.group(1).strip().lower(), "base64" in params, m.group(3)


def sniff(data: bytes) -> tuple[str, int, int] | None:
    """The format and size a PNG, JPEG, GIF or WebP header gives, or None for anything else (or a
    header too short to say)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and data[12:16] == b"IHDR":
        return PNG, int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return GIF, int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp(data)
    if data[:2] == b"\xff\xd8":
        return _jpeg(data)
    return None


def _webp(data: bytes) -> tuple[str, int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        w = int.from_bytes(data[26:28], "little") & 0x3FFF
        h = int.from_bytes(data[28:30], "little") & 0x3FFF
        return WEBP, w, h
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return WEBP, (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return WEBP, int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


# JPEG start-of-frame markers (baseline, progressive, lossless...; not DHT, JPG or DAC).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg(data: bytes) -> tuple[str, int, int] | None:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xDA)):  # markers without a length
            i += 2
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in _SOF and i + 9 <= len(data):
            return (
                JPEG,
                int.from_bytes(data[i + 7 : i + 9], "big"),
                int.from_bytes(data[i + 5 : i + 7], "big"),
            )
        i += 2 + length
    return None


# -- what an image costs, by each provider's published rule ------------------------------------------


def openai_tokens(width: int, height: int, detail: str) -> int:
    """OpenAI's rule for its tile-priced models (GPT-4o, 4.1, o-series): ``low`` is 85 tokens;
    otherwise the image is scaled to fit 2048x2048, then its shortest side to 768, and each
    512px tile costs 170 on top of the 85. ``auto`` is counted as ``high`` (the API picks; it errs
    high). Models priced by 32px patches (GPT-4.1 mini and nano, o4-mini) and GPT-4o mini's
    larger multipliers are not modelled."""
    if detail == "low":
        return 85
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    return 85 + 170 * math.ceil(w / 512) * math.ceil(h / 512)


def anthropic_tokens(width: int, height: int) -> int:
    """Anthropic's rule: width x height / 750, after an image whose long edge passes 1568px or
    whose count passes about 1,600 tokens is scaled down to fit both."""
    scale = min(1.0, 1568 / max(width, height, 1), math.sqrt(1600 * 750 / max(width * height, 1)))
    return max(1, math.ceil((width * scale) * (height * scale) / 750))


def gemini_tokens(width: int, height: int) -> int:
    """Gemini's rule (2.0 and later): 258 tokens for an image no larger than 384px both ways;
    a larger one is cut into 768x768 tiles of 258 tokens each."""
    if width <= 384 and height <= 384:
        return 258
    return 258 * math.ceil(width / 768) * math.ceil(height / 768)


def acknowledgement(images: Sequence[Image]) -> str:
    """The sentence an answer opens with when the question carried images, naming each one, so a
    test (and a reader) can tell the images arrived and how the simulator read them."""
    if not images:
        return ""
    said = "; ".join(i.describe() for i in images)
    if len(images) == 1:
        return f"Looking at the image you sent ({said}): "
    return f"Looking at the {len(images)} images you sent ({said}): "
