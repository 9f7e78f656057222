"""Response caching: final answers and proposer calls, exact and semantic (docs/CACHING.md)."""

from moa.cache.cache import (
    CacheTicket,
    Hit,
    ProposalCache,
    ResponseCache,
    open_cache,
    sampled,
)

__all__ = [
    "CacheTicket",
    "Hit",
    "ProposalCache",
    "ResponseCache",
    "open_cache",
    "sampled",
]
