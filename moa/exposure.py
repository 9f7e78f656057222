"""Secure by default: the service runs open (no API key) only where nobody else can reach it.

Two checks share the rule. ``check_exposure``: ``moa serve`` refuses to start on an address
beyond loopback while no key exists, unless told to run open (``--no-auth``, or
``server.open: true``). ``RequestExposure``: the app itself, however it was started (``moa
serve``, ``serve run``, ``serve deploy``, KubeRay), refuses a request that reached it from
beyond loopback while no key exists, with a 503 and a log line saying how to create one. The
app cannot know how Serve's proxy was bound, and keys may appear (or a flushed Redis lose them)
while it runs, so it decides per request, from the addresses of the connection the request came
on, and from whether a key exists now (as the key check sees it: within ``state.key_cache_s``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from moa.config import ConfigError, StateConfig
from moa.state import describe, open_store

log = logging.getLogger("moa.api")

# The operator's log line is repeated at most this often while requests keep being refused.
LOG_EVERY_S = 60.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _any_keys(cfg: StateConfig) -> bool:
    store = open_store(cfg)
    try:
        return await store.any_keys()
    finally:
        await store.close()


def keys_exist(cfg: StateConfig) -> bool:
    """Whether any API key exists in the state store (then every request needs one). Not from
    inside an event loop."""
    return asyncio.run(_any_keys(cfg))


def check_exposure(cfg: StateConfig, host: str, no_auth: bool, keys: bool | None = None) -> str:
    """What to tell the operator about access; raises ``ConfigError`` when the service would be
    open to the network: no key exists, the address is not loopback, and neither ``--no-auth``
    nor ``server.open`` (``no_auth``) says to run open. ``keys``: whether keys exist, when the
    caller has asked the store already (``keys_exist``)."""
    if keys_exist(cfg) if keys is None else keys:
        return f"API keys are required (keys in {describe(cfg)})."
    if is_loopback(host):
        return (
            "No API key exists: the service is OPEN to anyone on this machine. "
            "Create one with `moa keys create NAME` to require keys."
        )
    if no_auth:
        return (
            "No API key exists and --no-auth (or server.open) was given: the service is OPEN to "
            f"anyone who reaches {host}."
        )
    raise ConfigError(
        f"refusing to serve on {host} with no API key: anyone who reaches the port could spend your "
        f"provider budget. Create a key (`moa keys create NAME`, state in {describe(cfg)}), or pass "
        "--no-auth (or set server.open: true) to run open on purpose."
    )


def _loopback_address(address: Sequence[Any] | None) -> bool:
    """An ASGI ``server`` or ``client`` entry, ``(host, port)``: a loopback IP. Anything else (a
    public or private IP, a Unix socket path, nothing at all) counts as beyond loopback."""
    if not address:
        return False
    host = address[0]
    if not isinstance(host, str):
        return False
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None  # ::ffff:127.0.0.1
    return (mapped or ip).is_loopback


def from_beyond_loopback(server: Sequence[Any] | None, client: Sequence[Any] | None) -> bool:
    """Whether a request came from beyond this machine's loopback: it reached a non-loopback
    address of the server (Serve's proxy or uvicorn bound to 0.0.0.0, a pod IP), or came from a
    non-loopback client. On Ray the proxy passes its own connection's scope to the replica."""
    return not (_loopback_address(server) and _loopback_address(client))


class RequestExposure:
    """The exposure rule at request time (see the module's docstring). ``any_keys`` is the key
    check's own (cached) view; None when the app has no state store, where no key can exist."""

    def __init__(
        self, open_: bool, any_keys: Callable[[], Awaitable[bool]] | None, where: str, admin_api: bool
    ) -> None:
        self.open, self.any_keys, self.where, self.admin_api = open_, any_keys, where, admin_api
        self._logged_at: float | None = None

    async def refusal(self, server: Sequence[Any] | None, client: Sequence[Any] | None) -> str | None:
        """Why this request is refused (the message for the caller), or None to serve it."""
        if self.open or not from_beyond_loopback(server, client):
            return None
        if self.any_keys is not None and await self.any_keys():
            return None  # keys exist: the key check decides
        self._tell_operator(client)
        return (
            "This service has no API key yet, and serves no request from the network until it has "
            "one: its operator must create a key (or set server.open: true to run it open)."
        )

    def _tell_operator(self, client: Sequence[Any] | None) -> None:
        now = time.monotonic()
        if self._logged_at is not None and now - self._logged_at < LOG_EVERY_S:
            return
        self._logged_at = now
        how = f"`moa keys create NAME` with the service's state settings (state in {self.where})"
        if self.admin_api:
            how += ", or POST /admin/keys with MOA_ADMIN_KEY"
        log.warning(
            "refusing requests from beyond loopback with 503: no API key exists. Create one: %s. "
            "Or set server.open: true to serve everyone on purpose. (Repeated at most every %g s.)",
            how,
            LOG_EVERY_S,
            extra={"event": "exposure_refused", "status": 503},
        )
