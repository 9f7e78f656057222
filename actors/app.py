"""The Ray Serve application, wired from this package's deployments (``build_from_config``): what
``serve run`` and ``serve deploy`` build (``moa_serve_app``), and what ``moa serve`` and the Ray
tools deploy on a Ray instance of their own (``moa_actors.ray_here``).

One deployment per provider (own autoscaling and concurrency; one shared RPM/TPM limiter actor per
provider), the health board and the HTTP ingress; an aggregator deployment when ``serve.fusion``
is ``deployment``. With no API keys in the environment (simulator mode) and no ``simulator.url``
configured, a simulator deployment is added too.

Each deployment class computes its own Serve options from its own slice of the config
(``get_deployment_options``, as Ray Serve's LLM deployments do) and is bound with only the config
it reads: this builder only wires them together.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.deployment import Application

from moa.config import MoAConfig, simulation_active
from moa.simulator.profile import load_profile
from moa_actors.aggregator import AggregatorDeployment
from moa_actors.health_board import HealthBoardDeployment
from moa_actors.ingress import IngressDeployment
from moa_actors.provider import ProviderDeployment
from moa_actors.simulator import SimulatorDeployment


def build_from_config(cfg: MoAConfig) -> Application:
    simulator = None
    if simulation_active(cfg) and not cfg.simulator.url:
        profile = (
            load_profile(cfg.simulator.profile).model_dump(mode="json") if cfg.simulator.profile else None
        )
        simulator = serve.deployment(
            SimulatorDeployment, **SimulatorDeployment.get_deployment_options(cfg.serve.simulator)
        ).bind(profile)

    provider_config = ProviderDeployment.config_slice(cfg)
    providers: dict[str, Any] = {
        name: serve.deployment(
            ProviderDeployment, **ProviderDeployment.get_deployment_options(name, pcfg)
        ).bind(provider_config, name, simulator)
        for name, pcfg in cfg.providers.items()
    }
    board = serve.deployment(
        HealthBoardDeployment, **HealthBoardDeployment.get_deployment_options(cfg.serve.health_board)
    ).bind(**HealthBoardDeployment.config_slice(cfg))
    # The engine and the API read the whole config: the ingress and the aggregator get all of it.
    raw = cfg.model_dump(mode="json")
    aggregator = None
    if cfg.serve.fusion == "deployment":
        aggregator = serve.deployment(
            AggregatorDeployment, **AggregatorDeployment.get_deployment_options(cfg.serve.aggregator)
        ).bind(raw, providers)
    return serve.deployment(IngressDeployment, **IngressDeployment.get_deployment_options(cfg)).bind(
        raw, providers, board, aggregator
    )


# Measured with `moa bench`: about a quarter less orchestration overhead per request (user code on
# Serve's own event loop, gRPC between replicas, direct ingress). Every deployment of the app is
# async. Whoever starts Ray for the app sets it first: Ray's processes inherit it.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
