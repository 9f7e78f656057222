"""``moa bench``: the command line of the benchmark harness."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict

from moa.benchmark.options import (
    FAULTY_MODEL,
    SCENARIO_HELP,
    SCENARIOS,
    STRUCTURED_CONFIGS,
    STRUCTURED_ERROR_RATES,
    TOOL_CONFIGS,
    TOOL_ERROR_RATES,
    BenchOptions,
)

# moa bench --soak's load and target when none is given: issue 31's steady-state run.
SOAK_CONCURRENCY = 32
SOAK_TARGET = "local:moa-lite"


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be positive")
    return values


def _names(allowed: set[str] | None) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x for x in text.split(",") if x]
        unknown = [n for n in names if allowed is not None and n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(unknown)} (one of {', '.join(sorted(allowed or []))})"
            )
        return names

    return parse


def _targets(text: str) -> list[str]:
    names = _names(None)(text)
    unknown = [
        n
        for n in names
        if n not in ("baseline", "floor") and not (n.startswith(("serve:", "local:")) and n.split(":", 1)[1])
    ]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown target(s): {', '.join(unknown) or '(none given)'} "
            "(baseline, floor, serve:MODEL or local:MODEL)"
        )
    return names


def _tool_configs(text: str) -> list[str]:
    names = _names(None)(text)
    bad = [n for n in names if n.partition(":")[2] not in ("", "vote", "aggregate")]
    if bad or not names:
        raise argparse.ArgumentTypeError(
            f"unknown tool mode in: {', '.join(bad) or '(none given)'} (MODEL, MODEL:vote or MODEL:aggregate)"
        )
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _rates(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError("error rates are between 0 and 1")
    return values


def _csv(values: object) -> str:
    return ",".join(str(v) for v in values)  # type: ignore[attr-defined]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    d = BenchOptions()
    scenarios = "; ".join(f"{name}: {what}" for name, what in SCENARIO_HELP.items())
    p = sub.add_parser(
        "bench",
        help="benchmark the Serve app against a single-process baseline",
        description="Run a prompt workload at each concurrency level against each target, then the "
        "fault scenarios; print a line per finished level, then the report.",
    )
    p.add_argument("--prompts", type=Path, default=None, help="JSONL workload (default: the bundled prompts)")
    p.add_argument(
        "--concurrency",
        type=_ints,
        default=None,
        help=f"concurrency levels, comma-separated (default: {_csv(d.concurrency)}); with --soak, one "
        f"level (default: {SOAK_CONCURRENCY})",
    )
    p.add_argument(
        "--requests",
        type=int,
        default=d.requests,
        help=f"requests per target and level, at least twice the level (default: {d.requests})",
    )
    p.add_argument(
        "--targets",
        type=_targets,
        default=None,
        help="baseline, serve:MODEL (a preset or provider/model, through the Ray app), local:MODEL "
        "(the same through `moa serve --local`, a process of its own, no Ray) and floor (a bare "
        "Serve app's hop latencies), comma-separated; Ray starts only for serve:, floor and the "
        f"fault scenarios (default: {_csv(d.targets)}); with --soak, one local: or serve: target "
        f"(default: {SOAK_TARGET})",
    )
    p.add_argument(
        "--scenarios",
        type=_names(set(SCENARIOS)),
        default=list(d.scenarios),
        help=f"fault scenarios, comma-separated, each on the proposer {FAULTY_MODEL} of moa-lite "
        f"({scenarios}) (default: {_csv(d.scenarios)})",
    )
    p.add_argument(
        "--fault-requests",
        type=int,
        default=d.fault_requests,
        help=f"requests per fault scenario (default: {d.fault_requests})",
    )
    p.add_argument(
        "--fault-concurrency",
        type=int,
        default=d.fault_concurrency,
        help=f"concurrency of the fault scenarios (default: {d.fault_concurrency})",
    )
    p.add_argument(
        "--ttft", type=float, default=d.ttft_s, help=f"simulated time to first token, s (default: {d.ttft_s})"
    )
    p.add_argument(
        "--tps",
        type=float,
        default=d.tokens_per_s,
        help=f"simulated tokens per second (default: {d.tokens_per_s:g})",
    )
    p.add_argument(
        "--jitter",
        type=float,
        default=d.jitter,
        help=f"simulated latency jitter, 0.1 = ±10%% (default: {d.jitter})",
    )
    p.add_argument(
        "--layer-deadline",
        type=float,
        default=d.layer_deadline_s,
        help=f"the Serve app's layer deadline, s (default: {d.layer_deadline_s:g})",
    )
    p.add_argument(
        "--baseline-timeout",
        type=float,
        default=d.baseline_fault_timeout_s,
        help=f"baseline client timeout under faults, s (default: {d.baseline_fault_timeout_s:g})",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=d.out,
        help=f"where results.json, results.md and bench.png go (default: {d.out}/)",
    )
    p.add_argument(
        "--auth-overhead",
        action="store_true",
        help="instead: what key checking and budget reservation add per request (in-process API, "
        "model 'single', open vs key vs key+budget; writes auth-overhead.json and .md)",
    )
    p.add_argument(
        "--auth-redis-url",
        default=None,
        help="with --auth-overhead: keep the keys in this Redis (it is flushed!) instead of SQLite",
    )
    p.add_argument(
        "--cache",
        action="store_true",
        help="instead: the response cache on MT-Bench-style repeats and rephrasings (in-process API, "
        "moa-lite; --prompts, --requests caps the questions; writes cache.json and cache.md)",
    )
    p.add_argument(
        "--spend-audit",
        action="store_true",
        help="instead: the spend audit (the ledger against the simulator's invoice with hang-ups, "
        "abandoned requests and staircase overrides; a budget, TPM and one key hogging the slots, "
        "each against its goal; writes spend-audit.json and spend-audit.md; exits 1 if a goal is "
        "missed; --serve for the Ray app)",
    )
    p.add_argument(
        "--tools",
        action="store_true",
        help="instead: tool calling through the ensemble (in-process API, the embedded simulator with "
        "its tool errors at each rate; the bundled tool tasks or --prompts; accuracy, validity, cost, "
        "latency and the vote's share per configuration and rate; writes tools.json and tools.md; "
        "exits 1 if an answer broke the tools' contract)",
    )
    p.add_argument(
        "--tool-configs",
        type=_tool_configs,
        default=list(TOOL_CONFIGS),
        help=f"with --tools: what answers, comma-separated: a preset or provider/model, an ensemble "
        f"with :vote or :aggregate (default: {_csv(TOOL_CONFIGS)})",
    )
    p.add_argument(
        "--tool-error-rates",
        type=_rates,
        default=list(TOOL_ERROR_RATES),
        help="with --tools: the probabilities, comma-separated, that a simulated model gets a tool "
        f"call wrong, the kind of error drawn among five (default: {_csv(TOOL_ERROR_RATES)})",
    )
    p.add_argument(
        "--tool-repeats",
        type=_positive,
        default=1,
        help="with --tools: send each task this many times, seeds 1..N (independent error draws; default: 1)",
    )
    p.add_argument(
        "--tool-tasks",
        type=_positive,
        default=None,
        help="with --tools: only the first N tasks (default: all)",
    )
    p.add_argument(
        "--tool-concurrency",
        type=_positive,
        default=8,
        help="with --tools: requests in flight at once (default: 8)",
    )
    p.add_argument(
        "--batch",
        action="store_true",
        help="instead: offline batches (moa batch run) on the simulator under RPM limits that bind: "
        "MT-Bench (--prompts) through moa-lite, a synthetic set at the limits with the process's "
        "memory, a resume after SIGKILL, interactive latency beside a batch; writes batch.json and "
        "batch.md; exits 1 if a goal is missed",
    )
    p.add_argument(
        "--batch-items",
        type=_positive,
        default=2000,
        help="with --batch: items of the synthetic set (default: 2000)",
    )
    p.add_argument(
        "--structured",
        action="store_true",
        help="instead: structured outputs through the ensemble (in-process API, the embedded simulator "
        "writing malformed JSON or schema violations at each rate; 32 tasks with JSON Schemas of growing "
        "difficulty; the share of valid final answers, cost and latency against the first configuration; "
        "writes structured.json and structured.md; exits 1 if a final answer was invalid)",
    )
    p.add_argument(
        "--structured-configs",
        type=_names(None),
        default=list(STRUCTURED_CONFIGS),
        help=f"with --structured: what answers, comma-separated presets or provider/model, the first "
        f"the baseline (default: {_csv(STRUCTURED_CONFIGS)})",
    )
    p.add_argument(
        "--structured-error-rates",
        type=_rates,
        default=list(STRUCTURED_ERROR_RATES),
        help="with --structured: the probabilities, comma-separated, that a simulated model's document "
        f"does not parse or breaks its schema (default: {_csv(STRUCTURED_ERROR_RATES)})",
    )
    p.add_argument(
        "--structured-repeats",
        type=_positive,
        default=1,
        help="with --structured: send each task this many times, seeds 1..N (default: 1)",
    )
    p.add_argument(
        "--structured-tasks",
        type=_positive,
        default=None,
        help="with --structured: only the first N tasks (default: all)",
    )
    p.add_argument(
        "--structured-concurrency",
        type=_positive,
        default=8,
        help="with --structured: requests in flight at once (default: 8)",
    )
    p.add_argument(
        "--soak",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="instead: constant load at one concurrency level on one local: or serve: target for this "
        "long, sampling the service's processes (RSS, open fds and sockets, and the answering "
        "process's asyncio tasks from /healthz); per process and measure first, last, min, max and "
        "the growth over the second half against its noise; writes soak.json and soak.md; exits 1 "
        "if a measure grew or a request failed",
    )
    p.add_argument(
        "--sample-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="with --soak: seconds between samples (default: 10)",
    )
    p.add_argument(
        "--serve",
        action="store_true",
        help="with --cache or --spend-audit: against the Ray Serve app (HTTP proxy, an ingress replica) "
        "on a new local "
        "Ray instance, as `moa serve` runs it, instead of the in-process API",
    )
    p.add_argument(
        "--cache-key-budget",
        type=float,
        default=None,
        metavar="USD",
        help="with --cache: send every request with an API key that has this budget (keys checked, "
        "spend reserved and settled) instead of running open",
    )
    p.add_argument(
        "--cache-rounds",
        type=int,
        default=1,
        help="with --cache: ask the verbatim repeats this many times (more exact hits to time; default: 1)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="API key the Serve app's requests carry (default: $MOA_API_KEY); with one, the app "
        "uses the configured key store, where the key lives; without one, a fresh state of its own",
    )
    p.add_argument(
        "--details",
        action="store_true",
        help="keep each Serve request's per-call timings in results.json and break its overhead down",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="like for like: the baseline makes the calls the service targets' preset makes (its "
        "prompts, references and parameters, built by the engine's own functions; every proposer "
        "waited for), and the report shows each call role's output tokens on both sides and both "
        "end-to-end p50s (needs baseline and one preset, e.g. --targets baseline,local:moa-lite)",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="Serve targets stream their answers; reports time to first token and to first byte "
        "(p50, p99), with tokens and cost per request",
    )
    p.add_argument(
        "--aggregation",
        type=_names({"final", "early", "staircase"}),
        default=list(d.aggregation),
        help="run each Serve target once per aggregation mode, comma-separated (final, early, staircase; "
        "default: the plan's own)",
    )
    p.add_argument(
        "--staircase-chunk-chars",
        type=int,
        default=d.staircase_chunk_chars,
        help="every preset's staircase chunk size in characters (default: the presets' own, 200)",
    )
    p.set_defaults(func=run_cli)


class _Pace(TypedDict):
    ttft_s: float
    tokens_per_s: float
    jitter: float
    layer_deadline_s: float


def _pace(args: argparse.Namespace) -> _Pace:
    """The simulator's pace and the API's layer deadline, as every simulated run takes them."""
    return _Pace(
        ttft_s=args.ttft, tokens_per_s=args.tps, jitter=args.jitter, layer_deadline_s=args.layer_deadline
    )


def _told(table: str, out: Path, files: str, failed: list[str]) -> int:
    """Print a run's table and where its files are, name each failure on stderr: exit 1 on any."""
    print(table)
    print(f"results in {out}/ ({files})")
    for line in failed:
        print(f"moa bench: {line}", file=sys.stderr)
    return 1 if failed else 0


def run_cli(args: argparse.Namespace) -> int:
    try:
        import matplotlib  # noqa: F401
        import psutil  # noqa: F401
    except ImportError as e:
        print(f"moa bench needs the bench extra: pip install 'moa-serve[bench,serve]' ({e})", file=sys.stderr)
        return 2
    if args.soak is not None:
        return _run_soak(args)
    d = BenchOptions()
    args.concurrency = args.concurrency or list(d.concurrency)
    args.targets = args.targets or list(d.targets)
    if args.cache:
        from moa.benchmark.cache_bench import cache_markdown, run_cache_bench, write_cache_report

        got = asyncio.run(
            run_cache_bench(
                args.prompts,
                args.requests,
                args.ttft,
                args.tps,
                args.jitter,
                serve=args.serve,
                rounds=args.cache_rounds,
                key_budget_usd=args.cache_key_budget,
            )
        )
        write_cache_report(got, args.out)
        print(cache_markdown(got))
        print(f"results in {args.out}/ (cache.json, cache.md)")
        return 0
    if args.tools:
        return _run_tools(args)
    if args.batch:
        from moa.benchmark.batch_bench import batch_markdown, run_batch_bench, write_batch_report

        if args.prompts is None:
            print("moa bench --batch needs --prompts: the MT-Bench questions (JSONL)", file=sys.stderr)
            return 2
        result = run_batch_bench(args.prompts, args.batch_items)
        write_batch_report(result, args.out)
        print(batch_markdown(result))
        print(f"results in {args.out}/ (batch.json, batch.md)")
        return 0 if all(result["goals"].values()) else 1
    if args.structured:
        return _run_structured(args)
    if args.spend_audit:
        from moa.benchmark.spend_audit import audit_markdown, run_spend_audit, write_audit_report

        audit = asyncio.run(run_spend_audit(serve=args.serve))
        write_audit_report(audit, args.out)
        print(audit_markdown(audit))
        print(f"results in {args.out}/ (spend-audit.json, spend-audit.md)")
        return 0 if audit["met"] else 1
    if args.auth_overhead:
        from moa.benchmark.auth_cost import auth_markdown, run_auth_overhead, write_auth_report

        got = asyncio.run(
            run_auth_overhead(
                args.concurrency,
                args.requests,
                args.ttft,
                args.tps,
                args.jitter,
                redis_url=args.auth_redis_url,
                prompts_path=args.prompts,
            )
        )
        write_auth_report(got, args.out)
        print(auth_markdown(got))
        print(f"results in {args.out}/ (auth-overhead.json, auth-overhead.md)")
        return 0
    from moa.benchmark.runner import failures, markdown, run
    from moa.client_auth import api_key

    opts = BenchOptions(
        prompts=args.prompts,
        concurrency=args.concurrency,
        requests=args.requests,
        targets=args.targets,
        scenarios=args.scenarios,
        fault_requests=args.fault_requests,
        fault_concurrency=args.fault_concurrency,
        **_pace(args),
        baseline_fault_timeout_s=args.baseline_timeout,
        out=args.out,
        details=args.details,
        stream=args.stream,
        aggregation=args.aggregation,
        staircase_chunk_chars=args.staircase_chunk_chars,
        api_key=api_key(args.api_key),
        compare=args.compare,
    )
    report = asyncio.run(run(opts))
    return _told(markdown(report), opts.out, "results.json, results.md, bench.png", failures(report))


def _run_tools(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from moa.benchmark.tool_bench import (
        ToolBenchOptions,
        failures,
        load_tasks,
        requests_in,
        run_tool_bench,
        tools_markdown,
        write_tools_report,
    )

    opts = ToolBenchOptions(
        tasks_path=args.prompts,
        limit=args.tool_tasks,
        configs=args.tool_configs,
        error_rates=args.tool_error_rates,
        repeats=args.tool_repeats,
        concurrency=args.tool_concurrency,
        **_pace(args),
    )
    total = requests_in(opts, len(load_tasks(opts.tasks_path)[: opts.limit]))
    console = Console(stderr=True)
    # A bar on a terminal; in a log, only the line each finished configuration and rate prints.
    with Progress(console=console, disable=not console.is_terminal) as progress:
        bar = progress.add_task("tool tasks", total=total)
        console.print(
            f"{total} requests: {', '.join(opts.configs)} at tool-error rates "
            f"{', '.join(f'{r:g}' for r in opts.error_rates)}",
            soft_wrap=True,
            highlight=False,
        )

        def step(line: str | None) -> None:
            if line is None:
                progress.advance(bar)
            else:
                console.print(line, soft_wrap=True, highlight=False)

        report = asyncio.run(run_tool_bench(opts, step))
    write_tools_report(report, args.out)
    return _told(tools_markdown(report), args.out, "tools.json, tools.md", failures(report))


def _run_structured(args: argparse.Namespace) -> int:
    from moa.benchmark.structured_bench import (
        StructuredBenchOptions,
        failures,
        requests_in,
        run_structured_bench,
        structured_markdown,
        write_structured_report,
    )

    opts = StructuredBenchOptions(
        limit=args.structured_tasks,
        configs=args.structured_configs,
        error_rates=args.structured_error_rates,
        repeats=args.structured_repeats,
        concurrency=args.structured_concurrency,
        **_pace(args),
    )
    print(f"moa bench --structured: {requests_in(opts)} requests", file=sys.stderr)

    def step(line: str | None) -> None:
        if line is not None:
            print(line, file=sys.stderr)

    report = asyncio.run(run_structured_bench(opts, step))
    write_structured_report(report, args.out)
    return _told(structured_markdown(report), args.out, "structured.json, structured.md", failures(report))


def _run_soak(args: argparse.Namespace) -> int:
    from moa.benchmark.soak import SoakOptions, grew, run_soak, soak_markdown, write_soak_report

    levels, targets = args.concurrency or [SOAK_CONCURRENCY], args.targets or [SOAK_TARGET]
    if len(levels) != 1 or len(targets) != 1 or not targets[0].startswith(("local:", "serve:")):
        print(
            "moa bench --soak runs one level on one target: --concurrency N --targets local:MODEL "
            "(or serve:MODEL)",
            file=sys.stderr,
        )
        return 2
    if args.sample_every <= 0 or args.sample_every * 8 > args.soak:
        print("moa bench --soak: --sample-every must be positive and fit 8 times in the run", file=sys.stderr)
        return 2
    opts = SoakOptions(
        target=targets[0],
        duration_s=args.soak,
        sample_every_s=args.sample_every,
        concurrency=levels[0],
        ttft_s=args.ttft,
        tokens_per_s=args.tps,
        jitter=args.jitter,
        layer_deadline_s=args.layer_deadline,
        prompts=args.prompts,
    )
    report = asyncio.run(run_soak(opts, lambda line: print(line, file=sys.stderr)))
    write_soak_report(report, args.out)
    return _told(soak_markdown(report), args.out, "soak.json, soak.md", grew(report))
