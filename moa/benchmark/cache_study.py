"""The semantic cache's threshold study: precision and hit rate on labelled question pairs.

``moa/data/cache_pairs.jsonl`` holds pairs written for it: paraphrases (one answer serves both)
and near misses (they look alike but need different answers: another number, a negation, another
name, an antonym, another topic). A pair counts as a hit when its similarity reaches the
threshold (and, with the guard, when both questions carry the same anchors: numbers, negations,
names, quoted text). Precision is the share of hits that are right; hit rate the share of
paraphrases served; wrong hits the share of near misses served.

    python -m moa.benchmark.cache_study [--markdown]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from moa.cache.embed import StaticEmbedder, cosine
from moa.cache.keys import anchors, guard
from moa.simulator.embeddings import lexical_embedding

THRESHOLDS = (0.70, 0.75, 0.80, 0.85, 0.88, 0.90, 0.92, 0.95)


@dataclass
class Pair:
    a: str
    b: str
    same: bool
    differs_by: str | None


def load_pairs(name: str = "cache_pairs.jsonl") -> list[Pair]:
    text = resources.files("moa").joinpath(f"data/{name}").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [Pair(r["a"], r["b"], r["same"], r.get("differs_by")) for r in rows]


def score(pairs: Sequence[Pair], embed: Callable[[list[str]], list[list[float]]]) -> list[float]:
    out = []
    for p in pairs:
        va, vb = embed([p.a, p.b])
        out.append(cosine(va, vb))
    return out


GUARDS: dict[str, Callable[[str], Any] | None] = {
    "similarity + anchors and content words (the cache's guard)": guard,
    "similarity + anchors only": anchors,
    "similarity alone": None,
}


def table(
    pairs: Sequence[Pair], sims: Sequence[float], check: Callable[[str], Any] | None
) -> list[dict[str, Any]]:
    same = [check is None or check(p.a) == check(p.b) for p in pairs]
    n_para = sum(p.same for p in pairs)
    n_miss = len(pairs) - n_para
    rows = []
    for t in THRESHOLDS:
        hits = [s >= t and ok for s, ok in zip(sims, same, strict=True)]
        right = sum(h and p.same for h, p in zip(hits, pairs, strict=True))
        wrong = sum(h and not p.same for h, p in zip(hits, pairs, strict=True))
        wrong_kinds = sorted(
            {p.differs_by or "" for h, p in zip(hits, pairs, strict=True) if h and not p.same}
        )
        rows.append(
            {
                "threshold": t,
                "precision": right / (right + wrong) if right + wrong else None,
                "hit_rate": right / n_para,
                "wrong_hits": wrong / n_miss,
                "wrong_kinds": wrong_kinds,
            }
        )
    return rows


def study(name: str = "cache_pairs.jsonl") -> dict[str, Any]:
    pairs = load_pairs(name)
    static = StaticEmbedder()
    static.embed_sync(["warm up"])
    timings = []
    for p in pairs:
        s = time.perf_counter()
        static.embed_sync([p.a])
        timings.append(time.perf_counter() - s)
    embedders: dict[str, Callable[[list[str]], list[list[float]]]] = {
        "static (tokenlearn-static-model, 64 d)": static.embed_sync,
        "lexical (hashed trigrams, 256 d)": lambda texts: [lexical_embedding(t) for t in texts],
    }
    results: dict[str, Any] = {
        "pairs": {"paraphrases": sum(p.same for p in pairs), "near_misses": sum(not p.same for p in pairs)},
        "static_embed_ms_p50": statistics.median(timings) * 1000,
        "static_embed_ms_max": max(timings) * 1000,
        "embedders": {},
    }
    for name, fn in embedders.items():
        sims = score(pairs, fn)
        results["embedders"][name] = {label: table(pairs, sims, check) for label, check in GUARDS.items()}
    return results


def markdown(results: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.0f}%"

    lines = [
        f"{results['pairs']['paraphrases']} paraphrase pairs, "
        f"{results['pairs']['near_misses']} near-miss pairs; "
        f"static embedding: p50 {results['static_embed_ms_p50']:.3f} ms, max "
        f"{results['static_embed_ms_max']:.3f} ms per question (one CPU thread).",
        "",
    ]
    for name, res in results["embedders"].items():
        for label, rows in res.items():
            lines += [
                f"**{name}, {label}**",
                "",
                "| threshold | precision | hit rate (paraphrases served) | wrong hits (near misses served) "
                "| wrong hits by kind |",
                "|---|---|---|---|---|",
            ]
            for r in rows:
                lines.append(
                    f"| {r['threshold']:.2f} | {pct(r['precision'])} | {pct(r['hit_rate'])} | "
                    f"{pct(r['wrong_hits'])} | {', '.join(r['wrong_kinds']) or '-'} |"
                )
            lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables instead of JSON")
    parser.add_argument(
        "--pairs",
        default="cache_pairs.jsonl",
        help="cache_pairs.jsonl (the set the guard was written against) or cache_pairs_heldout.jsonl "
        "(written afterwards, never tuned on)",
    )
    args = parser.parse_args(argv)
    results = study(args.pairs)
    print(markdown(results) if args.markdown else json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
