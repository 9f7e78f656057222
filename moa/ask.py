"""``moa ask``: run the engine in-process, stream the answer, then show every call and the totals."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from moa.config import load_config
from moa.engine.assembly import assemble
from moa.result import MoAResult
from moa.types import ChatMessage, GenerationParams, TextDelta


def calls_table(result: MoAResult) -> Table:
    table = Table(title=f"preset {result.preset}: {result.decision.reason}", title_justify="left")
    for col in ("stage", "layer", "model", "role", "latency", "tokens in/out", "cost $", "status"):
        table.add_column(col, justify="right" if col in {"latency", "tokens in/out", "cost $"} else "left")
    for c in result.calls:
        status = "ok" if c.ok else ("straggler cancelled" if c.cancelled_straggler else str(c.error_kind))
        table.add_row(
            c.stage.value,
            "" if c.layer is None else str(c.layer),
            f"{c.provider}/{c.model}",
            c.role or "",
            f"{c.latency_s:.2f}s",
            f"{c.usage.input_tokens}/{c.usage.output_tokens}",
            f"{c.cost_usd:.5f}",
            status,
        )
    return table


def totals_line(result: MoAResult) -> str:
    return (
        f"total: {len(result.calls)} calls, {result.usage.input_tokens} tokens in, "
        f"{result.usage.output_tokens} out, ${result.cost_usd:.5f}, wall {result.wall_time_s:.2f}s, "
        f"critical path {result.critical_path_s:.2f}s"
    )


async def ask(args: argparse.Namespace, question: str) -> int:
    from moa.providers.registry import ProviderPool
    from moa.simulator.server import local_simulator

    cfg = load_config(args.config)
    messages = [ChatMessage(role="user", content=question)]
    if args.system:
        messages.insert(0, ChatMessage(role="system", content=args.system))
    params = GenerationParams(temperature=args.temperature, max_tokens=args.max_tokens)
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=160)  # redirected output: do not cut model names
    with local_simulator(cfg) as cfg:
        async with ProviderPool.from_config(cfg, sim_url=cfg.simulator.url) as pool:
            engine = assemble(cfg, pool)
            result: MoAResult | None = None
            if args.no_stream or args.json:
                result = await engine.run(messages, preset=args.preset, params=params)
                if not args.json:
                    print(result.text)
            else:
                async for ev in engine.stream(messages, preset=args.preset, params=params):
                    if isinstance(ev, TextDelta):
                        sys.stdout.write(ev.text)
                        sys.stdout.flush()
                    elif isinstance(ev, MoAResult):
                        result = ev
                print()
    assert result is not None
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    for note in result.notes:
        console.print(f"[yellow]note:[/yellow] {note}")
    if result.fallback:
        console.print(f"[yellow]fallback:[/yellow] {result.fallback}")
    console.print(calls_table(result))
    console.print(totals_line(result))
    return 0
