"""``moa bench --structured``'s workload and arithmetic (``moa/benchmark/structured_bench.py``).

The measured run itself needs the service to take ``response_format`` (the engine's side of
issue 28); these tests hold what the runner computes: the workload (every schema valid and, with
error-free models, answered validly by the simulator), the error rates it sets (the share of
broken documents the simulator really writes), each response's verdict, and the table's figures.
"""

from __future__ import annotations

import json
import math
from typing import Any

import jsonschema
import pytest

from moa.benchmark.structured_bench import (
    ERROR_KINDS,
    Outcome,
    against,
    body,
    error_profile,
    failures,
    structured_markdown,
    summarize,
    verdict,
)
from moa.benchmark.structured_tasks import LEVELS, TASKS, StructuredTask
from moa.cli import main
from moa.simulator.profile import parse_profile
from moa.simulator.structured import OutputFormat, document


def test_the_workload_has_thirty_tasks_of_growing_difficulty_with_valid_schemas() -> None:
    assert len(TASKS) >= 30 and len({t.id for t in TASKS}) == len(TASKS)
    assert [t.level for t in TASKS] == sorted(t.level for t in TASKS)
    assert all(sum(t.level == level for t in TASKS) >= 5 for level in LEVELS)
    for t in TASKS:
        jsonschema.Draft202012Validator.check_schema(t.schema)
    text = json.dumps([t.schema for t in TASKS if t.level == 5])
    for feature in ('"enum"', '"items"', '"$ref"', '"anyOf"', '"format"', '"required"'):
        assert feature in text, feature


def test_an_error_free_model_answers_every_task_validly() -> None:
    """With no error drawn, the simulator's document for each task keeps its schema: the
    workload measures the errors injected, not schemas a model cannot answer."""
    errors = parse_profile(error_profile(0.0, 0.1, 100, 0)).default.json_errors
    for t in TASKS:
        for seed in (1, 2):
            fmt = OutputFormat("json_schema", t.schema, t.id)
            doc = document("gpt-4.1-mini", "concise", seed, (("user", t.question),), fmt, errors)
            jsonschema.validate(json.loads(doc.text), t.schema)


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
def test_a_rate_is_the_probability_that_a_document_goes_wrong(rate: float) -> None:
    """Each kind at ``1 - (1 - rate) ** (1/2)`` makes ``rate`` the chance of either; the
    simulator's own draws over many conversations come out at that share."""
    profile = parse_profile(error_profile(rate, 0.1, 100, 0))
    errors = profile.default.json_errors
    each = [getattr(errors, k) for k in ERROR_KINDS]
    assert math.isclose(1 - math.prod(1 - e for e in each), rate, abs_tol=1e-5)
    assert errors.refusal == 0
    task = next(t for t in TASKS if t.id == "enum-plan")
    fmt = OutputFormat("json_schema", task.schema, task.id)
    n = 600
    broken = sum(
        document("m", "concise", seed, (("user", task.question),), fmt, errors).fault is not None
        for seed in range(n)
    )
    assert abs(broken / n - rate) < 0.05, broken / n


def test_the_request_asks_for_the_schema_unstrict() -> None:
    task = TASKS[0]
    sent = body(task, "moa-lite", 3)
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": task.id, "schema": task.schema, "strict": False},
    }
    assert sent["seed"] == 3 and sent["moa"] == {"detail": True}


def completion(content: str | None, refusal: str | None = None) -> dict[str, Any]:
    return {"choices": [{"message": {"role": "assistant", "content": content, "refusal": refusal}}]}


def test_each_response_gets_its_verdict() -> None:
    task = next(t for t in TASKS if t.id == "enum-ticket")
    good = json.dumps({"summary": "login fails", "priority": "high"})
    assert verdict(task, 200, completion(good))[0] == "valid"
    assert verdict(task, 200, completion(good[:-1] + ",}"))[0] == "invalid"
    assert verdict(task, 200, completion(json.dumps({"summary": "x", "priority": "urgent"})))[0] == "invalid"
    assert verdict(task, 200, completion(json.dumps({"summary": "x"})))[0] == "invalid"
    assert verdict(task, 200, completion(None, "I can't help with that."))[0] == "refused"
    error = {"error": {"message": "no valid answer", "type": "server_error", "code": "invalid_output"}}
    assert verdict(task, 502, error) == ("clean_error", "invalid_output")
    assert verdict(task, 500, None)[0] == "invalid"
    assert verdict(task, 200, {"choices": []})[0] == "invalid"


def outcomes(verdicts: list[str], cost: float, latency_ms: list[float]) -> list[Outcome]:
    tasks: list[StructuredTask] = [TASKS[0], TASKS[-1]]
    return [
        Outcome(tasks[i % 2], 1, v, "why" if v == "invalid" else "", ms, cost)
        for i, (v, ms) in enumerate(zip(verdicts, latency_ms, strict=True))
    ]


def test_the_tables_figures() -> None:
    """Shares of each verdict, validity by level, cost and latency, and the multiples of the
    baseline's; a cell with an invalid answer is a failure, named with its first example."""
    base = summarize("single", 0.1, outcomes(["valid"] * 8 + ["invalid", "clean_error"], 0.001, [100.0] * 10))
    moa = summarize(
        "moa-lite", 0.1, outcomes(["valid"] * 9 + ["refused"], 0.004, [100.0 + 50 * i for i in range(10)])
    )
    assert (base["valid_share"], base["invalid_share"], base["clean_error_share"]) == (0.8, 0.1, 0.1)
    assert base["invalid"] == 1 and moa["invalid"] == 0 and moa["refused_share"] == 0.1
    assert base["valid_by_level"] == {1: 0.8, 5: 0.8} and moa["valid_by_level"] == {1: 1.0, 5: 0.8}
    assert moa["latency_p50_ms"] == 300.0 and moa["latency_p95_ms"] == 550.0
    moa["against"] = {"with": "single", **against(moa, base)}
    assert moa["against"]["cost_x"] == pytest.approx(4.0) and moa["against"]["latency_p50_x"] == 3.0
    report = {
        "options": {"repeats": 1, "ttft_s": 0.1, "tokens_per_s": 100, "jitter": 0, "concurrency": 4},
        "workload": {"tasks": 2, "by_level": {1: 1, 5: 1}},
        "rows": [base, moa],
    }
    table = structured_markdown(report)
    assert "| moa-lite | 0.1 | 90% | 10% | 0% | 0 | 100% / - / - / - / 80% |" in table
    assert "4.00x, 3.00x" in table
    assert failures(report) == [f"single @ 0.1: 1 invalid answers (first: {TASKS[0].id}: why)"]


@pytest.mark.parametrize(
    "bad", [["--structured-repeats", "0"], ["--structured-tasks", "0"], ["--structured-error-rates", "1.5"]]
)
def test_the_command_refuses_bad_counts_and_rates_at_parse_time(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--structured", *bad])


@pytest.mark.parametrize("raw", ["bench-structured.json", "bench-structured-high.json"])
def test_structured_md_shows_the_measured_runs_rendered_with_no_invalid_answer(raw: str) -> None:
    """docs/STRUCTURED.md's tables are the raw files rendered (a figure edited by hand fails), and
    the runs they show gave no invalid answer: the page's "none invalid" is the files' own."""
    from pathlib import Path

    from moa.benchmark.structured_bench import failures, structured_markdown

    docs = Path(__file__).resolve().parent.parent / "docs"
    report = json.loads((docs / raw).read_text())
    assert structured_markdown(report) in (docs / "STRUCTURED.md").read_text()
    assert failures(report) == []
