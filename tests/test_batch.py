"""``moa batch``: the input's checks, a run in-process against the simulator, the budget, retries,
de-duplication, and resuming after a kill without paying twice or losing an item."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from moa.batch import BatchRunner, InputError, Reply, batch_status, read_items
from moa.batch.items import parse_items
from moa.batch.journal import Journal, read_outcomes
from moa.cli.batch_run import BatchOptions, run_batch
from moa.config import MoAConfig
from moa.simulator.server import SimulatorServer
from tests.conftest import FAST_PROFILE
from tests.helpers import clear_faults, model_stats, set_fault, set_pace


def _write(path: Path, lines: list[Any]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _prompts(path: Path, n: int, prefix: str = "question") -> Path:
    return _write(
        path,
        [{"custom_id": f"q{i}", "prompt": f"{prefix} number {i}: why is the sky blue?"} for i in range(n)],
    )


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# -- the input --------------------------------------------------------------------------------------


def test_both_line_shapes_are_read_and_the_preset_fills_a_missing_model() -> None:
    items = parse_items(
        [
            json.dumps({"prompt": "hi"}),
            "",
            json.dumps(
                {
                    "custom_id": "a",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {"model": "single", "messages": [{"role": "user", "content": "x"}]},
                }
            ),
            json.dumps(
                {"custom_id": "b", "url": "/v1/moa", "body": {"messages": [{"role": "user", "content": "y"}]}}
            ),
        ],
        preset="moa-lite",
    )
    assert [(i.custom_id, i.url, i.body["model"], i.line) for i in items] == [
        ("line-1", "/v1/chat/completions", "moa-lite", 1),
        ("a", "/v1/chat/completions", "single", 3),
        ("b", "/v1/moa", "moa-lite", 4),
    ]
    assert items[0].body["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "line 2: not JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        ('{"custom_id": "x"}', "line 2: missing body"),
        ('{"custom_id": "x", "method": "GET", "body": {}}', "method must be POST"),
        ('{"custom_id": "x", "url": "/v1/embeddings", "body": {}}', "url must be one of"),
        ('{"custom_id": "x", "body": {"stream": true}}', "cannot stream"),
        ('{"custom_id": "first", "body": {}}', "'first' is already used on line 1"),
        ('{"prompt": ""}', "'prompt' must be a non-empty string"),
        ('{"prompt": "x", "model": "single"}', "takes only 'prompt' and 'custom_id'"),
    ],
)
def test_a_line_that_cannot_run_is_refused_before_anything_is_sent(line: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_items([json.dumps({"custom_id": "first", "body": {}}), line], preset="moa")


def test_an_empty_or_missing_input_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no items"):
        read_items(_write(tmp_path / "in.jsonl", [""]), "moa")
    with pytest.raises(InputError, match="no such file"):
        read_items(tmp_path / "absent.jsonl", "moa")


# -- a run against the simulator, in-process ---------------------------------------------------------


async def test_a_batch_answers_every_item_as_the_api_would_with_its_cost(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path, state_dir: Path
) -> None:
    src = _prompts(tmp_path / "in.jsonl", 6)
    # Two ids with the same request: sent once, written twice, paid once.
    with src.open("a") as f:
        f.write(
            json.dumps({"custom_id": "again", "prompt": "question number 0: why is the sky blue?"}) + "\n"
        )
    out = tmp_path / "out.jsonl"
    summary = await run_batch(config, BatchOptions(input=src, output=out, preset="single", progress=False))
    assert (summary.total, summary.done, summary.succeeded, summary.errors, summary.stopped) == (
        7,
        7,
        7,
        {},
        None,
    )
    lines = {x["custom_id"]: x for x in _lines(out)}
    assert set(lines) == {f"q{i}" for i in range(6)} | {"again"}
    first = lines["q0"]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    body = first["response"]["body"]
    assert first["response"]["status_code"] == 200 and body["object"] == "chat.completion"
    assert body["model"] == "single" and body["choices"][0]["message"]["content"]
    assert first["moa"]["cost_usd"] > 0 and first["moa"]["tokens"] == body["usage"]["total_tokens"]
    assert lines["again"]["response"]["body"] == body and lines["again"]["moa"]["cost_usd"] == 0
    # Six requests reached the model, not seven; the batch's cost is theirs.
    assert model_stats(sim, "gpt-4.1-mini")["requests"] == 6
    assert summary.cost_usd == pytest.approx(sum(x["moa"]["cost_usd"] for x in lines.values()), abs=1e-6)
    status = batch_status(out)
    assert (status.state, status.total, status.done, status.succeeded) == ("finished", 7, 7, 7)
    # Run again: nothing is left to do, nothing is sent.
    again = await run_batch(config, BatchOptions(input=src, output=out, preset="single", progress=False))
    assert (again.done, again.run_cost_usd) == (7, 0) and model_stats(sim, "gpt-4.1-mini")["requests"] == 6
    assert len(_lines(out)) == 7


async def test_the_api_refuses_an_item_and_the_batch_records_it_and_goes_on(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path, state_dir: Path
) -> None:
    src = _write(
        tmp_path / "in.jsonl",
        [
            {"custom_id": "ok", "prompt": "a fine question"},
            {
                "custom_id": "bad",
                "body": {"model": "no-such-preset", "messages": [{"role": "user", "content": "x"}]},
            },
            {"custom_id": "typo", "body": {"temprature": 1, "messages": [{"role": "user", "content": "x"}]}},
        ],
    )
    out = tmp_path / "out.jsonl"
    summary = await run_batch(config, BatchOptions(input=src, output=out, preset="single", progress=False))
    lines = {x["custom_id"]: x for x in _lines(out)}
    assert lines["ok"]["response"]["status_code"] == 200
    assert lines["bad"]["response"]["status_code"] == 404
    assert lines["bad"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert lines["typo"]["response"]["status_code"] == 400
    assert summary.errors == {"model_not_found": 1, "unknown_parameter": 1}
    assert batch_status(out).errors == summary.errors


async def test_an_item_every_provider_failed_is_recorded_and_rerun_with_retry_errors(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path, state_dir: Path
) -> None:
    src = _prompts(tmp_path / "in.jsonl", 2)
    out = tmp_path / "out.jsonl"
    set_fault(sim, "*", error_500={"rate": 1.0})
    opts = BatchOptions(input=src, output=out, preset="single", progress=False, attempts=1)
    summary = await run_batch(config, opts)
    assert (summary.done, summary.succeeded) == (2, 0), summary
    assert all(x["response"]["status_code"] == 502 for x in _lines(out))
    clear_faults(sim, "*")
    kept = await run_batch(config, opts)
    assert kept.succeeded == 0 and kept.run_cost_usd == 0  # errors are kept unless asked
    rerun = await run_batch(config, opts.model_copy(update={"retry_errors": True}))
    assert (rerun.done, rerun.succeeded) == (2, 2) and rerun.run_cost_usd > 0
    assert sorted(x["custom_id"] for x in _lines(out)) == ["q0", "q1"]  # one line each


async def test_the_budget_holds_before_the_money_is_spent_and_the_batch_stops_cleanly(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path, state_dir: Path
) -> None:
    # Items that write at most 40 tokens, so that what one costs is close to its worst case.
    lines = [
        {"custom_id": f"q{i}", "body": {"max_tokens": 40, "messages": [_user(f"item {i}: why?")]}}
        for i in range(12)
    ]
    src = _write(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out.jsonl"
    # One item's worst case, as the API states it when a cap refuses it.
    probe = tmp_path / "probe.jsonl"
    one = _write(
        tmp_path / "p.jsonl", [{"custom_id": "p", "body": lines[0]["body"] | {"moa": {"max_cost_usd": 1e-9}}}]
    )
    await run_batch(config, BatchOptions(input=one, output=probe, preset="single", progress=False))
    message = _lines(probe)[0]["response"]["body"]["error"]["message"]
    worst = float(message.split("may cost up to $")[1].split(",")[0])
    budget = worst * 1.5  # room for one worst case and a half: a few items, not twelve
    summary = await run_batch(
        config,
        BatchOptions(
            input=src, output=out, preset="single", progress=False, concurrency=3, max_cost_usd=budget
        ),
    )
    assert summary.stopped is not None and "budget" in summary.stopped
    assert 0 < summary.done < 12 and summary.cost_usd <= budget
    assert sum(x["moa"]["cost_usd"] for x in _lines(out)) <= budget
    assert all(x["response"]["status_code"] == 200 for x in _lines(out))  # a refused item is not done
    status = batch_status(out)
    assert status.state.startswith("stopped: the budget") and status.projected_cost_usd is not None
    # A rerun with the same budget spends nothing more: the budget counts what the output holds.
    again = await run_batch(
        config, BatchOptions(input=src, output=out, preset="single", progress=False, max_cost_usd=budget)
    )
    assert again.run_cost_usd == 0 and again.done == summary.done


class _Scripted:
    """A sender that answers from a script: each request gets the next reply for its item."""

    def __init__(self, replies: dict[str, list[Reply]], slow: dict[str, float] | None = None) -> None:
        self.replies, self.slow = replies, slow or {}
        self.sent: list[tuple[str, dict[str, Any]]] = []

    async def send(self, url: str, body: dict[str, Any]) -> Reply:
        item = body["messages"][0]["content"]
        self.sent.append((item, body))
        await asyncio.sleep(self.slow.get(item, 0))
        return self.replies[item].pop(0)


def _ok(cost: float) -> Reply:
    return Reply(200, {"usage": {"total_tokens": 10}}, {"x-moa-cost-usd": str(cost)})


def _over_cap() -> Reply:
    return Reply(400, {"error": {"code": "over_cap", "param": "moa.max_cost_usd", "message": "over"}})


async def test_an_item_refused_for_its_share_waits_for_one_in_flight_then_gets_the_whole_remainder(
    tmp_path: Path,
) -> None:
    items = parse_items([json.dumps({"custom_id": x, "prompt": x}) for x in ("a", "b")], "single")
    sender = _Scripted({"a": [_ok(0.2)], "b": [_over_cap(), _over_cap(), _ok(0.3)]}, slow={"a": 0.05})
    journal = Journal(tmp_path / "out.jsonl")
    runner = BatchRunner(items, journal, sender, concurrency=2, max_cost_usd=1.0)
    summary = await runner.run()
    caps = [(item, body["moa"]["max_cost_usd"]) for item, body in sender.sent]
    # Both start with half of $1; b, refused while a is in flight, waits for a ($0.2), then asks
    # for its share of the $0.8 left (alone now: all of it); refused again with nothing in flight,
    # it tries the whole once more (the script answers that one).
    assert caps[0] == ("a", 0.5) and caps[1] == ("b", 0.5)
    assert caps[2][0] == "b" and caps[2][1] == pytest.approx(0.8)
    assert len(caps) == 4 and caps[3][0] == "b" and caps[3][1] == pytest.approx(0.8)
    assert summary.done == 2 and summary.cost_usd == pytest.approx(0.5) and summary.stopped is None


async def test_an_item_the_whole_remainder_cannot_hold_stops_the_batch(tmp_path: Path) -> None:
    items = parse_items([json.dumps({"custom_id": x, "prompt": x}) for x in ("a", "b")], "single")
    sender = _Scripted({"a": [_ok(0.6)], "b": [_over_cap(), _over_cap(), _over_cap()]})
    runner = BatchRunner(items, Journal(tmp_path / "out.jsonl"), sender, concurrency=1, max_cost_usd=1.0)
    summary = await runner.run()
    assert summary.done == 1 and summary.stopped is not None and "cannot hold another item" in summary.stopped
    # b asked for all that was left ($0.4), twice (its share, then the whole), and nothing more.
    assert [round(b["moa"]["max_cost_usd"], 6) for i, b in sender.sent if i == "b"] == [0.4, 0.4]


async def test_the_items_own_cap_is_kept_and_its_refusal_is_its_outcome(tmp_path: Path) -> None:
    line = {
        "custom_id": "a",
        "body": {"moa": {"max_cost_usd": 0.01}, "messages": [{"role": "user", "content": "a"}]},
    }
    items = parse_items([json.dumps(line)], "single")
    sender = _Scripted({"a": [_over_cap()]})
    summary = await BatchRunner(items, Journal(tmp_path / "o.jsonl"), sender, max_cost_usd=1.0).run()
    assert sender.sent[0][1]["moa"]["max_cost_usd"] == 0.01
    assert summary.errors == {"over_cap": 1} and summary.stopped is None


async def test_retry_after_is_waited_and_401_stops_the_batch(tmp_path: Path) -> None:
    items = parse_items([json.dumps({"custom_id": x, "prompt": x}) for x in ("a", "b")], "single")
    sender = _Scripted(
        {
            "a": [Reply(429, {"error": {"code": "rate_limit_exceeded"}}, {"retry-after": "7"}), _ok(0.1)],
            "b": [],
        }
    )
    waits: list[float] = []
    runner = BatchRunner(items[:1], Journal(tmp_path / "a.jsonl"), sender)

    async def sleep(s: float) -> None:
        waits.append(s)

    runner.sleep = sleep
    assert (await runner.run()).succeeded == 1 and waits == [7.0]
    denied = _Scripted({"a": [Reply(401, {"error": {"code": "invalid_api_key"}})] * 3, "b": [_ok(0.1)]})
    summary = await BatchRunner(items, Journal(tmp_path / "b.jsonl"), denied, concurrency=1).run()
    assert summary.done == 0 and summary.stopped is not None and "401" in summary.stopped
    assert [i for i, _ in denied.sent] == ["a"]


# -- crash and resume ---------------------------------------------------------------------------------


def test_a_torn_last_line_is_not_an_item(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    good = {"custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": None, "moa": {}}
    out.write_text(json.dumps(good) + "\n" + '{"custom_id": "b", "resp')
    assert [o.custom_id for o in read_outcomes(out)[0]] == ["a"]
    journal = Journal(out)
    journal.close()
    assert out.read_text() == json.dumps(good) + "\n"  # cut off, so the next line starts clean


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from moa.cli.batch_run import BatchOptions, run_batch
    from moa.config import load_config
    cfg = load_config(None)
    sim = cfg.simulator.model_copy(update={"url": sys.argv[1], "mode": "on"})
    cfg = cfg.model_copy(update={"simulator": sim})
    src, out = Path(sys.argv[2]), Path(sys.argv[3])
    opts = BatchOptions(input=src, output=out, preset="single", concurrency=3, progress=False)
    asyncio.run(run_batch(cfg, opts))
    """
)


async def test_killed_mid_run_it_resumes_with_no_item_paid_twice_and_none_lost(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path, state_dir: Path
) -> None:
    """A real process, killed with SIGKILL while it writes: the rerun sends only what the output
    does not hold, and every id ends with exactly one line."""
    n = 30
    src = _prompts(tmp_path / "in.jsonl", n, "kill")
    out = tmp_path / "out.jsonl"
    set_pace(sim, 0.1, 400.0)  # about half a second an item: the kill lands mid-run
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, sim.url, str(src), str(out), env=env
    )
    try:
        deadline = time.monotonic() + 60
        # Another process writes the file: there is nothing to wait on but the file itself.
        while time.monotonic() < deadline and len(read_outcomes(out)[0]) < 8:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        assert child.returncode is None, "the batch finished before it could be killed"
        child.send_signal(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), 10)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    before = len(read_outcomes(out)[0])
    assert 8 <= before < n
    assert batch_status(out).state == "interrupted"
    sent_before = model_stats(sim, "gpt-4.1-mini")["requests"]
    # Sent before the kill: the items done, and at most the three in flight (cut by the kill).
    assert before <= sent_before <= before + 3
    # The rerun need not be slow (only the kill had to land mid-run): the session's pace again,
    # the counters kept.
    set_pace(sim, FAST_PROFILE.default.ttft_s, FAST_PROFILE.default.tokens_per_s)
    summary = await run_batch(config, BatchOptions(input=src, output=out, preset="single", progress=False))
    assert (summary.done, summary.succeeded) == (n, n)
    ids = [x["custom_id"] for x in _lines(out)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(n))  # none lost, none written twice
    # The rerun sent exactly the items the output did not hold: nothing done was paid again.
    assert model_stats(sim, "gpt-4.1-mini")["requests"] - sent_before == n - before


async def test_every_answer_says_what_it_cost_in_a_header(
    config: MoAConfig, sim: SimulatorServer, state_dir: Path
) -> None:
    """``x-moa-cost-usd``, what the batch counts its budget with: the run's cost, on both answering
    endpoints, whether or not the request asked for ``moa.detail``."""
    from moa.cli.batch_run import in_process_sender

    question = {"messages": [_user("why is the sky blue?")]}
    async with in_process_sender(config, None) as sender:
        detailed = await sender.send(
            "/v1/chat/completions", question | {"model": "moa-lite", "moa": {"detail": True}}
        )
        plain = await sender.send("/v1/chat/completions", question | {"model": "single"})
        planned = await sender.send("/v1/moa", question | {"preset": "single"})
    assert float(detailed.headers["x-moa-cost-usd"]) == pytest.approx(
        detailed.body["moa"]["totals"]["cost_usd"]
    )
    assert float(detailed.headers["x-moa-cost-usd"]) > 0 and float(plain.headers["x-moa-cost-usd"]) > 0
    assert float(planned.headers["x-moa-cost-usd"]) == pytest.approx(planned.body["cost_usd"])


# -- the command --------------------------------------------------------------------------------------


def test_moa_batch_run_then_status_on_the_command_line(
    config: MoAConfig,
    sim: SimulatorServer,
    tmp_path: Path,
    state_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from moa.cli import main

    cfg_file = tmp_path / "moa.yaml"
    cfg_file.write_text(f"simulator: {{url: {sim.url}, mode: on}}\n")
    src, out = _prompts(tmp_path / "in.jsonl", 3), tmp_path / "out.jsonl"
    args = ["batch", "run", str(src), "--out", str(out), "--preset", "single", "--config", str(cfg_file)]
    assert main([*args, "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["done"], summary["succeeded"], summary["stopped"]) == (3, 3, None)
    assert main(["batch", "status", str(out)]) == 0
    shown = capsys.readouterr().out
    assert f"{out}: finished" in shown and "done       3 of 3 (3 answered)" in shown
    assert main(["batch", "status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["done"] == 3
    # A line that cannot run: refused with its line number before anything is sent (exit 2).
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "fine"}, "{oops"])
    assert (
        main(["batch", "run", str(bad), "--out", str(tmp_path / "o2.jsonl"), "--config", str(cfg_file)]) == 2
    )
    assert "line 2: not JSON" in capsys.readouterr().err
    # Another batch's output is refused rather than mixed.
    other = _prompts(tmp_path / "other.jsonl", 2, "other")
    other_args = ["batch", "run", str(other), "--out", str(out), "--config", str(cfg_file), "--no-progress"]
    assert main([*other_args, "--preset", "single"]) == 2
    assert "another batch's output" in capsys.readouterr().err


async def test_a_batch_runs_on_a_running_service_over_http(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path, state_dir: Path
) -> None:
    """``--url``: the same items, the same output lines, from ``moa serve --local``'s server."""
    from tests.helpers import ApiServer

    src, out = _prompts(tmp_path / "in.jsonl", 3), tmp_path / "out.jsonl"
    with ApiServer(config) as server:
        opts = BatchOptions(input=src, output=out, preset="single", progress=False, url=server.url)
        summary = await run_batch(config, opts)
    assert (summary.done, summary.succeeded) == (3, 3) and summary.cost_usd > 0
    lines = _lines(out)
    assert all(x["response"]["body"]["object"] == "chat.completion" for x in lines)
    assert all(x["response"]["request_id"] for x in lines)  # the trace id, from the header
    assert model_stats(sim, "gpt-4.1-mini")["requests"] == 3


async def test_an_item_an_earlier_run_answered_under_another_id_is_written_without_a_request(
    config: MoAConfig, sim: SimulatorServer, tmp_path: Path, state_dir: Path
) -> None:
    """And what a run keeps of each done item is not its answer: the answers stay in the file."""
    src, out = _prompts(tmp_path / "in.jsonl", 2), tmp_path / "out.jsonl"
    await run_batch(config, BatchOptions(input=src, output=out, preset="single", progress=False))
    with src.open("a") as f:
        f.write(
            json.dumps({"custom_id": "again", "prompt": "question number 1: why is the sky blue?"}) + "\n"
        )
    summary = await run_batch(config, BatchOptions(input=src, output=out, preset="single", progress=False))
    lines = {x["custom_id"]: x for x in _lines(out)}
    assert summary.done == 3 and model_stats(sim, "gpt-4.1-mini")["requests"] == 2
    assert lines["again"]["response"]["body"] == lines["q1"]["response"]["body"]
    assert lines["again"]["moa"]["cost_usd"] == 0
    journal = Journal(out)
    journal.close()
    assert len(journal.done) == 3 and all(o.body is None for o in journal.done.values())
