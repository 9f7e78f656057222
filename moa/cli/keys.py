"""``moa keys``: create, list, disable, enable and revoke the service's API keys.

It works on the same state as ``moa serve`` with the same settings (``state`` in the config,
MOA_STATE_DIR, MOA_REDIS_URL). A new key is printed once, on standard output, and never again.
The work itself is ``moa.keys_admin``'s, shared with the admin HTTP API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from typing import Any

from pydantic import ValidationError

from moa.cli.config import add_config_option
from moa.config import load_config
from moa.keys_admin import VERBS, NewKey, change_status, create_key, key_rows
from moa.state import KeyExists, KeyLimits, StateStore, describe, open_store


def usd(text: str) -> float:
    """An amount in USD for argparse: a finite number. ``float("inf")`` and ``float("nan")`` parse,
    and ``--budget-usd inf`` would make an unlimited key that looks limited."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite amount: {text!r}")
    return value


# Only a revocation is final: a disabled key is enabled again.
VERB_HELP = {
    "revoke": "revoke a key for good (final: it cannot be enabled again)",
    "disable": "disable a key for now (`enable` brings it back)",
    "enable": "enable a disabled key again (not a revoked one)",
}


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "keys", help="manage the API keys callers must present (see the README's security section)"
    )
    ks = p.add_subparsers(dest="keys_command", required=True)

    c = ks.add_parser("create", help="create a key and print it (once)")
    c.add_argument("name")
    c.add_argument("--budget-usd", type=usd, default=None, help="spend allowed per period (USD)")
    c.add_argument("--period", choices=["day", "month", "total"], default="total", help="budget period (UTC)")
    c.add_argument("--rpm", type=int, default=None, help="requests per minute")
    c.add_argument("--tpm", type=int, default=None, help="tokens per minute")
    c.add_argument("--presets", nargs="+", default=None, help="presets the key may use (default: all)")
    c.add_argument(
        "--models", nargs="+", default=None, help="provider/model names the key may use (default: all)"
    )
    c.add_argument("--detail", action="store_true", help="allow moa.detail (and /v1/moa)")
    c.add_argument("--max-cost-usd", type=usd, default=None, help="default per-request cost cap (USD)")
    c.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="requests in progress at once, per replica (default: server.key_concurrency_share of its slots)",
    )
    c.add_argument(
        "--cache-sampled",
        action="store_true",
        help="serve this key's temperature > 0 requests without a seed from the response cache too",
    )
    c.set_defaults(func=_create)

    lst = ks.add_parser("list", help="list keys: name, created, spend, limits, status (never the key)")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_list)
    for verb in VERBS:
        v = ks.add_parser(verb, help=VERB_HELP[verb])
        v.add_argument("name")
        v.set_defaults(func=_status, verb=verb)
    add_config_option(p, *ks.choices.values())


def _store(args: argparse.Namespace) -> tuple[StateStore, str]:
    cfg = load_config(args.config).state
    return open_store(cfg), describe(cfg)


def _run(args: argparse.Namespace, work: Any) -> int:
    async def main() -> int:
        store, where = _store(args)
        try:
            return int(await work(store, where))
        finally:
            await store.close()

    return asyncio.run(main())


def _create(args: argparse.Namespace) -> int:
    try:
        spec = NewKey(
            name=args.name,
            budget_usd=args.budget_usd,
            period=args.period,
            rpm=args.rpm,
            tpm=args.tpm,
            presets=args.presets,
            models=args.models,
            detail=args.detail,
            max_cost_usd=args.max_cost_usd,
            max_concurrent=args.max_concurrent,
            cache_sampled=args.cache_sampled,
        )
        spec.limits()
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'name'}: {x['msg']}" for x in e.errors())
        print(f"moa keys: {problems}", file=sys.stderr)
        return 2

    async def create(store: StateStore, where: str) -> int:
        try:
            key, _ = await create_key(store, spec)
        except KeyExists as e:
            print(f"moa keys: {e}", file=sys.stderr)
            return 1
        print(key)
        print(
            f"Created key {args.name!r} in {where}. This is the only time it is shown: store it now.",
            file=sys.stderr,
        )
        return 0

    return _run(args, create)


def _limits_text(lim: KeyLimits) -> str:
    parts = []
    if lim.budget_usd is not None:
        parts.append(f"${lim.budget_usd:g}/{lim.period}")
    if lim.rpm:
        parts.append(f"{lim.rpm} rpm")
    if lim.tpm:
        parts.append(f"{lim.tpm} tpm")
    if lim.max_cost_usd:
        parts.append(f"<= ${lim.max_cost_usd:g}/request")
    if lim.max_concurrent:
        parts.append(f"{lim.max_concurrent} at once")
    if lim.presets is not None:
        parts.append("presets " + ",".join(lim.presets))
    if lim.models is not None:
        parts.append("models " + ",".join(lim.models))
    if lim.detail:
        parts.append("detail")
    if lim.cache_sampled:
        parts.append("cache-sampled")
    return "; ".join(parts) or "unlimited"


def _list(args: argparse.Namespace) -> int:
    async def show(store: StateStore, where: str) -> int:
        rows = await key_rows(store)
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        if not rows:
            print(f"No keys in {where}: the service runs open (loopback only, unless --no-auth).")
            return 0
        print(f"{'NAME':<20} {'CREATED':<26} {'SPENT':>12}  {'STATUS':<9} LIMITS")
        for r in rows:
            lim = KeyLimits.model_validate(r["limits"])
            spent = f"${r['spent_usd']:.4f}"
            print(f"{r['name']:<20} {r['created']:<26} {spent:>12}  {r['status']:<9} {_limits_text(lim)}")
        return 0

    return _run(args, show)


def _status(args: argparse.Namespace) -> int:
    async def change(store: StateStore, where: str) -> int:
        done = await change_status(store, args.name, args.verb)
        if done.outcome == "ok":
            print(f"Key {args.name!r} is now {VERBS[args.verb]}.")
            return 0
        where_text = f" in {where}" if done.outcome == "missing" else ""
        print(f"moa keys: key {args.name!r} {done.reason}{where_text}", file=sys.stderr)
        return 1

    return _run(args, change)
