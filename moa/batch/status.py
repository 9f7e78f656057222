"""``moa batch status``: how a batch stands, read from its output and status files only.

It works while the run goes on (in another terminal, on another node sharing the directory) and
after it stopped: done and left, what it cost so far and is projected to cost in all, errors by
kind, and, while it runs, the rate and the time left.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from moa.batch.journal import read_outcomes


class BatchStatus(BaseModel):
    output: str = Field(description="The batch's output file.")
    state: str = Field(description="running, finished, stopped (with why), interrupted, or unknown.")
    total: int | None = Field(description="Items in the input (None when no status file says).")
    done: int = Field(description="Items with an output line.")
    succeeded: int = Field(description="Done items answered with 200.")
    errors: dict[str, int] = Field(description="Done items that did not succeed, by error code.")
    cost_usd: float = Field(description="What the done items cost.")
    projected_cost_usd: float | None = Field(
        description="The cost of all items at the done items' average (None before any is done)."
    )
    items_per_s: float | None = Field(description="This run's rate (None when it is not running).")
    eta_s: float | None = Field(description="Time left at that rate (None when not running).")


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def batch_status(output: Path, now: float | None = None) -> BatchStatus:
    """The status of the batch writing ``output``."""
    outcomes, _ = read_outcomes(output)
    status_path = output.with_name(output.name + ".status.json")
    info: dict[str, Any] = json.loads(status_path.read_text()) if status_path.exists() else {}
    total = info.get("total")
    done = len(outcomes)
    errors: dict[str, int] = {}
    for o in outcomes:
        if not o.ok:
            errors[o.kind] = errors.get(o.kind, 0) + 1
    cost = sum(o.cost_usd for o in outcomes)
    paid = [o for o in outcomes if o.cost_usd > 0]
    projected = None
    if total and paid:
        projected = cost + (total - done) * cost / len(paid)
    state = str(info.get("state", "unknown"))
    if state == "running" and not _alive(info.get("pid")):
        state = "interrupted"
    rate = eta = None
    if state == "running":
        elapsed = (now if now is not None else time.time()) - float(info.get("started_at", 0))
        ran = done - int(info.get("done_at_start", 0))
        if elapsed > 0 and ran > 0:
            rate = ran / elapsed
            eta = (total - done) / rate if total else None
    if state == "stopped" and info.get("stopped"):
        state = f"stopped: {info['stopped']}"
    return BatchStatus(
        output=str(output),
        state=state,
        total=total,
        done=done,
        succeeded=sum(o.ok for o in outcomes),
        errors=errors,
        cost_usd=round(cost, 6),
        projected_cost_usd=round(projected, 6) if projected is not None else None,
        items_per_s=round(rate, 3) if rate is not None else None,
        eta_s=round(eta, 1) if eta is not None else None,
    )
