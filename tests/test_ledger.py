"""The ledger matches the invoice: every call that reached a provider is billed, however it ended.

Providers bill what they generate, not what the caller finished reading. These tests cut calls in
every way the engine can (a straggler cut by early aggregation, a layer cancelled with its calls
running, an aggregator whose request was abandoned mid-answer, a provider stream broken mid-way)
and check each call is recorded at the prompt plus the text it sent, never at $0. The engine-level
cases drive ``ScriptedCaller`` on its virtual clock (the order of events is a fact of the test);
the provider-level and end-to-end cases use the official SDKs against the simulator, whose own
invoice (``billed_*_tokens``) the ledger is compared with.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from moa import MoAEngine, Plan, load_config
from moa.api.access import Access, Spend
from moa.api.cancel import ended
from moa.auth import Principal, new_key, new_record
from moa.config import MoAConfig, SimulatorMode
from moa.engine.receipts import Receipts, late_charge
from moa.providers.registry import ProviderPool
from moa.result import CallRecord, Stage
from moa.simulator.server import SimulatorServer
from moa.state import KeyLimits, KeyRecord, Refused, Reservation, StateStore, to_micro
from moa.state.redis_store import RedisStore
from moa.state.sqlite_store import SQLiteStore
from moa.testing import Reply, ScriptedCaller
from moa.tokens import approx_message_tokens, approx_tokens
from moa.types import CallRequest, CallResult, ChatMessage, ErrorKind, TextDelta, Usage
from tests.helpers import QUESTION as API_QUESTION
from tests.helpers import ApiServer, model_stats, set_fault, set_pace, sim_stats, simulated, wait_idle
from tests.test_keys_api import wait_for_auth
from tests.waiting import wait_until

QUESTION = [ChatMessage(role="user", content="How do vaccines train the immune system?")]
# Priced models of the bundled config, so that a cut call's cost is a real figure.
P1, P2, P3 = "openai/gpt-4.1-mini", "anthropic/claude-haiku-4-5", "gemini/gemini-2.5-flash"
AGG = "openai/gpt-4.1"
LONG_S = 600.0
CONFIG = load_config(None)
# What a cut stream is charged on top of the text read, for the text still in flight.
MARGIN = CONFIG.providers["openai"].cut_margin_tokens


def plan(**update: object) -> Plan:
    raw: dict[str, object] = {
        "layers": [
            {
                "proposers": [{"provider": k.split("/")[0], "model": k.split("/")[1]} for k in (P1, P2, P3)],
                "quorum": 2,
            }
        ],
        "aggregators": [{"provider": "openai", "model": "gpt-4.1"}],
        "fallbacks": [],
        "grace_s": LONG_S,
        "layer_deadline_s": LONG_S,
        "call_timeout_s": LONG_S,
    }
    raw.update(update)
    return Plan.model_validate(raw)


def price(key: str, input_tokens: int, output_tokens: int) -> float:
    provider, model = key.split("/")
    return CONFIG.price(provider, model).cost(input_tokens, output_tokens)


def prompt_of(caller: ScriptedCaller, key: str) -> int:
    (call,) = caller.calls_to(key)
    return approx_message_tokens(m.content for m in call.request.messages)


WORDS = tuple(f"word{n} " for n in range(40))


async def test_a_straggler_cut_by_early_aggregation_is_billed_for_what_it_wrote() -> None:
    """P3 has written 5 pieces when the quorum is met and ``early`` cuts it: its record costs its
    prompt plus those 5 pieces, estimated, and the run's cost includes it."""
    caller = ScriptedCaller()
    caller.script(P1, Reply(text="answer one", at_step=1))
    caller.script(P2, Reply(text="answer two", at_step=1))
    caller.script(P3, Reply(deltas=WORDS, pauses=((5, 99),)))  # holds after 5 pieces, never resumes
    caller.script(AGG, "the synthesis")
    run = asyncio.create_task(MoAEngine(CONFIG, caller).run(QUESTION, plan=plan(aggregation="early")))
    await caller.wait_started(3)
    await caller.advance()
    result = await run
    (cut,) = [c for c in result.calls if c.stage is Stage.PROPOSER and not c.ok]
    assert cut.cancelled_straggler and cut.error_kind is ErrorKind.CANCELLED and cut.usage_estimated
    sent = "".join(WORDS[:5])
    assert cut.usage.input_tokens == prompt_of(caller, P3) > 0
    assert cut.usage.output_tokens == approx_tokens(sent) + MARGIN > MARGIN
    assert cut.cost_usd == pytest.approx(price(P3, cut.usage.input_tokens, cut.usage.output_tokens))
    assert result.cost_usd == pytest.approx(sum(c.cost_usd for c in result.calls))
    assert cut.cost_usd > 0 and result.usage.output_tokens >= cut.usage.output_tokens


async def test_a_layer_cancelled_with_calls_running_bills_every_call() -> None:
    """The run is cancelled (the client left) while P3 still writes: P1 and P2, which answered,
    are recorded at their own usage, and P3 at its prompt plus the pieces it sent."""
    caller = ScriptedCaller()
    caller.script(P1, Reply(text="answer one"))
    caller.script(P2, Reply(text="answer two"))
    caller.script(P3, Reply(deltas=WORDS, pauses=((7, 99),)))
    seen: list[CallRecord] = []
    run = asyncio.create_task(MoAEngine(CONFIG, caller).run(QUESTION, plan=plan(), on_call=seen.append))
    await caller.wait_started(3)
    await wait_until(lambda: sum(c.finished for c in caller.calls), lambda n: n >= 2, what="two answers")
    for _ in range(20):  # let P3 send its pieces up to its pause
        await asyncio.sleep(0)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    by_model = {f"{r.provider}/{r.model}": r for r in seen}
    assert set(by_model) == {P1, P2, P3}
    assert by_model[P1].ok and by_model[P1].usage.output_tokens > 0 and not by_model[P1].usage_estimated
    cut = by_model[P3]
    assert not cut.ok and cut.usage_estimated and cut.cancelled_straggler
    assert cut.usage.output_tokens == approx_tokens("".join(WORDS[:7])) + MARGIN
    assert cut.usage.input_tokens == prompt_of(caller, P3)


async def test_an_aggregator_abandoned_mid_answer_is_billed_for_its_prompt_and_its_text() -> None:
    """A non-streaming request is abandoned while its aggregator writes: the aggregator's call
    (streamed under the hood, unseen by the client) is recorded with the references it read and
    the pieces it sent. Before, the aggregator (most of a request's cost) was recorded at $0."""
    caller = ScriptedCaller()
    for key in (P1, P2, P3):
        caller.script(key, Reply(text=f"the answer of {key} " * 20))
    caller.script(AGG, Reply(deltas=WORDS, pauses=((9, 99),)))
    seen: list[CallRecord] = []
    run = asyncio.create_task(MoAEngine(CONFIG, caller).run(QUESTION, plan=plan(), on_call=seen.append))
    await caller.wait_started(4)
    for _ in range(40):
        await asyncio.sleep(0)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    (agg,) = [r for r in seen if r.stage is Stage.AGGREGATOR]
    assert agg.usage_estimated and not agg.ok and agg.error_kind is ErrorKind.CANCELLED
    assert agg.usage.input_tokens == prompt_of(caller, AGG)  # the references it read
    assert agg.usage.output_tokens == approx_tokens("".join(WORDS[:9])) + MARGIN
    assert agg.cost_usd == pytest.approx(price(AGG, agg.usage.input_tokens, agg.usage.output_tokens))
    assert len([r for r in seen if r.stage is Stage.PROPOSER and r.ok]) == 3


# -- against the simulator's invoice ------------------------------------------------------------------


def margin_usd(config: MoAConfig, cuts: int) -> int:
    """The most ``cuts`` cut calls may be charged above the invoice, in micro-dollars: each its
    provider's ``cut_margin_tokens`` of output, at the dearest output price of the config."""
    dearest = max(
        config.providers[p].cut_margin_tokens * config.price(p, m).output_per_mtok / 1e6
        for p, m in config.all_models()
    )
    return to_micro(cuts * dearest)


def invoice(sim: SimulatorServer, config: MoAConfig) -> tuple[float, int]:
    """What the simulator would bill, priced as the config prices each model, and its tokens."""
    stats = sim_stats(sim)
    cost, tokens = 0.0, 0
    for model, s in stats.items():
        provider = next(p for p, m in config.all_models() if m == model)
        cost += config.price(provider, model).cost(s["billed_input_tokens"], s["billed_output_tokens"])
        tokens += s["billed_input_tokens"] + s["billed_output_tokens"]
    return cost, tokens


@pytest.fixture
def server(sim: SimulatorServer, state_dir: Path) -> Iterator[ApiServer]:
    with slow_api(sim, state_dir) as s:
        yield s


@contextlib.contextmanager
def slow_api(sim: SimulatorServer, state_dir: Path) -> Iterator[ApiServer]:
    """The in-process API on a SQLite state file, over a simulator slow enough to hang up on
    mid-answer."""
    set_pace(sim, ttft_s=0.02, tokens_per_s=40.0)
    with ApiServer(simulated(sim), store=lambda: SQLiteStore(state_dir / "state.db")) as s:
        yield s


async def spent_and_sim(server: ApiServer, sim: SimulatorServer, record_id: str, store: StateStore) -> int:
    """The key's settled spend, once the request settled and the simulator finished billing."""

    async def charged() -> int:
        return await store.spent(record_id, "total")

    spent = await wait_until(charged, lambda v: v > 0, what="the abandoned request to settle")
    await wait_idle(sim)
    return spent


def spend_of(
    server: ApiServer,
    sim: SimulatorServer,
    state_dir: Path,
    act: Callable[[httpx.AsyncClient], Awaitable[None]],
    detail: bool = False,
) -> int:
    """``act`` as a client with a fresh key (a $1 budget; ``detail``: it may use ``/v1/moa``),
    then that key's settled spend, once the simulator has billed everything the requests set
    going."""
    key = new_key()
    record = new_record("ledger", key, KeyLimits(budget_usd=1.0, detail=detail))

    async def scenario() -> int:
        store: StateStore = SQLiteStore(state_dir / "state.db")
        try:
            await store.create_key(record)
            await asyncio.to_thread(wait_for_auth, server)
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
                await act(http)
            return await spent_and_sim(server, sim, record.id, store)
        finally:
            await store.close()

    return asyncio.run(scenario())


@pytest.mark.parametrize("preset", ["single", "moa-lite"])
def test_a_stream_the_client_hangs_up_on_is_billed_as_the_provider_bills_it(
    server: ApiServer, sim: SimulatorServer, state_dir: Path, preset: str
) -> None:
    """A streaming client reads a few chunks of the answer and hangs up: the key is charged what
    the simulator invoices (every prompt it read, every token it generated), not $0 for the cut
    aggregator. Before, 30 cut streams of ``single`` were charged nothing."""
    spent = spend_of(server, sim, state_dir, hang_up(preset, API_QUESTION))
    billed_within_the_cut_margin(spent, sim, server.config)


def hang_up(model: str, messages: list[dict[str, Any]]) -> Callable[[httpx.AsyncClient], Awaitable[None]]:
    """A client that streams an answer, reads three chunks of its content and hangs up."""

    async def act(http: httpx.AsyncClient) -> None:
        body = {"model": model, "messages": messages, "stream": True, "max_tokens": 300}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            chunks = 0
            async for line in response.aiter_lines():
                if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                    chunks += 1
                    if chunks == 3:
                        break

    return act


def billed_within_the_cut_margin(spent: int, sim: SimulatorServer, config: MoAConfig) -> int:
    """Assert the key was charged at least the simulator's invoice and at most the cut margin of
    the calls it cut above it; the number of calls cut."""
    billed, _ = invoice(sim, config)
    cuts = sum(s["cancelled"] for s in sim_stats(sim).values())
    most = to_micro(billed) + margin_usd(config, cuts) + 2  # rounding: a micro-dollar a request
    assert to_micro(billed) <= spent <= most, (spent, billed)
    return cuts


EMAIL_TOOL = {
    "type": "function",
    "function": {
        "name": "send_email",
        "description": "Send an email.",
        "parameters": {
            "type": "object",
            "properties": {
                "to": {"type": "string"},
                "subject": {"type": "string"},
                "body": {"type": "string"},
            },
            "required": ["to", "subject", "body"],
        },
    },
}
# A call whose arguments run to some 80 tokens: at 40 tokens a second the proposers are still
# writing them, well past the cut margin, when the client hangs up.
EMAIL_ASK = (
    'Send email to "ops@example.com" with subject "Weekly capacity review for the storage and '
    'compute clusters of the northern region" and body "Hello team, please review the attached '
    "capacity figures for the storage and compute clusters before Thursday, flag any node that ran "
    'above eighty percent for more than two days, and propose the replacements we should order."'
)


def test_a_request_with_tools_cut_mid_call_is_billed_as_the_provider_bills_it(
    server: ApiServer, sim: SimulatorServer, state_dir: Path
) -> None:
    """A client hangs up while the proposers write their calls' arguments: the key is charged at
    least what the simulator invoices. The arguments never reach the engine as text (they are
    held until the call is whole), so the engine's estimate of each cut call is its prompt and
    the cut margin; the provider pool's receipt of the fragments it read makes up the rest.
    OpenAI and Anthropic stream the arguments; Gemini sends a call whole, so it is left out."""
    plan = {
        "layers": [
            {
                "proposers": [
                    {"provider": "openai", "model": "gpt-4.1-mini"},
                    {"provider": "anthropic", "model": "claude-haiku-4-5"},
                ],
                "quorum": 2,
            }
        ],
        "aggregators": [{"provider": "openai", "model": "gpt-4.1"}],
    }

    async def hang_up(http: httpx.AsyncClient) -> None:
        body = {"plan": plan, "messages": [{"role": "user", "content": EMAIL_ASK}], "tools": [EMAIL_TOOL]}
        request = asyncio.ensure_future(http.post("/v1/moa", json=body))
        await asyncio.sleep(1.2)  # the proposers are some 45 tokens into their arguments
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request

    spent = spend_of(server, sim, state_dir, hang_up, detail=True)
    billed, _ = invoice(sim, server.config)
    stats = sim_stats(sim)
    cuts = sum(s["cancelled"] for s in stats.values())
    assert cuts == 2 and stats["gpt-4.1-mini"]["billed_output_tokens"] > 30, stats
    most = to_micro(billed) + margin_usd(server.config, cuts) + 2
    assert to_micro(billed) <= spent <= most, (spent, billed)


def test_a_request_abandoned_while_its_aggregator_writes_is_billed_in_full(
    server: ApiServer, sim: SimulatorServer, state_dir: Path
) -> None:
    """A non-streaming ``moa-lite`` request whose client gives up while the aggregator writes: the
    aggregator's call (streamed under the hood) is charged for its prompt and what it wrote, so the
    key's spend equals the simulator's invoice. Before, the proposers were charged and the
    aggregator (most of the cost) was not."""

    async def abandon(http: httpx.AsyncClient) -> None:
        body = {"model": "moa-lite", "messages": API_QUESTION, "max_tokens": 120}
        call = asyncio.ensure_future(http.post("/v1/chat/completions", json=body))
        # Hang up once the aggregator is writing (the proposers answered).
        await wait_until(
            lambda: asyncio.to_thread(model_stats, sim, "gpt-4.1"),
            lambda s: s["in_flight"] > 0,
            what="the aggregator to start",
        )
        await asyncio.sleep(0.5)  # some of its answer generated; the rest never will be
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call

    spent = spend_of(server, sim, state_dir, abandon)
    billed, _ = invoice(sim, server.config)
    agg = sim_stats(sim)["gpt-4.1"]
    assert 0 < agg["billed_output_tokens"] < 120  # the aggregator was cut mid-answer
    cuts = sum(s["cancelled"] for s in sim_stats(sim).values())
    most = to_micro(billed) + margin_usd(server.config, cuts) + 4  # rounding: a micro-dollar a request
    assert to_micro(billed) <= spent <= most, (spent, billed)


async def test_a_provider_stream_broken_mid_way_is_billed_for_its_text(
    sim: SimulatorServer, config: MoAConfig
) -> None:
    """A stream that breaks mid-answer (the connection drops) is a failure that still cost its
    prompt and the text it sent: the result carries that usage, estimated, and its price, equal to
    the simulator's invoice for it. Before, a failure result cost $0."""
    set_fault(sim, "gpt-4.1-mini", cut_stream={"rate": 1.0})
    req = CallRequest(provider="openai", model="gpt-4.1-mini", messages=tuple(QUESTION))
    text, res = "", None
    async with ProviderPool.from_config(config, sim_url=sim.url) as pool:
        async for ev in pool.stream(req):
            if isinstance(ev, TextDelta):
                text += ev.text
            else:
                res = ev
    assert res is not None and res.error is not None and text
    assert res.usage_estimated and res.usage.output_tokens == approx_tokens(text) > 0
    assert res.cost_usd == pytest.approx(
        price("openai/gpt-4.1-mini", res.usage.input_tokens, res.usage.output_tokens)
    )
    await wait_idle(sim)
    billed = model_stats(sim, "gpt-4.1-mini")
    assert (billed["billed_input_tokens"], billed["billed_output_tokens"]) == (
        res.usage.input_tokens,
        res.usage.output_tokens,
    )


@pytest.mark.parametrize("stream", [False, True])
async def test_a_finished_call_is_invoiced_at_the_usage_it_reported(
    sim: SimulatorServer, config: MoAConfig, stream: bool
) -> None:
    """The simulator's invoice and the usage its responses report agree for a call that ran to
    its end, streamed or not: what the ledger compares the cut calls with is the same count."""
    req = CallRequest(provider="anthropic", model="claude-haiku-4-5", messages=tuple(QUESTION))
    async with ProviderPool.from_config(config, sim_url=sim.url) as pool:
        if stream:
            (res,) = [ev async for ev in pool.stream(req) if not isinstance(ev, TextDelta)]
        else:
            res = await pool.call(req)
    assert res.ok and not res.usage_estimated
    await wait_idle(sim)
    billed = model_stats(sim, "claude-haiku-4-5")
    assert (billed["billed_input_tokens"], billed["billed_output_tokens"]) == (
        res.usage.input_tokens,
        res.usage.output_tokens,
    )


def test_a_failed_request_is_settled_against_its_budget_at_what_it_cost(
    sim: SimulatorServer, state_dir: Path
) -> None:
    """docs/SECURITY.md: a request that fails still settles what it used. ``moa-lite`` (set to
    fail rather than answer with a proposal when its aggregators fail) against a budgeted key,
    with every aggregator and fallback answering 500: the request fails after its proposers
    answered; the key is charged exactly the simulator's invoice (the proposers; the refused
    attempts cost nothing), and the request's reservation is released, so the rest of the budget
    can be reserved in full."""
    for model in ("gpt-4.1", "claude-sonnet-4-6", "gemini-2.5-pro"):
        set_fault(sim, model, error_500={"rate": 1.0})
    cfg = load_config(None)
    presets = {
        **cfg.presets,
        "moa-lite": cfg.presets["moa-lite"].model_copy(update={"on_aggregators_failed": "fail"}),
    }
    cfg = cfg.model_copy(
        update={
            "simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": SimulatorMode.ON}),
            "presets": presets,
        }
    )
    key = new_key()
    budget = 0.05
    record = new_record("failing", key, KeyLimits(budget_usd=budget))

    async def scenario() -> tuple[httpx.Response, int, bool]:
        store: StateStore = SQLiteStore(state_dir / "state.db")
        try:
            await store.create_key(record)
            await asyncio.to_thread(wait_for_auth, server)
            body = {"model": "moa-lite", "messages": API_QUESTION, "max_tokens": 30}
            headers = {"Authorization": f"Bearer {key}"}
            async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60) as http:
                r = await http.post("/v1/chat/completions", json=body)
            spent = await spent_and_sim(server, sim, record.id, store)
            # Nothing else is held: the whole remainder of the budget can be reserved.
            rest = await store.reserve(record.id, "total", to_micro(budget) - spent, to_micro(budget), 60)
            return r, spent, isinstance(rest, Reservation)
        finally:
            await store.close()

    with ApiServer(cfg, store=lambda: SQLiteStore(state_dir / "state.db")) as server:
        r, spent, released = asyncio.run(scenario())
    assert r.status_code >= 500, r.text
    billed, _ = invoice(sim, cfg)
    assert billed > 0 and sim_stats(sim)["gpt-4.1"]["faults"]["error_500"] >= 1
    assert abs(spent - to_micro(billed)) <= 4, (spent, billed)
    assert released


async def test_text_nobody_reads_as_it_comes_crosses_in_batches_and_none_is_lost() -> None:
    """``batched`` (what a provider replica applies to a call with ``batch_s``): 100 pieces
    arriving faster than the batch time become a few messages, the first at once, and every
    character reaches the final text before the result; a cut call loses at most one batch."""
    from moa.types import batched

    async def pieces() -> AsyncIterator[TextDelta | CallResult]:
        for n in range(100):
            yield TextDelta(text=f"w{n} ")
            await asyncio.sleep(0.001)
        yield CallResult(provider="p", provider_kind="k", requested_model="m", text="done")

    out = [ev async for ev in batched(pieces(), batch_s=0.05)]
    deltas = [ev for ev in out if isinstance(ev, TextDelta)]
    assert 1 < len(deltas) < 20 and deltas[0].text == "w0 "
    assert "".join(d.text for d in deltas) == "".join(f"w{n} " for n in range(100))
    assert isinstance(out[-1], CallResult)


# -- receipts: what a cut call really consumed, reported after the cut --------------------------------


def cut_record(key: str, prompt: int, output: int, call_id: str = "call-1") -> CallRecord:
    """A proposer cut by the engine, at its estimate (as ``cut_result`` bills it)."""
    provider, model = key.split("/")
    return CallRecord(
        stage=Stage.PROPOSER,
        provider=provider,
        model=model,
        ok=False,
        error_kind=ErrorKind.CANCELLED,
        usage=Usage(input_tokens=prompt, output_tokens=output),
        cost_usd=price(key, prompt, output),
        usage_estimated=True,
        cut_id=call_id,
    )


async def test_receipts_are_handed_over_as_they_arrive_and_a_missing_one_leaves_them_at_the_bound() -> None:
    """The health board's store: a settlement asking for two receipts gets both once the second
    arrives, and each only once; one asking for a receipt that never comes gets what there is
    when its wait is over; a receipt nobody asked for is dropped after its time, or when the
    store is full."""
    receipts = Receipts(ttl_s=60.0)  # a minute, for the test
    receipts.put("a", Usage(input_tokens=10, output_tokens=5))
    waiting = asyncio.ensure_future(receipts.take(["a", "b"], within_s=LONG_S))
    await asyncio.sleep(0)
    assert not waiting.done()  # "b" is not in yet
    receipts.put("b", Usage(input_tokens=3, output_tokens=1))
    got = await waiting
    assert got == {"a": Usage(input_tokens=10, output_tokens=5), "b": Usage(input_tokens=3, output_tokens=1)}
    assert len(receipts) == 0 and await receipts.take(["a"], within_s=0) == {}

    receipts.put("c", Usage(output_tokens=7))
    assert await receipts.take(["c", "lost"], within_s=0.05) == {"c": Usage(output_tokens=7)}

    now = [0.0]
    receipts.clock = lambda: now[0]
    receipts.put("old", Usage(output_tokens=1))
    now[0] = 61.0
    receipts.put("new", Usage(output_tokens=2))
    assert await receipts.take(["old", "new"], within_s=0) == {"new": Usage(output_tokens=2)}

    few = Receipts(kept=2)  # and past its size, the oldest go first
    for name in ("x", "y", "z"):
        few.put(name, Usage(output_tokens=1))
    assert set(await few.take(["x", "y", "z"], within_s=0)) == {"y", "z"}


async def test_the_receipt_of_a_result_that_crossed_the_cut_is_handed_over_and_pushes_out_no_other() -> None:
    """A call the ingress cut as its result crossed (its replica finished it, so it was not cut
    there): the replica left the result's receipt like every streamed call's (``put_finished``),
    and the settlement gets it as it gets a cut call's, waiting for it if it is not in yet. Those
    receipts, one per streamed call, nobody asks for most of, are bounded apart: however many
    come, the receipt of a cut call stays."""
    receipts = Receipts(kept=2, finished_kept=2)
    receipts.put("cut", Usage(input_tokens=10, output_tokens=5))
    receipts.put_finished({f"done{n}": Usage(input_tokens=1, output_tokens=n) for n in range(5)})
    assert len(receipts) == 3  # the cut call's and the two newest results'
    got = await receipts.take(["cut", "done4", "done0"], within_s=0)
    assert got == {
        "cut": Usage(input_tokens=10, output_tokens=5),
        "done4": Usage(input_tokens=1, output_tokens=4),
    }

    waiting = asyncio.ensure_future(receipts.take(["crossed"], within_s=LONG_S))
    await asyncio.sleep(0)
    receipts.put_finished({"crossed": Usage(input_tokens=7, output_tokens=90)})
    assert await waiting == {"crossed": Usage(input_tokens=7, output_tokens=90)}


async def test_a_provider_replica_leaves_the_receipt_of_every_streamed_result() -> None:
    """``ProviderDeployment.stream``: a call that ends with its result leaves the provider's usage
    on the health board under the call's id, a few calls to one message. Without it a call whose
    result crossed its caller's cut (the replica saw no cut) was charged the caller's estimate,
    short of what the provider billed."""
    from moa_actors.provider import FINISHED_BATCH_S, ProviderDeployment

    sent: list[dict[str, Usage]] = []

    async def finished_receipts(batch: dict[str, Usage]) -> None:
        sent.append(dict(batch))

    class Client:
        async def stream(self, req: CallRequest, *, on_cut: object = None) -> AsyncIterator[object]:
            yield TextDelta(text="an answer")
            yield CallResult(
                provider="openai",
                provider_kind="openai",
                requested_model=req.model,
                text="an answer",
                usage=Usage(input_tokens=12, output_tokens=int(req.call_id[-1])),
            )

    class Replica(ProviderDeployment):
        def __del__(self) -> None:  # built without Serve: nothing to close
            pass

    replica = object.__new__(Replica)
    replica.client = Client()  # type: ignore[assignment]
    replica._board = SimpleNamespace(finished_receipts=SimpleNamespace(remote=finished_receipts))
    replica._receipts, replica._finished = set(), {}
    replica._observe = lambda result: None  # type: ignore[method-assign]
    reqs = [
        CallRequest(provider="openai", model="gpt-4.1", messages=tuple(QUESTION), call_id=f"call-{n}")
        for n in (3, 4)
    ]
    for req in reqs:
        assert isinstance([ev async for ev in replica.stream(req)][-1], CallResult)
    await asyncio.sleep(FINISHED_BATCH_S * 4)
    assert sent == [
        {"call-3": Usage(input_tokens=12, output_tokens=3), "call-4": Usage(input_tokens=12, output_tokens=4)}
    ]


def test_a_late_charge_brings_a_cut_call_to_the_larger_of_its_estimate_and_its_receipt() -> None:
    """More output than the estimate saw is charged; a receipt below the estimate (a prompt the
    provider never read) takes nothing back: the ledger errs above the invoice, not below."""
    call = cut_record(P1, prompt=100, output=20)
    tokens, cost = late_charge(CONFIG, call, Usage(input_tokens=100, output_tokens=62))
    # The receipt with the provider's margin, as the estimate has it: a replica's count of a cut
    # stream misses what its own socket held.
    assert tokens == 42 + MARGIN and cost > 0
    assert cost == pytest.approx(price(P1, 100, 62 + MARGIN) - call.cost_usd)
    assert late_charge(CONFIG, call, Usage()) == (0, 0.0)
    assert "cut_id" not in call.model_dump()  # internal: never in moa.detail


# Stands for what a transport ties to the request being served (Serve's request context).
REQUEST_SCOPE: contextvars.ContextVar[str] = contextvars.ContextVar("request_scope")


class FakeReceipts:
    """A receipt source whose receipts come when the test says, or never, or with an error."""

    def __init__(self, reported: dict[str, Usage], *, how: str = "answers") -> None:
        self.reported, self.how = reported, how
        self.arrived = asyncio.Event()
        self.asked: list[list[str]] = []
        self.scopes: list[str | None] = []

    async def receipts(self, call_ids: Collection[str], within_s: float) -> Mapping[str, Usage]:
        self.asked.append(sorted(call_ids))
        self.scopes.append(REQUEST_SCOPE.get(None))
        if self.how == "fails":
            raise ConnectionError("the health board is restarting")
        if self.how == "cancelled":  # as Serve cancels a handle call made in a cancelled request
            raise asyncio.CancelledError
        await (asyncio.Event() if self.how == "never" else self.arrived).wait()
        return {i: u for i, u in self.reported.items() if i in call_ids}


@pytest.fixture(params=["sqlite", "redis"])
async def ledger_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StateStore]:
    """The ledger on either state store (a Redis database no other test uses)."""
    if request.param == "sqlite":
        yield SQLiteStore(tmp_path / "state.db")
        return
    store = RedisStore(request.getfixturevalue("redis_server").rsplit("/", 1)[0] + "/9")
    await store.client.flushdb()
    yield store
    await store.close()


async def settling(
    store: StateStore, source: FakeReceipts, calls: list[CallRecord]
) -> tuple[Access, KeyRecord]:
    """A request with a $1 reservation on a $5 key, whose engine recorded ``calls``, settled."""
    record = new_record("receipts", new_key(), KeyLimits(budget_usd=5.0))
    await store.create_key(record)
    access = Access(CONFIG, store, source)
    principal = Principal(record)
    spend = Spend(access, principal, await access.hold(principal, 1.0), 1.0)
    for call in calls:
        spend.record(call)
    scope = REQUEST_SCOPE.set("the request")
    try:
        await spend.settle()
    finally:
        REQUEST_SCOPE.reset(scope)
    return access, record


async def test_a_settlement_charges_the_receipt_of_each_cut_call_on_both_stores(
    ledger_store: StateStore,
) -> None:
    """``settle()`` (what the response waits for) returns before the receipts come, with the
    request's reservation still held; once they come each cut call is charged the larger of its
    estimate and its receipt, and a call that was not cut (no receipt asked) its own usage. The
    receipts are asked for outside the request's context: what a transport ties to a request
    ends with it (on Ray, Serve cancelled the call for them with the abandoned request)."""
    cut = cut_record(P1, prompt=100, output=20, call_id="cut")
    answered = CallRecord(
        stage=Stage.AGGREGATOR,
        provider="openai",
        model="gpt-4.1",
        ok=True,
        usage=Usage(input_tokens=300, output_tokens=80),
        cost_usd=price(AGG, 300, 80),
    )
    source = FakeReceipts({"cut": Usage(input_tokens=100, output_tokens=62)})
    access, record = await settling(ledger_store, source, [cut, answered])
    assert await ledger_store.spent(record.id, "total") == 0
    held = await ledger_store.reserve(record.id, "total", to_micro(4.5), to_micro(5.0), 60)
    assert isinstance(held, Refused)  # the $1 is held until the receipts come
    source.arrived.set()
    await access.settled()
    assert source.asked == [["cut"]] and source.scopes == [None]
    charged = price(P1, 100, 62 + MARGIN) + price(AGG, 300, 80)
    assert await ledger_store.spent(record.id, "total") == to_micro(charged)


@pytest.mark.parametrize("how", ["never", "fails", "cancelled"])
async def test_a_lost_receipt_leaves_the_cut_call_at_its_estimate(
    ledger_store: StateStore, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receipt source that never answers (the settlement waits a bounded time), fails, or whose
    wait is cancelled: the call is charged its estimate, and the settlement still writes."""
    monkeypatch.setattr("moa.api.access.RECEIPT_WAIT_S", 0.05)
    monkeypatch.setattr("moa.api.access.RECEIPT_GRACE_S", 0.05)
    cut = cut_record(P1, prompt=100, output=20, call_id="cut")
    source = FakeReceipts({"cut": Usage(output_tokens=99)}, how=how)
    access, record = await settling(ledger_store, source, [cut])
    await access.settled()
    assert await ledger_store.spent(record.id, "total") == to_micro(cut.cost_usd)


async def test_a_cut_stream_tells_what_its_provider_invoices(sim: SimulatorServer, config: MoAConfig) -> None:
    """What a provider replica passes on as a cut call's receipt (``ProviderClient.stream``'s
    ``on_cut``): the stream closed after ten pieces, the client's count of what the call consumed
    is the simulator's invoice for it, within the pieces still in the socket."""
    set_pace(sim, ttft_s=0.02, tokens_per_s=200.0)
    req = CallRequest(provider="openai", model="gpt-4.1", messages=tuple(QUESTION))
    told: list[Usage] = []
    async with ProviderPool.from_config(config, sim_url=sim.url) as pool:
        stream = pool.clients["openai"].stream(req, on_cut=told.append)
        pieces = 0
        async for ev in stream:
            assert isinstance(ev, TextDelta), ev
            pieces += 1
            if pieces == 10:
                break
        await stream.aclose()  # type: ignore[attr-defined]
    await wait_idle(sim)
    billed = model_stats(sim, "gpt-4.1")
    assert billed["cancelled"] == 1 and len(told) == 1
    prompt = approx_message_tokens(q.content for q in QUESTION)
    assert told[0].input_tokens == billed["billed_input_tokens"] == prompt
    # Output: the text it read, which is what the simulator sent, but for the pieces it may still
    # have written while the client's close reached it.
    assert 0 < told[0].output_tokens <= billed["billed_output_tokens"] <= told[0].output_tokens + 2


async def test_a_request_cancelled_while_its_run_cleans_up_settles_after_the_cleanup() -> None:
    """``ended``: the request waits for its cancelled run's cleanup (which records what the cut
    calls cost) even when it is itself cancelled meanwhile, as Serve cancels a request whose
    client left; only then does its settlement, in the ``finally`` after, see the calls. Waiting
    with the cancellation suppressed settled at once, and a staircase's first layer, recorded
    after, was never charged on Ray."""
    recorded: list[str] = []
    settled_with: list[list[str]] = []

    async def run() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # closing its calls' streams (across processes on Ray)
            recorded.append("the cut call")
            raise

    async def request(work: asyncio.Task[None]) -> None:
        try:
            await ended(work)
        finally:
            settled_with.append(list(recorded))

    work = asyncio.ensure_future(run())
    await asyncio.sleep(0)
    handler = asyncio.ensure_future(request(work))
    for _ in range(3):  # the handler waits in ``ended``, the run in its cleanup
        await asyncio.sleep(0)
    assert not work.done() and not handler.done()
    handler.cancel()  # the client left: the request itself is cancelled
    with pytest.raises(asyncio.CancelledError):
        await handler
    assert settled_with == [["the cut call"]] and work.cancelled()


async def test_the_engines_estimate_of_a_cut_call_reads_the_prompt_as_the_provider_client_does() -> None:
    """A call cut before its provider reported its usage is charged its prompt as the provider
    reads it: the tool definitions and the response format's schema too, not the messages alone.
    The engine's estimate (``cut_result``; a fusion attempt's ``FuseStart``, what a cut aggregator
    is charged) and the provider client's (``prompt_read``) are one figure, so a cut call costs
    the same whichever side charges it when no receipt arrives."""
    from moa.engine.calls import cut_result
    from moa.engine.fusion import FuseJob, FuseStart, fuse
    from moa.plan import AggregatorSpec
    from moa.providers.consumption import prompt_read
    from moa.types import ResponseFormat, ToolSet
    from tests.helpers import TOOL_WEATHER

    config = load_config(None)
    question = (ChatMessage(role="user", content="Weather in Paris, as a document?"),)
    fmt = ResponseFormat(type="json_schema", name="weather", schema={"type": "object", "properties": {}})
    tools = ToolSet(tools=(TOOL_WEATHER,))
    req = CallRequest(provider="openai", model="gpt-4.1", messages=question, tools=tools, response_format=fmt)
    texts_only = approx_message_tokens(m.token_text for m in question)
    cut = cut_result(config, req, "", ErrorKind.CANCELLED, "cut", 0.1)
    assert cut.usage.input_tokens == prompt_read(req, "openai") > texts_only

    sent: list[CallRequest] = []

    class Recording:
        async def call(self, req: CallRequest) -> CallResult:
            raise AssertionError("fusion streams")

        async def stream(self, req: CallRequest) -> Any:
            sent.append(req)
            yield CallResult(
                provider=req.provider, provider_kind="openai", requested_model=req.model, text="{}"
            )

    spec = AggregatorSpec(provider="openai", model="gpt-4.1")
    job = FuseJob(
        chain=(spec,),
        messages=question,
        references=("a",),
        call_timeout_s=5,
        tools=tools,
        response_format=fmt,
    )
    (start,) = [ev async for ev in fuse(job, Recording(), config) if isinstance(ev, FuseStart)]
    assert (
        start.prompt_tokens
        == prompt_read(sent[0], "openai")
        > approx_message_tokens(m.token_text for m in sent[0].messages)
    )
