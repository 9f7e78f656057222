"""Admission control: how many requests a replica runs at once, how many of them one API key
may hold, and the refusal of every new request once the service drains."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from moa.api.errors import ApiError, moa_error
from moa.auth import Principal
from moa.errors import ShuttingDown


class Admission:
    """Admission control: at most ``limit`` requests in progress; past it, 429 at once. Once the
    service drains, every new request gets 503 at once.

    Each API key may hold at most its ``max_concurrent`` of them (by default ``key_share`` of
    ``limit``), so one key cannot take every slot. Counted here, per replica, like the slots
    themselves: it is their share that is protected, it costs no state-store round trip, and a
    replica that dies takes its counts with it (a cluster-wide count in the store would need
    expiring leases, and a leaked one would block its key until it expired). A key may so hold
    its limit on each replica at once."""

    def __init__(
        self, limit: int, key_share: float = 1.0, on_shed: Callable[[str], None] | None = None
    ) -> None:
        self.limit = limit
        # Told the code of every refusal: a shed request never reaches the request metrics.
        self._on_shed = on_shed or (lambda _: None)
        self.per_key = max(1, int(limit * key_share))
        self.in_flight = 0
        self.draining = False
        self._by_key: dict[str, int] = {}
        self._changed: asyncio.Event | None = None  # set when the count drops, while drained

    def take(self, principal: Principal | None = None) -> Slot:
        try:
            return self._take(principal)
        except ApiError as err:
            self._on_shed(err.code or "refused")
            raise

    def _take(self, principal: Principal | None) -> Slot:
        if self.draining:
            raise moa_error(ShuttingDown("the service is shutting down; retry shortly"))
        key = principal.key if principal is not None else None
        if key is not None:
            self._check_key(key.id, key.limits.max_concurrent)
        if self.in_flight >= self.limit:
            err = ApiError(429, "the service is at capacity; retry shortly", "rate_limit_error", "overloaded")
            err.headers["Retry-After"] = "1"
            raise err
        self.in_flight += 1
        if key is None:
            return Slot(self)
        self._by_key[key.id] = self._by_key.get(key.id, 0) + 1
        return Slot(self, key.id)

    def has_room(self, principal: Principal | None = None) -> bool:
        """Whether ``take`` would admit a request of ``principal`` now (a batch request waits
        for this rather than be refused)."""
        if self.draining or self.in_flight >= self.limit:
            return False
        key = principal.key if principal is not None else None
        return key is None or self._by_key.get(key.id, 0) < (key.limits.max_concurrent or self.per_key)

    def _check_key(self, key_id: str, own: int | None) -> None:
        """429 ``concurrency_limit_exceeded`` if the key already holds its share of the slots."""
        limit = own or self.per_key
        if self._by_key.get(key_id, 0) < limit:
            return
        why = "its max_concurrent" if own else "server.key_concurrency_share of this replica's slots"
        err = ApiError(
            429,
            f"This API key already has {limit} requests in progress on this replica, its limit "
            f"({why}); retry when one of them ends.",
            "rate_limit_error",
            "concurrency_limit_exceeded",
        )
        err.headers["Retry-After"] = "1"
        raise err

    def released(self, key_id: str | None = None) -> None:
        self.in_flight -= 1
        if key_id is not None:
            left = self._by_key.pop(key_id) - 1
            if left:
                self._by_key[key_id] = left
        if self._changed is not None:
            self._changed.set()

    async def wait_idle(self, within_s: float, hurry: asyncio.Event) -> bool:
        """Wait until no request is in progress (True), ``within_s`` passes or ``hurry`` is set."""
        loop = asyncio.get_running_loop()
        end = loop.time() + within_s
        while self.in_flight and not hurry.is_set() and loop.time() < end:
            self._changed = changed = asyncio.Event()
            waiters = [asyncio.ensure_future(changed.wait()), asyncio.ensure_future(hurry.wait())]
            try:
                await asyncio.wait(waiters, timeout=end - loop.time(), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                self._changed = None
        return self.in_flight == 0


class Slot:
    """One admitted request's place. Releasing is idempotent, so every owner may release it."""

    def __init__(self, admission: Admission, key_id: str | None = None) -> None:
        self._admission: Admission | None = admission
        self._key_id = key_id
        self._then: list[Callable[[], None]] = []

    def then(self, also: Callable[[], None]) -> Slot:
        """``also`` is called once, when the slot is released: another place the request holds
        for as long (a batch request's turn at the batch gate)."""
        self._then.append(also)
        return self

    def release(self) -> None:
        if self._admission is not None:
            self._admission.released(self._key_id)
            self._admission = None
            for also in self._then:
                also()
