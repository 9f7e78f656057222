"""What a benchmark run does, kept free of heavy imports so the ``moa`` CLI starts without the
bench extra installed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# One proposer of moa-lite misbehaves in the fault scenarios.
FAULTY_MODEL = "gemini-2.5-flash"
SCENARIOS: dict[str, dict[str, Any]] = {
    "none": {},
    "hang": {"hang": {"rate": 1.0}},
    "flaky": {"error_500": {"rate": 0.3}},
    "burst429": {"error_429": {"rate": 1.0, "first_n": 20, "retry_after_s": 1.0}},
}
# What each scenario does to FAULTY_MODEL, for --help.
SCENARIO_HELP: dict[str, str] = {
    "none": "no fault",
    "hang": "never answers",
    "flaky": "30%% of calls fail with 500",
    "burst429": "its first 20 calls get 429 (Retry-After 1 s)",
}

# `moa bench --tools`: what answers (an ensemble with its tool mode) and the simulated models'
# tool-error rates, by default.
TOOL_CONFIGS: tuple[str, ...] = ("single", "moa-lite:vote", "moa-lite:aggregate")
TOOL_ERROR_RATES: tuple[float, ...] = (0.0, 0.1, 0.25)
# moa bench --structured: what answers, and the rates at which every simulated model writes a
# document that does not parse or breaks its schema.
STRUCTURED_CONFIGS: tuple[str, ...] = ("single", "moa-lite")
STRUCTURED_ERROR_RATES: tuple[float, ...] = (0.0, 0.1, 0.3)


@dataclass
class BenchOptions:
    prompts: Path | None = None
    concurrency: Sequence[int] = (1, 8, 32)
    # Requests per target and level: at least this many, and at least twice the concurrency.
    requests: int = 8
    targets: Sequence[str] = ("baseline", "serve:moa-lite", "serve:moa", "serve:openai/gpt-4.1-mini")
    scenarios: Sequence[str] = ("none", "hang", "flaky", "burst429")
    fault_concurrency: int = 8
    fault_requests: int = 24
    ttft_s: float = 0.3
    tokens_per_s: float = 50.0
    jitter: float = 0.1
    # Longer than any healthy proposer takes at the default profile, so it only bites when a
    # proposer hangs: a second-layer proposer fuses the first layer's answers into up to ~800
    # tokens, about 16 s at 50 tokens/s (15 s cut some of them and sent requests to fallbacks).
    layer_deadline_s: float = 30.0
    baseline_fault_timeout_s: float = 10.0
    out: Path = Path("bench-results")
    # Keep each Serve request's per-call timings (from moa.detail) and break its overhead down.
    details: bool = False
    # Serve targets stream their answers: time to first token (and first byte) is measured.
    stream: bool = False
    # Run each Serve target once per aggregation mode given (moa.aggregation); empty: the plan's own.
    aggregation: Sequence[str] = ()
    # Every preset's staircase chunk size (plan.staircase_chunk_chars); None: the presets' own.
    staircase_chunk_chars: int | None = None
    # The API key every request to the Serve app carries. With one, the app checks keys against
    # the configured state store (the user's, where the key lives); without one, the app runs on a
    # fresh state of its own (no keys: open on loopback), so keys made with `moa keys create`
    # cannot turn every request into a 401.
    api_key: str | None = None
    # The baseline makes the calls the service targets' preset makes (moa.benchmark.compare), and
    # the report pairs them call by call: output tokens per role, end-to-end p50 side by side.
    compare: bool = False
    results: list[dict[str, Any]] = field(default_factory=list)
