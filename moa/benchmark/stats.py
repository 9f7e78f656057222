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

    @property
    def overhead_s(self) -> float | None:
        """Time the orchestration added on top of the simulated model calls."""
        if self.simulated_s is None or self.cut_straggler:
            return None
        return self.e2e_s - self.simulated_s


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
    }
