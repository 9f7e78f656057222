"""``moa bench --structured``: whether every final answer keeps the JSON Schema a request asked
for, and what the ensemble costs for it against ``single``.

The workload is ``moa.benchmark.structured_tasks`` (32 questions with schemas of growing
difficulty). Each task is sent through the API in this process (``moa serve --local``'s app over
an ASGI transport) to the embedded simulator as a chat completion with ``response_format``
``json_schema`` (not strict: a strict schema holds decoding to it, and the simulator, like the
APIs, then never breaks it), for each configuration at each error rate: every simulated model
then writes malformed JSON or a document that breaks the schema with that probability (the two
kinds drawn at equal rates, ``JsonErrors``). Each answer is scored here, apart from the service's
own validation:

- **valid**: a 200 whose content parses and keeps the schema;
- **refused**: a 200 carrying ``message.refusal`` (a clean answer: the model declined);
- **clean error**: a failure with an OpenAI-style error body;
- **invalid**: anything else (a 200 whose content does not parse or breaks the schema, a failure
  whose body is no API error). The goal is none: ``moa bench --structured`` exits 1 on any.

Cost and latency are reported per configuration and against the first (``single``) at the same
rate.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema

from moa.benchmark.error_grid import WHAT, Grid, grid_options, run_grid
from moa.benchmark.options import STRUCTURED_CONFIGS, STRUCTURED_ERROR_RATES
from moa.benchmark.stats import mean, percentile
from moa.benchmark.structured_tasks import LEVELS, TASKS, StructuredTask
from moa.simulator.profile import JsonErrors

# The kinds of error a rate is spread over: a refusal is an answer, not an error to catch.
ERROR_KINDS = ("malformed_json", "schema_violation")
VERDICTS = ("valid", "refused", "clean_error", "invalid")
EXAMPLES = 8


def error_profile(rate: float, ttft_s: float, tps: float, jitter: float) -> dict[str, Any]:
    """A simulator profile in which every model's document goes wrong with probability ``rate``:
    each kind fires at ``1 - (1 - rate) ** (1/2)``, so that at least one does with probability
    ``rate`` (when both do, malformed JSON wins, ``JsonErrors``' order)."""
    each = 1 - (1 - rate) ** (1 / len(ERROR_KINDS)) if rate > 0 else 0.0
    errors = JsonErrors(**dict.fromkeys(ERROR_KINDS, round(each, 6)))
    return {
        "default": {
            "ttft_s": ttft_s,
            "tokens_per_s": tps,
            "jitter": jitter,
            "json_errors": errors.model_dump(),
        }
    }


def body(task: StructuredTask, model: str, seed: int) -> dict[str, Any]:
    """The chat completion request a task sends."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": task.question}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": task.id, "schema": task.schema, "strict": False},
        },
        "seed": seed,
        "moa": {"detail": True},
    }


def verdict(task: StructuredTask, status: int, answer: Any) -> tuple[str, str]:
    """How a response scores (one of ``VERDICTS``), and why, in a few words."""
    if status != 200:
        err = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return "clean_error", str(err.get("code") or err.get("type") or status)
        return "invalid", f"{status} without an API error body"
    try:
        message = answer["choices"][0]["message"]
    except (KeyError, IndexError, TypeError):
        return "invalid", "a 200 that is no chat completion"
    if message.get("refusal"):
        return "refused", str(message["refusal"])[:80]
    try:
        document = json.loads(message.get("content") or "")
    except ValueError:
        return "invalid", "content is not JSON"
    errors = list(jsonschema.validators.validator_for(task.schema)(task.schema).iter_errors(document))
    if errors:
        return "invalid", errors[0].message[:120]
    return "valid", ""


@dataclass
class Outcome:
    task: StructuredTask
    seed: int
    verdict: str
    why: str
    latency_ms: float
    cost_usd: float | None


def summarize(config: str, rate: float, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """One configuration at one error rate: the shares of each verdict, cost and latency."""
    n = len(outcomes)
    counts = Counter(o.verdict for o in outcomes)
    costs = [o.cost_usd for o in outcomes if o.cost_usd is not None]
    by_level = {
        level: sum(o.verdict == "valid" for o in rows) / len(rows)
        for level in LEVELS
        if (rows := [o for o in outcomes if o.task.level == level])
    }
    return {
        "config": config,
        "error_rate": rate,
        "tasks": n,
        **{f"{v}_share": counts[v] / n if n else float("nan") for v in VERDICTS},
        "invalid": counts["invalid"],
        "valid_by_level": by_level,
        "cost_usd_per_task": mean(costs) if costs else float("nan"),
        "latency_p50_ms": percentile([o.latency_ms for o in outcomes], 50),
        "latency_p95_ms": percentile([o.latency_ms for o in outcomes], 95),
        "invalid_examples": [
            {"task": o.task.id, "seed": o.seed, "why": o.why} for o in outcomes if o.verdict == "invalid"
        ][:EXAMPLES],
    }


def against(row: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """A row's cost and latency as multiples of the baseline's at the same rate."""

    def ratio(key: str) -> float:
        b = base[key]
        return row[key] / b if b else float("nan")

    return {
        "cost_x": ratio("cost_usd_per_task"),
        "latency_p50_x": ratio("latency_p50_ms"),
        "latency_p95_x": ratio("latency_p95_ms"),
    }


@dataclass
class StructuredBenchOptions:
    limit: int | None = None  # the first N tasks (None: all)
    configs: Sequence[str] = STRUCTURED_CONFIGS
    error_rates: Sequence[float] = STRUCTURED_ERROR_RATES
    repeats: int = 1  # each task once per seed 1..repeats
    concurrency: int = 8
    ttft_s: float = 0.3
    tokens_per_s: float = 50.0
    jitter: float = 0.1
    layer_deadline_s: float = 30.0


async def ask(client: httpx.AsyncClient, task: StructuredTask, config: str, seed: int) -> Outcome:
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body(task, config, seed))
    ms = 1000 * (time.perf_counter() - t0)
    try:
        answer: Any = r.json()
    except ValueError:
        answer = None
    got, why = verdict(task, r.status_code, answer)
    detail = answer.get("moa") if isinstance(answer, dict) else None
    totals = detail.get("totals", {}) if isinstance(detail, dict) else {}
    return Outcome(task, seed, got, why, ms, totals.get("cost_usd"))


async def run_structured_bench(
    opts: StructuredBenchOptions, on_step: Callable[[str | None], None] | None = None
) -> dict[str, Any]:
    """Every task, for every configuration at every error rate; ``on_step`` hears of each request
    answered (None) and each finished cell (its line)."""
    tasks = list(TASKS[: opts.limit])
    grid = Grid(
        tasks=tasks,
        configs=list(opts.configs),
        label=str,
        error_profile=error_profile,
        ask=ask,
        summarize=summarize,
        compare_key="against",
        compare=lambda row, _, base, __: against(row, base),
        cell_line=cell_line,
    )
    ran = await run_grid(grid, opts, on_step)
    return {
        "what": WHAT,
        "workload": {
            "module": "moa.benchmark.structured_tasks",
            "tasks": len(tasks),
            "by_level": dict(Counter(t.level for t in tasks)),
        },
        "options": {"configs": list(opts.configs), **grid_options(opts, ERROR_KINDS)},
        **ran,
    }


def requests_in(opts: StructuredBenchOptions) -> int:
    """How many counted requests a run sends."""
    return len(TASKS[: opts.limit]) * opts.repeats * len(opts.configs) * len(opts.error_rates)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def cell_line(row: dict[str, Any]) -> str:
    return (
        f"{row['config']} @ {row['error_rate']:g}: valid {_pct(row['valid_share'])}, "
        f"invalid {row['invalid']}, ${row['cost_usd_per_task']:.5f}/task, p50 {row['latency_p50_ms']:.0f} ms"
    )


def structured_markdown(report: dict[str, Any]) -> str:
    """The results table, one row per configuration and error rate."""
    o, w = report["options"], report["workload"]
    lines = [
        f"{w['tasks']} tasks (levels {', '.join(f'{k}: {v}' for k, v in w['by_level'].items())}), each sent "
        f"{o['repeats']} time(s) per configuration and error rate; simulator ttft {o['ttft_s']} s, "
        f"{o['tokens_per_s']:g} tokens/s, jitter {o['jitter']}; concurrency {o['concurrency']}.",
        "",
        "| configuration | error rate | valid | refused | clean error | invalid | valid by level 1-5 "
        "| cost/task USD | p50 ms | p95 ms | cost, p50 vs the first |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        levels = " / ".join(_pct(r["valid_by_level"][k]) if k in r["valid_by_level"] else "-" for k in LEVELS)
        vs = r.get("against")
        ratio = f"{vs['cost_x']:.2f}x, {vs['latency_p50_x']:.2f}x" if vs else "-"
        lines.append(
            f"| {r['config']} | {r['error_rate']:g} | {_pct(r['valid_share'])} | {_pct(r['refused_share'])} "
            f"| {_pct(r['clean_error_share'])} | {r['invalid']} | {levels} | {r['cost_usd_per_task']:.5f} "
            f"| {r['latency_p50_ms']:.0f} | {r['latency_p95_ms']:.0f} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def failures(report: dict[str, Any]) -> list[str]:
    """The cells where a final answer was invalid: the service promises none is."""
    return [
        f"{r['config']} @ {r['error_rate']:g}: {r['invalid']} invalid answers "
        f"(first: {r['invalid_examples'][0]['task']}: {r['invalid_examples'][0]['why']})"
        for r in report["rows"]
        if r["invalid"]
    ]


def write_structured_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "structured.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "structured.md").write_text(structured_markdown(report))


__all__ = [
    "StructuredBenchOptions",
    "against",
    "body",
    "error_profile",
    "failures",
    "requests_in",
    "run_structured_bench",
    "structured_markdown",
    "summarize",
    "verdict",
    "write_structured_report",
]
