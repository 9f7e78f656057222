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
    """The input file cannot run as a batch; the message names the line and what is wrong.

    ``line`` (1-based; None for the file as a whole), ``code`` and ``param`` say the same for a
    program: the Batch API lists them in a failed batch's ``errors.data``, as OpenAI does."""

    def __init__(
        self, message: str, line: int | None = None, code: str = "invalid_request", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.message, self.line, self.code, self.param = message, line, code, param


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


def _item(raw: Any, line: int, preset: str, endpoint: str | None) -> BatchItem:
    def bad(what: str, code: str = "invalid_request", param: str | None = None) -> InputError:
        return InputError(f"line {line}: {what}", line, code, param)

    if not isinstance(raw, dict):
        raise bad(f"expected a JSON object, got {type(raw).__name__}")
    if "prompt" in raw and endpoint is None:
        extra = set(raw) - {"prompt", "custom_id"}
        if extra:
            raise bad(f"a prompt line takes only 'prompt' and 'custom_id', not {sorted(extra)}")
        if not isinstance(raw["prompt"], str) or not raw["prompt"].strip():
            raise bad("'prompt' must be a non-empty string", "invalid_value", "prompt")
        body: dict[str, Any] = {"model": preset, "messages": [{"role": "user", "content": raw["prompt"]}]}
        custom_id = str(raw.get("custom_id", f"line-{line}"))
        return BatchItem(custom_id=custom_id, url=ENDPOINTS[0], body=body, line=line)
    # OpenAI's lines name their method and url; the command's may leave them out (POST, chat).
    required = ("custom_id", "body") if endpoint is None else ("custom_id", "method", "url", "body")
    missing = [k for k in required if k not in raw]
    if missing:
        shapes = "OpenAI's batch input or a 'prompt'" if endpoint is None else "OpenAI's batch input"
        raise bad(
            f"missing {', '.join(missing)} (a line is {shapes})", "missing_required_parameter", missing[0]
        )
    method, url = raw.get("method", "POST"), raw.get("url", ENDPOINTS[0])
    if method != "POST":
        raise bad(f"method must be POST, not {method!r}", "invalid_value", "method")
    if endpoint is not None and url != endpoint:
        raise bad(f"url must be the batch's endpoint {endpoint}, not {url!r}", "mismatched_endpoint", "url")
    if url not in ENDPOINTS:
        raise bad(f"url must be one of {', '.join(ENDPOINTS)}, not {url!r}", "invalid_url", "url")
    if not isinstance(raw["body"], dict):
        raise bad("body must be a JSON object", "invalid_value", "body")
    if not isinstance(raw["custom_id"], str) or not raw["custom_id"]:
        raise bad("custom_id must be a non-empty string", "invalid_value", "custom_id")
    body = dict(raw["body"])
    if body.get("stream"):
        raise bad("a batch item cannot stream (remove 'stream')", "invalid_value", "body.stream")
    body.setdefault("model", preset)
    return BatchItem(custom_id=raw["custom_id"], url=url, body=body, line=line)


def _line(text: str, n: int, preset: str, endpoint: str | None, seen: dict[str, int]) -> BatchItem:
    """Line ``n``'s item; ``seen``: the ids of the lines before it, and where."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(
            f"line {n}: not JSON ({e.msg} at column {e.colno})", n, "invalid_json_line"
        ) from None
    item = _item(raw, n, preset, endpoint)
    if item.custom_id in seen:
        first = seen[item.custom_id]
        message = f"line {n}: custom_id {item.custom_id!r} is already used on line {first}"
        raise InputError(message, n, "duplicate_custom_id", "custom_id")
    return item


def check_items(
    lines: Iterable[str], preset: str, endpoint: str | None = None, max_errors: int = 1
) -> tuple[list[BatchItem], list[InputError]]:
    """The items of a batch file's lines, and what is wrong with them: every line is checked until
    ``max_errors`` are found. ``preset`` is the model of every item that names none; with an
    ``endpoint`` (the Batch API's batch), only OpenAI's line shape is taken, and its ``url`` must
    be that endpoint, as OpenAI requires."""
    items: list[BatchItem] = []
    errors: list[InputError] = []
    seen: dict[str, int] = {}
    for n, text in enumerate(lines, start=1):
        if len(errors) >= max_errors:
            break
        if not text.strip():
            continue
        try:
            item = _line(text, n, preset, endpoint, seen)
        except InputError as e:
            errors.append(e)
            continue
        seen[item.custom_id] = n
        items.append(item)
    if not items and not errors:
        errors.append(InputError("the input has no items", code="empty_file"))
    return items, errors


def parse_items(lines: Iterable[str], preset: str) -> list[BatchItem]:
    """The items of a batch file's lines; ``preset`` is the model of every item that names none.
    Raises ``InputError`` for the first line that cannot run, or for an id used twice."""
    items, errors = check_items(lines, preset)
    if errors:
        raise errors[0]
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
