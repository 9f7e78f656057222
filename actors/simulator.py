"""The provider simulator as a deployment, for clusters with no API keys: it listens on its node's
address so provider replicas on any node can reach it."""

from __future__ import annotations

from typing import Any

import ray

from moa.config import DeploymentOptions
from moa.simulator.profile import SimProfile
from moa.simulator.server import SimulatorServer
from moa_actors.options import serve_options


class SimulatorDeployment:
    """Bound with the simulator profile only (latencies, faults), as plain data."""

    @classmethod
    def get_deployment_options(cls, opts: DeploymentOptions) -> dict[str, Any]:
        """Its Serve options from ``serve.simulator``."""
        return {"name": "simulator", **serve_options(opts, default_max_ongoing=1000)}

    def __init__(self, profile: dict[str, Any] | None = None) -> None:
        sim_profile = SimProfile.model_validate(profile) if profile else SimProfile()
        self.server = SimulatorServer(sim_profile, host=ray.util.get_node_ip_address(), port=0)
        self.server.start()

    def url(self) -> str:
        return self.server.url

    def __del__(self) -> None:
        self.server.stop()
