"""Shared fixtures: one provider simulator per test session, reset between tests.

Tests talk to it over loopback with the official SDKs, exactly as production code talks to the real APIs.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from moa.config import MoAConfig, load_config
from moa.simulator.profile import ModelProfile, SimProfile
from moa.simulator.server import SimulatorServer

# Fast enough for a quick suite, slow enough that concurrency and cancellation are observable.
FAST_PROFILE = SimProfile(default=ModelProfile(ttft_s=0.02, tokens_per_s=2000.0, jitter=0.0))


@pytest.fixture(scope="session")
def simulator() -> Iterator[SimulatorServer]:
    with SimulatorServer(FAST_PROFILE) as server:
        yield server


@pytest.fixture
def sim(simulator: SimulatorServer) -> Iterator[SimulatorServer]:
    """The session simulator with counters, faults and profile reset before each test."""
    httpx.post(
        f"{simulator.url}/admin/reset", json={"profile": FAST_PROFILE.model_dump(mode="json")}
    ).raise_for_status()
    yield simulator


@pytest.fixture
def config(sim: SimulatorServer) -> MoAConfig:
    """The bundled default config, pointed at the session simulator."""
    cfg = load_config(None)
    return cfg.model_copy(
        update={"simulator": cfg.simulator.model_copy(update={"url": sim.url, "mode": "on"})}
    )
