"""The Ray Serve application, wired from this package's deployments (``build_from_config``): what
``serve run`` and ``serve deploy`` build (``moa_serve_app``), and what ``moa serve`` and the Ray
tools deploy on a Ray instance of their own (``moa_actors.ray_here``).

One deployment per provider (own autoscaling and concurrency; one shared RPM/TPM limiter actor per
provider), the health board and the HTTP ingress; an aggregator deployment when ``serve.fusion``
is ``deployment``. With no API keys in the environment (simulator mode) and no ``simulator.url``
configured, a simulator deployment is added too.

Each deployment class computes its own Serve options from its own typed config
(``get_deployment_options(config)``, as Ray Serve's LLM deployments do) and is bound with that
config and the handles it calls (``moa_actors.options.bind``): this builder only wires them.
The ingress and the aggregator read the whole config; a provider and the health board, a
model of their own holding only what they read.
"""

from __future__ import annotations

from ray.serve.deployment import Application

from moa.config import MoAConfig, simulation_active
from moa_actors.aggregator import AggregatorDeployment
from moa_actors.health_board import HealthBoardConfig, HealthBoardDeployment
from moa_actors.ingress import IngressDeployment
from moa_actors.options import bind
from moa_actors.provider import ProviderDeployment, ProviderReplicaConfig
from moa_actors.simulator import SimulatorDeployment, SimulatorDeploymentConfig


def build_from_config(cfg: MoAConfig) -> Application:
    simulator = None
    if simulation_active(cfg) and not cfg.simulator.url:
        simulator = bind(SimulatorDeployment, SimulatorDeploymentConfig.of(cfg))
    providers = {
        name: bind(ProviderDeployment, ProviderReplicaConfig.of(cfg, name), simulator)
        for name in cfg.providers
    }
    board = bind(HealthBoardDeployment, HealthBoardConfig.of(cfg))
    aggregator = bind(AggregatorDeployment, cfg, providers) if cfg.serve.fusion == "deployment" else None
    return bind(IngressDeployment, cfg, providers, board, aggregator)


# Measured with `moa bench`: about a quarter less orchestration overhead per request (user code on
# Serve's own event loop, gRPC between replicas, direct ingress). Every deployment of the app is
# async. Whoever starts Ray for the app sets it first: Ray's processes inherit it.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
