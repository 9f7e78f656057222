"""Which requests are background work: a client marks its own (``x-moa-priority: batch``, as
``moa batch run`` does when it sends to a service), and the Batch API's requests are (the worker
marks them in the ASGI scope, ``BATCH_WORKER_SCOPE``, which no client can set).

For such a request the middleware sets ``moa.caller.BACKGROUND`` for as long as the app serves
it, its stream included, so every call it makes is marked: the providers' limits give it only
what is spare above the share kept for interactive calls (``limits.interactive_reserve``). A
client-marked request also waits for its turn at the replica's batch gate before it takes a slot
(``moa.api.serving.Api.prepare``): the Batch API's ``batch.concurrency`` and ``batch.yield_at``
bound it as they bound the service's own batches. Marking a request only ever lowers it, so any
client may; ``interactive`` (or no header) is every other request. Any other value is a 400,
rather than a mark silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moa.api.errors import ApiError, error_response
from moa.caller import background_work

PRIORITY_HEADER = "x-moa-priority"
PRIORITIES = ("interactive", "batch")
# Set by the Batch API's worker on each request it sends to its own app (``as_key``).
BATCH_WORKER_SCOPE = "moa.batch_worker"


def priority_of(scope: Mapping[str, Any]) -> str | None:
    """The request's ``x-moa-priority``, lower-cased, or None without one."""
    wanted = PRIORITY_HEADER.encode()
    for name, value in scope.get("headers", ()):
        if name.lower() == wanted:
            return str(value.decode("latin-1").strip().lower())
    return None


def client_marked_batch(scope: Mapping[str, Any]) -> bool:
    """A request its client sent as batch work (not the Batch API's own, already gated)."""
    return priority_of(scope) == "batch" and not scope.get(BATCH_WORKER_SCOPE)


class PriorityMiddleware:
    """Sets ``BACKGROUND`` around the requests that are background work; 400 for a priority it
    does not know."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        priority = priority_of(scope)
        if priority is not None and priority not in PRIORITIES:
            err = ApiError(
                400,
                f"{PRIORITY_HEADER} is interactive or batch, not {priority!r}",
                "invalid_request_error",
                "invalid_priority",
                PRIORITY_HEADER,
            )
            await error_response(err)(scope, receive, send)
            return
        with background_work(priority == "batch" or bool(scope.get(BATCH_WORKER_SCOPE))):
            await self.app(scope, receive, send)
