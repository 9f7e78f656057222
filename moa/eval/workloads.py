"""Workloads: the user's questions, in the formats people already have.

One JSONL line per item: ``{"prompt": ...}``, AlpacaEval's ``{"instruction": ...}`` (with its
optional ``input``), or MT-Bench's ``{"turns": [...]}`` whose later turns are asked after the
target's own earlier answers. ``id``/``question_id`` and ``category`` are kept when present.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class WorkloadError(ValueError):
    """A workload or reference file that cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Item:
    id: str
    category: str
    turns: tuple[str, ...]

    @property
    def question(self) -> str:
        """The question as a judge sees it: the single turn, or every turn labelled."""
        if len(self.turns) == 1:
            return self.turns[0]
        return "\n\n".join(f"[Turn {i}]\n{t}" for i, t in enumerate(self.turns, 1))


def render_answers(answers: list[str] | tuple[str, ...]) -> str:
    """A target's answers as one block for a judge; the simulator's judge reads these sections."""
    if len(answers) == 1:
        return answers[0]
    return "\n\n".join(f"[Turn {i}]\n{a}" for i, a in enumerate(answers, 1))


def _turns(row: dict[str, object], where: str) -> tuple[str, ...]:
    if isinstance(row.get("turns"), list):
        turns = row["turns"]
        assert isinstance(turns, list)
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise WorkloadError(f"{where}: 'turns' must be a list of non-empty strings")
        return tuple(turns)
    for key in ("prompt", "instruction"):
        value = row.get(key)
        if isinstance(value, str) and value.strip():
            extra = row.get("input")
            if key == "instruction" and isinstance(extra, str) and extra.strip():
                value = f"{value}\n\n{extra}"
            return (value,)
    raise WorkloadError(f"{where}: expected a 'prompt', 'instruction' or 'turns' field")


def _lines(path: Path) -> list[tuple[str, dict[str, object]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise WorkloadError(f"cannot read {path}: {e.strerror}") from None
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise WorkloadError(f"{where}: each line must be a JSON object")
        rows.append((where, row))
    return rows


def load_workload(path: Path, limit: int | None = None) -> list[Item]:
    items: list[Item] = []
    seen: set[str] = set()
    for n, (where, row) in enumerate(_lines(path), 1):
        raw_id = row.get("question_id", row.get("id", n))
        item = Item(id=str(raw_id), category=str(row.get("category") or "all"), turns=_turns(row, where))
        if item.id in seen:
            raise WorkloadError(f"{where}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise WorkloadError(f"{path}: no items")
    return items


def load_reference_outputs(path: Path, items: list[Item]) -> dict[str, list[str]]:
    """Reference answers by item id, matched by id or by the question's text (AlpacaEval's
    reference files carry the instruction and an ``output``; MT-Bench-style ones a list of turns
    in ``output`` or ``choices[0].turns``)."""
    by_text = {item.turns[0]: item.id for item in items}
    ids = {item.id for item in items}
    out: dict[str, list[str]] = {}
    for where, row in _lines(path):
        output = row.get("output")
        choices = row.get("choices")
        if output is None and isinstance(choices, list) and choices and isinstance(choices[0], dict):
            output = choices[0].get("turns")
        answers = [output] if isinstance(output, str) else output
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise WorkloadError(f"{where}: expected 'output' (a string or a list of strings)")
        raw_id = row.get("question_id", row.get("id"))
        key = str(raw_id) if raw_id is not None and str(raw_id) in ids else None
        if key is None:
            text = row.get("instruction", row.get("prompt"))
            key = by_text.get(text) if isinstance(text, str) else None
        if key is not None:
            out[key] = list(answers)
    return out
