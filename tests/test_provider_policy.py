"""The provider policy (``ProviderClient``) over the scripted transport: retries and the provider's
retry hints, the circuit breaker, the concurrency slot, the cost of a stream cut mid-way, learned
parameter refusals. In-process, no SDK, no wire: the adapters are proven over the simulator
(tests/test_providers.py, tests/test_fidelity.py); here each decision of the policy is pinned."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from moa.caller import background_work
from moa.config import Endpoint, ProviderConfig, ProviderKind
from moa.limits import CircuitBreaker, CircuitState, ProviderLimits, RateBudgetExceeded, UnlimitedBudget
from moa.providers.client import ProviderClient
from moa.providers.registry import ProviderPool
from moa.providers.scripted import ScriptedTransport, Step
from moa.providers.transport import AttemptError
from moa.tokens import approx_message_tokens, approx_tokens
from moa.types import CallRequest, CallResult, ChatMessage, ErrorKind, GenerationParams, TextDelta, Usage

MODEL = "m"
QUESTION = (ChatMessage(role="user", content="What is the capital of France?"),)
PROMPT_TOKENS = approx_message_tokens(m.content for m in QUESTION)
ENDPOINT = Endpoint(provider="p", kind=ProviderKind.OPENAI, base_url=None, api_key=None, simulated=True)


def server_error() -> AttemptError:
    return AttemptError(ErrorKind.SERVER_ERROR, "500: overloaded", status=500)


def config(**fields: Any) -> ProviderConfig:
    raw: dict[str, Any] = {
        "kind": "openai",
        "timeout_s": 5,
        "retry": {"max_attempts": 3, "backoff_base_s": 0, "backoff_max_s": 0},
        "models": {MODEL: {"input_per_mtok": 1.0, "output_per_mtok": 2.0}},
    }
    return ProviderConfig.model_validate(raw | fields)


class Budget:
    """A rate budget that refuses every call while ``exhausted``, and records each settle."""

    def __init__(self) -> None:
        self.exhausted = False
        self.settled: list[tuple[int, int]] = []
        self.background: list[bool] = []  # each acquire's mark

    async def acquire(self, tokens: int, timeout_s: float, background: bool = False) -> None:
        self.background.append(background)
        if self.exhausted:
            raise RateBudgetExceeded(1.0)

    async def settle(self, reserved_tokens: int, actual_tokens: int) -> None:
        self.settled.append((reserved_tokens, actual_tokens))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def client_over(
    transport: ScriptedTransport,
    cfg: ProviderConfig | None = None,
    *,
    concurrency: int = 8,
    breaker: CircuitBreaker | None = None,
    budget: Budget | None = None,
) -> ProviderClient:
    limits = ProviderLimits(concurrency, budget or UnlimitedBudget(), breaker or CircuitBreaker(5, 30))
    return ProviderClient("p", cfg or config(), ENDPOINT, transport, limits)


def ask(**fields: Any) -> CallRequest:
    return CallRequest(provider="p", model=MODEL, messages=QUESTION, **fields)


# -- retries ---------------------------------------------------------------------------------------


async def test_a_retry_waits_as_long_as_the_provider_asked() -> None:
    """A 429's hint (Retry-After, or what the adapter read instead) is the wait, not the backoff
    (zero here): the call answers on its second attempt, no sooner than the hint."""
    hint = AttemptError(ErrorKind.RATE_LIMITED, "429: slow down", status=429, retry_after_s=0.3)
    transport = ScriptedTransport(Step(error=hint), "fine")
    res = await client_over(transport).complete(ask())
    assert res.ok and res.text == "fine" and res.attempts == 2
    assert res.latency_s >= 0.3, res.latency_s


async def test_a_hint_beyond_the_longest_wait_fails_at_once() -> None:
    hint = AttemptError(ErrorKind.RATE_LIMITED, "429: come back later", status=429, retry_after_s=60)
    transport = ScriptedTransport(Step(error=hint), "fine")
    res = await client_over(transport, config(retry={"max_retry_after_s": 1})).complete(ask())
    assert (
        res.error is not None and res.error.kind is ErrorKind.RATE_LIMITED and res.error.retry_after_s == 60
    )
    assert res.attempts == 1 and len(transport.sent) == 1


async def test_retryable_failures_go_again_until_the_attempts_run_out() -> None:
    transport = ScriptedTransport(server_error())
    res = await client_over(transport).complete(ask())
    assert res.error is not None and res.error.kind is ErrorKind.SERVER_ERROR
    assert res.attempts == 3 and len(transport.sent) == 3
    # A status refusal read nothing: no usage, no cost.
    assert res.usage.total_tokens == 0 and res.cost_usd == 0


async def test_a_bad_request_is_never_retried() -> None:
    transport = ScriptedTransport(AttemptError(ErrorKind.BAD_REQUEST, "400: no", status=400), "fine")
    res = await client_over(transport).complete(ask())
    assert res.error is not None and res.error.kind is ErrorKind.BAD_REQUEST and res.attempts == 1


async def test_the_deadline_bounds_a_hanging_attempt() -> None:
    transport = ScriptedTransport(Step(delay_s=30))
    res = await client_over(transport).complete(ask(timeout_s=0.2))
    assert res.error is not None and res.error.kind is ErrorKind.TIMEOUT
    assert res.latency_s < 2 and transport.sent[0][1] <= 0.2
    # The prompt went out and may have been read: it is charged, estimated.
    assert res.usage.input_tokens == PROMPT_TOKENS and res.usage_estimated


async def test_the_deadline_bounds_a_stream_that_never_opens() -> None:
    _, res = await ended(client_over(ScriptedTransport(Step(delay_s=30))).stream(ask(timeout_s=0.2)))
    assert res.error is not None and res.error.kind is ErrorKind.TIMEOUT


async def stream_text(stream: Any, pause_after_first_s: float = 0.0) -> tuple[str, CallResult]:
    """A stream's text and its result; with a pause after its first piece (a consumer busy)."""
    text, res = "", None
    async for ev in stream:
        if isinstance(ev, TextDelta):
            text += ev.text
            if text == ev.text and pause_after_first_s:
                await asyncio.sleep(pause_after_first_s)
        else:
            res = ev
    assert isinstance(res, CallResult)
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # no cancellation left behind on the task
    return text, res


async def ended(stream: Any, pause_after_first_s: float = 0.0) -> tuple[str, CallResult]:
    """``stream_text`` in a task of its own that must end within 5 s: a deadline that fails to end
    the stream fails the test (never hangs it), and nothing from outside cancels the stream."""
    task = asyncio.create_task(stream_text(stream, pause_after_first_s))
    done, _ = await asyncio.wait({task}, timeout=5)
    if not done:
        task.cancel()
        pytest.fail("the call's deadline did not end the stream")
    return task.result()


async def test_the_deadline_ends_a_stream_that_stops_mid_way() -> None:
    """A stream that stops after two pieces, its connection open: the call's deadline ends the
    wait for the next piece (the only bound here: the scripted transport has no read timeout), with
    the text it sent, closes the stream, and leaves no cancellation behind on the caller's task."""
    transport = ScriptedTransport(Step(pieces=("Par", "is", "."), stall_after=2))
    text, res = await ended(client_over(transport).stream(ask(timeout_s=0.2)))
    assert res.error is not None and res.error.kind is ErrorKind.TIMEOUT and res.attempts == 1
    assert text == "Paris" and transport.streams_closed == 1


async def test_a_deadline_passed_while_the_consumer_was_busy_ends_the_next_wait() -> None:
    """The deadline passes while the consumer holds the stream's first piece: a piece already at
    hand is still read (no wait), and the next wait ends at once, a timeout."""
    transport = ScriptedTransport(Step(pieces=("Par", "is", "."), stall_after=2))
    text, res = await ended(client_over(transport).stream(ask(timeout_s=0.2)), 0.3)
    assert res.error is not None and res.error.kind is ErrorKind.TIMEOUT and text == "Paris"


async def test_a_cancelled_consumer_mid_stream_is_cancelled_not_timed_out() -> None:
    transport = ScriptedTransport(Step(pieces=("Par", "is", "."), stall_after=2))
    task = asyncio.create_task(stream_text(client_over(transport).stream(ask(timeout_s=5))))
    await transport.wait_sent(1)
    await asyncio.sleep(0.05)  # into the wait for the third piece
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert transport.streams_closed == 1


# -- the circuit breaker ---------------------------------------------------------------------------


async def test_the_breaker_opens_half_opens_and_closes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(2, 30, clock=clock)
    transport = ScriptedTransport(
        server_error(), server_error(), "fine", server_error(), server_error(), server_error()
    )
    client = client_over(transport, config(retry={"max_attempts": 1}), breaker=breaker)
    for _ in range(2):
        assert not (await client.complete(ask())).ok
    assert breaker.state is CircuitState.OPEN
    refused = await client.complete(ask())
    assert refused.error is not None and refused.error.kind is ErrorKind.CIRCUIT_OPEN
    assert len(transport.sent) == 2  # refused without reaching the provider

    clock.now += 30
    assert breaker.state is CircuitState.HALF_OPEN
    assert (await client.complete(ask())).ok  # the probe answers: closed
    assert breaker.state is CircuitState.CLOSED

    for _ in range(2):
        await client.complete(ask())
    clock.now += 30
    probe = await client.complete(ask())  # a failed probe opens it again at once
    assert not probe.ok and breaker.state is CircuitState.OPEN


async def test_the_breaker_blames_only_the_providers_failures() -> None:
    """A bad request, our own bug, the caller's tighter deadline, our own rate budget and a
    cancelled call say nothing about the provider's health; a server error does (threshold 1)."""
    breaker, budget, held = CircuitBreaker(1, 30), Budget(), asyncio.Event()
    transport = ScriptedTransport(
        AttemptError(ErrorKind.BAD_REQUEST, "400: no", status=400),
        ValueError("a bug of ours"),
        Step(delay_s=30),
        Step(until=held),
        server_error(),
    )
    client = client_over(transport, config(retry={"max_attempts": 1}), breaker=breaker, budget=budget)
    kinds = [(await client.complete(ask())).error for _ in range(2)]
    kinds.append((await client.complete(ask(timeout_s=0.1))).error)
    budget.exhausted = True
    kinds.append((await client.complete(ask())).error)
    budget.exhausted = False
    assert [e.kind if e else None for e in kinds] == [
        ErrorKind.BAD_REQUEST,
        ErrorKind.INTERNAL,
        ErrorKind.TIMEOUT,
        ErrorKind.RATE_LIMITED,
    ]
    task = asyncio.create_task(client.complete(ask()))
    await transport.wait_sent(4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.state is CircuitState.CLOSED and breaker.snapshot()["consecutive_failures"] == 0
    await client.complete(ask())
    assert breaker.state is CircuitState.OPEN


async def test_a_budget_refusal_leaves_the_failure_count_alone() -> None:
    """Our own rate budget refusing a call is neutral: it neither counts against the provider nor
    clears the failures it has had (two failures around it still open a threshold of two)."""
    breaker, budget = CircuitBreaker(2, 30), Budget()
    client = client_over(
        ScriptedTransport(server_error()), config(retry={"max_attempts": 1}), breaker=breaker, budget=budget
    )
    await client.complete(ask())
    budget.exhausted = True
    refused = await client.complete(ask())
    assert refused.error is not None and refused.error.kind is ErrorKind.RATE_LIMITED
    budget.exhausted = False
    await client.complete(ask())
    assert breaker.state is CircuitState.OPEN


# -- the concurrency slot --------------------------------------------------------------------------


async def test_calls_beyond_the_concurrency_limit_wait_for_a_slot() -> None:
    go = asyncio.Event()
    transport = ScriptedTransport(Step(until=go))
    client = client_over(transport, concurrency=2)
    calls = [asyncio.create_task(client.complete(ask())) for _ in range(3)]
    await transport.wait_sent(2)
    await asyncio.sleep(0.1)
    assert len(transport.sent) == 2 and client.limits.in_flight == 2  # the third waits for a slot
    go.set()
    results = await asyncio.gather(*calls)
    assert all(r.ok for r in results) and len(transport.sent) == 3
    assert client.limits.max_in_flight == 2 and client.limits.in_flight == 0


async def test_no_slot_before_the_deadline_is_a_timeout_that_blames_nobody() -> None:
    go = asyncio.Event()
    transport = ScriptedTransport(Step(until=go))
    client = client_over(transport, concurrency=1, breaker=CircuitBreaker(1, 30))
    holder = asyncio.create_task(client.complete(ask()))
    await transport.wait_sent(1)
    res = await client.complete(ask(timeout_s=0.1))
    assert res.error is not None and res.error.kind is ErrorKind.TIMEOUT
    assert "no concurrency slot" in res.error.message and len(transport.sent) == 1
    assert client.limits.breaker.state is CircuitState.CLOSED
    go.set()
    assert (await holder).ok


# -- cost ------------------------------------------------------------------------------------------


async def test_an_answer_is_costed_from_the_providers_usage() -> None:
    transport = ScriptedTransport(
        Step(text="Paris.", usage=Usage(input_tokens=1000, output_tokens=500)), window=4096
    )
    res = await client_over(transport).complete(ask())
    assert res.ok and res.cost_usd == pytest.approx(1000 * 1e-6 + 500 * 2e-6)
    assert res.context_window == 4096 and not res.usage_estimated


async def test_a_stream_the_provider_cuts_mid_way_is_costed_and_not_retried() -> None:
    """Text already sent cannot be taken back: a retryable failure after it ends the call, which
    is charged for its prompt and the text that came."""
    cut = Step(pieces=("Paris is ", "the capi"), error=server_error())
    transport = ScriptedTransport(cut, "never asked")
    events = [ev async for ev in client_over(transport).stream(ask())]
    res = events[-1]
    assert isinstance(res, CallResult) and res.error is not None and res.error.kind is ErrorKind.SERVER_ERROR
    assert [ev.text for ev in events if isinstance(ev, TextDelta)] == ["Paris is ", "the capi"]
    assert res.attempts == 1 and len(transport.sent) == 1 and res.text == "Paris is the capi"
    # A status refusal mid-stream: the prompt counts as refused, the text received is billed.
    assert res.usage.output_tokens == approx_tokens("Paris is the capi") and res.usage_estimated
    assert res.cost_usd == pytest.approx(res.usage.input_tokens * 1e-6 + res.usage.output_tokens * 2e-6)
    assert res.cost_usd > 0


async def test_a_stream_its_consumer_cuts_reports_what_it_consumed() -> None:
    """Closed after its first piece: the provider's stream is closed at once, the cut is told the
    prompt and the text received, the budget is settled with the same, the slot is freed and
    the breaker learns nothing."""
    budget, breaker = Budget(), CircuitBreaker(1, 30)
    transport = ScriptedTransport(Step(pieces=("Paris", " is", " the capital.")))
    client = client_over(transport, budget=budget, breaker=breaker)
    cuts: list[Usage] = []
    stream = client.stream(ask(), on_cut=cuts.append)
    first = await anext(aiter(stream))
    assert isinstance(first, TextDelta) and first.text == "Paris"
    await stream.aclose()  # type: ignore[attr-defined]
    assert transport.streams_closed == 1
    assert cuts == [Usage(input_tokens=PROMPT_TOKENS, output_tokens=approx_tokens("Paris"))]
    assert [actual for _, actual in budget.settled] == [PROMPT_TOKENS + approx_tokens("Paris")]
    assert client.limits.in_flight == 0 and breaker.state is CircuitState.CLOSED


# -- learned refusals ------------------------------------------------------------------------------


async def test_a_refused_parameter_is_learned_and_never_sent_again() -> None:
    refusal = AttemptError(
        ErrorKind.BAD_REQUEST,
        "400: Unsupported parameter: 'temperature' is not supported with this model.",
        status=400,
    )
    transport = ScriptedTransport(Step(error=refusal), "fine")
    client = client_over(transport, config(retry={"max_attempts": 1}))
    warm = GenerationParams(temperature=0.5)
    res = await client.complete(ask(params=warm))
    # Gone again at once without it, even with one attempt allowed: a refusal is not a retry.
    assert res.ok and res.attempts == 2
    assert [req.params.temperature for req, _ in transport.sent] == [0.5, None]
    assert res.adjustments == [f"temperature dropped: refused by {MODEL} (learned from its 400)"]
    again = await client.complete(ask(params=warm))
    assert again.ok and again.attempts == 1 and transport.sent[-1][0].params.temperature is None


# -- background work: a batch's calls marked on their way to the limits ---------------------------


async def test_the_pool_marks_a_background_requests_calls_for_the_budget_and_the_slot() -> None:
    """Under ``background_work`` (what the API sets around a batch's request) the in-process pool
    sends each call marked, streamed or not: the budget and the slot see the mark; outside, not."""
    budget = Budget()
    client = client_over(ScriptedTransport("a", "b", "c"), budget=budget)
    pool = ProviderPool({"p": client})
    assert (await pool.call(ask())).ok
    with background_work():
        assert (await pool.call(ask())).ok
        events = [ev async for ev in pool.stream(ask())]
    assert isinstance(events[-1], CallResult) and events[-1].ok
    assert budget.background == [False, True, True]
    assert client.limits.background_calls == 2


class FakeHandle:
    """A Serve handle's surface as HandleCaller and RemoteFuser use it, recording what each sends."""

    def __init__(self, answer: Any) -> None:
        self.answer, self.sent = answer, []

    def options(self, **_: Any) -> FakeHandle:
        return self

    def __getattr__(self, method: str) -> FakeHandle:
        return self

    def remote(self, payload: Any, trace: Any = None) -> Any:
        self.sent.append(payload)
        answer = self.answer

        class Response:
            def __await__(self) -> Any:
                async def value() -> Any:
                    return answer

                return value().__await__()

            async def __aiter__(self) -> Any:
                yield answer

            def cancel(self) -> None:
                pass

        return Response()


async def test_the_ray_transports_carry_the_mark_to_the_provider_and_aggregator_replicas() -> None:
    """On Ray the call itself carries the mark (``CallRequest.background``) to the provider replica,
    and a fusion job (``FuseJob.background``) to the aggregator replica, whose calls it marks."""
    from moa.engine.fusion import FuseJob
    from moa.plan import AggregatorSpec
    from moa_actors.handles import HandleCaller, RemoteFuser

    result = CallResult(provider="p", provider_kind="scripted", requested_model=MODEL, text="ok")
    handle = FakeHandle(result)
    caller = HandleCaller({"p": handle})
    await caller.call(ask())
    with background_work():
        await caller.call(ask())
        _ = [ev async for ev in caller.stream(ask())]
    assert [req.background for req in handle.sent] == [False, True, True]
    fuser = FakeHandle("done")
    job = FuseJob(chain=(AggregatorSpec(provider="p", model=MODEL),), messages=QUESTION, call_timeout_s=5)
    with background_work():
        assert [ev async for ev in RemoteFuser(fuser).fuse(job)] == ["done"]
    _ = [ev async for ev in RemoteFuser(fuser).fuse(job)]
    assert [j.background for j in fuser.sent] == [True, False]


async def test_a_background_fusion_job_marks_every_call_of_its_chain() -> None:
    """In the aggregator replica no request is being served: the job's own mark marks its calls."""
    from moa.config import load_config
    from moa.engine.fusion import FuseJob, fuse
    from moa.plan import AggregatorSpec

    sent: list[CallRequest] = []

    def answer(req: CallRequest) -> CallResult:
        sent.append(req)
        return CallResult(provider=req.provider, provider_kind="openai", requested_model=req.model, text="x")

    class Recording:
        async def call(self, req: CallRequest) -> CallResult:
            return answer(req)

        async def stream(self, req: CallRequest) -> Any:
            yield answer(req)

    spec = AggregatorSpec(provider="openai", model="gpt-4.1-mini")
    for background in (True, False):
        job = FuseJob(chain=(spec,), messages=QUESTION, references=("a", "b"), call_timeout_s=5)
        job = job.model_copy(update={"background": background})
        _ = [ev async for ev in fuse(job, Recording(), load_config(None))]
    assert [req.background for req in sent] == [True, False]
