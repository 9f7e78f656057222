"""Receipts: what a call cut short really consumed, reported after the cut by the side that saw
every token its provider sent, and charged to the ledger when it comes.

Why: a cut call is billed at the cutting side's estimate (``cut_result``: its prompt plus the text
received, plus the provider's ``cut_margin_tokens``). In-process that is what the provider client
read. On Ray the text reaches the ingress from the provider replica in batches
(``CallRequest.batch_s``) and the cancellation takes a while to reach the replica, so the provider
writes, and bills, text the ingress never sees: the ledger ended 7.2% below the invoice
(docs/RELIABILITY.md). The provider replica sees all of it. When a stream is cut there, its client
says what the call consumed (``ProviderClient.stream``'s ``on_cut``), the replica leaves that as a
receipt under the call's id (``CallRequest.call_id``) in one shared place (``Receipts``, kept by
the health board), and the request's settlement takes it back (``ReceiptSource``) before it writes
the ledger: each cut call is charged the larger of the estimate and the receipt (``late_charge``).

A call can also be cut on one side and finished on the other: its result crossed the cancellation
(the replica had the provider's usage and passed it on; the ingress had stopped reading). The
replica cannot tell, so every streamed call's result leaves a receipt too (``put_finished``, a few
at a time): nobody asks for most of them, and they are kept apart, in a bounded tier of their own,
so that they never push out the receipt of a call that was cut.

Bounded everywhere: a settlement waits at most ``RECEIPT_WAIT_S`` for its receipts, and a receipt
that never comes (a replica that died, a call cut before it reached one) leaves the call at its
estimate. The request's response never waits for receipts (``moa.api.access.Spend``).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from typing import Protocol

from moa.config import MoAConfig
from moa.result import CallRecord
from moa.types import Usage

# How long a request's settlement waits for the receipts of the calls it cut, counted from the
# end of the request: the cancellation crossing to the provider replica and its receipt crossing
# to the health board take milliseconds; a loaded machine may take far longer, but not seconds.
RECEIPT_WAIT_S = 2.0
# How long a receipt is kept for its request's settlement: as long as a request may run after the
# cut (a straggler cut early in a request of an hour), as its reservation is (``RESERVATION_TTL_S``
# in moa.api.access). Past it, and past ``RECEIPTS_KEPT`` (receipts nobody asks for: a request
# without an API key settles nothing), the oldest are dropped, and their calls keep the estimate.
RECEIPT_TTL_S = 3600.0 + 300.0
RECEIPTS_KEPT = 100_000
# The receipts of calls that ended with their result, kept for the few their caller had cut as the
# result crossed: the newest this many (every streamed call leaves one). At a thousand streamed
# calls a second that is almost a minute; a result that crossed the cut of a request which ran on
# for longer leaves its call at the estimate (``cut_margin_tokens`` above what it had read).
FINISHED_KEPT = 50_000


class ReceiptSource(Protocol):
    """Where a request's settlement takes the receipts of the calls it cut (on Ray, the health
    board through its handle: ``moa_actors.handles.BoardReceipts``)."""

    async def receipts(self, call_ids: Collection[str], within_s: float) -> Mapping[str, Usage]:
        """The receipts of ``call_ids`` that arrive within ``within_s`` seconds (those already in
        at once); the others are left out. Never raises for a receipt source that is down: it
        answers with what it has, maybe nothing."""
        ...


class Receipts:
    """The receipts left by every provider replica, each until its request's settlement takes it
    (or it is ``RECEIPT_TTL_S`` old). One event loop touches it (the health board's)."""

    def __init__(
        self, ttl_s: float = RECEIPT_TTL_S, kept: int = RECEIPTS_KEPT, finished_kept: int = FINISHED_KEPT
    ) -> None:
        self.ttl_s, self.kept, self.finished_kept = ttl_s, kept, finished_kept
        self.clock: Callable[[], float] = time.monotonic
        # call id -> (when it came, input tokens, output tokens), oldest first; plain numbers,
        # which take a fraction of the memory of a Usage each. The receipts of cut calls, and
        # apart from them those of calls that ended with their result.
        self._held: OrderedDict[str, tuple[float, int, int]] = OrderedDict()
        self._finished: OrderedDict[str, tuple[float, int, int]] = OrderedDict()
        self._arrived: set[asyncio.Event] = set()  # one per settlement waiting for receipts

    def __len__(self) -> int:
        return len(self._held) + len(self._finished)

    async def receipts(self, call_ids: Collection[str], within_s: float) -> Mapping[str, Usage]:
        """``ReceiptSource`` in-process: ``moa serve --local``'s pool leaves its receipts here."""
        return await self.take(call_ids, within_s)

    def put(self, call_id: str, usage: Usage) -> None:
        """A provider replica's receipt: what the call ``call_id`` consumed when it was cut."""
        self._keep(self._held, {call_id: usage}, self.kept)

    def put_finished(self, receipts: Mapping[str, Usage]) -> None:
        """Receipts of calls that ended with their result (the provider's usage), by call id:
        wanted only for a call whose caller had cut it as its result crossed."""
        self._keep(self._finished, receipts, self.finished_kept)

    def _keep(
        self, tier: OrderedDict[str, tuple[float, int, int]], receipts: Mapping[str, Usage], kept: int
    ) -> None:
        now = self.clock()
        for call_id, usage in receipts.items():
            tier[call_id] = (now, usage.input_tokens, usage.output_tokens)
            tier.move_to_end(call_id)
        while tier:
            oldest, (at, _, _) = next(iter(tier.items()))
            if now - at <= self.ttl_s and len(tier) <= kept:
                break
            del tier[oldest]
        for arrived in self._arrived:
            arrived.set()

    def _has(self, call_id: str) -> bool:
        return call_id in self._held or call_id in self._finished

    async def take(self, call_ids: Collection[str], within_s: float) -> dict[str, Usage]:
        """The receipts of ``call_ids``, removed: at once when all are in, else those in when
        ``within_s`` seconds have passed."""
        wanted = set(call_ids)
        loop = asyncio.get_running_loop()
        end = loop.time() + within_s
        while not all(self._has(call_id) for call_id in wanted):
            left = end - loop.time()
            if left <= 0:
                break
            arrived = asyncio.Event()
            self._arrived.add(arrived)
            try:
                async with asyncio.timeout(left):
                    await arrived.wait()
            except TimeoutError:
                break
            finally:
                self._arrived.discard(arrived)
        got = {
            call_id: (self._held if call_id in self._held else self._finished).pop(call_id)
            for call_id in wanted
            if self._has(call_id)
        }
        return {call_id: Usage(input_tokens=i, output_tokens=o) for call_id, (_, i, o) in got.items()}


def late_charge(config: MoAConfig, call: CallRecord, reported: Usage) -> tuple[int, float]:
    """What to add to a cut call's estimate (``call``) once its receipt (``reported``) came: the
    tokens and dollars that bring it to the larger of the two, for input and output each.

    The larger, not the receipt alone: the estimate counts a prompt the provider may never have
    read (a call cut while it waited for a concurrency slot), and the ledger is to err above the
    invoice rather than below it. The receipt's output is taken with the provider's
    ``cut_margin_tokens``, as the estimate's is: a replica's count of a cut stream misses what its
    own socket still held. So a cut call is charged at most the margin above what its provider
    billed, whichever side counted. Never negative."""
    pcfg = config.providers.get(call.provider)
    est = call.usage
    input_tokens = max(est.input_tokens, reported.input_tokens)
    margin = pcfg.cut_margin_tokens if pcfg is not None else 0
    output_tokens = max(est.output_tokens, reported.output_tokens + margin)
    tokens = input_tokens + output_tokens - est.total_tokens
    if pcfg is None:
        return tokens, 0.0
    cost = config.price(call.provider, call.model).cost(input_tokens, output_tokens)
    return tokens, max(cost - call.cost_usd, 0.0)
