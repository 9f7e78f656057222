"""Samples and the figures computed from them."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Sample:
    """One request: end-to-end time and the simulated model time on its critical path."""

    e2e_s: float
    ok: bool
    simulated_s: float | None = None
    met_quorum: bool | None = None
    # The critical path includes a wait on a straggler the plan then cut (grace or layer deadline):
    # time spent waiting on a model whose service time never came back, so no overhead is computed.
    cut_straggler: bool = False
    error: str | None = None
    # Streaming targets: seconds to the first byte of the response, and to the first answer text.
    first_byte_s: float | None = None
    ttft_s: float | None = None
    # Every call's tokens and the request's cost, from moa.detail.
    tokens: int | None = None
    cost_usd: float | None = None
    # Of every call's input tokens, those the providers read from their prompt caches, and what
    # those reads saved against the full input price (the bundled prices).
    input_tokens: int | None = None
    cached_tokens: int | None = None
    cache_saved_usd: float | None = None

    @property
    def overhead_s(self) -> float | None:
        """Time the orchestration added on top of the simulated model calls."""
        if self.simulated_s is None or self.cut_straggler:
            return None
        return self.e2e_s - self.simulated_s


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(p / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def summarize(samples: Sequence[Sample], wall_s: float, cpu_s: float, peak_rss_mb: float) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    # Latency as the client lives it: failed requests count with the time they took to fail.
    e2e = [s.e2e_s * 1000 for s in samples]
    overhead = [s.overhead_s * 1000 for s in ok if s.overhead_s is not None]
    # The model work each request did, and end-to-end time per second of it: when two targets'
    # requests do different amounts of simulated work, the ratio still compares them.
    simulated = [s.simulated_s * 1000 for s in ok if s.simulated_s is not None]
    ratio = [s.e2e_s / s.simulated_s for s in ok if s.overhead_s is not None and s.simulated_s]
    quorum = [s for s in samples if s.met_quorum is not None]
    n = len(samples)
    ttft = [s.ttft_s * 1000 for s in ok if s.ttft_s is not None]
    first_byte = [s.first_byte_s * 1000 for s in ok if s.first_byte_s is not None]
    tokens = [s.tokens for s in ok if s.tokens is not None]
    cost = [s.cost_usd for s in ok if s.cost_usd is not None]
    inputs = [s.input_tokens for s in ok if s.input_tokens is not None]
    cached = [s.cached_tokens for s in ok if s.cached_tokens is not None]
    saved = [s.cache_saved_usd for s in ok if s.cache_saved_usd is not None]
    return {
        "requests": n,
        "ok": len(ok),
        "errors": n - len(ok),
        "rps": len(ok) / wall_s if wall_s > 0 else math.nan,
        "p50_ms": percentile(e2e, 50),
        "p95_ms": percentile(e2e, 95),
        "p99_ms": percentile(e2e, 99),
        "overhead_p50_ms": percentile(overhead, 50),
        "overhead_p99_ms": percentile(overhead, 99),
        "simulated_p50_ms": percentile(simulated, 50),
        "e2e_per_simulated_p50": percentile(ratio, 50),
        "cpu_ms_per_request": cpu_s * 1000 / n if n else math.nan,
        "peak_rss_mb": peak_rss_mb,
        "quorum_met_share": sum(bool(s.met_quorum) for s in quorum) / n if n else math.nan,
        "cut_stragglers": sum(s.cut_straggler for s in ok),
        "error_kinds": dict(Counter(s.error or "?" for s in samples if not s.ok)),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "first_byte_p50_ms": percentile(first_byte, 50),
        "first_byte_p99_ms": percentile(first_byte, 99),
        "tokens_per_request": mean(tokens),
        "cost_usd_per_request": mean(cost),
        "input_tokens_per_request": mean(inputs),
        "cached_tokens_per_request": mean(cached),
        "cache_saved_usd_per_request": mean(saved),
    }


# -- where the overhead goes (``moa bench --details``) -----------------------------------------------

CALL_FIELDS = (
    "stage",
    "layer",
    "model",
    "ok",
    "cancelled_straggler",
    "started_s",
    "latency_s",
    "provider_service_s",
)
BREAKDOWN_PARTS = {
    "http_api_ms": "HTTP entry + API: end-to-end minus the engine's wall time",
    "before_first_call_ms": "engine before the first call (routing, planning)",
    "layer_crossings_ms": "proposer layers beyond their slowest call's time in its replica (hops to and fro)",
    "final_call_ms": "final call beyond its time in its replica (hops there and back, the answer's assembly)",
    "exchange_ms": "SDK + simulator exchange on the critical path: call latency minus simulated time",
}
# Raw files kept before these fields were named for what they are, the provider-reported service
# time (the committed docs/bench-*.json among them), use the old names; they are still read.
OLD_NAMES = {
    "provider_service_s": "simulated_service_s",
    "provider_critical_path_s": "simulated_critical_path_s",
}


def reported(kept: dict[str, Any], key: str) -> float | None:
    """A kept call's ``provider_service_s`` or request's ``provider_critical_path_s``, whichever name
    its raw file gives it."""
    value = kept[key] if key in kept else kept.get(OLD_NAMES[key])
    return None if value is None else float(value)


def trim_detail(e2e_s: float, detail: dict[str, Any]) -> dict[str, Any]:
    """What a request's ``moa.detail`` says about where its time went, and nothing else."""
    return {
        "e2e_s": e2e_s,
        "wall_time_s": detail["totals"]["wall_time_s"],
        "provider_critical_path_s": detail["totals"]["provider_critical_path_s"],
        "calls": [{k: c.get(k) for k in CALL_FIELDS} for c in detail["calls"]],
    }


def decompose(request: dict[str, Any]) -> dict[str, float] | None:
    """One request's overhead in additive parts (ms); None when it has no plain shape to split.

    The parts sum to end-to-end minus the simulated critical path. Only requests whose calls all
    succeeded in one pass are split: a cut straggler, a retry chain or a fallback has waits that
    are policy, not overhead. A call's latency is measured in the provider replica, so the handle
    hops to and from it fall into the crossings and the final call.
    """
    calls = request["calls"]
    service: dict[int, float] = {}
    for c in calls:
        reported_s = reported(c, "provider_service_s")
        if not c["ok"] or c["cancelled_straggler"] or reported_s is None:
            return None
        service[id(c)] = reported_s
    finals = [c for c in calls if c["stage"] == "aggregator"]
    proposers = [c for c in calls if c["stage"] == "proposer"]
    if len(finals) != 1 or len(proposers) + 1 != len(calls):
        return None
    final = finals[0]
    layers: dict[int, list[dict[str, Any]]] = {}
    for c in proposers:
        layers.setdefault(c["layer"], []).append(c)
    starts = [min(c["started_s"] for c in layers[k]) for k in sorted(layers)] + [final["started_s"]]
    crossings, exchange = 0.0, final["latency_s"] - service[id(final)]
    for i, k in enumerate(sorted(layers)):
        crossings += starts[i + 1] - max(c["started_s"] + c["latency_s"] for c in layers[k])
        exchange += max(c["latency_s"] for c in layers[k]) - max(service[id(c)] for c in layers[k])
    parts = {
        "http_api_ms": request["e2e_s"] - request["wall_time_s"],
        "before_first_call_ms": starts[0],
        "layer_crossings_ms": crossings,
        "final_call_ms": request["wall_time_s"] - final["started_s"] - final["latency_s"],
        "exchange_ms": exchange,
    }
    return {k: 1000 * v for k, v in parts.items()}


def breakdown(requests: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each part over the requests that could be split, and of their overhead."""
    split = [(r, p) for r in requests if (p := decompose(r)) is not None]
    paths = [(r["e2e_s"], reported(r, "provider_critical_path_s")) for r, _ in split]
    overhead = [1000 * (e2e - path) for e2e, path in paths if path is not None]
    return {
        "requests": len(requests),
        "split": len(split),
        "parts_p50_ms": {k: percentile([p[k] for _, p in split], 50) for k in BREAKDOWN_PARTS},
        "overhead_p50_ms": percentile(overhead, 50),
    }
