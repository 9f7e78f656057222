"""``moa bench --tools``: when the ensemble helps with tool calls, and what it costs.

The workload (``moa/data/tool_tasks.jsonl``, or any file in its format, described in
docs/TOOLS.md) is a set of conversations with tools and the calls a correct model makes: single
calls, parallel calls, and multi-turn conversations with tool results (answered in text, or by a
follow-up call). Each task is sent through the API in this process (``moa serve --local``'s app,
over an ASGI transport: no port, no Ray) to the embedded simulator, for each configuration
(``single``, ``moa-lite`` voting, ``moa-lite`` aggregating...) at each tool-error rate: every
simulated model then gets a call wrong with that probability, the kind of error drawn among the
simulator's five (``ToolErrors``). Each task is sent once per seed (``repeats``), so one rate gives
as many independent draws per task as there are seeds.

Every answer is scored here, independently of the service's own checks:

- **correct**: the final calls are the expected ones (same names, arguments equal as canonical
  JSON, in any order), or, for a task that expects text, the answer is text (no calls) holding
  the values the task names;
- **valid**: the answer keeps the request's tool contract (declared functions, arguments the
  schema accepts, the tool choice and ``parallel_tool_calls`` respected), or the request failed
  with a clean API error (an error body, not a broken response); the service validates every
  final call, so anything else is a bug and ``moa bench --tools`` exits 1;
- what it cost (``moa.detail``'s ``cost_usd`` and calls), its latency as the client saw it, and
  whether the vote decided it (``answer_source: vote``: no aggregator call).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import jsonschema
from jsonschema.exceptions import SchemaError

from moa.benchmark.error_grid import WHAT, Grid, grid_options, run_grid
from moa.benchmark.options import TOOL_CONFIGS, TOOL_ERROR_RATES
from moa.benchmark.stats import mean, percentile
from moa.config import ConfigError
from moa.eval.stats import wilson_interval
from moa.simulator.profile import ToolErrors

KINDS = ("single", "parallel", "multi_turn")
# The simulator's kinds of tool error, each drawn at the share of a rate that makes the rate the
# probability that a call goes wrong at all (error_profile).
ERROR_KINDS: tuple[str, ...] = tuple(ToolErrors.model_fields)
# Wrong answers kept in the report per configuration and rate, as examples (all are counted).
EXAMPLES = 8


# -- the workload ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpectedCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolTask:
    """One conversation, its tools, and what a correct model answers: these calls (``calls``), or
    a text answer holding every string of ``text_contains`` (``calls`` None)."""

    id: str
    kind: str
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    calls: tuple[ExpectedCall, ...] | None
    text_contains: tuple[str, ...] = ()
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    def schemas(self) -> dict[str, dict[str, Any]]:
        """Each declared function's parameters schema, by name."""
        return {t["function"]["name"]: t["function"].get("parameters", {}) for t in self.tools}

    def body(self, model: str, tool_mode: str | None, seed: int) -> dict[str, Any]:
        """The chat completion request this task sends, as an agent client sends it."""
        body: dict[str, Any] = {"model": model, "messages": self.messages, "tools": self.tools, "seed": seed}
        if self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = self.parallel_tool_calls
        body["moa"] = {"detail": True, **({"tools": tool_mode} if tool_mode else {})}
        return body


def parse_task(row: Any) -> ToolTask:
    """A task from one JSON line; ``ValueError`` says what is wrong with it."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    for key in ("id", "kind", "messages", "tools", "expected"):
        if key not in row:
            raise ValueError(f"no {key!r}")
    if row["kind"] not in KINDS:
        raise ValueError(f"kind {row['kind']!r} is not one of {', '.join(KINDS)}")
    tools = row["tools"]
    if not isinstance(tools, list) or not tools:
        raise ValueError("'tools' must be a non-empty list of OpenAI function tools")
    for t in tools:
        if not isinstance(t, dict) or t.get("type") != "function" or "name" not in t.get("function", {}):
            raise ValueError("every tool must be {'type': 'function', 'function': {'name': ...}}")
    expected = row["expected"]
    if not isinstance(expected, dict) or ("calls" in expected) == ("text" in expected):
        raise ValueError("'expected' must hold either 'calls' or 'text'")
    calls: tuple[ExpectedCall, ...] | None = None
    contains: tuple[str, ...] = ()
    if "calls" in expected:
        raw = expected["calls"]
        if not isinstance(raw, list) or not raw:
            raise ValueError("expected 'calls' must be a non-empty list")
        if not all(isinstance(c, dict) and isinstance(c.get("arguments"), dict) for c in raw):
            raise ValueError("every expected call needs 'name' and an 'arguments' object")
        calls = tuple(ExpectedCall(str(c["name"]), c["arguments"]) for c in raw)
    else:
        text = expected["text"]
        contains = tuple(str(s) for s in (text.get("contains", []) if isinstance(text, dict) else []))
    return ToolTask(
        id=str(row["id"]),
        kind=row["kind"],
        messages=row["messages"],
        tools=tools,
        calls=calls,
        text_contains=contains,
        tool_choice=row.get("tool_choice"),
        parallel_tool_calls=row.get("parallel_tool_calls"),
    )


def load_tasks(path: Path | None = None) -> list[ToolTask]:
    """The bundled tool tasks, or a JSONL file of them. A file that cannot be read or parsed is a
    ``ConfigError`` naming the file and line (``moa`` exits 2), before anything starts."""
    where = str(path) if path else "moa/data/tool_tasks.jsonl"
    try:
        text = (
            path.read_text() if path else resources.files("moa").joinpath("data/tool_tasks.jsonl").read_text()
        )
    except OSError as e:
        raise ConfigError(f"cannot read the tool tasks file {path}: {e.strerror}") from None
    tasks: list[ToolTask] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            tasks.append(parse_task(json.loads(line)))
        except ValueError as e:  # json.JSONDecodeError is one
            raise ConfigError(f"{where}:{n}: not a tool task ({e})") from None
    if not tasks:
        raise ConfigError(f"{where}: no tool tasks")
    ids = Counter(t.id for t in tasks)
    twice = sorted(i for i, k in ids.items() if k > 1)
    if twice:
        raise ConfigError(f"{where}: task ids used more than once: {', '.join(twice)}")
    return tasks


# -- scoring -------------------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """JSON with one number type: 21.0 and 21 are the same JSON number (a schema's ``number`` is
    written either way), so integral floats compare as integers. Booleans stay booleans."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """A JSON value's canonical text: keys sorted, no spaces, integral numbers as integers."""
    return json.dumps(_plain(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_calls(calls: Iterable[tuple[str, Any]]) -> list[tuple[str, str]]:
    """(name, canonical arguments) pairs, sorted: parallel calls in any order are the same answer."""
    return sorted((name, canonical_json(args)) for name, args in calls)


@dataclass
class Answer:
    """What the client got: the calls (arguments as parsed JSON, or None where they are not
    JSON) and text of a 200, or the status and error body of a failure."""

    status: int
    calls: list[tuple[str, Any]] = field(default_factory=list)
    text: str = ""
    error: str | None = None  # the error's code or type; "unclean" for a body that is no API error
    detail: dict[str, Any] = field(default_factory=dict)


def read_answer(status: int, body: Any) -> Answer:
    """A response, as the scorer reads it."""
    if status != 200:
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return Answer(status, error=str(err.get("code") or err.get("type") or status))
        return Answer(status, error="unclean")
    try:
        message = body["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return Answer(status, error="unclean")
    calls: list[tuple[str, Any]] = []
    for c in message.get("tool_calls") or []:
        fn = c.get("function", {})
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            args = None
        calls.append((str(fn.get("name")), args))
    return Answer(status, calls, message.get("content") or "", detail=body.get("moa") or {})


def violations(task: ToolTask, answer: Answer) -> list[str]:
    """How an answer breaks the request's tool contract (empty: it keeps it). Written apart from
    the service's own validation (``moa.engine.toolcalls``), which is what it checks."""
    found: list[str] = []
    choice, calls = task.tool_choice, answer.calls
    named = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if choice == "none" and calls:
        found.append("a call under tool_choice none")
    if (choice == "required" or named) and not calls:
        found.append("no call, but tool_choice requires one")
    if task.parallel_tool_calls is False and len(calls) > 1:
        found.append(f"{len(calls)} calls with parallel_tool_calls false")
    schemas = task.schemas()
    for name, args in calls:
        if named and name != named:
            found.append(f"{name} called, but tool_choice names {named}")
        if name not in schemas:
            found.append(f"{name} is not declared")
        elif not isinstance(args, dict):
            found.append(f"{name}: arguments are not a JSON object")
        else:
            schema = schemas[name]
            try:
                errors = list(jsonschema.validators.validator_for(schema)(schema).iter_errors(args))
            except SchemaError as e:
                errors = [e]
            found.extend(f"{name}: {e.message}" for e in errors)
    return found


@dataclass
class Score:
    correct: bool
    valid: bool
    # Why a wrong answer is wrong: error, text_instead_of_call, call_instead_of_text,
    # wrong_function, wrong_count, wrong_arguments, missing_text (None: correct).
    miss: str | None = None
    violations: list[str] = field(default_factory=list)


def score(task: ToolTask, answer: Answer) -> Score:
    """Whether ``answer`` is the one ``task`` expects, and keeps the tools' contract."""
    if answer.error is not None:
        return Score(correct=False, valid=answer.error != "unclean", miss="error")
    broken = violations(task, answer)
    valid = not broken
    if task.calls is None:
        if answer.calls:
            return Score(False, valid, "call_instead_of_text", broken)
        if not answer.text.strip() or any(s not in answer.text for s in task.text_contains):
            return Score(False, valid, "missing_text", broken)
        return Score(True, valid, None, broken)
    if not answer.calls:
        return Score(False, valid, "text_instead_of_call", broken)
    if any(args is None for _, args in answer.calls):
        return Score(False, valid, "wrong_arguments", broken)
    want = canonical_calls((c.name, c.arguments) for c in task.calls)
    got = canonical_calls(answer.calls)
    if got == want:
        return Score(True, valid, None, broken)
    if sorted(n for n, _ in got) == sorted(n for n, _ in want):
        return Score(False, valid, "wrong_arguments", broken)
    if set(n for n, _ in got) == set(n for n, _ in want):
        return Score(False, valid, "wrong_count", broken)
    return Score(False, valid, "wrong_function", broken)


# -- the run -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolConfig:
    """What answers: a preset (or ``provider/model``) and, for an ensemble, its tool mode."""

    model: str
    mode: str | None = None

    @property
    def label(self) -> str:
        return f"{self.model} {self.mode}" if self.mode else self.model

    @classmethod
    def parse(cls, spec: str) -> ToolConfig:
        """``single``, ``moa-lite:vote``, ``moa-lite:aggregate``..."""
        model, _, mode = spec.partition(":")
        if mode and mode not in ("vote", "aggregate"):
            raise ValueError(f"{spec!r}: the tool mode is vote or aggregate")
        return cls(model, mode or None)


def error_profile(rate: float, ttft_s: float, tps: float, jitter: float, seed: int = 0) -> dict[str, Any]:
    """A simulator profile in which every model gets a tool call wrong with probability ``rate``:
    each of the five kinds fires at ``1 - (1 - rate) ** (1/5)``, so that at least one fires with
    probability ``rate`` (when several do, the first in ``ToolErrors``' order wins)."""
    each = 1 - (1 - rate) ** (1 / len(ERROR_KINDS)) if rate > 0 else 0.0
    return {
        "seed": seed,
        "default": {
            "ttft_s": ttft_s,
            "tokens_per_s": tps,
            "jitter": jitter,
            "tool_errors": dict.fromkeys(ERROR_KINDS, round(each, 6)),
        },
    }


@dataclass
class ToolBenchOptions:
    tasks_path: Path | None = None
    # At most this many tasks, the file's first (None: all).
    limit: int | None = None
    configs: Sequence[str] = TOOL_CONFIGS
    error_rates: Sequence[float] = TOOL_ERROR_RATES
    # Each task is sent once per seed 1..repeats: independent draws of every model's errors.
    repeats: int = 1
    concurrency: int = 8
    ttft_s: float = 0.3
    tokens_per_s: float = 50.0
    jitter: float = 0.1
    layer_deadline_s: float = 30.0


@dataclass
class Outcome:
    """One request's result, kept for the report."""

    task: ToolTask
    seed: int
    score: Score
    latency_ms: float
    cost_usd: float | None
    calls: int | None
    source: str | None
    answered: list[str]


async def ask(client: httpx.AsyncClient, task: ToolTask, config: ToolConfig, seed: int) -> Outcome:
    """Send one task and score what came back."""
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=task.body(config.model, config.mode, seed))
    ms = 1000 * (time.perf_counter() - t0)
    try:
        body: Any = r.json()
    except ValueError:
        body = None
    answer = read_answer(r.status_code, body)
    totals = answer.detail.get("totals", {})
    answered = [f"{n}({canonical_json(a) if a is not None else '<not JSON>'})" for n, a in answer.calls]
    if not answer.calls and answer.error is None:
        answered = [f"text: {answer.text[:80]}"]
    elif answer.error is not None:
        answered = [f"error {r.status_code}: {answer.error}"]
    return Outcome(
        task=task,
        seed=seed,
        score=score(task, answer),
        latency_ms=ms,
        cost_usd=totals.get("cost_usd"),
        calls=totals.get("calls"),
        source=answer.detail.get("answer_source"),
        answered=answered,
    )


def summarize(config: ToolConfig, rate: float, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """One configuration at one error rate: the figures of the table, and the wrong answers."""
    n = len(outcomes)
    right = sum(o.score.correct for o in outcomes)
    low, high = wilson_interval(right, n)
    answered = [o for o in outcomes if o.score.miss != "error"]
    by_kind = {
        kind: sum(o.score.correct for o in rows) / len(rows)
        for kind in KINDS
        if (rows := [o for o in outcomes if o.task.kind == kind])
    }
    # Who answered, and how often rightly: the vote decides the easy cases, so the aggregator's
    # share of wrong answers says what is left when the proposals disagree.
    by_source = {
        source: {"answers": len(rows), "accuracy": sum(o.score.correct for o in rows) / len(rows)}
        for source in sorted({o.source for o in answered if o.source})
        if (rows := [o for o in answered if o.source == source])
    }
    costs = [o.cost_usd for o in answered if o.cost_usd is not None]
    return {
        "config": config.label,
        "model": config.model,
        "tool_mode": config.mode,
        "error_rate": rate,
        "tasks": n,
        "accuracy": right / n if n else float("nan"),
        "accuracy_ci95": [low, high],
        "accuracy_by_kind": by_kind,
        "valid": sum(o.score.valid for o in outcomes) / n if n else float("nan"),
        "errors": n - len(answered),
        "invalid_answers": sum(not o.score.valid and o.score.miss != "error" for o in outcomes),
        "unclean_errors": sum(not o.score.valid and o.score.miss == "error" for o in outcomes),
        "cost_usd_per_task": mean(costs),
        "model_calls_per_task": mean([o.calls for o in answered if o.calls is not None]),
        "latency_p50_ms": percentile([o.latency_ms for o in outcomes], 50),
        "latency_p95_ms": percentile([o.latency_ms for o in outcomes], 95),
        "vote_share": sum(o.source == "vote" for o in answered) / n if n else float("nan"),
        "answer_sources": by_source,
        "misses": dict(Counter(o.score.miss for o in outcomes if o.score.miss)),
        "wrong_by_task": dict(Counter(o.task.id for o in outcomes if not o.score.correct).most_common()),
        "wrong_examples": [
            {"task": o.task.id, "seed": o.seed, "miss": o.score.miss, "answered": o.answered}
            for o in outcomes
            if not o.score.correct
        ][:EXAMPLES],
        "broken": [
            {"task": o.task.id, "seed": o.seed, "violations": o.score.violations, "answered": o.answered}
            for o in outcomes
            if not o.score.valid
        ],
    }


def paired(rows: Sequence[Outcome], base: Sequence[Outcome]) -> dict[str, int]:
    """Against the baseline's answers to the same tasks and seeds: how many this one got right
    where it did not, and the reverse (the run's draws are the same for both)."""
    theirs = {(o.task.id, o.seed): o.score.correct for o in base}
    pairs = [(o.score.correct, theirs[(o.task.id, o.seed)]) for o in rows if (o.task.id, o.seed) in theirs]
    return {
        "right_where_baseline_wrong": sum(a and not b for a, b in pairs),
        "wrong_where_baseline_right": sum(b and not a for a, b in pairs),
    }


def cell_line(row: dict[str, Any]) -> str:
    """One finished configuration and rate, as a line in the run's output."""
    return (
        f"{row['config']} @ {row['error_rate']:g}: accuracy {100 * row['accuracy']:.0f}%, "
        f"valid {100 * row['valid']:.0f}%, ${row['cost_usd_per_task']:.5f}/task, "
        f"p50 {row['latency_p50_ms']:.0f} ms, vote {100 * row['vote_share']:.0f}%"
    )


async def run_tool_bench(
    opts: ToolBenchOptions, on_step: Callable[[str | None], None] | None = None
) -> dict[str, Any]:
    """Every task, for every configuration at every error rate; ``on_step`` hears of each request
    answered (None) and each finished cell (its line)."""
    tasks = load_tasks(opts.tasks_path)[: opts.limit]
    configs = [ToolConfig.parse(c) for c in opts.configs]
    grid = Grid(
        tasks=tasks,
        configs=configs,
        label=lambda c: c.label,
        error_profile=error_profile,
        ask=ask,
        summarize=summarize,
        compare_key="paired",
        compare=lambda _, outcomes, __, baseline: dict(paired(outcomes, baseline)),
        cell_line=cell_line,
    )
    ran = await run_grid(grid, opts, on_step)
    return {
        "what": WHAT,
        "workload": {
            "file": str(opts.tasks_path) if opts.tasks_path else "moa/data/tool_tasks.jsonl",
            "tasks": len(tasks),
            "by_kind": dict(Counter(t.kind for t in tasks)),
            "text_expected": sum(t.calls is None for t in tasks),
        },
        "options": {"configs": [c.label for c in configs], **grid_options(opts, ERROR_KINDS)},
        **ran,
    }


def requests_in(opts: ToolBenchOptions, tasks: int) -> int:
    """How many counted requests a run sends."""
    return tasks * opts.repeats * len(opts.configs) * len(opts.error_rates)


# -- the report ------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def tools_markdown(report: dict[str, Any]) -> str:
    """The results table, one row per configuration and error rate."""
    o, w = report["options"], report["workload"]
    lines = [
        f"{w['tasks']} tasks ({', '.join(f'{k}: {v}' for k, v in w['by_kind'].items())}; "
        f"{w['text_expected']} expect text), each sent {o['repeats']} time(s) (seeds 1..{o['repeats']}) "
        f"per configuration and tool-error rate; simulator ttft {o['ttft_s']} s, "
        f"{o['tokens_per_s']:g} tokens/s, jitter {o['jitter']}; concurrency {o['concurrency']}.",
        "",
        "| configuration | tool-error rate | accuracy (95% CI) | single / parallel / multi-turn | valid "
        "| errors | cost/task USD | model calls/task | p50 ms | p95 ms | decided by vote |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        low, high = r["accuracy_ci95"]
        kinds = " / ".join(
            _pct(r["accuracy_by_kind"][k]) if k in r["accuracy_by_kind"] else "-" for k in KINDS
        )
        lines.append(
            f"| {r['config']} | {r['error_rate']:g} | {_pct(r['accuracy'])} ({_pct(low)}-{_pct(high)}) "
            f"| {kinds} | {_pct(r['valid'])} | {r['errors']} | {r['cost_usd_per_task']:.5f} "
            f"| {r['model_calls_per_task']:.2f} | {r['latency_p50_ms']:.0f} | {r['latency_p95_ms']:.0f} "
            f"| {_pct(r['vote_share'])} |"
        )
    voted = sources_markdown(report)
    return "\n".join(lines) + "\n" + (f"\n{voted}" if voted else "")


def sources_markdown(report: dict[str, Any]) -> str:
    """For each voting configuration at each error rate above zero: how many answers the vote
    decided and how often rightly, the same for the aggregator, and the paired counts against the
    first configuration. Empty when no configuration votes."""
    rows = [r for r in report["rows"] if r["tool_mode"] == "vote" and r["error_rate"] > 0]
    if not rows:
        return ""
    lines = [
        "| configuration | tool-error rate | decided by the vote | its accuracy | aggregator | its accuracy "
        "| right where the first configuration was wrong / the reverse |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = []
        for source in ("vote", "aggregator"):
            got = r["answer_sources"].get(source)
            cells += [str(got["answers"]), _pct(got["accuracy"])] if got else ["0", "-"]
        pair = r.get("paired")
        against = (
            f"{pair['right_where_baseline_wrong']} / {pair['wrong_where_baseline_right']} ({pair['with']})"
            if pair
            else "-"
        )
        lines.append(f"| {r['config']} | {r['error_rate']:g} | {' | '.join(cells)} | {against} |")
    return "\n".join(lines) + "\n"


def failures(report: dict[str, Any]) -> list[str]:
    """The answers that broke the tools' contract, and the errors that were no API error: the
    service promises neither happens, so ``moa bench --tools`` exits 1 on any."""
    lines = []
    for r in report["rows"]:
        if r["invalid_answers"] or r["unclean_errors"]:
            first = r["broken"][0]
            why = "; ".join(first["violations"]) or first["answered"]
            lines.append(
                f"{r['config']} @ {r['error_rate']:g}: {r['invalid_answers']} answers broke the tools' "
                f"contract, {r['unclean_errors']} responses were no API error (first: task "
                f"{first['task']} seed {first['seed']}: {why})"
            )
    return lines


def write_tools_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tools.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "tools.md").write_text(tools_markdown(report))


__all__ = [
    "Answer",
    "ToolBenchOptions",
    "ToolConfig",
    "ToolTask",
    "canonical_calls",
    "canonical_json",
    "error_profile",
    "failures",
    "load_tasks",
    "read_answer",
    "run_tool_bench",
    "score",
    "sources_markdown",
    "tools_markdown",
    "violations",
    "write_tools_report",
]
