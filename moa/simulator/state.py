"""The simulator's mutable state: the live profile, per-model counters, fault draws, prompt cache.

Everything here is touched only from the server's event loop thread, so nothing needs a lock.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from moa.simulator.continuation import split_continuation
from moa.simulator.profile import FAULT_KINDS, Faults, FaultSpec, ModelProfile, SimProfile
from moa.simulator.text import stable_hash
from moa.simulator.wire import SimRequest
from moa.tokens import CHARS_PER_TOKEN

# Prompt caching, by OpenAI's documented rule: a prompt's prefix is cached once the prompt has this
# many tokens, and a hit covers the longest prefix seen before, in blocks of this many tokens.
CACHE_MIN_TOKENS = 1024
CACHE_BLOCK_TOKENS = 128
# Cached prefixes kept per model (one per block of each prompt), least recently used dropped first.
CACHE_BLOCKS_PER_MODEL = 16_384
# Requests kept for GET /admin/requests (what each carried, and whether the model refused it).
RECENT_REQUESTS = 64
# Authors remembered for the simulated judge (text hash -> model): enough for a large eval run.
AUTHORS_KEPT = 100_000


@dataclass(slots=True)
class ModelStats:
    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    completed: int = 0
    cancelled: int = 0
    faults: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "completed": self.completed,
            "faults": dict(self.faults),
            "cancelled": self.cancelled,
        }


class SimState:
    def __init__(self, profile: SimProfile) -> None:
        self.stats: dict[str, ModelStats] = {}
        self.total_requests = 0
        # Who wrote each answer served, kept across resets: a judge may see answers from before one.
        self._authors: OrderedDict[int, str] = OrderedDict()
        self.embedding_requests = 0  # answered embedding calls (not in total_requests: no generation)
        self.set_profile(profile)
        self.reset_counters()

    # -- profile ---------------------------------------------------------------------------------

    def set_profile(self, profile: SimProfile) -> None:
        self.profile = profile
        self._resolved: dict[str, ModelProfile] = {}
        self.rng = random.Random(profile.seed)

    def model_profile(self, model: str) -> ModelProfile:
        mp = self._resolved.get(model)
        if mp is None:
            mp = self._resolved[model] = self.profile.for_model(model)
        return mp

    def set_faults(self, pattern: str, faults: Faults) -> None:
        self.set_profile(self.profile.model_copy(update={"faults": {**self.profile.faults, pattern: faults}}))

    def clear_faults(self, pattern: str | None = None) -> bool:
        if pattern is None:
            had = bool(self.profile.faults)
            remaining: dict[str, Faults] = {}
        else:
            had = pattern in self.profile.faults
            remaining = {k: v for k, v in self.profile.faults.items() if k != pattern}
        self.set_profile(self.profile.model_copy(update={"faults": remaining}))
        return had

    def reset_counters(self) -> None:
        # Requests still in flight hold their ModelStats and decrement it when they end: keep those
        # objects (zeroed) so the count stays balanced.
        kept = {m: s for m, s in self.stats.items() if s.in_flight}
        for s in kept.values():
            s.requests = s.completed = s.cancelled = 0
            s.max_in_flight = s.in_flight
            s.faults.clear()
        self.stats = kept
        self.total_requests = 0
        self.embedding_requests = 0
        self._first_n: dict[tuple[str, str], list[Any]] = {}
        self._prompt_cache: dict[str, OrderedDict[bytes, None]] = {}
        self.recent_requests: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)
        self.rng = random.Random(self.profile.seed)

    # -- per request -----------------------------------------------------------------------------

    def record_request(self, api: str, req: SimRequest, refused: str | None) -> None:
        """Keep what a parsed request carried; ``refused`` is the model's 400 message, if it gave
        one; ``continues`` the partial answer it was asked to continue, if it was."""
        _, prefix = split_continuation(req.transcript)
        self.recent_requests.append(
            {
                "api": api,
                "model": req.model,
                "stream": req.stream,
                "params": req.params,
                "refused": refused,
                "continues": prefix,
            }
        )

    def begin(self, model: str) -> ModelStats:
        st = self.stats.get(model)
        if st is None:
            st = self.stats[model] = ModelStats()
        st.requests += 1
        st.in_flight += 1
        st.max_in_flight = max(st.max_in_flight, st.in_flight)
        self.total_requests += 1
        return st

    def pick_fault(self, model: str, faults: Faults) -> tuple[str, FaultSpec] | None:
        """The fault this request suffers, if any; the first kind (in field order) that fires wins."""
        for kind in FAULT_KINDS:
            spec: FaultSpec | None = getattr(faults, kind)
            if spec is None:
                continue
            if spec.first_n is not None:
                seen = self._first_n.get((model, kind))
                if seen is None or seen[0] is not spec:  # a newly set fault counts from zero
                    seen = self._first_n[(model, kind)] = [spec, 0]
                seen[1] += 1
                if seen[1] > spec.first_n:
                    continue
            if spec.rate >= 1.0 or (spec.rate > 0.0 and self.rng.random() < spec.rate):
                return kind, spec
        return None

    def jitter(self, value: float, jitter: float) -> float:
        return value * self.rng.uniform(1.0 - jitter, 1.0 + jitter) if jitter else value

    def cached_tokens(self, req: SimRequest, prompt_tokens: int) -> int:
        """Tokens of ``req``'s prompt served from the model's prompt cache: the longest prefix, in
        whole blocks from ``CACHE_MIN_TOKENS`` on, that an earlier prompt to this model began
        with. Every block-aligned prefix of this prompt is remembered for the next.

        Automatic, as on OpenAI and on Gemini's implicit caching; a request that does not ask for
        caching (an Anthropic request without ``cache_control``) reads and writes nothing. The
        prompt is its transcript in order, so a prompt that changes early (a reference that grew,
        say) shares only the prefix before the change, as on the real APIs."""
        if not req.prompt_caching or prompt_tokens < CACHE_MIN_TOKENS:
            return 0
        cache = self._prompt_cache.setdefault(req.model, OrderedDict())
        flat = "".join(f"{role}\n{text}\n" for role, text in req.transcript)
        block = CACHE_BLOCK_TOKENS * CHARS_PER_TOKEN
        h = hashlib.blake2b(digest_size=16)
        h.update(flat[: CACHE_MIN_TOKENS * CHARS_PER_TOKEN].encode())
        hit, end, missed = 0, CACHE_MIN_TOKENS * CHARS_PER_TOKEN, False
        while end <= len(flat) and end // CHARS_PER_TOKEN <= prompt_tokens:
            key = h.digest()
            if not missed and key in cache:
                cache.move_to_end(key)
                hit = end // CHARS_PER_TOKEN
            else:
                missed = True
                cache[key] = None
            h.update(flat[end : end + block].encode())
            end += block
        while len(cache) > CACHE_BLOCKS_PER_MODEL:
            cache.popitem(last=False)
        return hit

    def remember_author(self, text: str, model: str) -> None:
        key = stable_hash(text.strip())
        self._authors[key] = model
        self._authors.move_to_end(key)
        if len(self._authors) > AUTHORS_KEPT:
            self._authors.popitem(last=False)

    def author(self, text: str) -> str | None:
        """The model that wrote ``text``, if the simulator served it (whitespace around it aside)."""
        return self._authors.get(stable_hash(text.strip()))

    def snapshot(self) -> dict[str, Any]:
        return {
            "models": {m: s.as_dict() for m, s in self.stats.items()},
            "total_requests": self.total_requests,
            "embedding_requests": self.embedding_requests,
        }
