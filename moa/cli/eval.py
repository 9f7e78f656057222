"""``moa eval``: the command line of the evaluation harness."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from moa.config import load_config

if TYPE_CHECKING:
    from moa.eval.runner import EvalSpec

DEFAULT_JUDGE = "openai/gpt-4.1"


def _list(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return names


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "eval",
        help="does moa beat your best single model on your questions? win rates, scores, costs",
        description="Answer a workload with each target, have judges compare each target with a "
        "reference (pairwise, both orders) or grade it 1-10, and report win rates or scores with "
        "bootstrap 95% intervals and the cost of answering and judging. Every call is written to "
        "the run directory as it finishes; --resume continues an interrupted run.",
    )
    p.add_argument(
        "--workload", type=Path, help="JSONL: {prompt}, AlpacaEval {instruction} or MT-Bench {turns}"
    )
    p.add_argument(
        "--targets",
        type=_list,
        help="comma-separated: presets (PRESET:final, :early or :staircase for an aggregation mode), "
        "provider/model, or MODEL@URL",
    )
    p.add_argument("--reference", default=None, help="pairwise: the target every other is compared with")
    p.add_argument(
        "--reference-outputs", type=Path, default=None, help="pairwise: a JSONL file of reference answers"
    )
    p.add_argument(
        "--judges",
        type=_list,
        default=[DEFAULT_JUDGE],
        help=f"comma-separated configured provider/model judges (default: {DEFAULT_JUDGE})",
    )
    p.add_argument(
        "--mode", choices=("pairwise", "graded"), default=None, help="default: pairwise with a reference"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N items of the workload")
    p.add_argument("--max-tokens", type=int, default=1024, help="max_tokens of target calls (default: 1024)")
    p.add_argument(
        "--judge-max-tokens", type=int, default=1024, help="max_tokens of judge calls (default: 1024)"
    )
    p.add_argument("--temperature", type=float, default=None, help="temperature of target calls")
    p.add_argument("--concurrency", type=int, default=8, help="calls in flight at once (default: 8)")
    p.add_argument(
        "--max-cost-usd",
        type=float,
        default=None,
        help="stop before a call whose worst case would take the run's spend past this",
    )
    p.add_argument(
        "--out", type=Path, default=Path("eval-runs"), help="where run directories go (default: eval-runs/)"
    )
    p.add_argument("--run-id", default=None, help="the run directory's name (default: the start time)")
    p.add_argument(
        "--resume", type=Path, default=None, help="continue the run in this directory (its run.json)"
    )
    p.add_argument("--service", default=None, help="run bare targets on this running moa service (URL)")
    p.add_argument("--service-key-env", default="MOA_API_KEY", help="variable holding the service's API key")
    p.add_argument(
        "--api-key",
        default=None,
        help="the service's API key (default: the --service-key-env variable); costs need a key "
        "made with `moa keys create NAME --detail`",
    )
    p.add_argument("--endpoint-key-env", default=None, help="variable holding the key of MODEL@URL endpoints")
    p.add_argument("--config", default=None, help="config YAML (default: $MOA_CONFIG or the bundled one)")
    p.add_argument("--sim-profile", default=None, help="simulator profile (judge behaviour) when simulating")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run_cli)


def _spec(args: argparse.Namespace) -> EvalSpec:
    from moa.eval.runner import EvalSpec

    if args.workload is None or not args.targets:
        raise ValueError("--workload and --targets are needed (or --resume DIR)")
    mode: Literal["pairwise", "graded"] = args.mode or (
        "pairwise" if args.reference or args.reference_outputs else "graded"
    )
    if mode == "pairwise" and not (args.reference or args.reference_outputs):
        raise ValueError("pairwise needs --reference TARGET or --reference-outputs FILE")
    return EvalSpec(
        workload=str(args.workload),
        limit=args.limit,
        mode=mode,
        targets=args.targets,
        reference=args.reference,
        reference_outputs=str(args.reference_outputs) if args.reference_outputs else None,
        judges=args.judges,
        max_tokens=args.max_tokens,
        judge_max_tokens=args.judge_max_tokens,
        temperature=args.temperature,
        service_url=args.service,
    )


def run_cli(args: argparse.Namespace) -> int:
    from moa.eval.report import build_report, markdown, write_report
    from moa.eval.runner import Evaluation, load_spec, save_spec
    from moa.eval.targets import TargetError
    from moa.eval.workloads import WorkloadError
    from moa.simulator.server import simulator_if_needed

    cfg = load_config(args.config)
    if args.api_key:  # read by the service targets from --service-key-env, in this process only
        os.environ[args.service_key_env] = args.api_key
    if args.sim_profile:
        cfg = cfg.model_copy(
            update={"simulator": cfg.simulator.model_copy(update={"profile": args.sim_profile})}
        )
    try:
        if args.resume:
            run_dir = args.resume
            spec = load_spec(run_dir)
        else:
            spec = _spec(args)
            run_dir = args.out / (args.run_id or time.strftime("%Y%m%d-%H%M%S"))
            if (run_dir / "run.json").exists():
                raise ValueError(f"{run_dir} holds a run already: --resume {run_dir}, or another --run-id")
            save_spec(run_dir, spec)
    except (ValueError, OSError) as e:
        print(f"moa eval: {e}", file=sys.stderr)
        return 2
    with simulator_if_needed(cfg) as cfg:
        try:
            ev = Evaluation(
                spec,
                cfg,
                run_dir,
                concurrency=args.concurrency,
                max_cost_usd=args.max_cost_usd,
                progress=not args.no_progress,
                service_key_env=args.service_key_env,
                endpoint_key_env=args.endpoint_key_env,
            )
            asyncio.run(ev.run())
        except (WorkloadError, TargetError, ValueError) as e:
            print(f"moa eval: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"moa eval: interrupted; continue with: moa eval --resume {run_dir}", file=sys.stderr)
            return 130
    report = build_report(spec, ev.files, ev.items, ev.budget.stopped)
    notes = write_report(report, run_dir)
    print(markdown(report))
    for note in notes:
        print(note, file=sys.stderr)
    if ev.budget.stopped:
        print(
            f"moa eval: stopped by --max-cost-usd; continue with: moa eval --resume {run_dir}",
            file=sys.stderr,
        )
    print(f"results in {run_dir}/ (report.json, report.md, report.png, answers.jsonl, judgments.jsonl)")
    return 0
