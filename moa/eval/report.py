"""The report: win rates (raw and length-controlled) or scores with 95% intervals, judge agreement,
unparseable verdicts, and the cost of answering and of judging, as JSON, Markdown and a PNG."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

from moa.eval.runner import EvalSpec, RunFiles
from moa.eval.stats import Estimate, bootstrap, cohen_kappa, length_controlled_rate, mean_ci, pearson
from moa.eval.verdict import pair_preference, side_preference
from moa.eval.workloads import Item
from moa.tokens import approx_tokens

LC_RESAMPLES = 500  # each resample refits the regression


def preference(rec: dict[str, Any]) -> float | None:
    """The judgment as a preference for the target: 1 it won, 0 it lost, 0.5 a tie."""
    return side_preference(rec.get("verdict"), rec.get("order") == "target_first")


def pair_preferences(recs: Sequence[dict[str, Any]]) -> tuple[dict[tuple[str, str], float], int]:
    """Each (judge, item) pair's preference by :func:`pair_preference` (both orders read), and
    how many pairs were dropped for an order that could not be read or whose judge call failed."""
    orders: dict[tuple[str, str], dict[str, float | None]] = defaultdict(dict)
    for r in recs:
        orders[(r["judge"], r["item"])][r.get("order") or ""] = (
            preference(r) if r.get("error") is None else None
        )
    kept: dict[tuple[str, str], float] = {}
    for key, got in orders.items():
        pref = pair_preference(got.get("target_first"), got.get("reference_first"))
        if pref is not None:
            kept[key] = pref
    return kept, len(orders) - len(kept)


def _length(rec: dict[str, Any] | None) -> int:
    return sum(approx_tokens(a) for a in rec["answers"]) if rec else 0


def _costs(files: RunFiles, target: str, items: Sequence[Item]) -> dict[str, Any]:
    recs = [files.answers.get((target, i.id)) for i in items]
    done = [r for r in recs if r is not None and r.get("error") is None]
    known = [r["cost_usd"] for r in done if r.get("cost_usd") is not None]
    return {
        "answered": len(done),
        "failed": sum(1 for r in recs if r is not None and r.get("error") is not None),
        "cost_usd": sum(known) if known else (None if done else 0.0),
        "cost_per_item_usd": statistics.fmean(known) if known else None,
        "cost_known_for": len(known),
        "mean_output_tokens": statistics.fmean(r["output_tokens"] for r in done)
        if done and all("output_tokens" in r for r in done)
        else None,
    }


def _pairwise_target(files: RunFiles, spec: EvalSpec, target: str, items: Sequence[Item]) -> dict[str, Any]:
    ref = spec.reference_name()
    assert ref is not None
    recs = [r for r in files.judgments.values() if r["kind"] == "pairwise" and r["target"] == target]
    per_item: dict[str, list[tuple[float, float]]] = defaultdict(list)
    diffs: dict[str, float] = {}
    for item in items:
        mine, theirs = files.ok_answer(target, item.id), files.ok_answer(ref, item.id)
        if mine and theirs:
            diffs[item.id] = float(_length(mine) - _length(theirs))
    scale = statistics.pstdev(diffs.values()) if len(diffs) > 1 else 0.0
    parsed = [r for r in recs if r.get("error") is None and r.get("verdict") is not None]
    # A pair counts only with both orders read (pair_preference): one order alone would let the
    # judge's position bias back into the rate. An item's group holds each judge's pair.
    pairs, dropped = pair_preferences(recs)
    for (_, item_id), pref in pairs.items():
        if item_id in diffs:
            per_item[item_id].append((pref, diffs[item_id]))
    groups = list(per_item.values())

    def raw(gs: Sequence[object]) -> float:
        return statistics.fmean(statistics.fmean(p for p, _ in g) for g in gs)  # type: ignore[attr-defined]

    def lc(gs: Sequence[object]) -> float | None:
        pairs = [pd for g in gs for pd in g]  # type: ignore[attr-defined]
        return length_controlled_rate([p for p, _ in pairs], [d for _, d in pairs], scale)

    win = bootstrap(groups, raw)
    judges: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (judge, item_id), pref in pairs.items():
        judges[judge][item_id].append(pref)
    by_judge = {
        j: mean_ci([statistics.fmean(v) for v in per.values()]).as_dict() for j, per in sorted(judges.items())
    }
    lc_est = bootstrap(groups, lc, resamples=LC_RESAMPLES) if scale > 0 else win
    verdicts = [r["verdict"] for r in parsed]
    decided = [v for v in verdicts if v != "tie"]
    by_pair: dict[tuple[str, str], dict[str, float | None]] = defaultdict(dict)
    for r in parsed:
        by_pair[(r["judge"], r["item"])][r["order"]] = preference(r)
    both = [p for p in by_pair.values() if len(p) == 2]
    one_order = [preference(r) for r in parsed if r["order"] == "target_first"]
    return {
        "items_judged": len(groups),
        "judgments": len(recs),
        "wins": sum(1 for r in parsed if preference(r) == 1.0),
        "ties": sum(1 for r in parsed if preference(r) == 0.5),
        "losses": sum(1 for r in parsed if preference(r) == 0.0),
        "win_rate": win.as_dict(),
        "win_rate_by_judge": by_judge,
        "lc_win_rate": lc_est.as_dict(),
        "length_controlled": scale > 0,
        "mean_length_diff_tokens": statistics.fmean(diffs.values()) if diffs else None,
        "unparseable": sum(1 for r in recs if r.get("error") is None and r.get("verdict") is None),
        "retried": sum(1 for r in recs if r.get("retried")),
        "judge_errors": sum(1 for r in recs if r.get("error") is not None),
        # Pairs left out of the win rates: an order unparseable or its judge call failed.
        "pairs_dropped": dropped,
        # How much the judge favours the answer shown first (0.5: not at all), and how often the
        # two orders of a pair agree once unswapped: why every pair is judged both ways.
        "first_shown_wins": (sum(v == "A" for v in decided) / len(decided)) if decided else None,
        "order_consistency": (sum(p["target_first"] == p["reference_first"] for p in both) / len(both))
        if both
        else None,
        "win_rate_target_shown_first_only": statistics.fmean(p for p in one_order if p is not None)
        if one_order
        else None,
        "judge_cost_usd": sum(r.get("cost_usd") or 0.0 for r in recs),
    }


def _graded_target(files: RunFiles, target: str, items: Sequence[Item]) -> dict[str, Any]:
    recs = [r for r in files.judgments.values() if r["kind"] == "graded" and r["target"] == target]
    per_item: dict[str, list[float]] = defaultdict(list)
    for r in recs:
        if r.get("score") is not None:
            per_item[r["item"]].append(float(r["score"]))
    category = {i.id: i.category for i in items}
    scores = {k: statistics.fmean(v) for k, v in per_item.items()}
    by_cat: dict[str, list[float]] = defaultdict(list)
    for k, v in scores.items():
        by_cat[category.get(k, "all")].append(v)
    return {
        "items_judged": len(scores),
        "judgments": len(recs),
        "score": mean_ci(list(scores.values())).as_dict(),
        "by_category": {c: mean_ci(v).as_dict() for c, v in sorted(by_cat.items())},
        "unparseable": sum(1 for r in recs if r.get("error") is None and r.get("score") is None),
        "retried": sum(1 for r in recs if r.get("retried")),
        "judge_errors": sum(1 for r in recs if r.get("error") is not None),
        "judge_cost_usd": sum(r.get("cost_usd") or 0.0 for r in recs),
    }


def _agreement(files: RunFiles, spec: EvalSpec) -> list[dict[str, Any]]:
    """Per pair of judges: how often they agree on the same judgment, and beyond chance."""
    out = []
    by_judge: dict[str, dict[tuple[str, str, str], Any]] = defaultdict(dict)
    for r in files.judgments.values():
        if r.get("error") is not None:
            continue
        key = (r["target"], r["item"], r.get("order") or "")
        if spec.mode == "pairwise" and r.get("verdict") is not None:
            by_judge[r["judge"]][key] = {1.0: "target", 0.0: "reference", 0.5: "tie"}[preference(r) or 0.0]
        elif spec.mode == "graded" and r.get("score") is not None:
            by_judge[r["judge"]][key] = float(r["score"])
    for j1, j2 in combinations(spec.judges, 2):
        common = sorted(set(by_judge[j1]) & set(by_judge[j2]))
        a, b = [by_judge[j1][k] for k in common], [by_judge[j2][k] for k in common]
        row: dict[str, Any] = {"judges": [j1, j2], "n": len(common)}
        if spec.mode == "pairwise":
            row["agreement"] = (sum(x == y for x, y in zip(a, b, strict=True)) / len(a)) if a else None
            row["cohen_kappa"] = cohen_kappa(a, b)
        else:
            row["within_1_point"] = (
                (sum(abs(x - y) <= 1 for x, y in zip(a, b, strict=True)) / len(a)) if a else None
            )
            row["pearson"] = pearson(a, b)
        out.append(row)
    return out


def build_report(
    spec: EvalSpec, files: RunFiles, items: Sequence[Item], stopped: str | None
) -> dict[str, Any]:
    answering = list(dict.fromkeys(spec.targets + ([spec.reference_name()] if spec.reference_name() else [])))
    targets: dict[str, Any] = {}
    for name in answering:
        assert name is not None
        row: dict[str, Any] = {"answers": _costs(files, name, items)}
        if spec.mode == "pairwise" and name != spec.reference_name():
            row["pairwise"] = _pairwise_target(files, spec, name, items)
        elif spec.mode == "graded":
            row["graded"] = _graded_target(files, name, items)
        targets[name] = row
    target_cost = sum(r["answers"]["cost_usd"] or 0.0 for r in targets.values())
    judge_cost = sum(r.get("cost_usd") or 0.0 for r in files.judgments.values())
    return {
        "spec": spec.model_dump(mode="json"),
        "items": len(items),
        "stopped": stopped,
        "targets": targets,
        "judge_agreement": _agreement(files, spec) if len(spec.judges) > 1 else [],
        "cost_usd": {"targets": target_cost, "judging": judge_cost, "total": target_cost + judge_cost},
    }


# -- rendering -----------------------------------------------------------------------------------


def _estimate(e: dict[str, Any], scale: float, unit: str, places: int) -> str:
    """An estimate and, where it has one, its interval: ``value`` and ``low``/``high`` scaled."""
    if e.get("value") is None:
        return "n/a"
    point = f"{scale * e['value']:.{places}f}{unit}"
    if e.get("low") is None:
        return point
    return f"{point} [{scale * e['low']:.{places}f}, {scale * e['high']:.{places}f}]"


def _pct(e: dict[str, Any]) -> str:
    return _estimate(e, 100, "%", 1)


def _num(e: dict[str, Any]) -> str:
    return _estimate(e, 1, "", 2)


def _usd(v: float | None) -> str:
    return "unknown" if v is None else f"${v:.4f}"


def markdown(report: dict[str, Any]) -> str:
    spec = report["spec"]
    lines = [f"# moa eval: {spec['mode']} on {Path(spec['workload']).name} ({report['items']} items)", ""]
    if report["stopped"]:
        lines += [f"**Stopped early** ({report['stopped']}): the figures cover what finished.", ""]
    lines += [f"Judges: {', '.join(spec['judges'])}. Intervals are bootstrap 95% over items.", ""]
    if spec["mode"] == "pairwise":
        lines += [
            f"Reference: `{spec['reference_outputs'] or spec['reference']}`; pairs judged both ways.",
            "",
            "| target | win rate | LC win rate | W/T/L | unparseable (retried) | judge errors | "
            "first shown wins | answer cost/item | answer cost | judge cost |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in report["targets"].items():
            pw = row.get("pairwise")
            if pw is None:
                continue
            fsw = pw["first_shown_wins"]
            lines.append(
                f"| `{name}` | {_pct(pw['win_rate'])} | {_pct(pw['lc_win_rate'])} | "
                f"{pw['wins']}/{pw['ties']}/{pw['losses']} | {pw['unparseable']} ({pw['retried']}) | "
                f"{pw['judge_errors']} | {'n/a' if fsw is None else f'{100 * fsw:.0f}%'} | "
                f"{_usd(row['answers']['cost_per_item_usd'])} | {_usd(row['answers']['cost_usd'])} | "
                f"{_usd(pw['judge_cost_usd'])} |"
            )
    else:
        cats = sorted(
            {c for r in report["targets"].values() for c in r.get("graded", {}).get("by_category", {})}
        )
        lines += [
            "| target | score (1-10) | "
            + " | ".join(cats)
            + " | unparseable (retried) | judge errors | answer cost/item | judge cost |",
            "|---|---|" + "---|" * len(cats) + "---|---|---|---|",
        ]
        for name, row in report["targets"].items():
            g = row["graded"]
            per = " | ".join(_num(g["by_category"].get(c, {})) for c in cats)
            lines.append(
                f"| `{name}` | {_num(g['score'])} | {per} | {g['unparseable']} ({g['retried']}) | "
                f"{g['judge_errors']} | {_usd(row['answers']['cost_per_item_usd'])} | "
                f"{_usd(g['judge_cost_usd'])} |"
            )
    if spec["mode"] == "pairwise" and len(spec["judges"]) > 1:
        for name, row in report["targets"].items():
            if "pairwise" in row:
                each = ", ".join(f"`{j}` {_pct(e)}" for j, e in row["pairwise"]["win_rate_by_judge"].items())
                lines.append(f"\nWin rate of `{name}` by judge: {each}.")
    for row in report["judge_agreement"]:
        j1, j2 = row["judges"]
        if "cohen_kappa" in row:
            kappa = "n/a" if row["cohen_kappa"] is None else f"{row['cohen_kappa']:.2f}"
            agree = "n/a" if row["agreement"] is None else f"{100 * row['agreement']:.0f}%"
            lines.append(
                f"\nJudges `{j1}` and `{j2}` agree on {agree} of {row['n']} judgments (kappa {kappa})."
            )
        else:
            r = "n/a" if row["pearson"] is None else f"{row['pearson']:.2f}"
            w1 = "n/a" if row["within_1_point"] is None else f"{100 * row['within_1_point']:.0f}%"
            lines.append(
                f"\nJudges `{j1}` and `{j2}`: scores within 1 point {w1}, Pearson r {r} (n={row['n']})."
            )
    dropped = {
        n: r["pairwise"]["pairs_dropped"]
        for n, r in report["targets"].items()
        if r.get("pairwise", {}).get("pairs_dropped")
    }
    if dropped:
        lines.append(
            "\nPairs left out of the win rates (one order unparseable or its judge call failed; "
            "one order alone carries the judge's position bias): "
            + ", ".join(f"`{n}` {c}" for n, c in dropped.items())
        )
    failed = {n: r["answers"]["failed"] for n, r in report["targets"].items() if r["answers"]["failed"]}
    if failed:
        lines.append("\nFailed answers (not judged): " + ", ".join(f"`{n}` {c}" for n, c in failed.items()))
    c = report["cost_usd"]
    lines += [
        "",
        f"Cost: targets {_usd(c['targets'])}, judging {_usd(c['judging'])}, total {_usd(c['total'])}.",
    ]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> str | None:
    """The PNG: quality with its interval beside answer cost per item. None if written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "report.png skipped: matplotlib is not installed (pip install 'moa-serve[eval]')"
    pairwise = report["spec"]["mode"] == "pairwise"
    rows = [
        (
            n,
            r["pairwise"]["win_rate"] if pairwise else r["graded"]["score"],
            r["answers"]["cost_per_item_usd"],
        )
        for n, r in report["targets"].items()
        if ("pairwise" in r if pairwise else "graded" in r)
    ]
    if not rows:
        return "report.png skipped: nothing was judged"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.6 * len(rows) + 2.5))
    names = [n for n, _, _ in rows]
    values = [e["value"] if e["value"] is not None else 0.0 for _, e, _ in rows]
    low = [v - (e["low"] if e["low"] is not None else v) for v, (_, e, _) in zip(values, rows, strict=True)]
    high = [
        (e["high"] if e["high"] is not None else v) - v for v, (_, e, _) in zip(values, rows, strict=True)
    ]
    left.barh(names, values, xerr=[low, high], color="#4c72b0", capsize=4)
    if pairwise:
        lc = [report["targets"][n]["pairwise"]["lc_win_rate"]["value"] for n in names]
        left.scatter([v if v is not None else 0.0 for v in lc], names, color="#dd8452", zorder=3, label="LC")
        left.axvline(0.5, color="grey", linestyle="--", linewidth=1)
        left.set_xlim(0, 1)
        left.set_xlabel("win rate vs reference (95% CI); dot: length-controlled")
    else:
        left.set_xlim(1, 10)
        left.set_xlabel("judge score 1-10 (95% CI)")
    for (n, _, cost), v in zip(rows, values, strict=True):
        right.scatter([cost or 0.0], [v], s=40)
        right.annotate(n, (cost or 0.0, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ref = report["spec"]["reference_outputs"] or report["spec"]["reference"]
    if pairwise and ref in report["targets"]:
        ref_cost = report["targets"][ref]["answers"]["cost_per_item_usd"] or 0.0
        right.scatter([ref_cost], [0.5], s=40, marker="s", color="grey")
        right.annotate(
            f"{ref} (reference)", (ref_cost, 0.5), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    right.set_xlabel("answer cost per item, USD")
    right.set_ylabel("win rate" if pairwise else "score")
    right.set_title("quality vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_report(report: dict[str, Any], run_dir: Path) -> list[str]:
    """report.json, report.md and report.png in the run directory; returns notes for the user."""
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (run_dir / "report.md").write_text(markdown(report), encoding="utf-8")
    skipped = plot(report, run_dir / "report.png")
    return [skipped] if skipped else []


__all__ = ["Estimate", "build_report", "markdown", "preference", "write_report"]
