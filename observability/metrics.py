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
# Orchestration overhead is milliseconds to a few hundred: DURATION_BUCKETS would put it all in one.
OVERHEAD_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5]
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
            self.circuit = _NoOp()
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
        self.circuit = m.Gauge(
            "moa_provider_circuit_open",
            description="1 while this replica's circuit breaker for the provider is not closed (open, "
            "or half-open: waiting for a probe to succeed), else 0.",
            tag_keys=("moa_provider",),
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

    def circuit_state(self, provider: str, state: str) -> None:
        """Set on every health report (every 2 s and on each change), so the gauge is always fresh:
        an alert on "open for minutes" must not read a value that stopped moving."""
        self.circuit.set(0.0 if state == "closed" else 1.0, {"moa_provider": provider})


class RequestMetrics:
    """Per request: preset, router decision, quorum shortfalls, fallbacks, cost, time to first token,
    orchestration overhead, and requests shed at admission (cache hits: ``CacheMetrics``)."""

    def __init__(self) -> None:
        m = _serve_metrics()
        if m is None:
            self.requests = self.latency = self.shortfalls = self.fallbacks = _NoOp()
            self.cost = self.ttft = self.overhead = self.shed_requests = _NoOp()
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
        # What a query costs is a product figure (the spec watches cost per query): the providers'
        # own cost counter cannot say which preset spent it.
        self.cost = m.Counter(
            "moa_request_cost_usd",
            description="Cost of answered requests (USD): every call each made, by the preset that ran.",
            tag_keys=("preset",),
        )
        self.ttft = m.Histogram(
            "moa_request_time_to_first_token",
            description="Time from a streamed request's arrival to its first answer token (seconds).",
            boundaries=DURATION_BUCKETS,
            tag_keys=("preset",),
        )
        self.overhead = m.Histogram(
            "moa_request_overhead",
            description="An answered request's time not spent waiting on models: end-to-end time "
            "minus its stages' critical path (seconds).",
            boundaries=OVERHEAD_BUCKETS,
            tag_keys=("preset",),
        )
        self.shed_requests = m.Counter(
            "moa_requests_shed",
            description="Requests refused at admission, before any work, by reason: overloaded (the "
            "replica at server.max_concurrent_requests), concurrency_limit_exceeded (a key's share), "
            "shutting_down (draining).",
            tag_keys=("reason",),
        )

    def record(
        self,
        preset: str,
        complexity: str | None,
        status: int,
        seconds: float,
        fallback_reason: str | None = None,
        classifier_cached: bool = False,
        cost_usd: float = 0.0,
        critical_path_s: float | None = None,
    ) -> None:
        self.requests.inc(1, {"preset": preset, "complexity": complexity or "forced", "status": str(status)})
        self.latency.observe(seconds, {"preset": preset})
        if cost_usd > 0:
            self.cost.inc(cost_usd, {"preset": preset})
        if critical_path_s is not None:
            self.overhead.observe(max(seconds - critical_path_s, 0.0), {"preset": preset})
        if fallback_reason == "quorum_missed":
            self.shortfalls.inc(1, {"preset": preset})  # whether or not the fallback then answered
        if fallback_reason and status == 200:
            self.fallbacks.inc(1, {"preset": preset, "reason": str(fallback_reason)})
        if classifier_cached:
            cache_metrics().hit("router_classifier", "exact", 0.0)

    def first_token(self, preset: str, seconds: float) -> None:
        self.ttft.observe(seconds, {"preset": preset})

    def shed(self, reason: str) -> None:
        self.shed_requests.inc(1, {"reason": reason})


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
    tokens, requests refused for a spent budget, and how much of its budget is used."""

    def __init__(self) -> None:
        m = _serve_metrics()
        self.live = m is not None  # whether anything is exported (in a Serve replica)
        if m is None:
            self.requests = self.cost = self.tokens = self.refusals = self.budget = _NoOp()
            return
        self.requests = m.Counter("moa_key_requests", description="Requests per API key.", tag_keys=("key",))
        self.cost = m.Counter("moa_key_cost_usd", description="Spend per API key (USD).", tag_keys=("key",))
        self.tokens = m.Counter("moa_key_tokens", description="Tokens per API key.", tag_keys=("key",))
        self.refusals = m.Counter(
            "moa_key_budget_refusals",
            description="Requests refused because the key's budget could not hold them.",
            tag_keys=("key",),
        )
        self.budget = m.Gauge(
            "moa_key_budget_used_ratio",
            description="Share of the key's budget_usd spent in its current period (settled spend; "
            "1 = all of it), for keys with a budget; set again every 5 s (Ray drops a gauge left "
            "unset for two export periods).",
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

    def budget_used(self, key: str, ratio: float) -> None:
        self.budget.set(ratio, {"key": key})


class ControlPlaneMetrics:
    """Calls to the service's own control plane: the health board (ingress check-ins) and each
    provider's rate-limiter actor, by outcome (ok, error). A dependency that stops answering
    shows as errors with no ok: routing then runs on a stale view, or calls wait on budgets."""

    def __init__(self) -> None:
        m = _serve_metrics()
        if m is None:
            self.calls: Any = _NoOp()
            return
        self.calls = m.Counter(
            "moa_control_plane_calls",
            description="Calls to the health board and the rate-limiter actors, by target "
            "(health_board, rate_limiter) and outcome (ok, error).",
            tag_keys=("target", "outcome"),
        )

    def call(self, target: str, ok: bool) -> None:
        self.calls.inc(1, {"target": target, "outcome": "ok" if ok else "error"})


_control_metrics: ControlPlaneMetrics | None = None


def control_plane_metrics() -> ControlPlaneMetrics:
    """One set per process (an ingress replica, a provider replica and its limiter client)."""
    global _control_metrics
    if _control_metrics is None:
        _control_metrics = ControlPlaneMetrics()
    return _control_metrics


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
