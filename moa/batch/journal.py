"""A batch's output file, which is also its checkpoint.

Every finished item is one line appended to the output and flushed to disk (``fsync``) before the
next is counted as done, so the output itself says which items are done: a batch that stops for any
reason (Ctrl-C, a crash, a lost node, the budget) and is started again with the same output skips
exactly those, and pays for none of them twice. A line cut short by a crash (no newline, or not
JSON) is the one item that did not finish writing: it is removed and its item runs again.

Next to the output, ``<output>.status.json`` says how the run is going (items, when it started, its
state) for ``moa batch status``; the output stays the only record of what is done.

Lines follow OpenAI's Batch API output (``id``, ``custom_id``, ``response`` with ``status_code``,
``request_id`` and ``body``, and ``error``), so tools written for OpenAI's results read them, plus
``moa`` with what the item cost: ``cost_usd``, ``tokens`` and ``seconds``.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field


class Outcome(BaseModel):
    """One finished item, as its output line holds it."""

    custom_id: str = Field(description="The item's id from the input.")
    status_code: int | None = Field(
        description="The API's HTTP status, or None when no response came (``error`` says why)."
    )
    body: Any = Field(default=None, description="The API's response body, exactly as it answered.")
    request_id: str | None = Field(default=None, description="The response's trace id.")
    error: dict[str, str] | None = Field(
        default=None, description="Why no response came (``code``, ``message``); None when one did."
    )
    cost_usd: float = Field(default=0.0, description="What the item's request cost, as the service said.")
    tokens: int = Field(default=0, description="The request's tokens (prompt and completion, all calls).")
    seconds: float = Field(default=0.0, description="How long the request took, retries included.")

    @property
    def ok(self) -> bool:
        return self.status_code == 200

    @property
    def kind(self) -> str:
        """What went wrong, in one word (the API's error code, or the transport's): for counts."""
        if self.ok:
            return "ok"
        if self.error is not None:
            return self.error.get("code", "error")
        err = self.body.get("error") if isinstance(self.body, dict) else None
        code = err.get("code") if isinstance(err, dict) else None
        return str(code or f"http_{self.status_code}")

    def line(self) -> dict[str, Any]:
        response = None
        if self.status_code is not None:
            response = {"status_code": self.status_code, "request_id": self.request_id, "body": self.body}
        return {
            "id": f"batch_req_{uuid.uuid4().hex}",
            "custom_id": self.custom_id,
            "response": response,
            "error": self.error,
            "moa": {"cost_usd": self.cost_usd, "tokens": self.tokens, "seconds": round(self.seconds, 3)},
        }

    @classmethod
    def of_line(cls, line: dict[str, Any]) -> Outcome:
        response = line.get("response") or {}
        moa = line.get("moa") or {}
        return cls(
            custom_id=line["custom_id"],
            status_code=response.get("status_code"),
            body=response.get("body"),
            request_id=response.get("request_id"),
            error=line.get("error"),
            cost_usd=float(moa.get("cost_usd", 0.0)),
            tokens=int(moa.get("tokens", 0)),
            seconds=float(moa.get("seconds", 0.0)),
        )


def read_outcomes(path: Path) -> tuple[list[Outcome], int]:
    """The finished items an output file holds, and how many of its bytes hold them (the rest, a
    line a stopped run did not finish, is not an item). Reads only: a run may be appending."""
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    outcomes: list[Outcome] = []
    good = 0
    for raw in data.splitlines(keepends=True):
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("a line without its end")
            outcomes.append(Outcome.of_line(json.loads(raw)))
        except (ValueError, KeyError, TypeError):
            break
        good += len(raw)
    return outcomes, good


def _slim(outcome: Outcome) -> Outcome:
    """The outcome without its answer's body (only an error's code is kept, for the counts): what
    a run keeps of each done item, so its memory does not grow with the answers' text."""
    err = outcome.body.get("error") if isinstance(outcome.body, dict) else None
    code = err.get("code") if isinstance(err, dict) else None
    return outcome.model_copy(update={"body": {"error": {"code": code}} if code else None})


class Journal:
    """The output file of one batch, opened to append: ``done`` is what it already holds (each
    item without its answer's body: ``full`` reads one back from the file)."""

    def __init__(self, path: Path, retry_errors: bool = False) -> None:
        self.path = path
        self.status_path = path.with_name(path.name + ".status.json")
        self.done: dict[str, Outcome] = {}
        kept = self._read()
        if retry_errors and any(not o.ok for o in kept):
            kept = [o for o in kept if o.ok]
            self._rewrite(kept)
        self.done = {o.custom_id: _slim(o) for o in kept}
        self._file = path.open("a", encoding="utf-8")

    def _read(self) -> list[Outcome]:
        """The finished items in the file; a torn last line is cut off the file."""
        outcomes, good = read_outcomes(self.path)
        if self.path.exists() and good < self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(good)
        return outcomes

    def _rewrite(self, outcomes: list[Outcome]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for o in outcomes:
                f.write(json.dumps(o.line()) + "\n")
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(self.path)

    def write(self, outcome: Outcome) -> None:
        """Appends the item's line and puts it on disk before returning: from then it is done."""
        self._file.write(json.dumps(outcome.line()) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done[outcome.custom_id] = _slim(outcome)

    def full(self, custom_id: str) -> Outcome:
        """A done item's outcome with its answer, read back from the file."""
        self._file.flush()
        for outcome in read_outcomes(self.path)[0]:
            if outcome.custom_id == custom_id:
                return outcome
        raise KeyError(custom_id)

    def write_status(self, status: dict[str, Any]) -> None:
        """Replaces the status file (written whole, then renamed, so a reader never sees half)."""
        tmp = self.status_path.with_name(self.status_path.name + ".tmp")
        tmp.write_text(json.dumps(status | {"updated_at": time.time()}, indent=2))
        tmp.replace(self.status_path)

    def close(self) -> None:
        self._file.close()
