"""``moa serve``: the service on a Ray instance started here, or in this process with ``--local``.

What both ways share happens here, before either starts: the config, the port claimed (so a port
in use is the one line printed), and the check that an address open to the network has keys. The
Ray side (``moa_actors.lifecycle``) is imported only when it runs: the core never imports Ray.
"""

from __future__ import annotations

import argparse
import sys

from moa.config import load_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    p.add_argument(
        "--haproxy",
        action="store_true",
        help="put Ray's HAProxy in front of the ingress, with splicing off (x86_64 Linux; "
        "docs/OPERATIONS.md)",
    )
    p.add_argument("--verbose", action="store_true", help="show the Ray workers' logs")
    p.add_argument(
        "--no-auth", action="store_true", help="serve a non-loopback address with no API key (open to all)"
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from moa.exposure import check_exposure, keys_exist
    from moa.service import PortInUse, claim_port

    cfg = load_config(args.config)
    if args.no_auth:  # the app's own request-time check reads it too
        cfg = cfg.model_copy(update={"server": cfg.server.model_copy(update={"open": True})})
    ray_only = args.dashboard or args.metrics_port is not None or args.num_cpus is not None or args.haproxy
    if args.local and ray_only:
        print("moa serve: --dashboard, --metrics-port, --num-cpus and --haproxy need Ray", file=sys.stderr)
        return 2
    if not args.local:
        try:
            from moa_actors.lifecycle import haproxy_problem, run_on_ray_here
        except ImportError as e:
            print(f"moa serve needs Ray Serve: pip install 'moa-serve[serve]' ({e})", file=sys.stderr)
            return 2
        if args.haproxy and (problem := haproxy_problem()):
            print(f"moa serve: --haproxy: no HAProxy to run: {problem}", file=sys.stderr)
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
        from moa.local import serve_in_process

        return serve_in_process(cfg, args.host, args.port, sock=sock, keys_required=keys)
    return run_on_ray_here(
        cfg,
        args.host,
        args.port,
        num_cpus=args.num_cpus,
        quiet=not args.verbose,
        metrics_port=args.metrics_port,
        dashboard=args.dashboard,
        haproxy=args.haproxy,
        sock=sock,
        keys_required=keys,
    )
