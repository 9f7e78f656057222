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
import os

from moa.cache.cache import open_shared_store
from moa.cache.store import CacheStore
from moa.cli.config import add_config_option
from moa.config import BUNDLED_SOURCE, MoAConfig, config_sources, load_config


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", help="the response cache: stats, clear")
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
    add_config_option(p, *cs.choices.values())


def _shared(args: argparse.Namespace, memory: str) -> tuple[MoAConfig, CacheStore | None]:
    """The config and its shared cache store; None (after saying ``memory``) for the in-process
    store, which this command cannot reach."""
    cfg = load_config(args.config)
    store = open_shared_store(cfg)
    if store is None:
        print(f"cache.store is memory: {memory}")
    return cfg, store


def _stats(args: argparse.Namespace) -> int:
    cfg, store = _shared(args, "each replica keeps its own in-process cache; nothing is shared")
    if store is None:
        return 0
    # Which config answered, and where its cache.enabled came from: the store outlives any one
    # config, so a config with the cache off (the bundled one, say) can face a full store.
    sources = {name: origin for name, _, origin in config_sources(args.config)}
    enabled_from, source = sources["cache.enabled"], _source(args.config)

    async def read() -> int:
        try:
            stats = await store.stats()
        finally:
            await store.close()
        cc = cfg.cache
        row = {
            "config": source,
            "enabled": cc.enabled,
            "enabled_from": enabled_from,
            "store": stats.where,
            "entries": stats.entries,
            "bytes": stats.bytes,
            "max_bytes": cc.max_bytes,
            "ttl_s": cc.ttl_s,
            "semantic_threshold": cc.semantic.threshold,
        }
        if args.json:
            print(json.dumps(row))
            return 0
        width = max(len(k) for k in row)
        for k, v in row.items():
            print(f"{k:<{width}}  {v}")
        if not cc.enabled and stats.entries:
            print(
                f"The cache is off in this config (cache.enabled: false, from {enabled_from}), so "
                "nothing started with it reads or writes the store; its "
                f"{stats.entries} entries were written by a service or run whose config had the cache "
                "on over the same store. `moa cache clear` drops them."
            )
        return 0

    return asyncio.run(read())


def _source(path: str | None) -> str:
    """The config in use, as ``load_config`` chose it: the file given, ``$MOA_CONFIG``, or the
    bundled one."""
    chosen = path or os.environ.get("MOA_CONFIG")
    return f"{chosen} (over the bundled config)" if chosen else BUNDLED_SOURCE


def _clear(args: argparse.Namespace) -> int:
    _, store = _shared(args, "restart the replicas to clear their caches")
    if store is None:
        return 0

    async def clear() -> int:
        try:
            n = await store.clear(args.scope)
        finally:
            await store.close()
        print(f"cleared {n} entries" + (f" of scope {args.scope}" if args.scope else ""))
        return 0

    return asyncio.run(clear())
