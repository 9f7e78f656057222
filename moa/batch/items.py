"""A batch's input: one chat completion request per line, read whole before anything is sent.

Two line shapes are accepted. OpenAI's Batch API input (``custom_id``, ``method``, ``url``,
``body``), so a file prepared for OpenAI runs here unchanged; and a plain ``{"prompt": ...}`` (with
an optional ``custom_id``), the quickest way to put a list of questions through a preset. The whole
file is checked before the first request: a batch that fails on line 1,800 after paying for 1,799
answers is the mistake this module exists to prevent. Bodies themselves are checked by the API
they are sent to, item by item, exactly as a client's request would be.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

# The endpoints a batch line may name: the OpenAI-compatible one and this service's own.
ENDPOINTS = ("/v1/chat/completions", "/v1/moa")


class InputError(ValueError):
    """The input file cannot run as a batch; the message names the line and what is wrong."""


class BatchItem(BaseModel):
    """One request of a batch."""

    custom_id: str = Field(description="The caller's id of the item, unique in the batch.")
    url: str = Field(description="The endpoint the body is sent to (one of ENDPOINTS).")
    body: dict[str, Any] = Field(description="The request body, as the endpoint takes it.")
    line: int = Field(description="Its line in the input file (1-based), for error messages.")

    def fingerprint(self) -> str:
        """Equal for items whose requests are the same (endpoint and body), whatever their ids:
        the batch sends such a request once and writes its answer under every id."""
        canonical = json.dumps([self.url, self.body], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def _item(raw: Any, line: int, preset: str) -> BatchItem:
    if not isinstance(raw, dict):
        raise InputError(f"line {line}: expected a JSON object, got {type(raw).__name__}")
    if "prompt" in raw:
        extra = set(raw) - {"prompt", "custom_id"}
        if extra:
            raise InputError(
                f"line {line}: a prompt line takes only 'prompt' and 'custom_id', not {sorted(extra)}"
            )
        if not isinstance(raw["prompt"], str) or not raw["prompt"].strip():
            raise InputError(f"line {line}: 'prompt' must be a non-empty string")
        body: dict[str, Any] = {"model": preset, "messages": [{"role": "user", "content": raw["prompt"]}]}
        custom_id = str(raw.get("custom_id", f"line-{line}"))
        return BatchItem(custom_id=custom_id, url=ENDPOINTS[0], body=body, line=line)
    missing = [k for k in ("custom_id", "body") if k not in raw]
    if missing:
        raise InputError(
            f"line {line}: missing {', '.join(missing)} (a line is OpenAI's batch input or a 'prompt')"
        )
    method, url = raw.get("method", "POST"), raw.get("url", ENDPOINTS[0])
    if method != "POST":
        raise InputError(f"line {line}: method must be POST, not {method!r}")
    if url not in ENDPOINTS:
        raise InputError(f"line {line}: url must be one of {', '.join(ENDPOINTS)}, not {url!r}")
    if not isinstance(raw["body"], dict):
        raise InputError(f"line {line}: body must be a JSON object")
    if not isinstance(raw["custom_id"], str) or not raw["custom_id"]:
        raise InputError(f"line {line}: custom_id must be a non-empty string")
    body = dict(raw["body"])
    if body.get("stream"):
        raise InputError(f"line {line}: a batch item cannot stream (remove 'stream')")
    body.setdefault("model", preset)
    return BatchItem(custom_id=raw["custom_id"], url=url, body=body, line=line)


def parse_items(lines: Iterable[str], preset: str) -> list[BatchItem]:
    """The items of a batch file's lines; ``preset`` is the model of every item that names none.
    Raises ``InputError`` for the first line that cannot run, or for an id used twice."""
    items: list[BatchItem] = []
    seen: dict[str, int] = {}
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"line {n}: not JSON ({e.msg} at column {e.colno})") from None
        item = _item(raw, n, preset)
        if item.custom_id in seen:
            first = seen[item.custom_id]
            raise InputError(f"line {n}: custom_id {item.custom_id!r} is already used on line {first}")
        seen[item.custom_id] = n
        items.append(item)
    if not items:
        raise InputError("the input has no items")
    return items


def read_items(path: Path, preset: str) -> list[BatchItem]:
    """The items of the batch file at ``path`` (see ``parse_items``)."""
    try:
        with path.open(encoding="utf-8") as f:
            return parse_items(f, preset)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
