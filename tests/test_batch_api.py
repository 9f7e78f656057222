"""The OpenAI Batch API on the service (``/v1/files``, ``/v1/batches``): the official ``openai``
client's batch flow, unchanged, against ``moa serve --local``'s own server with a real SQLite state
file; each key sees its own ids only; a malformed input fails at validation; cancel; a restarted
service picks its batches up again without paying twice; the leases that keep two replicas from
running one batch, on SQLite and on a real redis-server."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from moa.api.batch_worker import lease_name
from moa.api.errors import ApiError
from moa.api.multipart import FormReader
from moa.batch.journal import Outcome
from moa.cli import main
from moa.cli.batch_run import BatchOptions, run_batch
from moa.config import MoAConfig, SimulatorMode, load_config
from moa.simulator.server import SimulatorServer
from moa.state.batches import BatchRecord, BatchStore, FileRecord
from moa.state.redis_store import RedisStore
from moa.state.sqlite_store import SQLiteStore
from tests.helpers import ApiServer, model_stats, set_fault, set_pace, sim_in_flight
from tests.waiting import wait_until, wait_until_sync

MODEL = "gpt-4.1-mini"  # what the preset "single" calls, once per request


def _config(sim: SimulatorServer, **batch: Any) -> MoAConfig:
    cfg = load_config(None)
    settings = {"poll_s": 0.2, "lease_s": 3.0, "concurrency": 2} | batch
    return cfg.model_copy(
        update={
            "simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON}),
            "batch": cfg.batch.model_copy(update=settings),
        }
    )


def _serve(cfg: MoAConfig, state_dir: Path) -> ApiServer:
    return ApiServer(cfg, store=lambda: SQLiteStore(state_dir / "state.db"))


def create_key(capsys: pytest.CaptureFixture[str], name: str, *options: str) -> str:
    """``moa keys create`` as an operator runs it; the key is the one line on stdout."""
    capsys.readouterr()
    assert main(["keys", "create", name, *options]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk-")
    return key


def client(server: ApiServer, key: str | None) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key or "none", max_retries=0)


def line(custom_id: str, text: str, **body: Any) -> dict[str, Any]:
    """One line of OpenAI's batch input."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "single", "messages": [{"role": "user", "content": text}], **body},
    }


def jsonl(lines: list[Any]) -> bytes:
    return "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode()


def finished(oai: openai.OpenAI, batch_id: str, *, within_s: float = 60) -> Any:
    """Polls ``batches.retrieve`` as a client does, until the batch is in a terminal status."""
    return wait_until_sync(
        lambda: oai.batches.retrieve(batch_id),
        lambda b: b.status in ("completed", "failed", "expired", "cancelled"),
        within_s=within_s,
        interval=0.1,
        what=f"batch {batch_id} to end",
    )


def content_lines(oai: openai.OpenAI, file_id: str) -> list[dict[str, Any]]:
    return [json.loads(x) for x in oai.files.content(file_id).text.splitlines()]


@pytest.fixture
def cfg(sim: SimulatorServer) -> MoAConfig:
    return _config(sim)


@pytest.fixture
def server(cfg: MoAConfig, state_dir: Path) -> Iterator[ApiServer]:
    with _serve(cfg, state_dir) as s:
        yield s


# -- the openai client's flow -------------------------------------------------------------------------


def test_the_openai_client_batch_flow_works_unchanged(
    server: ApiServer, sim: SimulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    oai = client(server, create_key(capsys, "batcher"))
    lines = [
        line("a", "Why is the sky blue?"),
        line("b", "Why is the sea salty?"),
        line("c", "Why do cats purr?"),
        line("again", "Why is the sky blue?"),  # the same request as "a": sent once
        line("bad", "Hello?", frobnicate=1),  # the API refuses it (400): an error line
    ]
    uploaded = oai.files.create(file=("questions.jsonl", jsonl(lines)), purpose="batch")
    assert (uploaded.object, uploaded.purpose, uploaded.filename) == ("file", "batch", "questions.jsonl")
    assert uploaded.bytes == len(jsonl(lines)) and uploaded.id.startswith("file-")
    assert oai.files.retrieve(uploaded.id).bytes == uploaded.bytes
    assert oai.files.content(uploaded.id).content == jsonl(lines)

    created = oai.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "flow"},
    )
    assert (created.object, created.status, created.input_file_id) == ("batch", "validating", uploaded.id)
    assert created.expires_at == created.created_at + 24 * 3600

    done = finished(oai, created.id)
    assert done.status == "completed", done
    assert (done.endpoint, done.completion_window, done.metadata) == (
        "/v1/chat/completions",
        "24h",
        {"run": "flow"},
    )
    assert done.in_progress_at and done.finalizing_at and done.completed_at and done.errors is None
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (5, 4, 1)

    assert done.output_file_id and done.error_file_id
    output = {x["custom_id"]: x for x in content_lines(oai, done.output_file_id)}
    assert set(output) == {"a", "b", "c", "again"}
    for x in output.values():
        assert set(x) == {"id", "custom_id", "response", "error"} and x["error"] is None
        assert x["id"].startswith("batch_req_") and x["response"]["status_code"] == 200
        assert x["response"]["body"]["object"] == "chat.completion"
        assert x["response"]["request_id"]  # the answer's trace id
    assert output["again"]["response"]["body"] == output["a"]["response"]["body"]
    (bad,) = content_lines(oai, done.error_file_id)
    assert bad["custom_id"] == "bad" and bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["code"] == "unknown_parameter"
    assert oai.files.retrieve(done.output_file_id).purpose == "batch_output"
    # Three requests reached a model: "again" was answered by "a"'s, "bad" was refused first.
    assert model_stats(sim, MODEL)["requests"] == 3
    # As background work: their calls took only the provider's spare capacity.
    assert server.server.api is not None
    assert server.server.api.engine.caller.clients["openai"].limits.background_calls == 3  # type: ignore[attr-defined]
    assert [b.id for b in oai.batches.list()] == [created.id]


def test_another_key_gets_404_for_ids_that_are_not_its_own(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    owner = client(server, create_key(capsys, "owner"))
    other = client(server, create_key(capsys, "other"))
    uploaded = owner.files.create(file=("in.jsonl", jsonl([line("a", "Hi?")])), purpose="batch")
    batch = owner.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    for call in (
        lambda: other.files.retrieve(uploaded.id),
        lambda: other.files.content(uploaded.id),
        lambda: other.batches.retrieve(batch.id),
        lambda: other.batches.cancel(batch.id),
        lambda: other.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        ),
    ):
        with pytest.raises(openai.NotFoundError) as refused:
            call()
        assert refused.value.code == "not_found"
    assert list(other.batches.list()) == []
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve("file-doesnotexist")  # the same answer as for another key's id
    with pytest.raises(openai.AuthenticationError):
        client(server, None).batches.retrieve(batch.id)
    assert finished(owner, batch.id).status == "completed"
    assert [b.id for b in owner.batches.list()] == [batch.id]


def test_a_malformed_line_fails_the_batch_at_validation_naming_it(
    server: ApiServer, sim: SimulatorServer, capsys: pytest.CaptureFixture[str]
) -> None:
    oai = client(server, create_key(capsys, "batcher"))
    lines = [
        line("a", "Why?"),
        '{"custom_id": "b", "method": "POST"',  # not JSON
        line("c", "Why?") | {"url": "/v1/moa"},  # not the batch's endpoint
        line("a", "Again?"),  # a custom_id used twice
    ]
    uploaded = oai.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    batch = oai.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = finished(oai, batch.id)
    assert done.status == "failed" and done.failed_at and done.in_progress_at is None
    assert done.errors is not None and done.errors.object == "list"
    assert [(e.line, e.code) for e in done.errors.data or []] == [
        (2, "invalid_json_line"),
        (3, "mismatched_endpoint"),
        (4, "duplicate_custom_id"),
    ]
    assert done.errors.data and "line 2" in (done.errors.data[0].message or "")
    assert model_stats(sim, MODEL)["requests"] == 0  # nothing was sent


def test_bad_requests_get_clear_openai_style_errors(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _serve(_config(sim, max_file_bytes=2000), state_dir) as server:
        oai = client(server, create_key(capsys, "batcher"))
        with pytest.raises(openai.BadRequestError) as wrong_purpose:
            oai.files.create(file=("in.jsonl", jsonl([line("a", "Hi?")])), purpose="fine-tune")
        assert wrong_purpose.value.body["param"] == "purpose"  # type: ignore[index]
        with pytest.raises(openai.APIStatusError) as too_big:
            oai.files.create(file=("in.jsonl", b"x" * 5000), purpose="batch")
        assert too_big.value.status_code == 413 and too_big.value.code == "file_too_large"
        uploaded = oai.files.create(file=("in.jsonl", jsonl([line("a", "Hi?")])), purpose="batch")
        for kwargs, param in (
            ({"completion_window": "1h"}, "completion_window"),
            ({"endpoint": "/v1/embeddings"}, "endpoint"),
            ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ):
            args: dict[str, Any] = {"endpoint": "/v1/chat/completions", "completion_window": "24h"} | kwargs
            with pytest.raises(openai.BadRequestError) as refused:
                oai.batches.create(input_file_id=uploaded.id, **args)
            assert refused.value.body["param"] == param  # type: ignore[index]
        with pytest.raises(openai.BadRequestError):
            oai.batches.list(limit=0)
        headers = {"Authorization": f"Bearer {oai.api_key}"}
        not_a_form = httpx.post(f"{server.url}/v1/files", content=b"{}", headers=headers)
        assert (
            not_a_form.status_code == 400 and "multipart/form-data" in not_a_form.json()["error"]["message"]
        )
        batch = oai.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert finished(oai, batch.id).status == "completed"
        with pytest.raises(openai.ConflictError):
            oai.batches.cancel(batch.id)


def test_batches_are_listed_newest_first_a_page_at_a_time(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    oai = client(server, create_key(capsys, "batcher"))
    uploaded = oai.files.create(file=("in.jsonl", jsonl(["not json"])), purpose="batch")
    ids = [
        oai.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(3)
    ]
    first = oai.batches.list(limit=2)
    assert [b.id for b in first.data] == [ids[2], ids[1]] and first.has_more
    rest = oai.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in rest.data] == [ids[0]] and not rest.has_more
    assert [b.id for b in oai.batches.list(limit=1)] == ids[::-1]  # the client follows the pages


# -- the work: cancel, priority, budget ---------------------------------------------------------------


def test_a_cancelled_batch_stops_taking_requests_and_keeps_what_was_done(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_pace(sim, ttft_s=0.3, tokens_per_s=400)
    with _serve(_config(sim, concurrency=1), state_dir) as server:
        oai = client(server, create_key(capsys, "batcher"))
        lines = [line(f"q{i}", f"Question {i}: why?", max_tokens=20) for i in range(12)]
        uploaded = oai.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = oai.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_until_sync(
            lambda: model_stats(sim, MODEL)["requests"], lambda n: n >= 2, what="two requests sent"
        )
        cancelling = oai.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
        done = finished(oai, batch.id)
        assert done.status == "cancelled" and done.cancelled_at and done.request_counts is not None
        answered = done.request_counts.completed
        assert 2 <= answered < 12 and done.request_counts.failed == 0
        assert done.output_file_id and len(content_lines(oai, done.output_file_id)) == answered
        # The request in progress at the cancel finished and was written; none started after it.
        assert model_stats(sim, MODEL)["requests"] == answered
        assert oai.batches.cancel(batch.id).status == "cancelled"  # again: as it is


def test_batch_work_is_bounded_on_each_replica(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``batch.concurrency`` requests at most in progress, all of the replica's batches together."""
    set_pace(sim, ttft_s=0.3, tokens_per_s=400)
    with _serve(_config(sim, concurrency=2), state_dir) as server:
        oai = client(server, create_key(capsys, "batcher"))
        ids = []
        for b in range(2):
            lines = [line(f"q{i}", f"Batch {b}, question {i}: why?", max_tokens=20) for i in range(5)]
            uploaded = oai.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
            ids.append(
                oai.batches.create(
                    input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
                ).id
            )
        seen = set()
        while not all(oai.batches.retrieve(i).status == "completed" for i in ids):
            seen.add(sim_in_flight(sim))
            time.sleep(0.02)
        assert max(seen) == 2, seen  # reached, never passed
        assert model_stats(sim, MODEL)["requests"] == 10


def test_batch_requests_wait_while_interactive_ones_hold_the_replica(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``batch.yield_at`` at a quarter of four slots, a batch request starts only while no
    interactive request is in progress: one is held two seconds at its model, and no batch request
    reaches a model until it is done."""
    set_fault(sim, "gpt-4.1", hang={"rate": 1.0, "hang_s": 2.0})
    cfg = _config(sim, yield_at=0.25)
    cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"max_concurrent_requests": 4})})
    with _serve(cfg, state_dir) as server:
        oai = client(server, create_key(capsys, "batcher"))
        question = [{"role": "user", "content": "Why?"}]
        interactive = threading.Thread(
            target=lambda: oai.chat.completions.create(model="openai/gpt-4.1", messages=question)  # type: ignore[arg-type]
        )
        interactive.start()
        wait_until_sync(lambda: model_stats(sim, "gpt-4.1")["in_flight"], lambda n: n == 1, what="the call")
        uploaded = oai.files.create(
            file=("in.jsonl", jsonl([line("a", "Why?"), line("b", "How?")])), purpose="batch"
        )
        batch = oai.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        waited = 0  # looks at the batch in progress, its requests held back
        while True:
            running = oai.batches.retrieve(batch.id).status == "in_progress"
            sent = model_stats(sim, MODEL)["requests"]
            # Read after: the interactive call was in progress when ``sent`` was read, too.
            if model_stats(sim, "gpt-4.1")["in_flight"] == 0:
                break
            assert sent == 0, "a batch request started beside an interactive one"
            waited += running
        interactive.join()
        assert waited > 0
        assert finished(oai, batch.id).status == "completed"
        assert model_stats(sim, MODEL)["requests"] == 2


def test_the_keys_budget_applies_to_its_batches(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with _serve(_config(sim, attempts=1), state_dir) as server:
        oai = client(server, create_key(capsys, "poor", "--budget-usd", "0.000001"))
        uploaded = oai.files.create(
            file=("in.jsonl", jsonl([line("a", "Why?"), line("b", "How?")])), purpose="batch"
        )
        batch = oai.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = finished(oai, batch.id)
        assert done.status == "completed" and done.output_file_id is None and done.error_file_id
        refused = content_lines(oai, done.error_file_id)
        assert {x["response"]["status_code"] for x in refused} == {429}
        assert {x["response"]["body"]["error"]["code"] for x in refused} == {"insufficient_quota"}
        assert model_stats(sim, MODEL)["requests"] == 0


def test_a_key_revoked_while_its_batch_runs_fails_the_batch_keeping_what_was_done(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_pace(sim, ttft_s=0.2, tokens_per_s=400)
    with _serve(_config(sim, concurrency=1), state_dir) as server:
        oai = client(server, create_key(capsys, "leaving"))
        lines = [line(f"q{i}", f"Question {i}: why?", max_tokens=20) for i in range(30)]
        uploaded = oai.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = oai.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_until_sync(
            lambda: model_stats(sim, MODEL)["requests"], lambda n: n >= 2, what="two requests sent"
        )
        assert main(["keys", "revoke", "leaving"]) == 0
        done = wait_until_sync(
            lambda: _record(state_dir, batch.id),
            lambda b: b.status in ("completed", "failed"),
            interval=0.1,
            what="the batch to end",
        )
    assert done.status == "failed" and done.failed_at and done.errors is not None
    assert done.errors[0]["code"] == "invalid_api_key"
    answered = done.request_counts.completed
    assert 2 <= answered < 30 and done.output_file_id is not None
    assert model_stats(sim, MODEL)["requests"] == answered  # nothing sent once the key was refused


def test_a_batch_not_done_within_its_window_expires_with_the_rest_as_errors(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A batch whose 24 hours passed (while no replica ran it: its replicas were down) expires
    when one takes it up: done items in the output, the rest in the error file."""
    key = create_key(capsys, "batcher")
    batch_id = "batch_too_late"
    _left_in_progress(
        state_dir, batch_id, [line("a", "Why?"), line("b", "How?")], expires_at=int(time.time()) - 1
    )
    with _serve(_config(sim), state_dir) as server:
        oai = client(server, key)
        done = finished(oai, batch_id)
        assert done.status == "expired" and done.expired_at and done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
        assert done.output_file_id and done.error_file_id
        assert [x["custom_id"] for x in content_lines(oai, done.output_file_id)] == ["a"]
        (late,) = content_lines(oai, done.error_file_id)
    assert late["custom_id"] == "b" and late["response"] is None and late["error"]["code"] == "batch_expired"
    assert model_stats(sim, MODEL)["requests"] == 0


# -- a service stopped and started again ----------------------------------------------------------------


def _record(state_dir: Path, batch_id: str) -> BatchRecord:
    async def read() -> BatchRecord:
        store = SQLiteStore(state_dir / "state.db")
        try:
            record = await store.batches.batch(batch_id)
        finally:
            await store.close()
        assert record is not None
        return record

    return asyncio.run(read())


def test_a_restarted_service_picks_its_batches_up_without_paying_twice(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    set_pace(sim, ttft_s=0.2, tokens_per_s=400)
    cfg = _config(sim, concurrency=1)
    key = create_key(capsys, "batcher")
    lines = [line(f"q{i}", f"Question {i}: why?", max_tokens=20) for i in range(8)]
    with _serve(cfg, state_dir) as first:
        oai = client(first, key)
        uploaded = oai.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
        batch = oai.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        wait_until_sync(
            lambda: model_stats(sim, MODEL)["requests"], lambda n: n >= 3, what="three requests sent"
        )
    # Stopped (drained): the request in progress finished and was written; the batch is not done.
    sent_before = model_stats(sim, MODEL)["requests"]
    assert _record(state_dir, batch.id).status == "in_progress"
    assert sent_before < len(lines)
    with _serve(cfg, state_dir) as second:
        oai = client(second, key)
        done = finished(oai, batch.id)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (8, 0)
        assert done.output_file_id is not None
        ids = [x["custom_id"] for x in content_lines(oai, done.output_file_id)]
    assert sorted(ids) == sorted(f"q{i}" for i in range(8))  # each item once
    # Each item reached its model exactly once, across both runs: nothing done was paid again.
    assert model_stats(sim, MODEL)["requests"] == len(lines)


def _left_in_progress(
    state_dir: Path,
    batch_id: str,
    lines: list[Any],
    *,
    expires_at: int | None = None,
    lease_s: float = 0.0,
    status: str = "in_progress",
) -> float:
    """What a replica that died while running a batch leaves (the key "batcher"'s): the batch in
    progress, its first item answered in the journal, and, with ``lease_s``, its lease, claimed
    for that long from the time returned (``time.monotonic``)."""

    async def left() -> float:
        store = SQLiteStore(state_dir / "state.db")
        owner = await store.key_by_name("batcher")
        assert owner is not None
        files = state_dir / "files"
        files.mkdir(exist_ok=True)
        (files / "file-input").write_bytes(jsonl(lines))
        record = FileRecord(
            id="file-input", owner=owner.id, filename="in.jsonl", purpose="batch", bytes=1, created_at=1
        )
        await store.batches.add_file(record)
        until = expires_at if expires_at is not None else int(time.time()) + 3600
        batch = _batch(batch_id, owner.id, status).changed(
            {"owner_hash": owner.key_hash, "input_file_id": "file-input", "expires_at": until}
        )
        await store.batches.add_batch(batch)
        first = lines[0]["custom_id"]
        answered = Outcome(custom_id=first, status_code=200, body={"object": "chat.completion"})
        (files / f"{batch_id}.journal.jsonl").write_text(json.dumps(answered.line()) + "\n")
        if lease_s:
            assert await store.batches.claim(lease_name(batch_id), "a-dead-replica", lease_s)
        claimed_at = time.monotonic()
        await store.close()
        return claimed_at

    return asyncio.run(left())


def test_a_batch_whose_replica_died_is_taken_over_once_its_lease_passes(
    sim: SimulatorServer, state_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A replica that dies keeps its lease until it passes (it cannot let it go): until then no
    other replica runs its batch; then one does, from the journal the dead one left."""
    key = create_key(capsys, "batcher")
    lines = [line("a", "Why?"), line("b", "How?")]
    batch_id = "batch_of_a_dead_replica"
    DEAD_LEASE_S = 5.0

    claimed_at = _left_in_progress(state_dir, batch_id, lines, lease_s=DEAD_LEASE_S)
    with _serve(_config(sim), state_dir) as server:
        oai = client(server, key)
        done = finished(oai, batch_id)
        taken_after = time.monotonic() - claimed_at
        assert done.status == "completed" and done.output_file_id is not None
        output = {x["custom_id"]: x for x in content_lines(oai, done.output_file_id)}
    assert taken_after >= DEAD_LEASE_S  # not before the dead replica's lease passed
    assert set(output) == {"a", "b"}
    assert model_stats(sim, MODEL)["requests"] == 1  # only "b": "a" was in the journal


def test_moa_batch_run_in_process_never_takes_the_services_batches(
    config: MoAConfig,
    sim: SimulatorServer,
    state_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``moa batch run`` builds the API app in its own process, on the service's state: it runs
    its own requests, never the Batch API's batches that state holds."""
    set_pace(sim, ttft_s=0.3, tokens_per_s=400)
    key = create_key(capsys, "batcher")
    waiting = [line("a", "Why?"), line("b", "How?")]
    _left_in_progress(state_dir, "batch_of_the_service", waiting, status="validating")
    src = tmp_path / "own.jsonl"
    src.write_bytes(jsonl([line(f"q{i}", f"Own question {i}?", max_tokens=20) for i in range(3)]))
    opts = BatchOptions(input=src, output=tmp_path / "out.jsonl", concurrency=1, api_key=key, progress=False)
    summary = asyncio.run(run_batch(config, opts))
    assert (summary.done, summary.succeeded) == (3, 3)
    assert _record(state_dir, "batch_of_the_service").status == "validating"
    assert model_stats(sim, MODEL)["requests"] == 3


# -- the store: records and leases, on SQLite and on Redis ------------------------------------------------


async def _flush(url: str) -> None:
    store = RedisStore(url)
    await store.client.flushdb()
    await store.close()


@pytest.fixture(params=["sqlite", "redis"])
async def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[BatchStore]]:
    """The Batch API's records as two replicas see them: two stores on one state."""
    if request.param == "sqlite":
        stores: list[Any] = [SQLiteStore(tmp_path / "state.db"), SQLiteStore(tmp_path / "state.db")]
    else:
        url = request.getfixturevalue("redis_server")
        await _flush(url)
        stores = [RedisStore(url), RedisStore(url)]
    yield [s.batches for s in stores]
    for s in stores:
        await s.close()


async def test_a_lease_is_held_by_one_replica_until_let_go_or_passed(replicas: list[BatchStore]) -> None:
    a, b = replicas
    assert await a.claim("batch:x", "replica-a", 0.6)
    assert not await b.claim("batch:x", "replica-b", 0.6)  # held
    assert await a.claim("batch:x", "replica-a", 0.6)  # renewed by its holder
    assert await b.claim("batch:y", "replica-b", 0.6)  # another batch's lease is another lease
    await b.release("batch:x", "replica-b")  # not its to let go: nothing happens
    assert not await b.claim("batch:x", "replica-b", 0.6)
    # The holder dies (renews no more): once the lease passes, another replica claims it ...
    claimed = await wait_until(
        lambda: b.claim("batch:x", "replica-b", 5.0), within_s=10, interval=0.05, what="the lease to pass"
    )
    assert claimed
    # ... and the old holder has lost it: its renewal fails, so it stops.
    assert not await a.claim("batch:x", "replica-a", 5.0)
    await b.release("batch:x", "replica-b")
    assert await a.claim("batch:x", "replica-a", 5.0)  # let go: free at once


async def test_two_replicas_racing_for_a_lease_one_wins(replicas: list[BatchStore]) -> None:
    a, b = replicas
    for n in range(20):
        won = await asyncio.gather(
            *(s.claim(f"batch:{n}", f"replica-{i}", 5.0) for i, s in enumerate((a, b, a, b)))
        )
        assert sum(won) == 1


def _batch(batch_id: str, owner: str = "k1", status: str = "validating") -> BatchRecord:
    return BatchRecord.model_validate(
        {
            "id": batch_id,
            "owner": owner,
            "endpoint": "/v1/chat/completions",
            "input_file_id": "file-1",
            "completion_window": "24h",
            "status": status,
            "created_at": 1,
            "expires_at": 2,
        }
    )


async def test_batch_records_change_only_from_the_status_asked(replicas: list[BatchStore]) -> None:
    a, b = replicas
    await a.add_file(
        FileRecord(id="file-1", owner="k1", filename="in.jsonl", purpose="batch", bytes=3, created_at=1)
    )
    assert (await b.file("file-1")) is not None and await b.file("file-2") is None
    for i in range(3):
        await a.add_batch(_batch(f"batch_{i}"))
    await a.add_batch(_batch("batch_other", owner="k2"))
    assert await b.open_batches() == ["batch_0", "batch_1", "batch_2", "batch_other"]
    # A cancel on one replica, then a status change on the other that expected the old status.
    assert await b.update_batch("batch_1", {"status": "cancelling"}, ("validating", "in_progress"))
    assert await a.update_batch("batch_1", {"status": "in_progress"}, ("validating",)) is None
    record = await a.batch("batch_1")
    assert record is not None and record.status == "cancelling"
    assert await a.update_batch("batch_1", {"status": "cancelled"}, None)
    assert "batch_1" not in await b.open_batches()  # terminal: no replica looks at it again
    assert [r.id for r in await b.list_batches("k1", None, 10)] == ["batch_2", "batch_1", "batch_0"]
    assert [r.id for r in await b.list_batches("k1", "batch_2", 1)] == ["batch_1"]
    assert await b.list_batches("k1", "batch_other", 10) == []  # another owner's id: nothing after it
    assert [r.id for r in await b.list_batches("k2", None, 10)] == ["batch_other"]


async def test_concurrent_changes_to_one_batch_are_all_kept(replicas: list[BatchStore]) -> None:
    """Read-modify-write is atomic: two replicas changing different fields lose neither."""
    a, b = replicas
    await a.add_batch(_batch("batch_x", status="in_progress"))
    await asyncio.gather(
        *(
            s.update_batch("batch_x", {"metadata": None, f"{field}_at": n}, None)
            for n in range(10)
            for s, field in ((a, "finalizing"), (b, "cancelling"))
        )
    )
    record = await a.batch("batch_x")
    assert record is not None and record.finalizing_at is not None and record.cancelling_at is not None


# -- the upload's form, read as it streams in --------------------------------------------------------------


def _form(files: dict[str, Any], data: dict[str, str]) -> tuple[str, bytes]:
    request = httpx.Request("POST", "http://x/v1/files", files=files, data=data)
    return request.headers["content-type"], request.read()


@pytest.mark.parametrize("chunk", [1, 7, 64, 100_000])
def test_the_form_is_read_whatever_its_chunks(chunk: int) -> None:
    content = jsonl([line(f"q{i}", "why\r\n--not a boundary") for i in range(50)])
    content_type, body = _form({"file": ("in.jsonl", content)}, {"purpose": "batch"})
    boundary = content_type.split("boundary=")[1].encode()
    out = io.BytesIO()
    reader = FormReader(boundary, "file", out, 1_000_000)
    for i in range(0, len(body), chunk):
        reader.feed(body[i : i + chunk])
    upload = reader.finish()
    assert out.getvalue() == content and upload.size == len(content)
    assert (upload.filename, upload.fields) == ("in.jsonl", {"purpose": "batch"})


def test_the_form_is_refused_past_its_bound_or_cut_short() -> None:
    content_type, body = _form({"file": ("in.jsonl", b"x" * 1000)}, {"purpose": "batch"})
    boundary = content_type.split("boundary=")[1].encode()
    with pytest.raises(ApiError) as too_big:
        FormReader(boundary, "file", io.BytesIO(), 999).feed(body)
    assert too_big.value.status == 413
    reader = FormReader(boundary, "file", io.BytesIO(), 1000)
    reader.feed(body[:-10])
    with pytest.raises(ApiError) as cut:
        reader.finish()
    assert cut.value.status == 400
