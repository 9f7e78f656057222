"""A chat message's ``image_url`` parts, checked as OpenAI's API checks them, into ``ImagePart``s.

An image is an ``https://`` URL, which the service never fetches (it is passed on only to the
providers whose APIs take URLs), or a ``data:`` URL holding a PNG, JPEG, GIF or WebP in base64,
whose format and size are read from its header here (for the cost projection and the caps).
Anything else is refused with a 400 naming the part.
"""

from __future__ import annotations

from typing import Any, get_args

from moa.images import GIF, JPEG, PNG, WEBP, b64decode, parse_data_url, sniff
from moa.types import ImageDetail, ImagePart

# The formats every provider's API takes (Gemini's leaves GIF out of its list, but reads it).
FORMATS = (PNG, JPEG, GIF, WEBP)
_DETAILS = get_args(ImageDetail)


def image_part(raw: Any) -> ImagePart:
    """The ``image_url`` object of a content part as an ``ImagePart``; ``ValueError`` (its message
    the client's to read) if it is not one this service can pass on."""
    if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
        raise ValueError("an image_url part needs an image_url object with a url")
    url: str = raw["url"]
    detail = raw.get("detail", "auto")
    if detail not in _DETAILS:
        raise ValueError(f"image_url.detail must be one of {', '.join(_DETAILS)}, not {detail!r}")
    if url.startswith("https://") and len(url) > len("https://"):
        return ImagePart(url=url, detail=detail)
    found = parse_data_url(url) if url.startswith("data:") else None
    if found is None:
        raise ValueError("an image_url's url must be an https:// URL or a data: URL (base64)")
    media_type, is_base64, payload = found
    data = b64decode(payload) if is_base64 else None
    if data is None:
        raise ValueError("an image data URL must hold base64 data (data:image/png;base64,...)")
    seen = sniff(data)
    if media_type not in FORMATS or seen is None:
        raise ValueError(
            "You uploaded an unsupported image. Please make sure your image is valid and of one of "
            "the following formats: ['png', 'jpeg', 'gif', 'webp']."
        )
    kind, width, height = seen
    return ImagePart(url=url, detail=detail, media_type=kind, width=width, height=height)
