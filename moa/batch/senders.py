"""Where a batch sends its requests: through the API as any client does, with one ``httpx``
client whose transport decides where to (a running service over HTTP, or an API app in this
process through an ASGI transport: ``moa batch run``'s own app, or the service's app running the
Batch API's batches), so every item meets the same checks, keys, budgets and caps, and its output
line holds exactly the response the API gives.

This package never builds an API app itself: the API imports it (the Batch API runs its batches
with it), so the in-process app of ``moa batch run`` is built above both (``moa.cli.batch_run``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx

from moa.batch.runner import Reply, SendFailed


class ServiceNotFound(Exception):
    """No service to send a batch to where the command was told to look: the message says why."""


@dataclass(frozen=True)
class FoundService:
    """The moa app found on a Ray cluster (``moa batch run --address``): where its requests go."""

    url: str  # the app's base URL on a Serve HTTP proxy of the cluster
    app: str  # the Serve application's name
    nodes: int  # the cluster's live nodes, for the command to say where the work runs


class ServiceSender:
    """Sends a batch's requests with one ``httpx`` client (its transport decides where to)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def send(self, url: str, body: dict[str, Any]) -> Reply:
        try:
            response = await self.client.post(url, json=body)
        except httpx.TimeoutException as e:
            raise SendFailed("timeout", f"no response within the timeout ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise SendFailed("connection_error", f"{type(e).__name__}: {e}") from None
        try:
            answer: Any = response.json()
        except ValueError:
            answer = {"error": {"code": "not_json", "message": response.text[:500]}}
        return Reply(response.status_code, answer, dict(response.headers))


# A batch's requests are background work on a service (``moa.api.priority``): they wait for the
# interactive load at its batch gate, and their calls take only the providers' spare capacity.
BATCH_PRIORITY = {"x-moa-priority": "batch"}


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


@contextlib.asynccontextmanager
async def service_sender(url: str, api_key: str | None, timeout_s: float) -> AsyncIterator[ServiceSender]:
    """Requests to the service at ``url`` (``moa serve``, on Ray or not), each marked as batch
    work: the service's interactive requests go first."""
    headers = auth_headers(api_key) | BATCH_PRIORITY
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s) as client:
        yield ServiceSender(client)
