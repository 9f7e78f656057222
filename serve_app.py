"""The Ray Serve application: ``serve run serve_app:build_app config=PATH``.

One deployment per provider (own autoscaling and concurrency; one shared RPM/TPM limiter actor per
provider), the router and the HTTP ingress; an aggregator deployment when ``serve.fusion`` is
``deployment``. With no API keys in the environment
(simulator mode) and no ``simulator.url`` configured, a simulator deployment is added too.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import DeploymentActorConfig
from ray.serve.deployment import Application

from actors.aggregator import AggregatorDeployment
from actors.handles import deployment_name
from actors.ingress import IngressDeployment
from actors.limiter import LIMITER_NAME, RateLimiterActor
from actors.provider import ProviderDeployment
from actors.router import RouterDeployment
from actors.simulator import SimulatorDeployment
from moa.config import MoAConfig, load_config, simulation_active
from moa.simulator.profile import load_profile


def build_app(args: dict[str, str] | None = None) -> Application:
    """Serve's application builder; ``args`` may name ``config`` (a YAML path)."""
    args = args or {}
    return build_from_config(load_config(args.get("config")))


def build_from_config(cfg: MoAConfig) -> Application:
    raw = cfg.model_dump(mode="json")
    simulator = None
    if simulation_active(cfg) and not cfg.simulator.url:
        profile = (
            load_profile(cfg.simulator.profile).model_dump(mode="json") if cfg.simulator.profile else None
        )
        sim_opts = cfg.serve.simulator.serve_options(default_max_ongoing=1000)
        simulator = serve.deployment(SimulatorDeployment, name="simulator", **sim_opts).bind(profile)

    providers: dict[str, Any] = {}
    for name, pcfg in cfg.providers.items():
        opts = pcfg.deployment.serve_options(default_max_ongoing=2 * pcfg.limits.concurrency)
        actors = []
        if pcfg.limits.rpm or pcfg.limits.tpm:
            actors.append(
                DeploymentActorConfig(
                    name=LIMITER_NAME,
                    actor_class=RateLimiterActor,
                    init_kwargs={"rpm": pcfg.limits.rpm, "tpm": pcfg.limits.tpm},
                    actor_options={"num_cpus": 0.01},
                )
            )
        providers[name] = serve.deployment(
            ProviderDeployment, name=deployment_name(name), deployment_actors=actors, **opts
        ).bind(raw, name, simulator)

    # The ingress polls the health board every 0.5 s and each provider replica reports to it every
    # 2 s: access lines for those calls would bury everything else in its log.
    router = serve.deployment(
        RouterDeployment,
        name="router",
        logging_config={"enable_access_log": False},
        **cfg.serve.router.serve_options(1000),
    ).bind(raw, providers)
    aggregator = None
    if cfg.serve.fusion == "deployment":
        aggregator = serve.deployment(
            AggregatorDeployment, name="aggregator", **cfg.serve.aggregator.serve_options(1000)
        ).bind(raw, providers)
    ingress_opts = cfg.serve.ingress.serve_options(
        default_max_ongoing=cfg.server.max_concurrent_requests + 16
    )
    return serve.deployment(IngressDeployment, name="ingress", **ingress_opts).bind(
        raw, providers, router, aggregator
    )


# Measured with `moa bench`: about a quarter less orchestration overhead per request (user code on
# Serve's own event loop, gRPC between replicas, direct ingress). Every deployment here is async.
THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def start_local(
    cfg: MoAConfig, host: str, port: int, num_cpus: float | None = None, quiet: bool = True
) -> str:
    """A local Ray instance with the app deployed; returns the base URL. ``stop_local`` ends it."""
    import os

    import ray

    for key, value in THROUGHPUT_ENV.items():
        os.environ.setdefault(key, value)  # set before Ray starts: its processes inherit it
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_from_config(cfg), name="moa", route_prefix="/")
    return f"http://{host}:{port}"


def stop_local() -> None:
    import ray

    serve.shutdown()
    ray.shutdown()


def run_local(
    cfg: MoAConfig, host: str, port: int, num_cpus: float | None = None, quiet: bool = True
) -> None:
    """``moa serve``: a local Ray instance, the app deployed, until Ctrl-C; then a clean shutdown."""
    import signal
    import threading

    simulated = simulation_active(cfg) and not cfg.simulator.url
    try:
        url = start_local(cfg, host, port, num_cpus, quiet)
        print(f"MoA service ready at {url}  (OpenAI-compatible: {url}/v1)", flush=True)
        if simulated:
            print(
                "No provider API key is set: every provider is the built-in simulator; answers are synthetic."
            )
        print(f"  curl {url}/v1/models")
        print(f"  OpenAI(base_url='{url}/v1', api_key='unused').chat.completions.create(model='moa', ...)")
        print("Press Ctrl-C to stop.", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
        print("Shutting down...", flush=True)
    finally:
        stop_local()
