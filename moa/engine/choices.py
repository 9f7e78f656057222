"""Several answers to one request (OpenAI's ``n``): the proposer stages run once, then the final
answer (``moa.engine.answer``: the aggregators, the fallback chain, the best proposal) is written
``n`` times at once, each a call of its own sampled on its own, and each with its own chain
handling and finish reason.

Each answer runs in a view of the run (``view``): the same records, failures, notes and proposals,
so every call is billed and listed once, with its own generation parameters (a request's ``seed``
becomes ``seed + index``: the first answer is the one ``n: 1`` would give, and the others differ
from it and from each other) and its ``choice`` on its records. An answer whose chain is exhausted
fails the request with the usual error (a client indexing ``choices`` never gets fewer than it
asked for): the other answers are cancelled, and every call made so far, theirs included, is
billed. A client that leaves cancels them all.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncGenerator
from contextlib import aclosing

from moa.engine.answer import answer, critical_path
from moa.engine.context import RunContext
from moa.engine.modes import Proposed
from moa.errors import InvalidRequest
from moa.result import MoAResult
from moa.types import GenerationParams, TextDelta, ToolSet, Usage


def unshared(choices: int, tools: ToolSet | None) -> None:
    """Refuse what several answers cannot be made of: a request with tools, whose final calls
    are decided once (by the proposals' vote, which has one outcome, and validated against the
    tools' contract before any of it is sent), not sampled ``n`` times."""
    if choices > 1 and tools is not None:
        error = InvalidRequest(
            "n > 1 is not supported with tools by this service: the final calls are decided once, "
            "by a vote of the proposals, not sampled n times; send n requests instead"
        )
        error.param = "n"
        raise error


def seeded(params: GenerationParams, index: int) -> GenerationParams:
    """The parameters answer ``index`` is written with: the request's, its ``seed`` (if it gave
    one) moved on by ``index`` so that each answer is repeatable and none repeats another."""
    if params.seed is None or index == 0:
        return params
    return params.model_copy(update={"seed": params.seed + index})


def view(ctx: RunContext, index: int) -> RunContext:
    """Answer ``index``'s view of the run: its state shared (the lists are the run's own), its
    parameters and ``choice`` its own."""
    return dataclasses.replace(ctx, params=seeded(ctx.params, index), choice=index)


async def several(ctx: RunContext, proposed: Proposed) -> AsyncGenerator[TextDelta | MoAResult, None]:
    """The run's ``ctx.choices`` answers over ``proposed``, written at once: each answer's deltas
    as they arrive (``TextDelta.choice`` says whose), then one ``MoAResult`` with every answer
    (``choices``) and every call. The first answer that fails ends the run with its error."""
    views = [view(ctx, i) for i in range(ctx.choices)]
    events: asyncio.Queue[tuple[int, TextDelta | MoAResult] | BaseException | None] = asyncio.Queue()

    async def write(index: int) -> None:
        try:
            final = answer(views[index], proposed)
            async with aclosing(final):
                async for ev in final:
                    events.put_nowait((index, ev))
        except Exception as e:  # the run's error: the reader raises it
            events.put_nowait(e)
        else:
            events.put_nowait(None)

    tasks = [asyncio.create_task(write(i)) for i in range(ctx.choices)]
    results: dict[int, MoAResult] = {}
    try:
        written = 0
        while written < len(tasks):
            item = await events.get()
            if item is None:
                written += 1
            elif isinstance(item, BaseException):
                raise item
            elif isinstance(item[1], MoAResult):
                results[item[0]] = item[1]
            else:
                yield TextDelta(text=item[1].text, choice=item[0])
    finally:
        # An answer failed, or the run was cut: the others end now, each billing what it made.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        ctx.fallback_reason = next((v.fallback_reason for v in views if v.fallback_reason), None)
    yield combined(ctx, views, [results[i] for i in range(len(views))])


def combined(ctx: RunContext, views: list[RunContext], results: list[MoAResult]) -> MoAResult:
    """The run's result: the first answer's, with every answer as ``choices`` and the totals of
    every call (each answer's result was made when it was written, before the others ended)."""
    records = ctx.records
    service = [v.provider_critical_s for v in views if v.provider_critical_s is not None]
    return results[0].model_copy(
        update={
            "choices": [r.choice(i) for i, r in enumerate(results)],
            "calls": records,
            "usage": sum((r.usage for r in records), start=Usage()),
            "cost_usd": sum(r.cost_usd for r in records),
            "wall_time_s": ctx.offset(),
            "critical_path_s": critical_path(records),
            # The answers were written side by side: the slowest one's path is the run's.
            "provider_critical_path_s": max(service) if service else ctx.provider_critical_s,
            "notes": ctx.notes,
        }
    )
