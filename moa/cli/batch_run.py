"""``moa batch run``: a batch file through the API, in this process or on a running service.

The run itself is ``moa.batch``'s (the same runner and journal the service's Batch API uses); what
is here is the command's own: its options, its progress bar, and the API app it builds in this
process when no ``--url`` is given, which only a layer above the API may build.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import httpx
from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moa.batch.items import read_items
from moa.batch.journal import Journal
from moa.batch.runner import BatchRunner, BatchSummary, Sender
from moa.batch.runner import Progress as ItemProgress
from moa.batch.senders import ServiceSender, auth_headers, service_sender
from moa.config import MoAConfig
from moa.local import local_app
from moa.state import StateStore, open_store


class BatchOptions(BaseModel):
    """What ``moa batch run`` takes (its flags)."""

    input: Path = Field(description="The JSONL input: OpenAI batch lines or {'prompt': ...} lines.")
    output: Path = Field(description="The JSONL output, also the checkpoint: a rerun skips what it holds.")
    preset: str = Field(default="moa", description="The model of every item whose body names none.")
    concurrency: int = Field(default=4, ge=1, le=256, description="Items in flight at once.")
    max_cost_usd: float | None = Field(
        default=None, gt=0, description="The batch's budget, earlier runs of the same output included."
    )
    url: str | None = Field(default=None, description="A running service to send to; None runs in-process.")
    address: str | None = Field(
        default=None, description="A Ray cluster's address: the moa app on it is the service sent to."
    )
    app: str | None = Field(default=None, description="With address: which moa app (by its Serve name).")
    api_key: str | None = Field(default=None, description="The API key the requests carry.", repr=False)
    retry_errors: bool = Field(default=False, description="Run again the items whose line holds an error.")
    attempts: int = Field(default=4, ge=1, le=20, description="Tries per item (408, 429, 5xx, no response).")
    timeout_s: float = Field(default=3600.0, gt=0, description="How long one request to a service may take.")
    progress: bool = Field(default=True, description="A progress bar on stderr (a terminal's).")


@contextlib.asynccontextmanager
async def in_process_sender(
    cfg: MoAConfig, api_key: str | None, store: Callable[[], StateStore] | None = None
) -> AsyncIterator[ServiceSender]:
    """Requests to the API app built here, over the in-process provider pool (no server, no
    port); with a ``store``, keys and budgets apply as on ``moa serve --local``."""
    # Its own requests only: the service's Batch API batches in the same state are not its to run.
    async with local_app(cfg, store, run_batches=False) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            # A loopback address, as a client on this machine has: the service's exposure rule
            # serves loopback without keys (moa.exposure), and this is the operator's own process.
            transport=transport,
            base_url="http://127.0.0.1",
            headers=auth_headers(api_key),
            timeout=None,
        ) as client:
            yield ServiceSender(client)


@contextlib.asynccontextmanager
async def _sender(cfg: MoAConfig, opts: BatchOptions) -> AsyncIterator[Sender]:
    if opts.url:
        async with service_sender(opts.url, opts.api_key, opts.timeout_s) as s:
            yield s
    else:
        async with in_process_sender(cfg, opts.api_key, lambda: open_store(cfg.state)) as s:
            yield s


@contextlib.contextmanager
def _bar(enabled: bool, total: int, done: int) -> Iterator[Progress]:
    bar = Progress(
        TextColumn("batch"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[cost]}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not enabled,
    )
    with bar:
        bar.add_task("batch", total=total, completed=done, cost="$0")
        yield bar


async def run_batch(cfg: MoAConfig, opts: BatchOptions) -> BatchSummary:
    """Runs the batch; the items already in the output are skipped. Ctrl-C (cancellation) stops
    it with every finished item kept: the next run goes on from there."""
    items = read_items(opts.input, opts.preset)
    journal = Journal(opts.output, retry_errors=opts.retry_errors)
    known = {i.custom_id for i in items}
    strangers = sorted(set(journal.done) - known)
    if strangers:
        journal.close()
        raise ValueError(
            f"{opts.output} holds items that are not in {opts.input} (e.g. {strangers[0]!r}): "
            "it is another batch's output; choose another --out"
        )
    status = {
        "state": "running",
        "pid": os.getpid(),
        "input": str(opts.input),
        "total": len(items),
        "done_at_start": len(journal.done),
        "started_at": time.time(),
        "max_cost_usd": opts.max_cost_usd,
    }
    journal.write_status(status)
    try:
        with _bar(opts.progress, len(items), len(journal.done)) as bar:

            def shown(p: ItemProgress) -> None:
                bar.update(bar.task_ids[0], completed=p.done, cost=f"${p.cost_usd:.4f}")

            async with _sender(cfg, opts) as sender:
                runner = BatchRunner(
                    items,
                    journal,
                    sender,
                    concurrency=opts.concurrency,
                    max_cost_usd=opts.max_cost_usd,
                    attempts=opts.attempts,
                    on_progress=shown,
                )
                summary = await runner.run()
    except BaseException:
        journal.write_status(status | {"state": "interrupted"})
        raise
    finally:
        journal.close()
    end = "stopped" if summary.stopped else "finished"
    journal.write_status(status | {"state": end, "stopped": summary.stopped})
    return summary
