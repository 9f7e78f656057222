"""Where a batch sends its requests: the API app in this process, or a running service.

Both go through the API as any client does (``httpx`` with an ASGI transport in-process, over HTTP
otherwise), so every item meets the same checks, keys, budgets and caps, and its output line holds
exactly the response the API gives.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from moa.batch.runner import Reply, SendFailed
from moa.config import MoAConfig
from moa.local import local_app
from moa.state import StateStore


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


def _headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


@contextlib.asynccontextmanager
async def service_sender(url: str, api_key: str | None, timeout_s: float) -> AsyncIterator[ServiceSender]:
    """Requests to the service at ``url`` (``moa serve``, on Ray or not)."""
    async with httpx.AsyncClient(base_url=url, headers=_headers(api_key), timeout=timeout_s) as client:
        yield ServiceSender(client)


@contextlib.asynccontextmanager
async def in_process_sender(
    cfg: MoAConfig, api_key: str | None, store: Callable[[], StateStore] | None = None
) -> AsyncIterator[ServiceSender]:
    """Requests to the API app built here, over the in-process provider pool (no server, no
    port); with a ``store``, keys and budgets apply as on ``moa serve --local``."""
    async with local_app(cfg, store) as app:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            # A loopback address, as a client on this machine has: the service's exposure rule
            # serves loopback without keys (moa.exposure), and this is the operator's own process.
            transport=transport,
            base_url="http://127.0.0.1",
            headers=_headers(api_key),
            timeout=None,
        ) as client:
            yield ServiceSender(client)
