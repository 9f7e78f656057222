"""``moa batch``: a file of requests through the service, resumable, within a budget.

``run`` sends every item of the input not yet in the output (in this process by default, to a
running service with ``--url``, or to the moa app on a Ray cluster with ``--address``) and prints a
summary; ``status`` reads how a batch stands from
its files, while it runs or after. The work is ``moa.batch``'s (the run's own: ``batch_run``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from moa.batch import BatchSummary, InputError, batch_status
from moa.batch.senders import FoundService, ServiceNotFound
from moa.cli.batch_run import BatchOptions, run_batch
from moa.cli.config import CONFIG_HELP
from moa.client_auth import api_key, auth_advice
from moa.config import MoAConfig, load_config

HELP = "run a file of chat completion requests through MoA, resumable, within a budget"
DESCRIPTION = (
    'Each input line is an OpenAI Batch API line (custom_id, method, url, body) or {"prompt": ...}. '
    "The output (JSONL, OpenAI's batch output lines plus each item's cost) is also the checkpoint: "
    "run the same command again after a stop and only what it lacks is sent."
)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("batch", help=HELP, description=DESCRIPTION)
    verbs = p.add_subparsers(dest="batch_command", required=True)
    d = BatchOptions.model_fields
    r = verbs.add_parser("run", help="run the items the output does not hold yet")
    r.add_argument("input", type=Path, help="the input JSONL")
    r.add_argument(
        "--out", "-o", dest="output", type=Path, required=True, help="the output JSONL (created or resumed)"
    )
    r.add_argument("--preset", default=d["preset"].default, help="model of items naming none (default: moa)")
    r.add_argument(
        "--concurrency", type=int, default=d["concurrency"].default, help="items in flight (default: 4)"
    )
    r.add_argument(
        "--max-cost-usd",
        type=float,
        default=None,
        help="the batch's budget, earlier runs of this output included; held before each request, "
        "so the batch stops cleanly when the next item's worst case no longer fits",
    )
    where = r.add_mutually_exclusive_group()
    where.add_argument(
        "--url", default=None, help="a running service (http://HOST:8000); default: in this process"
    )
    where.add_argument(
        "--address",
        default=None,
        help="a Ray cluster (auto, HOST:6379, ray://HOST:10001): the moa app running on it is the "
        "service sent to, and its provider deployments across the cluster's nodes do the work",
    )
    r.add_argument("--app", default=None, help="with --address: the moa app's Serve name, if several run")
    r.add_argument("--api-key", default=None, help="API key the requests carry (default: $MOA_API_KEY)")
    r.add_argument(
        "--retry-errors", action="store_true", help="send again the items whose line holds an error"
    )
    r.add_argument("--attempts", type=int, default=d["attempts"].default, help="tries per item (default: 4)")
    r.add_argument("--config", default=None, help=CONFIG_HELP)
    r.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    r.set_defaults(func=_run)
    s = verbs.add_parser("status", help="how a batch stands: done, cost, projected cost, errors, ETA")
    s.add_argument("output", type=Path, help="the batch's output JSONL")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(func=_status)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    # Every flag of ``run`` is a field of BatchOptions by the same name, but these two.
    given = {name: getattr(args, name) for name in BatchOptions.model_fields if hasattr(args, name)}
    progress = not args.no_progress and sys.stderr.isatty()
    opts = BatchOptions(**given | {"api_key": api_key(args.api_key), "progress": progress})
    if opts.app is not None and opts.address is None:
        print("moa batch: --app goes with --address", file=sys.stderr)
        return 2
    if opts.address is not None:
        try:
            found = service_on_cluster(opts.address, opts.app)
        except ServiceNotFound as e:
            print(f"moa batch: {e}", file=sys.stderr)
            return 2
        nodes = f"{found.nodes} node{'s' if found.nodes != 1 else ''}"
        where = f"the app {found.app!r} on the Ray cluster at {opts.address} ({nodes})"
        print(f"moa batch: {where}, at {found.url}", file=sys.stderr)
        opts = opts.model_copy(update={"url": found.url})
    if opts.url is None:
        from moa.simulator.server import simulator_if_needed

        with simulator_if_needed(cfg) as cfg:
            summary = _go(cfg, opts)
    else:
        summary = _go(cfg, opts)
    if summary is None:
        return 2
    print(summary.model_dump_json(indent=2))
    for code in summary.errors:
        advice = auth_advice(code.removeprefix("http_"))
        if advice:
            print(f"moa batch: {advice}", file=sys.stderr)
    if summary.stopped:
        print(f"moa batch: stopped: {summary.stopped}; run the same command to go on", file=sys.stderr)
        return 1
    return 0


# The Ray side of ``--address`` registers itself under this entry point group (``pyproject.toml``),
# as ``moa bench``'s does under ``moa.bench``: the core never imports Ray by name.
CLUSTER_GROUP = "moa.cluster"


def service_on_cluster(address: str, app: str | None) -> FoundService:
    """The moa app on the Ray cluster at ``address``, found by the Ray side of this command
    (``moa_actors.cluster_service``); ``ServiceNotFound`` says why there is none to send to."""
    from importlib.metadata import entry_points

    found = entry_points(group=CLUSTER_GROUP, name="ray")
    if not found:
        raise ServiceNotFound(
            f"--address needs the Ray side of moa (no {CLUSTER_GROUP!r} entry point named 'ray'): "
            "reinstall the project (pip install -e '.[serve]')"
        )
    try:
        module = next(iter(found)).load()
    except ImportError as e:
        raise ServiceNotFound(f"--address needs Ray: pip install 'moa-serve[serve]' ({e})") from None
    service: FoundService = module.find_service(address, app)
    return service


def _go(cfg: MoAConfig, opts: BatchOptions) -> BatchSummary | None:
    """The run, or None after saying why the input or output cannot run."""
    try:
        return asyncio.run(run_batch(cfg, opts))
    except (InputError, ValueError) as e:
        print(f"moa batch: {e}", file=sys.stderr)
        return None


def _status(args: argparse.Namespace) -> int:
    if not args.output.exists():
        print(f"moa batch: {args.output}: no such file", file=sys.stderr)
        return 2
    st = batch_status(args.output)
    if args.json:
        print(st.model_dump_json(indent=2))
        return 0
    total = "?" if st.total is None else str(st.total)
    print(f"{st.output}: {st.state}")
    print(f"  done       {st.done} of {total} ({st.succeeded} answered)")
    projected = st.projected_cost_usd
    in_all = f", projected ${projected:.4f} in all" if projected is not None else ""
    print(f"  cost       ${st.cost_usd:.4f}{in_all}")
    if st.errors:
        print("  errors     " + ", ".join(f"{k}: {v}" for k, v in sorted(st.errors.items())))
    if st.items_per_s is not None:
        eta = f", about {st.eta_s:.0f} s left" if st.eta_s is not None else ""
        print(f"  rate       {st.items_per_s:.2f} items/s{eta}")
    return 0
