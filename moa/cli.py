"""The ``moa`` command line: ``ask`` runs the engine in-process, ``simulate`` runs the provider simulator."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from moa.config import ConfigError, load_config
from moa.errors import MoAError


def _add_ask(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("ask", help="answer a question in-process with the MoA engine")
    p.add_argument("question", help="the question (use - to read it from standard input)")
    p.add_argument("--preset", default=None, help="preset or provider/model (default: the config's, 'auto')")
    p.add_argument("--config", default=None, help="config YAML (default: $MOA_CONFIG or the bundled one)")
    p.add_argument("--system", default=None, help="a system message to send with the question")
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--no-stream", action="store_true", help="print the answer only when it is complete")
    p.add_argument("--json", action="store_true", help="print the full result as JSON instead")
    p.set_defaults(func=_run_ask)


def _run_ask(args: argparse.Namespace) -> int:
    from moa.ask import ask

    question = sys.stdin.read() if args.question == "-" else args.question
    return asyncio.run(ask(args, question))


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the service: on a local Ray instance, or in this process with --local",
        description="Serve the OpenAI-compatible API until SIGINT (Ctrl-C) or SIGTERM, then drain: "
        "new requests get 503, those in progress get server.drain_s to finish.",
    )
    p.add_argument("--config", default=None, help="config YAML (default: $MOA_CONFIG or the bundled one)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: 8000)")
    p.add_argument(
        "--local",
        action="store_true",
        help="serve from this one process with the in-process provider pool, without Ray",
    )
    p.add_argument("--num-cpus", type=float, default=None, help="CPUs Ray may use (default: all)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="port of Ray's Prometheus endpoint (default: one Ray picks, printed at start-up)",
    )
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="start Ray's dashboard (and so `serve status --address ...`); its URL is printed",
    )
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    p.add_argument(
        "--no-auth", action="store_true", help="serve a non-loopback address with no API key (open to all)"
    )
    p.set_defaults(func=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from moa.exposure import check_exposure, keys_exist
    from moa.service import PortInUse, claim_port

    cfg = load_config(args.config)
    if args.no_auth:  # the app's own request-time check reads it too
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"open": True})})
    if args.local and (args.dashboard or args.metrics_port is not None or args.num_cpus is not None):
        print("moa serve: --dashboard, --metrics-port and --num-cpus need Ray", file=sys.stderr)
        return 2
    if not args.local:
        try:
            from moa_serve_app import run_local
        except ImportError as e:
            print(f"moa serve needs Ray Serve: pip install 'moa-serve[serve]' ({e})", file=sys.stderr)
            return 2
    try:
        # Claimed before anything is announced or started: with the port taken, the one line
        # printed is why, not an access notice for a service that never runs.
        sock = claim_port(args.host, args.port)
    except PortInUse as e:
        print(f"moa serve: {e}", file=sys.stderr)
        return 1
    try:
        # Before anything is served: an address open to the network needs keys (or --no-auth).
        keys = keys_exist(cfg.state)
        print(check_exposure(cfg.state, args.host, cfg.server.open, keys=keys), file=sys.stderr)
    except BaseException:
        sock.close()
        raise
    if args.local:
        from moa.local import serve_local

        return serve_local(cfg, args.host, args.port, sock=sock, keys_required=keys)
    return run_local(
        cfg,
        args.host,
        args.port,
        num_cpus=args.num_cpus,
        quiet=not args.verbose,
        metrics_port=args.metrics_port,
        dashboard=args.dashboard,
        sock=sock,
        keys_required=keys,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa", description="Mixture-of-Agents LLM service.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_ask(sub)
    _add_serve(sub)
    from moa.simulator.cli import register as register_simulate

    register_simulate(sub)
    from moa.benchmark.cli import register as register_bench

    register_bench(sub)
    from moa.eval.cli import register as register_eval

    register_eval(sub)
    from moa.keys_cli import register as register_keys

    register_keys(sub)
    from moa.cache_cli import register as register_cache

    register_cache(sub)
    from moa.config_cli import register as register_config

    register_config(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"moa: {e}", file=sys.stderr)
        return 2
    except MoAError as e:
        print(f"moa: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["build_parser", "load_config", "main"]
