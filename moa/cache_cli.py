"""``moa cache stats`` and ``moa cache clear``: the shared cache store the config names (the SQLite
file in the state directory, or Redis), as every replica with the same settings sees it.

A replica's in-process LRU is not reached from here directly: a clear bumps the store's
generation counter, which every replica checks at most once a second before using its LRU
(``moa.cache.store.TieredStore``), emptying the LRU when it moved.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from moa.cache.cache import open_shared_store
from moa.config import load_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="the response cache: stats, clear")
    p.add_argument("--config", default=None, help="config YAML (default: $MOA_CONFIG or the bundled one)")
    cs = p.add_subparsers(dest="cache_command", required=True)
    st = cs.add_parser("stats", help="entries and bytes in the shared store, and its settings")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_stats)
    cl = cs.add_parser("clear", help="drop cached entries: every one, or one scope's")
    cl.add_argument(
        "--scope",
        default=None,
        help="key:NAME (an API key's entries), shared:NAME (a shared scope), open (the keyless "
        "service's) or local (moa ask's); default: every scope",
    )
    cl.set_defaults(func=_clear)


def _stats(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    store = open_shared_store(cfg)
    if store is None:
        print("cache.store is memory: each replica keeps its own in-process cache; nothing is shared")
        return 0

    async def read() -> int:
        try:
            stats = await store.stats()
        finally:
            await store.close()
        cc = cfg.cache
        row = {
            "enabled": cc.enabled,
            "store": stats.where,
            "entries": stats.entries,
            "bytes": stats.bytes,
            "max_bytes": cc.max_bytes,
            "ttl_s": cc.ttl_s,
            "semantic_threshold": cc.semantic.threshold,
        }
        if args.json:
            print(json.dumps(row))
        else:
            width = max(len(k) for k in row)
            for k, v in row.items():
                print(f"{k:<{width}}  {v}")
        return 0

    return asyncio.run(read())


def _clear(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    store = open_shared_store(cfg)
    if store is None:
        print("cache.store is memory: restart the replicas to clear their caches")
        return 0

    async def clear() -> int:
        try:
            n = await store.clear(args.scope)
        finally:
            await store.close()
        print(f"cleared {n} entries" + (f" of scope {args.scope}" if args.scope else ""))
        return 0

    return asyncio.run(clear())
