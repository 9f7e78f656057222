"""``moa ask``: run the engine in-process, stream the answer, then show every call and the totals.

The engine, the provider pool and rich are imported when the command runs, not when the parser
is built: every other ``moa`` command starts without them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from moa.config import load_config
from moa.result import MoAResult
from moa.types import ChatMessage, GenerationParams, TextDelta

if TYPE_CHECKING:
    from rich.table import Table


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ask", help="answer a question in-process with the MoA engine")
    p.add_argument("question", help="the question (use - to read it from standard input)")
    p.add_argument("--preset", default=None, help="preset or provider/model (default: the config's, 'auto')")
    p.add_argument("--config", default=None, help="config YAML (default: $MOA_CONFIG or the bundled one)")
    p.add_argument("--system", default=None, help="a system message to send with the question")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--no-stream", action="store_true", help="print the answer only when it is complete")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    question = sys.stdin.read() if args.question == "-" else args.question
    return asyncio.run(ask(args, question))


def calls_table(result: MoAResult) -> Table:
    from rich.table import Table

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
    from rich.console import Console

    from moa.engine.assembly import assemble
    from moa.providers.registry import ProviderPool
    from moa.simulator.server import simulator_if_needed

    cfg = load_config(args.config)
    messages = [ChatMessage(role="user", content=question)]
    if args.system:
        messages.insert(0, ChatMessage(role="system", content=args.system))
    params = GenerationParams(temperature=args.temperature, max_tokens=args.max_tokens)
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=160)  # redirected output: do not cut model names
    with simulator_if_needed(cfg) as cfg:
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
