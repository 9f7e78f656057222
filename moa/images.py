"""Images a request carries, read without an imaging library and without ever fetching a URL.

What both the service (the API's ``image_url`` parts, the cost projection) and the provider
simulator need to know of an image:

- decoding a base64 payload, and a data URL's media type and payload;
- reading the format and size from the header of a PNG, JPEG, GIF or WebP (``sniff``), so an
  image sent as data is measured exactly;
- each provider's published rule for what an image costs in input tokens (``openai_tokens``,
  ``anthropic_tokens``, ``gemini_tokens``).

An image given by URL is never fetched (no request the service makes on a client's behalf): its
size is unknown, and it is counted as ``ASSUMED_SIZE`` square. That errs low for larger images
and high for smaller ones.
"""

from __future__ import annotations

import base64
import binascii
import math
import re

# The size assumed for an image nobody here can see (a URL never fetched, a Gemini file URI): a
# typical upload. Larger images cost more on the real APIs, smaller ones less.
ASSUMED_SIZE = 1024

# Formats by the media type each API names them with, and by their header's magic bytes.
PNG, JPEG, GIF, WEBP = "image/png", "image/jpeg", "image/gif", "image/webp"

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
