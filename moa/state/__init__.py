"""State that outlives a process and is shared by every replica: API keys and the spend ledger,
and the Batch API's files, batches and leases (``moa.state.batches``).

Two stores implement one protocol: SQLite (the embedded default, a file in the state directory)
and Redis (a cluster: every replica on every node sees the same keys and budgets). Money is
counted in whole micro-dollars so that concurrent reservations add up exactly.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from moa.config import StateConfig
    from moa.state.batches import BatchStore

Period = Literal["day", "month", "total"]
KeyStatus = Literal["active", "disabled", "revoked"]

MICRO = 1_000_000


def to_micro(usd: float) -> int:
    """Dollars to micro-dollars, rounded up: a projection or a charge is never understated."""
    return math.ceil(round(usd * MICRO, 6))


def from_micro(micro: int) -> float:
    return micro / MICRO


def window_of(period: Period, now: float) -> str:
    """The ledger window a spend at ``now`` (Unix seconds) falls in; calendar periods are UTC."""
    if period == "total":
        return "total"
    day = dt.datetime.fromtimestamp(now, dt.UTC)
    return f"day:{day:%Y-%m-%d}" if period == "day" else f"month:{day:%Y-%m}"


class KeyLimits(BaseModel):
    """What one API key may do. ``None`` means unrestricted; an infinite or NaN amount is refused
    (``allow_inf_nan``), never taken as a limit: it would be no limit at all."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    budget_usd: float | None = Field(default=None, ge=0)
    period: Period = "total"
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    presets: tuple[str, ...] | None = None
    models: tuple[str, ...] | None = None
    detail: bool = False
    max_cost_usd: float | None = Field(default=None, gt=0)
    # Requests in progress at once on each replica (None: server.key_concurrency_share of its slots).
    max_concurrent: int | None = Field(default=None, ge=1)
    # The operator's policy: this key's requests with temperature > 0 and no seed may be served
    # from the response cache (as if each said moa.cache_sampled: true).
    cache_sampled: bool = False


class KeyRecord(BaseModel):
    """A key as stored: its SHA-256 hash, never the key itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    name: str
    key_hash: str
    created_at: float
    status: KeyStatus = "active"
    limits: KeyLimits = KeyLimits()


class Reservation(BaseModel):
    """Money set aside for one request until it settles (or its ``expires_at`` passes)."""

    model_config = ConfigDict(frozen=True)

    id: str
    key_id: str
    window: str
    micro: int


class Refused(BaseModel):
    """A reservation that did not fit: what was left of the budget when it was asked."""

    model_config = ConfigDict(frozen=True)

    remaining_micro: int


class KeyExists(ValueError):
    """A key by that name already exists."""


class StateStore(Protocol):
    """Keys and the spend ledger. Every method is safe to call from many replicas at once."""

    @property
    def batches(self) -> BatchStore:
        """The Batch API's records, in the same SQLite file or Redis server."""
        ...

    async def create_key(self, record: KeyRecord) -> None: ...

    async def list_keys(self) -> list[KeyRecord]: ...

    async def key_by_hash(self, key_hash: str) -> KeyRecord | None: ...

    async def key_by_name(self, name: str) -> KeyRecord | None: ...

    async def set_status(self, name: str, status: KeyStatus) -> bool: ...

    async def any_keys(self) -> bool: ...

    async def reserve(
        self, key_id: str, window: str, micro: int, budget_micro: int | None, ttl_s: float
    ) -> Reservation | Refused:
        """Atomically: if settled spend + live reservations + ``micro`` fits the budget, hold it."""
        ...

    async def settle(self, reservation: Reservation, actual_micro: int) -> None:
        """Release the reservation and add what the request really cost. Call it once per reservation."""
        ...

    async def spent(self, key_id: str, window: str) -> int: ...

    async def take_request(self, key_id: str, minute: int, rpm: int | None, tpm: int | None) -> float | None:
        """Count one request in the key's minute; ``None`` if allowed, else seconds to wait."""
        ...

    async def reserve_tokens(self, key_id: str, minute: int, tokens: int, tpm: int) -> float | None:
        """Atomically: hold ``tokens`` (a request's projection) in the key's minute if what the
        minute already counts plus them fits ``tpm``, or if the minute counts nothing yet (a
        request bigger than the whole limit still runs, alone in its minute: the limit is then
        passed by at most one projection). ``None`` if held, else seconds to the minute's end."""
        ...

    async def add_tokens(self, key_id: str, minute: int, tokens: int) -> None:
        """Add ``tokens`` to the key's minute; a negative amount (a settlement below what was
        held) takes them back, never below zero."""
        ...

    async def close(self) -> None: ...


def default_state_dir() -> Path:
    """A per-user data directory: $XDG_DATA_HOME/moa, or ~/.local/share/moa."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "moa"


def state_dir(cfg: StateConfig) -> Path:
    """MOA_STATE_DIR, else the config's ``state.dir``, else the per-user default."""
    chosen = os.environ.get("MOA_STATE_DIR") or cfg.dir
    return Path(chosen).expanduser() if chosen else default_state_dir()


def redis_url(cfg: StateConfig) -> str | None:
    """MOA_REDIS_URL (which may carry a password) wins over ``state.redis_url`` (which may not)."""
    return os.environ.get("MOA_REDIS_URL") or cfg.redis_url


def open_store(cfg: StateConfig) -> StateStore:
    """The store the config names: Redis when a URL is set, else the SQLite file in the state dir."""
    url = redis_url(cfg)
    if url:
        from moa.state.redis_store import RedisStore

        return RedisStore(url, password=os.environ.get("MOA_REDIS_PASSWORD") or None)
    from moa.state.sqlite_store import SQLiteStore

    return SQLiteStore(state_dir(cfg) / "state.db")


def describe(cfg: StateConfig) -> str:
    """Where the state lives, for messages (never a password)."""
    url = redis_url(cfg)
    if url:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        return f"redis://{parts.hostname}:{parts.port or 6379}{parts.path}"
    return str(state_dir(cfg) / "state.db")
