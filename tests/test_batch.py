"""``moa batch``: the input's checks, a run in-process against the simulator, the budget, retries,
de-duplication, and resuming after a kill without paying twice or losing an item."""

from __future__ import annotations

import asyncio
import json
import os
import re
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
        # Its own app, with nobody to yield to: not batch work, the whole limits are its.
        assert "x-moa-priority" not in sender.client.headers
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
        assert server.server.api is not None
        openai = server.server.api.engine.caller.clients["openai"]  # type: ignore[attr-defined]
        # Sent as batch work: the service's calls for them took only the providers' spare capacity.
        assert openai.limits.background_calls == 3
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


# -- batch work goes after the interactive work, on a service ------------------------------------------


async def test_a_request_marked_as_batch_work_marks_its_calls_and_an_unknown_priority_is_refused(
    config: MoAConfig, sim: SimulatorServer, state_dir: Path
) -> None:
    import httpx

    from moa.local import local_app

    body = {"model": "single", "messages": [_user("why is the sky blue?")]}
    async with local_app(config, run_batches=False) as app:
        openai = app.state.api.engine.caller.clients["openai"]
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            plain = await client.post("/v1/chat/completions", json=body)
            assert plain.status_code == 200 and openai.limits.background_calls == 0
            marked = await client.post("/v1/chat/completions", json=body, headers={"x-moa-priority": "batch"})
            assert marked.status_code == 200 and openai.limits.background_calls == 1
            said = await client.post(
                "/v1/moa",
                json={"preset": "single", "messages": body["messages"]},
                headers={"X-Moa-Priority": "Interactive"},
            )
            assert said.status_code == 200 and openai.limits.background_calls == 1
            odd = await client.post("/v1/chat/completions", json=body, headers={"x-moa-priority": "urgent"})
    assert odd.status_code == 400
    assert odd.json()["error"] | {"message": ""} == {
        "message": "",
        "type": "invalid_request_error",
        "code": "invalid_priority",
        "param": "x-moa-priority",
    }
    assert model_stats(sim, "gpt-4.1-mini")["requests"] == 3  # the refused one called nothing


async def test_a_batch_request_waits_for_its_turn_behind_the_interactive_load(
    config: MoAConfig, sim: SimulatorServer, state_dir: Path
) -> None:
    """Two slots, batch.yield_at 0.5: while one interactive request runs, a request marked as batch
    work waits at the gate (its model not called) and starts once the interactive one ends; an
    unmarked request beside it starts at once."""
    import httpx

    from moa.local import local_app

    raw = config.model_dump(mode="json")
    raw["server"]["max_concurrent_requests"] = 2
    raw["batch"]["yield_at"] = 0.5
    cfg = MoAConfig.model_validate(raw)
    set_fault(sim, "claude-haiku-4-5", hang={"rate": 1.0, "hang_s": 1.5})
    held = {"model": "anthropic/claude-haiku-4-5", "messages": [_user("hold on")]}
    body = {"model": "single", "messages": [_user("why is the sky blue?")]}
    ended: dict[str, float] = {}

    async def post(client: httpx.AsyncClient, name: str, payload: Any, **headers: str) -> int:
        status = (await client.post("/v1/chat/completions", json=payload, headers=headers)).status_code
        ended[name] = time.monotonic()
        return status

    async with local_app(cfg, run_batches=False) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=30) as client:
            interactive = asyncio.create_task(post(client, "interactive", held))
            while model_stats(sim, "claude-haiku-4-5")["in_flight"] < 1:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
            batch = asyncio.create_task(post(client, "batch", body, **{"x-moa-priority": "batch"}))
            await asyncio.sleep(0.5)
            assert model_stats(sim, "gpt-4.1-mini")["requests"] == 0 and not batch.done()
            assert app.state.api.batch_gate.busy == 0
            assert await post(client, "beside", body) == 200  # unmarked: at once, in the second slot
            assert not interactive.done()
            assert (await interactive, await batch) == (200, 200)
    assert ended["beside"] < ended["interactive"] < ended["batch"]
    assert app.state.api.batch_gate.busy == 0 and app.state.api.admission.in_flight == 0


# -- on a Ray cluster: --address ------------------------------------------------------------------


class _EntryPoint:
    def __init__(self, module: Any) -> None:
        self.module = module

    def load(self) -> Any:
        if isinstance(self.module, BaseException):
            raise self.module
        return self.module


def _ray_side(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[tuple[str, str | None]]:
    """``moa.cluster``'s entry point, as an installed project has it, over ``module`` (None: no
    entry point; an exception: what loading it raises). Returns the addresses it was asked about."""
    import importlib.metadata
    import types

    asked: list[tuple[str, str | None]] = []
    if module is not None and not isinstance(module, BaseException):
        inner = module

        def find_service(address: str, app: str | None) -> Any:
            asked.append((address, app))
            return inner(address, app)

        module = types.SimpleNamespace(find_service=find_service)

    def entry_points(group: str, name: str) -> list[_EntryPoint]:
        assert (group, name) == ("moa.cluster", "ray")
        return [] if module is None else [_EntryPoint(module)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    return asked


def test_address_sends_the_batch_to_the_app_the_ray_side_finds(
    config: MoAConfig,
    sim: SimulatorServer,
    tmp_path: Path,
    state_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The core finds the Ray side by entry point (never importing Ray), asks it for the app on
    the cluster, and sends there as to --url: as batch work."""
    from moa.batch.senders import FoundService
    from moa.cli import main
    from tests.helpers import ApiServer

    src, out = _prompts(tmp_path / "in.jsonl", 3), tmp_path / "out.jsonl"
    with ApiServer(config) as server:
        asked = _ray_side(monkeypatch, lambda address, app: FoundService(url=server.url, app="moa", nodes=2))
        args = ["batch", "run", str(src), "--out", str(out), "--preset", "single", "--no-progress"]
        assert main([*args, "--address", "10.0.0.1:6379"]) == 0
        assert server.server.api is not None
        assert server.server.api.engine.caller.clients["openai"].limits.background_calls == 3  # type: ignore[attr-defined]
    assert asked == [("10.0.0.1:6379", None)]
    err = capsys.readouterr().err
    assert f"the app 'moa' on the Ray cluster at 10.0.0.1:6379 (2 nodes), at {server.url}" in err
    assert len(_lines(out)) == 3 and model_stats(sim, "gpt-4.1-mini")["requests"] == 3


def test_address_says_why_there_is_no_service_to_send_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from moa.batch.senders import ServiceNotFound
    from moa.cli import main

    src, out = _prompts(tmp_path / "in.jsonl", 1), tmp_path / "out.jsonl"
    args = ["batch", "run", str(src), "--out", str(out), "--no-progress"]

    def none_there(address: str, app: str | None) -> Any:
        raise ServiceNotFound(f"no Ray cluster at {address}: nothing listens")

    for module, said in [
        (none_there, "moa batch: no Ray cluster at auto: nothing listens"),
        (None, "no 'moa.cluster' entry point named 'ray'): reinstall the project"),
        (ImportError("No module named 'ray'"), "--address needs Ray: pip install 'moa-serve[serve]'"),
    ]:
        _ray_side(monkeypatch, module)
        assert main([*args, "--address", "auto"]) == 2
        assert said in capsys.readouterr().err
    assert main([*args, "--app", "moa"]) == 2
    assert "--app goes with --address" in capsys.readouterr().err
    with pytest.raises(SystemExit) as both:
        main([*args, "--address", "auto", "--url", "http://127.0.0.1:8000"])
    assert both.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert not out.exists()


def test_the_ray_side_picks_the_moa_app_and_a_proxy_this_process_can_reach() -> None:
    from moa.batch.senders import ServiceNotFound
    from moa_actors.cluster_service import _pick, service_host

    moa_app = {"deployments": {"ingress": {}, "health-board": {}, "provider-openai": {}}}
    other = {"deployments": {"ingress": {}}}
    assert _pick("auto", {"moa": moa_app, "floor": other}, None)[0] == "moa"
    assert _pick("auto", {"mine": moa_app, "floor": other}, None)[0] == "mine"  # the only moa app
    assert _pick("auto", {"moa": moa_app, "keyed": moa_app}, "keyed")[0] == "keyed"
    assert _pick("auto", {"moa": moa_app, "keyed": moa_app}, None)[0] == "moa"
    for apps, wanted, said in [
        ({"a": moa_app, "b": moa_app}, None, "several moa apps run on auto (a, b): choose one with --app"),
        ({"floor": other}, None, "no moa app runs on the Ray cluster at auto (its apps: floor)"),
        ({"a": moa_app}, "b", "no moa app named 'b' on auto (moa apps: a)"),
    ]:
        with pytest.raises(ServiceNotFound, match=re.escape(said)):
            _pick("auto", apps, wanted)

    proxies = {
        "head": {"status": "HEALTHY", "node_ip": "10.0.0.1"},
        "worker": {"status": "HEALTHY", "node_ip": "10.0.0.2"},
        "gone": {"status": "UNHEALTHY", "node_ip": "10.0.0.3"},
    }
    assert service_host("auto", "0.0.0.0", proxies, "worker") == "127.0.0.1"  # this node's own
    assert service_host("auto", "127.0.0.1", proxies, "head") == "127.0.0.1"
    assert service_host("10.0.0.1:6379", "0.0.0.0", proxies, "elsewhere") == "10.0.0.1"
    assert service_host("ray://head.example:10001", "0.0.0.0", proxies, None) == "head.example"
    assert service_host("auto", "10.0.0.9", proxies, "head") == "10.0.0.9"  # bound to one address
    with pytest.raises(ServiceNotFound, match=re.escape("listen on 127.0.0.1 only")):
        service_host("ray://head.example:10001", "127.0.0.1", proxies, None)
    with pytest.raises(ServiceNotFound, match="no Serve HTTP proxy is running"):
        service_host("auto", "0.0.0.0", {"gone": proxies["gone"]}, "gone")


async def test_a_batch_request_waits_for_its_keys_room_where_another_gets_a_429(
    config: MoAConfig, sim: SimulatorServer, state_dir: Path
) -> None:
    """A key allowed one request at a time on the replica: three requests marked as batch work at
    once are all answered (each waits at the gate for the key's room); three unmarked ones, two
    of them refused with 429 ``concurrency_limit_exceeded``, as before."""
    import httpx

    from moa.auth import new_key, new_record
    from moa.local import local_app
    from moa.state import KeyLimits
    from moa.state.sqlite_store import SQLiteStore

    key = new_key()
    store = SQLiteStore(state_dir / "state.db")
    await store.create_key(new_record("batcher", key, KeyLimits(max_concurrent=1)))
    await store.close()
    set_pace(sim, 0.3, 400.0)  # long enough for three at once to overlap
    body = {"model": "single", "messages": [_user("why is the sky blue?")]}
    headers = {"authorization": f"Bearer {key}"}
    async with local_app(config, lambda: SQLiteStore(state_dir / "state.db"), run_batches=False) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://127.0.0.1", headers=headers, timeout=30
        ) as client:
            marked = await asyncio.gather(
                *(
                    client.post("/v1/chat/completions", json=body, headers={"x-moa-priority": "batch"})
                    for _ in range(3)
                )
            )
            unmarked = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body) for _ in range(3))
            )
    assert [r.status_code for r in marked] == [200, 200, 200]
    assert sorted(r.status_code for r in unmarked) == [200, 429, 429]
    assert {r.json()["error"]["code"] for r in unmarked if r.status_code == 429} == {
        "concurrency_limit_exceeded"
    }
