"""Secure by default: whether ``moa serve`` may start open (no API key) on the address it binds."""

from __future__ import annotations

import asyncio
import ipaddress

from moa.config import ConfigError, StateConfig
from moa.state import describe, open_store


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


def check_exposure(cfg: StateConfig, host: str, no_auth: bool) -> str:
    """What to tell the operator about access; raises ``ConfigError`` when the service would be
    open to the network: no key exists, the address is not loopback, and ``--no-auth`` was not given."""
    if asyncio.run(_any_keys(cfg)):
        return f"API keys are required (keys in {describe(cfg)})."
    if is_loopback(host):
        return (
            "No API key exists: the service is OPEN to anyone on this machine. "
            "Create one with `moa keys create NAME` to require keys."
        )
    if no_auth:
        return f"No API key exists and --no-auth was given: the service is OPEN to anyone who reaches {host}."
    raise ConfigError(
        f"refusing to serve on {host} with no API key: anyone who reaches the port could spend your "
        f"provider budget. Create a key (`moa keys create NAME`, state in {describe(cfg)}), or pass "
        "--no-auth to run open on purpose."
    )
