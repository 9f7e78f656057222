"""Response caching: final answers and proposer calls, exact and semantic (docs/CACHING.md)."""

from moa.cache.cache import (
    CacheTicket,
    Hit,
    ProposalCache,
    ResponseCache,
    current_ticket,
    open_cache,
    sampled,
    set_ticket,
)

__all__ = [
    "CacheTicket",
    "Hit",
    "ProposalCache",
    "ResponseCache",
    "current_ticket",
    "open_cache",
    "sampled",
    "set_ticket",
]
