"""API keys the OpenAI way: ``Authorization: Bearer sk-...``.

Keys are random, shown once, and stored only as their SHA-256 hash. Each replica keeps the records
it looked up for ``state.key_cache_s`` (1 s by default): a revoked key stops working on every
replica within that time, and a request costs no store round trip for its key most of the time.
Nothing here ever logs, traces or echoes a key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from moa.errors import MoAError
from moa.plan import Plan
from moa.result import RouteDecision
from moa.state import KeyLimits, KeyRecord, StateStore

KEY_PREFIX = "sk-moa-"
# Unknown keys are cached too (so a flood of bad keys does not reach the store), up to this many.
CACHE_ENTRIES = 10_000


class InvalidApiKey(MoAError):
    status_code = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(MoAError):
    status_code = 403
    error_type = "permission_error"
    code = "permission_denied"

    def __init__(self, message: str, param: str = "model") -> None:
        super().__init__(message)
        self.param = param


class KeyRateLimited(MoAError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InsufficientQuota(MoAError):
    status_code = 429
    error_type = "insufficient_quota"
    code = "insufficient_quota"


def new_key() -> str:
    """A fresh key: ``sk-moa-`` and 256 random bits."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_record(name: str, key: str, limits: KeyLimits) -> KeyRecord:
    return KeyRecord(
        id=uuid.uuid4().hex[:12], name=name, key_hash=hash_key(key), created_at=time.time(), limits=limits
    )


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's record, or nobody (the service runs open: no key exists)."""

    key: KeyRecord | None

    @property
    def label(self) -> str:
        """For metrics, traces and logs: the key's name, never the key."""
        return self.key.name if self.key else ""

    @property
    def limits(self) -> KeyLimits:
        return self.key.limits if self.key else KeyLimits(detail=True)

    def check_model(self, requested: str, is_preset: bool) -> None:
        """The request's ``model`` field: a preset must be among the key's presets; a direct model
        call is allowed by a key limited to presets only when its models list names it (the
        models of whatever plan runs are checked after routing by ``check_plan``)."""
        lim = self.limits
        if is_preset:
            if lim.presets is not None and requested not in lim.presets:
                raise PermissionDenied(f"this key may not use the preset {requested!r}")
        elif lim.presets is not None and (lim.models is None or requested not in lim.models):
            raise PermissionDenied(f"this key may not call the model {requested!r} directly")

    def check_plan(self, plan: Plan, param: str = "model") -> None:
        """Every model a plan may call must be allowed (for ``auto``, checked after routing)."""
        allowed = self.limits.models
        if allowed is None:
            return
        refused = sorted({f"{p}/{m}" for p, m in plan.model_refs()} - set(allowed))
        if refused:
            raise PermissionDenied(f"this key may not use the model(s) {', '.join(refused)}", param)

    def allows(self, decision: RouteDecision, plan: Plan) -> bool:
        """Whether the key may run ``plan`` as ``decision`` chose it: a routed (``auto``) preset
        must be among its presets too (a preset it asked for by name was checked by
        ``check_model``), and every model among its models."""
        lim = self.limits
        if not decision.forced and lim.presets is not None and decision.preset not in lim.presets:
            return False
        return lim.models is None or set(f"{p}/{m}" for p, m in plan.model_refs()) <= set(lim.models)

    def check_routed(self, plan: Plan, decision: RouteDecision, param: str = "model") -> None:
        """The plan that will run, after routing (and any move to a cheaper tier): 403 naming the
        preset ``auto`` chose if the key may not use it, or the models it may not call."""
        presets = self.limits.presets
        if not decision.forced and presets is not None and decision.preset not in presets:
            raise PermissionDenied(
                f"auto routed this request to the preset {decision.preset!r}, which this key may not "
                f"use, and no cheaper tier it may use can answer it (its presets: {', '.join(presets)})",
                param,
            )
        self.check_plan(plan, param)

    def check_custom_plan(self) -> None:
        if self.limits.presets is not None:
            raise PermissionDenied("this key may only use its presets, not an explicit plan", "plan")

    def check_detail(self, detail: bool) -> None:
        if detail and not self.limits.detail:
            raise PermissionDenied("this key may not ask for moa.detail", "moa.detail")


class Authenticator:
    """Turns an Authorization header into a ``Principal``, or raises ``InvalidApiKey``."""

    def __init__(
        self, store: StateStore, cache_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.store = store
        self.cache_s = cache_s
        self.clock = clock
        self._records: OrderedDict[str, tuple[float, KeyRecord | None]] = OrderedDict()
        self._any: tuple[float, bool] | None = None

    def forget(self) -> None:
        """Drop every cached record: this replica sees a key change it made at once (the others
        within ``cache_s``)."""
        self._records.clear()
        self._any = None

    async def any_keys(self) -> bool:
        if self._any is not None and self._any[1]:
            return True  # keys are never deleted (only revoked): once any exists, auth is for good
        now = self.clock()
        if self._any is None or now - self._any[0] > self.cache_s:
            self._any = (now, await self.store.any_keys())
        return self._any[1]

    async def _lookup(self, key_hash: str) -> KeyRecord | None:
        now = self.clock()
        hit = self._records.get(key_hash)
        if hit is not None and now - hit[0] <= self.cache_s:
            return hit[1]
        record = await self.store.key_by_hash(key_hash)
        self._records[key_hash] = (now, record)
        self._records.move_to_end(key_hash)
        while len(self._records) > CACHE_ENTRIES:
            self._records.popitem(last=False)
        return record

    async def authenticate(self, authorization: str | None) -> Principal:
        if not await self.any_keys():
            return Principal(None)  # no key exists: the service runs open (and said so at start)
        scheme, _, key = (authorization or "").partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise InvalidApiKey(
                "You didn't provide an API key. Send it in the Authorization header: "
                "'Authorization: Bearer sk-...'."
            )
        digest = hash_key(key)
        record = await self._lookup(digest)
        # The lookup is by hash; the comparison that decides is constant-time all the same.
        if record is None or not hmac.compare_digest(record.key_hash, digest):
            raise InvalidApiKey("Incorrect API key provided.")
        if record.status != "active":
            raise InvalidApiKey(f"This API key has been {record.status}.")
        return Principal(record)

    async def authenticate_hash(self, key_hash: str) -> Principal:
        """The key whose hash is ``key_hash``, for a request the service sends as it (a Batch API
        batch's, as the key that created it): refused as the key itself would be once it is
        revoked or disabled."""
        if not await self.any_keys():
            return Principal(None)
        record = await self._lookup(key_hash)
        if record is None:
            raise InvalidApiKey("The API key that created this batch no longer exists.")
        if record.status != "active":
            raise InvalidApiKey(f"This API key has been {record.status}.")
        return Principal(record)


def parse_list(values: Iterable[str] | None) -> tuple[str, ...] | None:
    """``--presets a,b --presets c`` -> ("a", "b", "c"); nothing given -> unrestricted."""
    if not values:
        return None
    return tuple(dict.fromkeys(v.strip() for item in values for v in item.split(",") if v.strip()))
