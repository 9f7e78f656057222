"""The response cache: final answers and proposer calls, exact and (opt-in) semantic.

What may be served is decided per request by a ``CacheTicket`` (scope, read/write, semantic,
whether a fresh sample was asked for), which the API sets in a context variable so that the engine
and every task it starts see it. The engine asks ``lookup`` before any model is called and
``store`` once an answer is complete; proposer calls go through ``ProposalCache``, a ``ModelCaller``
over the transport.
"""

from __future__ import annotations

import array
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace

from moa.cache.embed import STATIC_EXTRA, Embedder, cosine, make_embedder, static_embedder_installed
from moa.cache.keys import context_key, final_key, guard, proposal_key, split_last_user
from moa.cache.store import CacheStore, MemoryStore, TieredStore
from moa.caller import ModelCaller
from moa.config import CacheConfig, MoAConfig
from moa.errors import FallbackReason
from moa.plan import Plan
from moa.result import CacheOutcome, MoAResult
from moa.types import (
    CallRequest,
    CallResult,
    ChatMessage,
    GenerationParams,
    ResponseFormat,
    StreamEvent,
    ToolSet,
    Usage,
)
from moa_observability.metrics import cache_metrics
from moa_observability.tracing import tracer

log = logging.getLogger("moa.cache")

CacheMode = str  # "default" | "no-cache" | "no-store" | "off"
# Finish reasons of a complete answer (adapters normalise theirs to OpenAI's words); "length" is
# an answer cut at max_tokens, "content_filter" one cut by the provider, "other" unknown.
# "tool_calls" is an answer that is one or more function calls, complete (and validated).
COMPLETE = (None, "stop", "tool_calls")


@dataclass
class CacheTicket:
    """One request's cache rights and, once it ran, what the cache did for it."""

    scope: str
    read: bool = True
    write: bool = True
    semantic: bool = False
    sampled_ok: bool = False
    outcome: CacheOutcome = field(default_factory=CacheOutcome)
    # The last user message's embedding, computed for the lookup and reused to index the answer.
    vector: list[float] | None = None
    # The request's tools (definitions, choice, parallel switch): part of every key of its answer.
    tools: ToolSet | None = None
    # The request's response format (type, name, schema, strict): part of every key of its answer.
    response_format: ResponseFormat | None = None

    @classmethod
    def for_request(
        cls, scope: str, mode: CacheMode = "default", semantic: bool = False, sampled_ok: bool = False
    ) -> CacheTicket:
        return cls(
            scope=scope,
            read=mode in ("default", "no-store"),
            write=mode in ("default", "no-cache"),
            semantic=semantic,
            sampled_ok=sampled_ok,
        )


def sampled(params: GenerationParams) -> bool:
    """A fresh sample was asked for: a temperature above 0 and no seed to make it repeatable."""
    return params.temperature is not None and params.temperature > 0 and params.seed is None


@dataclass
class Hit:
    result: MoAResult
    kind: str  # exact | semantic
    similarity: float | None
    age_s: float


def _proposal_entry(ticket: CacheTicket, req: CallRequest) -> str:
    """Where a proposer call's answer is kept: its exact request, in the ticket's scope."""
    return f"{ticket.scope}|p|{proposal_key(ticket.scope, req)}"


def _pack(vector: Sequence[float], anchor_set: dict[str, list[str]]) -> bytes:
    return json.dumps(anchor_set, sort_keys=True).encode() + b"\0" + array.array("f", vector).tobytes()


def _unpack(payload: bytes) -> tuple[dict[str, list[str]], list[float]]:
    head, _, body = payload.partition(b"\0")
    vec = array.array("f")
    vec.frombytes(body)
    return json.loads(head), list(vec)


class ResponseCache:
    def __init__(self, config: CacheConfig, store: CacheStore, embedder: Embedder | None = None) -> None:
        self.config = config
        self.store = store
        self._embedder = embedder
        self._embedder_factory: Any = None
        self.metrics = cache_metrics()

    # -- final answers ----------------------------------------------------------------------------

    def readable(self, ticket: CacheTicket, params: GenerationParams) -> str | None:
        """Why the cache may not serve this request (None: it may)."""
        if not ticket.read:
            return "the request said no-cache" if ticket.write else "the request said off"
        if sampled(params) and self.config.sampled == "bypass" and not ticket.sampled_ok:
            return "temperature > 0 without a seed asks for a fresh sample (moa.cache_sampled allows reuse)"
        return None

    def embedder(self) -> Embedder | None:
        if self._embedder is None and self._embedder_factory is not None:
            self._embedder = self._embedder_factory()
        return self._embedder

    async def lookup(
        self, ticket: CacheTicket, messages: Sequence[ChatMessage], plan: Plan, params: GenerationParams
    ) -> Hit | None:
        """An exact hit, else (with semantic on) the most similar answer of the same context whose
        anchors match and whose similarity reaches the threshold."""
        with tracer().start_as_current_span("moa.cache.lookup") as span:
            try:
                hit = await self._lookup(ticket, messages, plan, params)
            except Exception as e:
                # An unreachable store (or embedding API) makes a miss, never a failed request.
                log.warning("cache lookup failed: %s: %s", type(e).__name__, e)
                span.set_attribute("error.type", type(e).__name__)
                hit = None
            span.set_attributes(
                {
                    "moa.cache.result": f"hit-{hit.kind}" if hit else "miss",
                    "moa.cache.semantic": ticket.semantic,
                    "moa.cache.similarity": hit.similarity or 0.0 if hit else 0.0,
                }
            )
        if hit is None:
            self.metrics.miss("final")
        else:
            self.metrics.hit("final", hit.kind, hit.result.cache.saved_cost_usd)
        return hit

    async def _lookup(
        self, ticket: CacheTicket, messages: Sequence[ChatMessage], plan: Plan, params: GenerationParams
    ) -> Hit | None:
        fmt = ticket.response_format
        key = f"{ticket.scope}|f|{final_key(ticket.scope, messages, plan, params, ticket.tools, fmt)}"
        hit = await self._entry(key, "exact", None)
        if hit is not None or not ticket.semantic:
            return hit
        embedder = self.embedder()
        split = split_last_user(messages)
        if embedder is None or split is None:
            return None
        context, question = split
        index = f"{ticket.scope}|s|{context_key(ticket.scope, context, plan, params, ticket.tools, fmt)}"
        candidates = await self.store.index_read(index)
        ticket.vector = (await embedder.embed([question]))[0]
        if not candidates:
            return None
        wanted = guard(question)
        scored = []
        for member, payload in candidates.items():
            their_anchors, vector = _unpack(payload)
            if their_anchors != wanted:
                continue  # another number, negation, name or content word: another question
            similarity = cosine(ticket.vector, vector)
            if similarity >= self.config.semantic.threshold:
                scored.append((similarity, member))
        for similarity, member in sorted(scored, reverse=True):
            hit = await self._entry(f"{ticket.scope}|f|{member}", "semantic", round(similarity, 4))
            if hit is not None:
                return hit
        return None

    async def _entry(self, key: str, kind: str, similarity: float | None) -> Hit | None:
        raw = await self.store.get(key)
        if raw is None:
            return None
        entry = json.loads(raw)
        age = time.time() - entry["created"]
        if age > self.config.ttl_s:
            return None
        original = MoAResult.model_validate(entry["result"])
        calls = [
            c.model_copy(
                update={
                    "cache": kind,
                    "similarity": similarity,
                    "saved_cost_usd": c.cost_usd + c.saved_cost_usd,
                    "usage": Usage(),
                    "cost_usd": 0.0,
                    "latency_s": 0.0,
                    "ttft_s": None,
                    "attempts": 0,
                    "provider_service_s": None,
                    "started_s": 0.0,
                }
            )
            for c in original.calls
        ]
        saved = original.cost_usd + sum(c.saved_cost_usd for c in original.calls)
        result = original.model_copy(
            update={
                "calls": calls,
                "usage": Usage(),
                "cost_usd": 0.0,
                "critical_path_s": 0.0,
                "provider_critical_path_s": None,
                "cache": CacheOutcome(
                    status=f"hit-{kind}", similarity=similarity, saved_cost_usd=saved, age_s=round(age, 3)
                ),
            }
        )
        return Hit(result=result, kind=kind, similarity=similarity, age_s=age)

    def storable(self, result: MoAResult) -> str | None:
        """Why an answer must not be stored (None: it may)."""
        if result.finish_reason not in COMPLETE:
            return f"the answer ended with {result.finish_reason!r} (cut, not complete)"
        if not result.text and not result.tool_calls:
            return "the answer is empty"
        if result.answer_source == "proposal":
            # The aggregators failed, perhaps for a moment: the next asker deserves another try.
            return "every aggregator failed: a proposal answered, unaggregated"
        if result.fallback_reason == FallbackReason.QUORUM_MISSED and not self.config.quorum_missed:
            return "a proposer layer missed its quorum (cache.quorum_missed stores such answers)"
        return None

    async def store_answer(
        self,
        ticket: CacheTicket,
        messages: Sequence[ChatMessage],
        plan: Plan,
        params: GenerationParams,
        result: MoAResult,
    ) -> str | None:
        """Store a complete answer; returns why it was not stored, if it was not. A failing store
        (or embedding API) is logged and reported as the reason, never raised: the answer stands."""
        if not ticket.write:
            return "the request said no-store" if ticket.read else "the request said off"
        why = self.storable(result)
        if why is not None:
            return why
        try:
            fmt = ticket.response_format
            key = final_key(ticket.scope, messages, plan, params, ticket.tools, fmt)
            stored = result.model_copy(update={"cache": CacheOutcome()})
            raw = json.dumps({"created": time.time(), "result": stored.model_dump(mode="json")}).encode()
            await self.store.put(f"{ticket.scope}|f|{key}", raw, self.config.ttl_s)
            self.metrics.stored("final", len(raw))
            split = split_last_user(messages)
            embedder = self.embedder()
            if ticket.semantic and split is not None and embedder is not None:
                context, question = split
                vector = ticket.vector or (await embedder.embed([question]))[0]
                index = (
                    f"{ticket.scope}|s|{context_key(ticket.scope, context, plan, params, ticket.tools, fmt)}"
                )
                payload = _pack(vector, guard(question))
                await self.store.index_add(
                    index, key, payload, self.config.ttl_s, self.config.semantic.max_candidates
                )
        except Exception as e:
            log.warning("cache store failed: %s: %s", type(e).__name__, e)
            return f"the cache store failed ({type(e).__name__})"
        return None

    # -- proposer calls ---------------------------------------------------------------------------

    async def proposal(self, req: CallRequest, ticket: CacheTicket) -> CallResult | None:
        """A proposer call's earlier answer, when its exact request was answered before and the
        ticket may read it: usage and cost zero, ``saved_cost_usd`` what it cost then."""
        if self.readable(ticket, req.params) is not None:
            return None
        t0 = time.monotonic()
        try:
            raw = await self.store.get(_proposal_entry(ticket, req))
        except Exception as e:
            log.warning("cache lookup failed: %s: %s", type(e).__name__, e)
            raw = None
        if raw is not None:
            entry = json.loads(raw)
            if time.time() - entry["created"] <= self.config.ttl_s:
                original = CallResult.model_validate(entry["result"])
                saved = original.cost_usd
                self.metrics.hit("proposal", "exact", saved)
                ticket.outcome.proposals_from_cache += 1
                trace.get_current_span().add_event(
                    "moa.cache.hit", {"moa.cache.level": "proposal", "gen_ai.request.model": req.model}
                )
                return original.model_copy(
                    update={
                        "usage": Usage(),
                        "cost_usd": 0.0,
                        "saved_cost_usd": saved,
                        "latency_s": time.monotonic() - t0,
                        "ttft_s": None,
                        "attempts": 0,
                        "provider_service_s": None,
                        "cache": "exact",
                    }
                )
        self.metrics.miss("proposal")
        return None

    async def store_proposal(self, req: CallRequest, ticket: CacheTicket, res: CallResult) -> None:
        """Store a proposer call's answer when it is complete and the ticket may write; a failing
        store is logged, never raised."""
        if not (ticket.write and res.ok and (res.text or res.tool_calls) and res.finish_reason in COMPLETE):
            return
        raw = json.dumps({"created": time.time(), "result": res.model_dump(mode="json")}).encode()
        try:
            await self.store.put(
                f"{ticket.scope}|p|{proposal_key(ticket.scope, req)}", raw, self.config.ttl_s
            )
            self.metrics.stored("proposal", len(raw))
        except Exception as e:
            log.warning("cache store failed: %s: %s", type(e).__name__, e)

    async def close(self) -> None:
        await self.store.close()


class ProposalCache:
    """The response cache's proposal level as a ``ModelCaller`` over the transport (``inner``): a
    proposer call whose exact request was answered before is answered from the cache, with no
    call made; any other goes to ``inner`` and, once complete, is stored. One per run: its ticket
    says what that request may read and write, and counts the proposals served."""

    def __init__(self, inner: ModelCaller, cache: ResponseCache, ticket: CacheTicket) -> None:
        self.inner = inner
        self.cache = cache
        self.ticket = ticket

    async def call(self, req: CallRequest) -> CallResult:
        hit = await self.cache.proposal(req, self.ticket)
        if hit is not None:
            return hit
        res = await self.inner.call(req)
        await self.cache.store_proposal(req, self.ticket, res)
        return res

    async def stream(self, req: CallRequest) -> AsyncIterator[StreamEvent]:
        """A hit is the one final result (no text deltas: nothing was generated, nothing is billed
        if the call is then cut); a miss streams from ``inner``, its result stored before it is
        passed on."""
        hit = await self.cache.proposal(req, self.ticket)
        if hit is not None:
            yield hit
            return
        async for ev in self.inner.stream(req):
            if isinstance(ev, CallResult):
                await self.cache.store_proposal(req, self.ticket, ev)
            yield ev


def cache_redis_url(config: MoAConfig) -> str | None:
    from moa.state import redis_url

    return os.environ.get("MOA_CACHE_REDIS_URL") or config.cache.redis_url or redis_url(config.state)


def open_shared_store(config: MoAConfig) -> CacheStore | None:
    """The shared store the config names (None: the in-process LRU alone)."""
    cc = config.cache
    choice = cc.store
    url = cache_redis_url(config)
    if choice == "auto":
        choice = "redis" if url else "sqlite"
    if choice == "memory":
        return None
    if choice == "redis":
        if not url:
            raise ValueError(
                "cache.store is redis but no Redis URL is set (cache.redis_url or state.redis_url)"
            )
        from moa.cache.redis_store import RedisCacheStore

        return RedisCacheStore(
            url, cc.max_bytes, cc.ttl_s, password=os.environ.get("MOA_REDIS_PASSWORD") or None
        )
    from moa.cache.sqlite_store import SQLiteCacheStore
    from moa.state import state_dir

    return SQLiteCacheStore(state_dir(config.state) / "cache.db", cc.max_bytes)


def open_cache(config: MoAConfig) -> ResponseCache | None:
    """The cache the config asks for, or None when caching is off."""
    cc = config.cache
    if not cc.enabled:
        return None
    shared = open_shared_store(config)
    local = MemoryStore(cc.memory_max_bytes)
    store: CacheStore = local if shared is None else TieredStore(local, shared)
    cache = ResponseCache(cc, store)
    if cc.semantic.embedder == "static" and not static_embedder_installed():
        # No embedder, no factory: semantic lookups and index writes are skipped, exact hits work.
        log.warning(
            "semantic cache lookups are off: the static embedder is not installed (%s); "
            "exact hits still work",
            STATIC_EXTRA,
        )
        return cache
    # The embedder loads on the first semantic request, not at start-up.
    cache._embedder_factory = lambda: make_embedder(config)
    return cache
