"""Prometheus metrics through Ray Serve's metrics API (exported on each node's Ray metrics port).

Outside a Ray replica every recorder is a no-op, so the core can call them unconditionally.
Names follow the GenAI conventions where they fit (``gen_ai.client.operation.duration`` and
``gen_ai.client.token.usage``, with dots as underscores: Prometheus allows no dots; Ray adds
its ``ray_`` prefix).
"""

from __future__ import annotations

from typing import Any

from moa.types import CallResult

DURATION_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120]
TOKEN_BUCKETS = [16, 64, 256, 1024, 4096, 16384, 65536, 262144]
CALL_TAGS = ("gen_ai_provider_name", "gen_ai_request_model", "moa_provider", "error_type")


class _NoOp:
    def inc(self, *_: Any, **__: Any) -> None: ...

    def observe(self, *_: Any, **__: Any) -> None: ...

    def set(self, *_: Any, **__: Any) -> None: ...


def _serve_metrics() -> Any:
    try:
        from ray import serve
        from ray.serve import metrics

        serve.get_replica_context()  # raises outside a replica
        return metrics
    except Exception:
        return None


class ProviderMetrics:
    """Per provider and model: requests, errors by kind, latency, time to first token, tokens, cost."""

    def __init__(self) -> None:
        m = _serve_metrics()
        if m is None:
            self.duration = self.ttft = self.tokens = self.requests = self.errors = self.cost = _NoOp()
            return
        self.duration = m.Histogram(
            "gen_ai_client_operation_duration",
            description="Duration of provider calls, retries included (seconds).",
            boundaries=DURATION_BUCKETS,
            tag_keys=CALL_TAGS,
        )
        self.ttft = m.Histogram(
            "gen_ai_client_time_to_first_chunk",
            description="Time to the first streamed token (seconds).",
            boundaries=DURATION_BUCKETS,
            tag_keys=CALL_TAGS[:3],
        )
        self.tokens = m.Histogram(
            "gen_ai_client_token_usage",
            description="Tokens per provider call, by type (input, output).",
            boundaries=TOKEN_BUCKETS,
            tag_keys=(*CALL_TAGS[:3], "gen_ai_token_type"),
        )
        self.requests = m.Counter(
            "moa_provider_requests", description="Provider calls.", tag_keys=CALL_TAGS[:3]
        )
        self.errors = m.Counter(
            "moa_provider_errors", description="Failed provider calls, by error kind.", tag_keys=CALL_TAGS
        )
        self.cost = m.Counter(
            "moa_provider_cost_usd", description="Cost of provider calls (USD).", tag_keys=CALL_TAGS[:3]
        )

    def record(self, result: CallResult, provider_kind_name: str) -> None:
        tags = {
            "gen_ai_provider_name": provider_kind_name,
            "gen_ai_request_model": result.requested_model,
            "moa_provider": result.provider,
        }
        error = result.error.kind.value if result.error else ""
        self.requests.inc(1, tags)
        self.duration.observe(result.latency_s, {**tags, "error_type": error})
        if result.error is not None:
            self.errors.inc(1, {**tags, "error_type": error})
            return
        if result.ttft_s is not None:
            self.ttft.observe(result.ttft_s, tags)
        self.tokens.observe(result.usage.input_tokens, {**tags, "gen_ai_token_type": "input"})
        self.tokens.observe(result.usage.output_tokens, {**tags, "gen_ai_token_type": "output"})
        if result.cost_usd:
            self.cost.inc(result.cost_usd, tags)


class RequestMetrics:
    """Per request: preset, router decision, quorum shortfalls, fallbacks (cache hits: ``CacheMetrics``)."""

    def __init__(self) -> None:
        m = _serve_metrics()
        if m is None:
            self.requests = self.latency = self.shortfalls = self.fallbacks = _NoOp()
            return
        self.requests = m.Counter(
            "moa_requests",
            description="MoA requests by preset, decision and status.",
            tag_keys=("preset", "complexity", "status"),
        )
        self.latency = m.Histogram(
            "moa_request_duration",
            description="End-to-end request time (seconds).",
            boundaries=DURATION_BUCKETS,
            tag_keys=("preset",),
        )
        self.shortfalls = m.Counter(
            "moa_quorum_shortfalls", description="Layers that missed their quorum.", tag_keys=("preset",)
        )
        self.fallbacks = m.Counter(
            "moa_fallbacks",
            description="Requests answered by a fallback, by reason: quorum_missed, aggregators_failed, "
            "synthesis_failed.",
            tag_keys=("preset", "reason"),
        )

    def record(
        self,
        preset: str,
        complexity: str | None,
        status: int,
        seconds: float,
        fallback_reason: str | None = None,
        classifier_cached: bool = False,
    ) -> None:
        self.requests.inc(1, {"preset": preset, "complexity": complexity or "forced", "status": str(status)})
        self.latency.observe(seconds, {"preset": preset})
        if fallback_reason == "quorum_missed":
            self.shortfalls.inc(1, {"preset": preset})  # whether or not the fallback then answered
        if fallback_reason and status == 200:
            self.fallbacks.inc(1, {"preset": preset, "reason": str(fallback_reason)})
        if classifier_cached:
            cache_metrics().hit("router_classifier", "exact", 0.0)


class CacheMetrics:
    """The caches: hits by level (``cache``: final, proposal, router_classifier) and kind (exact,
    semantic), misses by level, bytes written and the cost saved (what the served answers cost
    when they were made)."""

    def __init__(self) -> None:
        m = _serve_metrics()
        if m is None:
            self.hits = self.misses = self.bytes = self.saved = _NoOp()
            return
        self.hits = m.Counter(
            "moa_cache_hits",
            description="Answers served from a cache, by level (final, proposal, router_classifier) "
            "and kind (exact, semantic).",
            tag_keys=("cache", "kind"),
        )
        self.misses = m.Counter(
            "moa_cache_misses", description="Cache lookups that found nothing, by level.", tag_keys=("cache",)
        )
        self.bytes = m.Counter(
            "moa_cache_stored_bytes", description="Bytes written to the cache, by level.", tag_keys=("cache",)
        )
        self.saved = m.Counter(
            "moa_cache_saved_usd",
            description="What the answers served from the cache cost when they were made (USD).",
            tag_keys=("cache", "kind"),
        )

    def hit(self, level: str, kind: str, saved_usd: float) -> None:
        self.hits.inc(1, {"cache": level, "kind": kind})
        if saved_usd:
            self.saved.inc(saved_usd, {"cache": level, "kind": kind})

    def miss(self, level: str) -> None:
        self.misses.inc(1, {"cache": level})

    def stored(self, level: str, size: int) -> None:
        self.bytes.inc(size, {"cache": level})


_cache_metrics: CacheMetrics | None = None


def cache_metrics() -> CacheMetrics:
    """One set per process: every cache (and the router's classifier cache) records into it."""
    global _cache_metrics
    if _cache_metrics is None:
        _cache_metrics = CacheMetrics()
    return _cache_metrics


class KeyMetrics:
    """Per API key (labelled with the key's name, never the key): requests settled, their cost and
    tokens, and requests refused for a spent budget."""

    def __init__(self) -> None:
        m = _serve_metrics()
        if m is None:
            self.requests = self.cost = self.tokens = self.refusals = _NoOp()
            return
        self.requests = m.Counter("moa_key_requests", description="Requests per API key.", tag_keys=("key",))
        self.cost = m.Counter("moa_key_cost_usd", description="Spend per API key (USD).", tag_keys=("key",))
        self.tokens = m.Counter("moa_key_tokens", description="Tokens per API key.", tag_keys=("key",))
        self.refusals = m.Counter(
            "moa_key_budget_refusals",
            description="Requests refused because the key's budget could not hold them.",
            tag_keys=("key",),
        )

    def record(self, key: str, cost_usd: float, tokens: int) -> None:
        self.requests.inc(1, {"key": key})
        if cost_usd:
            self.cost.inc(cost_usd, {"key": key})
        if tokens:
            self.tokens.inc(tokens, {"key": key})

    def refused(self, key: str) -> None:
        self.refusals.inc(1, {"key": key})


class ShadowMetrics:
    """Shadow evaluation of live traffic (``eval.shadow``): outcomes, running win rate and cost by
    preset, the cost apart from the requests' own."""

    def __init__(self) -> None:
        m = _serve_metrics()
        if m is None:
            self.outcomes = self.rate = self.spend = _NoOp()
            return
        self.outcomes = m.Counter(
            "moa_shadow_evaluations",
            description="Shadow evaluations by preset asked for, route (the preset the router ran) "
            "and outcome: win, tie, loss (the served answer against the baseline), unparseable, "
            "failed, skipped_busy, skipped_budget.",
            tag_keys=("preset", "route", "outcome"),
        )
        self.rate = m.Gauge(
            "moa_shadow_win_rate",
            description="Running win rate of the served answers against the shadow baseline (ties "
            "half), by preset and route; bound: estimate, low, high (a 95% interval).",
            tag_keys=("preset", "route", "bound"),
        )
        self.spend = m.Counter(
            "moa_shadow_cost_usd",
            description="Cost of shadow evaluation (USD), by preset, route and role: baseline, judge.",
            tag_keys=("preset", "route", "role"),
        )

    def outcome(self, preset: str, route: str, outcome: str) -> None:
        self.outcomes.inc(1, {"preset": preset, "route": route, "outcome": outcome})

    def win_rate(self, preset: str, route: str, value: float, interval: tuple[float, float]) -> None:
        for bound, v in (("estimate", value), ("low", interval[0]), ("high", interval[1])):
            self.rate.set(v, {"preset": preset, "route": route, "bound": bound})

    def cost(self, preset: str, route: str, role: str, usd: float) -> None:
        if usd > 0:
            self.spend.inc(usd, {"preset": preset, "route": route, "role": role})
