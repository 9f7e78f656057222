"""``moa bench --tools``: the bundled tool workload is well-formed and well-defined, the scorer
tells right answers from wrong ones (exactly, canonically, in any order), and a tiny run goes
end to end through the in-process API and the embedded simulator to the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from moa.benchmark.tool_bench import (
    KINDS,
    Answer,
    ToolConfig,
    ToolTask,
    canonical_calls,
    canonical_json,
    error_profile,
    load_tasks,
    read_answer,
    score,
    tools_markdown,
    violations,
)
from moa.cli import main
from moa.config import ConfigError
from moa.simulator.openai_wire import OpenAIWire
from moa.simulator.profile import ToolErrors, parse_profile
from moa.simulator.tools import propose

TASKS = load_tasks()
BY_ID = {t.id: t for t in TASKS}


# -- the workload ------------------------------------------------------------------------------------


def test_the_bundled_workload_has_every_kind_and_enough_tasks() -> None:
    kinds = {t.kind for t in TASKS}
    assert len(TASKS) >= 50 and kinds == set(KINDS)
    assert any(t.kind == "parallel" and t.calls and len(t.calls) > 1 for t in TASKS)
    multi = [t for t in TASKS if t.kind == "multi_turn"]
    assert all(any(m["role"] == "tool" for m in t.messages) for t in multi)  # tool results in each
    assert any(t.calls is None for t in multi) and any(t.calls for t in multi)  # text and a follow-up call
    assert all(2 <= len(t.tools) <= 6 for t in TASKS)
    assert {len(t.tools) for t in TASKS} >= {2, 3, 5, 6}


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.id)
def test_every_expected_call_is_valid_against_its_tools_schema(task: ToolTask) -> None:
    schemas = task.schemas()
    for schema in schemas.values():
        jsonschema.validators.validator_for(schema).check_schema(schema)
    for call in task.calls or ():
        assert call.name in schemas, f"{call.name} is not among the task's tools"
        jsonschema.validate(call.arguments, schemas[call.name])


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t.id)
def test_a_simulated_model_without_errors_answers_every_task_as_expected(task: ToolTask) -> None:
    """The expected answer is the one the simulator derives from the conversation, for every model
    and seed: a task whose answer depended on a draw (a tie between functions, an enum value the
    message never says) would score noise."""
    body = {k: v for k, v in task.body("m", None, 1).items() if k != "moa"}
    request = OpenAIWire().parse(body, None, False)
    assert request.tools is not None
    for model in ("gpt-4.1-mini", "claude-haiku-4-5", "gemini-2.5-flash", "gpt-4.1"):
        for seed in (None, 1, 2):
            made = propose(model, seed, request.transcript, request.tools, ToolErrors(), lambda: "call_1")
            calls = [(c.name, json.loads(c.arguments)) for c in made.calls]
            if task.calls is None:
                # It answers in text, which quotes the tool results: they hold what must be said.
                results = " ".join(m["content"] for m in task.messages if m["role"] == "tool")
                assert not calls and all(s in results for s in task.text_contains)
            else:
                assert score(task, Answer(200, calls)).correct, f"{model} seed {seed}: {calls}"


def test_a_malformed_task_file_is_refused_naming_its_line(tmp_path: Path) -> None:
    good = json.dumps(
        {
            "id": "x",
            "kind": "single",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": TASKS[0].tools,
            "expected": {"calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
        }
    )
    path = tmp_path / "tasks.jsonl"
    path.write_text(good + "\n" + good.replace('"kind": "single"', '"kind": "chat"') + "\n")
    with pytest.raises(ConfigError, match=r"tasks.jsonl:2: .*kind 'chat'"):
        load_tasks(path)
    path.write_text(good + "\n" + good + "\n")
    with pytest.raises(ConfigError, match="more than once: x"):
        load_tasks(path)


# -- the scorer ------------------------------------------------------------------------------------------

PAR = BY_ID["par-weather-3"]  # get_weather in Paris, Oslo and Lisbon
ONE = BY_ID["flights-osl-fco"]  # search_flights with a string, an integer and an enum
TEXT = BY_ID["mt-weather-answer"]  # answered in text, saying 18
FORCED = BY_ID["named-forecast"]  # tool_choice names get_forecast
SERIAL = BY_ID["serial-weather-first"]  # parallel_tool_calls false
FLIGHT = {"origin": "OSL", "destination": "FCO", "date": "2025-07-14", "passengers": 2, "cabin": "business"}


def reply(*calls: tuple[str, Any], text: str = "") -> Answer:
    return Answer(200, list(calls), text)


def test_canonical_json_ignores_key_order_spacing_and_integral_floats_only() -> None:
    assert canonical_json({"b": 1, "a": [2.0, "x"]}) == '{"a":[2,"x"],"b":1}'
    assert canonical_json({"t": 21.0}) == canonical_json({"t": 21})
    assert canonical_json({"t": 21.5}) != canonical_json({"t": 21})
    assert canonical_json({"f": True}) != canonical_json({"f": 1})  # a boolean is no number
    assert canonical_json({"n": "1"}) != canonical_json({"n": 1})


def test_an_exact_call_is_right_whatever_its_key_order_or_number_spelling() -> None:
    assert score(ONE, reply(("search_flights", FLIGHT))).correct
    shuffled = dict(reversed(list(FLIGHT.items())))
    assert score(ONE, reply(("search_flights", {**shuffled, "passengers": 2.0}))).correct
    # As the API sends them: arguments as JSON text, read by read_answer.
    body = {
        "choices": [
            {
                "message": {
                    "content": None,
                    "tool_calls": [
                        {"function": {"name": "search_flights", "arguments": json.dumps(shuffled, indent=2)}}
                    ],
                }
            }
        ]
    }
    assert score(ONE, read_answer(200, body)).correct


@pytest.mark.parametrize(
    ("answer", "miss"),
    [
        (reply(("search_flights", {**FLIGHT, "passengers": 3})), "wrong_arguments"),
        (reply(("search_flights", {**FLIGHT, "passengers": "2"})), "wrong_arguments"),
        (reply(("search_flights", {**FLIGHT, "cabin": "economy"})), "wrong_arguments"),
        (reply(("search_flights", {k: v for k, v in FLIGHT.items() if k != "cabin"})), "wrong_arguments"),
        (reply(("search_flights", {**FLIGHT, "nonstop": True})), "wrong_arguments"),
        (reply(("search_flights", None)), "wrong_arguments"),  # arguments that are not JSON
        (reply(("search_hotels", FLIGHT)), "wrong_function"),
        (reply(("search_flights", FLIGHT), ("search_flights", FLIGHT)), "wrong_count"),
        (reply(text="Flights from Oslo to Rome leave daily."), "text_instead_of_call"),
        (Answer(502, error="all_providers_failed"), "error"),
    ],
)
def test_a_call_that_differs_in_any_way_is_wrong(answer: Answer, miss: str) -> None:
    got = score(ONE, answer)
    assert not got.correct and got.miss == miss


def test_parallel_calls_are_right_in_any_order_and_wrong_with_one_missing_or_changed() -> None:
    cities = [("get_weather", {"city": c}) for c in ("Paris", "Oslo", "Lisbon")]
    assert score(PAR, reply(*cities)).correct
    assert score(PAR, reply(*reversed(cities))).correct
    assert canonical_calls(cities) == canonical_calls(reversed(cities))
    assert not score(PAR, reply(*cities[:2])).correct
    assert not score(PAR, reply(*cities[:2], ("get_weather", {"city": "Rome"}))).correct
    assert not score(PAR, reply(*cities, cities[0])).correct  # a call made twice
    assert not score(PAR, reply(*cities[:2], ("get_local_time", {"city": "Lisbon"}))).correct


def test_a_text_task_wants_text_saying_what_the_results_said() -> None:
    assert TEXT.text_contains == ("18",)
    assert score(TEXT, reply(text="It is 18 degrees and clear in Paris.")).correct
    assert score(TEXT, reply(text="It is clear in Paris.")).miss == "missing_text"
    assert score(TEXT, reply(text="  ")).miss == "missing_text"
    assert score(TEXT, reply(("get_weather", {"city": "Paris"}))).miss == "call_instead_of_text"


def test_validity_is_the_tools_contract_and_a_clean_error_keeps_it() -> None:
    assert score(ONE, reply(("search_flights", FLIGHT))).valid
    assert score(ONE, reply(("search_hotels", {"city": "Oslo", "check_in": "x", "nights": 2}))).valid
    assert violations(ONE, reply(("book_taxi", {}))) == ["book_taxi is not declared"]
    assert violations(ONE, reply(("search_flights", {**FLIGHT, "passengers": 12})))  # maximum 9
    assert violations(ONE, reply(("search_flights", {**FLIGHT, "cabin": "first"})))  # not in the enum
    assert violations(ONE, reply(("search_flights", {**FLIGHT, "nonstop": True})))  # no additional properties
    assert not score(ONE, reply(("search_flights", None))).valid
    assert violations(FORCED, reply(text="Pack layers.")) == ["no call, but tool_choice requires one"]
    assert violations(FORCED, reply(("get_weather", {"city": "Kyoto"})))
    two = [("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Milan"})]
    assert violations(SERIAL, reply(*two)) == ["2 calls with parallel_tool_calls false"]
    assert score(ONE, read_answer(502, {"error": {"message": "every model failed", "code": "x"}})).valid
    assert not score(ONE, read_answer(500, "Internal Server Error")).valid


def test_an_error_rate_is_the_chance_that_a_call_goes_wrong_at_all() -> None:
    for rate in (0.1, 0.25, 0.5):
        profile = error_profile(rate, 0.3, 50, 0.1)
        each = profile["default"]["tool_errors"]
        assert set(each) == set(ToolErrors.model_fields)
        clean = 1.0
        for p in each.values():
            clean *= 1 - p
        assert 1 - clean == pytest.approx(rate, abs=1e-5)
        parse_profile(profile)  # one the simulator takes
    assert set(error_profile(0.0, 0.3, 50, 0.1)["default"]["tool_errors"].values()) == {0.0}


def test_a_config_names_a_model_and_its_tool_mode() -> None:
    assert ToolConfig.parse("moa-lite:vote") == ToolConfig("moa-lite", "vote")
    assert ToolConfig.parse("single").label == "single"
    with pytest.raises(ValueError, match="vote or aggregate"):
        ToolConfig.parse("moa-lite:majority")
    for bad in (
        ["--tool-configs", "moa-lite:majority"],
        ["--tool-tasks", "0"],
        ["--tool-error-rates", "1.5"],
    ):
        with pytest.raises(SystemExit):
            main(["bench", "--tools", *bad])


# -- a tiny run ----------------------------------------------------------------------------------------


def test_a_tiny_run_goes_end_to_end_and_reports_every_figure(tmp_path: Path) -> None:
    """Three tasks (a call, parallel calls, a text answer after a tool result) through moa-lite
    voting, with error-free models and then with models that always call the wrong function."""
    path = tmp_path / "tasks.jsonl"
    picked = ["time-tokyo", "par-balance-2", "mt-weather-answer"]
    rows = {json.loads(line)["id"]: line for line in _bundled_lines()}
    path.write_text("\n".join(rows[i] for i in picked) + "\n")
    out = tmp_path / "out"
    fast = ["--ttft", "0.01", "--tps", "5000", "--jitter", "0"]
    args = ["bench", "--tools", "--prompts", str(path), "--tool-configs", "single,moa-lite:vote"]
    assert main([*args, "--tool-error-rates", "0,1", *fast, "--out", str(out)]) == 0
    report = json.loads((out / "tools.json").read_text())
    assert report["workload"]["tasks"] == 3
    one, clean, one_broken, broken = report["rows"]
    assert [(r["config"], r["error_rate"]) for r in report["rows"]] == [
        ("single", 0.0),
        ("moa-lite vote", 0.0),
        ("single", 1.0),
        ("moa-lite vote", 1.0),
    ]
    assert one["model_calls_per_task"] == 1.0 and one["vote_share"] == 0.0 and one["accuracy"] == 1.0
    assert clean["paired"] == {
        "with": "single",
        "right_where_baseline_wrong": 0,
        "wrong_where_baseline_right": 0,
    }
    assert clean["tasks"] == 3 and clean["accuracy"] == 1.0 and clean["valid"] == 1.0
    # The two call tasks are decided by the vote (three proposer calls, no aggregator); the
    # text answer goes to the aggregator (four calls).
    assert clean["vote_share"] == pytest.approx(2 / 3)
    assert clean["model_calls_per_task"] == pytest.approx(10 / 3)
    assert clean["cost_usd_per_task"] > 0 and clean["latency_p50_ms"] > 0
    assert clean["errors"] == 0 and clean["invalid_answers"] == 0
    assert clean["answer_sources"] == {
        "aggregator": {"answers": 1, "accuracy": 1.0},
        "vote": {"answers": 2, "accuracy": 1.0},
    }
    # Every model calls a wrong function: only the text answer is still right, and nothing that
    # reached the client broke the tools' contract.
    assert broken["accuracy_by_kind"] == {"single": 0.0, "parallel": 0.0, "multi_turn": 1.0}
    assert one_broken["accuracy_by_kind"] == broken["accuracy_by_kind"]
    assert broken["valid"] == 1.0 and broken["invalid_answers"] == 0
    assert broken["misses"].get("wrong_function", 0) + broken["misses"].get("error", 0) == 2
    table = (out / "tools.md").read_text()
    assert "| moa-lite vote | 0 | 100% " in table and "decided by vote" in table


def _bundled_lines() -> list[str]:
    from importlib import resources

    text = resources.files("moa").joinpath("data/tool_tasks.jsonl").read_text()
    return [line for line in text.splitlines() if line.strip()]


def test_tools_md_shows_the_raw_results_rendered() -> None:
    """A figure in docs/TOOLS.md's tables is the figure in docs/bench-tools.json: regenerate the
    tables with ``tools_markdown`` from the JSON, never edit them by hand."""
    docs = Path(__file__).parents[1] / "docs"
    doc = (docs / "TOOLS.md").read_text()
    assert "](bench-tools.json)" in doc
    rendered = tools_markdown(json.loads((docs / "bench-tools.json").read_text()))
    tables = [block for block in rendered.strip().split("\n\n") if block.startswith("|")]
    assert len(tables) == 2  # every configuration and rate; who answered when the ensemble voted
    for table in tables:
        assert table in doc, f"docs/TOOLS.md does not show this table as rendered:\n{table}"
