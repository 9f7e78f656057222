"""The provider simulator as a deployment, for clusters with no API keys: it listens on its node's
address so provider replicas on any node can reach it."""

from __future__ import annotations

from typing import Any

import ray
from pydantic import BaseModel, Field

from moa.config import DeploymentOptions, MoAConfig
from moa.simulator.profile import SimProfile, load_profile
from moa.simulator.server import SimulatorServer
from moa_actors.options import serve_options


class SimulatorDeploymentConfig(BaseModel):
    """What the simulator deployment is bound with: the simulator profile and its own scheduling."""

    profile: SimProfile = Field(
        default_factory=SimProfile, description="Latencies and faults: simulator.profile's file, loaded."
    )
    deployment: DeploymentOptions = Field(description="Its Serve options (serve.simulator).")

    @classmethod
    def of(cls, cfg: MoAConfig) -> SimulatorDeploymentConfig:
        """Reads ``simulator.profile``'s file where the app is built, so a replica on any node needs
        none."""
        profile = load_profile(cfg.simulator.profile) if cfg.simulator.profile else SimProfile()
        return cls(profile=profile, deployment=cfg.serve.simulator)


class SimulatorDeployment:
    """Bound with ``SimulatorDeploymentConfig``."""

    @classmethod
    def get_deployment_options(cls, config: SimulatorDeploymentConfig) -> dict[str, Any]:
        """Its Serve options from ``serve.simulator``."""
        return {"name": "simulator", **serve_options(config.deployment, default_max_ongoing=1000)}

    def __init__(self, config: SimulatorDeploymentConfig) -> None:
        self.server = SimulatorServer(config.profile, host=ray.util.get_node_ip_address(), port=0)
        self.server.start()

    def url(self) -> str:
        return self.server.url

    def __del__(self) -> None:
        self.server.stop()
