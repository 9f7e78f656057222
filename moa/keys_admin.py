"""Managing API keys: one implementation for ``moa keys`` and the admin HTTP API (``/admin/keys``).

Both create, list, disable, enable and revoke keys through these functions, so a key made one way
behaves exactly like a key made the other. A new key is returned once, by ``create_key``; listing
shows a key's name, limits, spend and status, never the key or its hash.
"""

from __future__ import annotations

import datetime as dt
import hmac
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from moa.auth import new_key, new_record, parse_list
from moa.state import KeyLimits, KeyRecord, KeyStatus, StateStore, window_of

ADMIN_KEY_ENV = "MOA_ADMIN_KEY"
# An admin key guards every key and budget: a short one is refused rather than trusted.
ADMIN_KEY_MIN_CHARS = 24

# The verbs both front ends offer, and the status each leaves a key in.
VERBS: dict[str, KeyStatus] = {"revoke": "revoked", "disable": "disabled", "enable": "active"}


class NewKey(BaseModel):
    """What a new key may do: ``moa keys create`` options, or the admin API's request body."""

    # An infinite budget or cap would be an unlimited key under a limited-looking name.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
    budget_usd: float | None = Field(default=None, ge=0)
    period: Literal["day", "month", "total"] = "total"
    rpm: int | None = Field(default=None, ge=1)
    tpm: int | None = Field(default=None, ge=1)
    presets: list[str] | None = None
    models: list[str] | None = None
    detail: bool = False
    max_cost_usd: float | None = Field(default=None, gt=0)
    max_concurrent: int | None = Field(default=None, ge=1)
    cache_sampled: bool = False

    def limits(self) -> KeyLimits:
        return KeyLimits(
            budget_usd=self.budget_usd,
            period=self.period,
            rpm=self.rpm,
            tpm=self.tpm,
            presets=parse_list(self.presets),
            models=parse_list(self.models),
            detail=self.detail,
            max_cost_usd=self.max_cost_usd,
            max_concurrent=self.max_concurrent,
            cache_sampled=self.cache_sampled,
        )


async def create_key(store: StateStore, spec: NewKey) -> tuple[str, KeyRecord]:
    """Store a new key's record (its hash) and return the key, the only time it exists in full.

    Raises ``KeyExists`` when the name is taken."""
    key = new_key()
    record = new_record(spec.name, key, spec.limits())
    await store.create_key(record)
    return key, record


@dataclass(frozen=True)
class StatusChange:
    """The outcome of a revoke, disable or enable: ``ok``, or why not (``missing``, ``revoked``)."""

    outcome: Literal["ok", "missing", "revoked"]
    record: KeyRecord | None

    @property
    def reason(self) -> str:
        return {"ok": "", "missing": "does not exist", "revoked": "is revoked (final)"}[self.outcome]


async def change_status(store: StateStore, name: str, verb: str) -> StatusChange:
    if await store.set_status(name, VERBS[verb]):
        return StatusChange("ok", await store.key_by_name(name))
    known = await store.key_by_name(name)
    return StatusChange("revoked" if known is not None else "missing", known)


def key_row(k: KeyRecord, spent_micro: int) -> dict[str, Any]:
    """One key as listed: never the key or its hash."""
    return {
        "name": k.name,
        "id": k.id,
        "created": dt.datetime.fromtimestamp(k.created_at, dt.UTC).isoformat(timespec="seconds"),
        "spent_usd": spent_micro / 1_000_000,
        "limits": k.limits.model_dump(mode="json"),
        "status": k.status,
    }


async def spent_now(store: StateStore, k: KeyRecord, now: float | None = None) -> int:
    return await store.spent(k.id, window_of(k.limits.period, time.time() if now is None else now))


async def key_rows(store: StateStore, now: float | None = None) -> list[dict[str, Any]]:
    """What ``moa keys list`` and ``GET /admin/keys`` show of each key."""
    return [key_row(k, await spent_now(store, k, now)) for k in await store.list_keys()]


def admin_key_matches(expected: str, authorization: str | None) -> bool:
    """``Authorization: Bearer <admin key>``, compared in constant time (hashes of both sides, so
    not even the length of the admin key shows in the time a refusal takes)."""
    import hashlib

    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    digest = hashlib.sha256(given.strip().encode()).digest()
    return hmac.compare_digest(digest, hashlib.sha256(expected.encode()).digest()) and bool(given.strip())


__all__ = [
    "ADMIN_KEY_ENV",
    "NewKey",
    "StatusChange",
    "admin_key_matches",
    "change_status",
    "create_key",
    "key_rows",
]
