"""Deployment files checked against Ray's own schemas, without starting anything."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from moa.config import ConfigError, SimulatorMode, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
OTEL_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT="

pytest.importorskip("ray")


def _cluster() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _validate_cluster(config: dict[str, Any]) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(config)))


def test_cluster_yaml_validates_against_rays_schema() -> None:
    _validate_cluster(_cluster())


@pytest.mark.parametrize(
    "breakage",
    [
        lambda c: c.update(unknown_top_level_key=1),
        lambda c: c.update(max_workers="ten"),
        lambda c: c["available_node_types"]["head"].update(min_workers=[0]),
    ],
)
def test_a_broken_cluster_yaml_is_rejected(breakage: Any) -> None:
    import jsonschema

    config = _cluster()
    breakage(config)
    with pytest.raises(jsonschema.ValidationError):
        _validate_cluster(config)


def test_every_node_starts_ray_with_the_otel_endpoint() -> None:
    config = _cluster()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        assert OTEL_ENDPOINT in start and "OTEL_SERVICE_NAME=moa" in start
        assert start.index(OTEL_ENDPOINT) < start.index("ray start")
    assert {"head", "cpu_provider_workers", "gpu_proposer_workers"} <= set(config["available_node_types"])
    assert config["available_node_types"]["gpu_proposer_workers"]["min_workers"] == 0
    assert any("pip install" in cmd and "moa[serve]" in cmd for cmd in config["setup_commands"])


def _serve_schema(text: str) -> Any:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(yaml.safe_load(text))


def _deployment_names() -> set[str]:
    from moa_actors.health_board import HEALTH_BOARD_NAME

    cfg = load_config(None)
    return {"ingress", HEALTH_BOARD_NAME, "aggregator", *(f"provider-{p}" for p in cfg.providers)}


def test_serve_config_parses_and_names_real_deployments() -> None:
    schema = _serve_schema((ROOT / "serve_config.yaml").read_text())
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    import importlib

    assert callable(getattr(importlib.import_module(module), attr))
    assert {d.name for d in app.deployments} <= _deployment_names()
    env = app.runtime_env["env_vars"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http") and not any("API_KEY" in k for k in env)


def test_kuberay_manifest() -> None:
    manifest = yaml.safe_load((ROOT / "kuberay" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    (app,) = _serve_schema(manifest["spec"]["serveConfigV2"]).applications
    assert {d.name for d in app.deployments} <= _deployment_names()
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    secret_vars = {e["name"] for e in head["env"] if "valueFrom" in e}
    providers = {p.api_key_env for p in load_config(None).providers.values()}
    assert secret_vars == providers | {"MOA_REDIS_PASSWORD", "MOA_ADMIN_KEY"}
    # Every pod, head and workers alike, reaches the one state store.
    groups = [head] + [
        g["template"]["spec"]["containers"][0]
        for g in manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    ]
    for container in groups:
        env = {e["name"]: e for e in container["env"]}
        _assert_state_url(env["MOA_REDIS_URL"]["value"])
        assert "secretKeyRef" in env["MOA_REDIS_PASSWORD"]["valueFrom"]


def _assert_state_url(url: str) -> None:
    """A Redis URL the service accepts as ``state.redis_url``: no password in it."""
    from urllib.parse import urlsplit

    from moa.config import StateConfig

    assert urlsplit(url).scheme == "redis" and urlsplit(url).password is None, url
    assert StateConfig(redis_url=url).redis_url == url


def test_every_node_and_the_serve_app_use_the_redis_state_store() -> None:
    """On a cluster the keys and the spend ledger must be shared: each file names the Redis store
    (the environment's ``state.redis_url``), and its password only ever comes from a secret."""
    config = _cluster()
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(config[key])
        (url,) = re.findall(r"MOA_REDIS_URL=(\S+)", start)
        _assert_state_url(url)
        assert start.index("MOA_REDIS_URL=") < start.index("ray start")
        assert "moa-keys.env" in start and "MOA_REDIS_PASSWORD=" not in start  # from the secret
    app = _serve_schema((ROOT / "serve_config.yaml").read_text()).applications[0]
    env = app.runtime_env["env_vars"]
    _assert_state_url(env["MOA_REDIS_URL"])
    assert "MOA_REDIS_PASSWORD" not in env and "MOA_ADMIN_KEY" not in env
    for name in ("cluster.yaml", "serve_config.yaml", "kuberay/rayservice.yaml"):
        text = (ROOT / name).read_text()
        assert not re.search(r"redis://[^/\s]*:[^@/\s]*@", text), name  # no redis://user:pass@


def test_no_file_holds_anything_like_a_key() -> None:
    pattern = re.compile(r"(sk-[A-Za-z0-9_-]{16,}|AIza[0-9A-Za-z_-]{30,}|sk-ant-[A-Za-z0-9_-]{10,})")
    for name in (
        "cluster.yaml",
        "serve_config.yaml",
        "serve_config.local.yaml",
        "kuberay/rayservice.yaml",
        "moa/default_config.yaml",
    ):
        assert not pattern.search((ROOT / name).read_text()), name


def test_each_deployment_is_bound_with_its_own_slice_of_the_config() -> None:
    """The builder only wires: each deployment class computes its own Serve options, and a provider
    or the health board is bound with the part of the config it reads, not the whole of it."""
    from moa_actors.app import build_from_config
    from moa_actors.health_board import HEALTH_BOARD_NAME, HealthBoardConfig
    from moa_actors.provider import CONFIG_SECTIONS, ProviderReplicaConfig

    cfg = load_config(None)
    cfg.serve.fusion = "deployment"
    ingress = build_from_config(cfg)._bound_deployment
    config, providers, board, aggregator = ingress.init_args
    assert ingress.name == "ingress" and config.model_dump(mode="json") == cfg.model_dump(mode="json")
    assert ingress.max_ongoing_requests == cfg.server.max_concurrent_requests + 16
    for name, app in providers.items():
        provider = app._bound_deployment
        (bound, _simulator) = provider.init_args
        assert isinstance(bound, ProviderReplicaConfig)
        assert provider.name == f"provider-{name}" and bound.name == name
        assert set(bound.model_dump()) - {"name"} == set(CONFIG_SECTIONS)
        assert provider.max_ongoing_requests == 2 * cfg.providers[name].limits.concurrency
    health = board._bound_deployment
    assert health.name == HEALTH_BOARD_NAME and health.num_replicas == 1
    (health_config,) = health.init_args
    assert isinstance(health_config, HealthBoardConfig)
    assert health_config.providers == list(cfg.providers)
    assert aggregator._bound_deployment.name == "aggregator"


def test_every_deployment_takes_its_options_from_the_typed_config_it_is_bound_with() -> None:
    """One signature for the five deployment classes, ``get_deployment_options(config)``, as Ray
    Serve's LLM deployments have: the config is a pydantic model whose every field is described,
    and the builder binds that same model first (never a dict the replica parses again)."""
    import typing

    from pydantic import BaseModel

    from moa_actors.aggregator import AggregatorDeployment
    from moa_actors.app import build_from_config
    from moa_actors.health_board import HealthBoardDeployment
    from moa_actors.ingress import IngressDeployment
    from moa_actors.provider import ProviderDeployment
    from moa_actors.simulator import SimulatorDeployment

    classes = (
        AggregatorDeployment,
        HealthBoardDeployment,
        IngressDeployment,
        ProviderDeployment,
        SimulatorDeployment,
    )
    config_types = {}
    for cls in classes:
        hints = typing.get_type_hints(cls.get_deployment_options)
        assert list(hints) == ["config", "return"], cls.__name__
        config_type = hints["config"]
        assert issubclass(config_type, BaseModel), cls.__name__
        undocumented = [n for n, f in config_type.model_fields.items() if not f.description]
        assert undocumented == [], f"{config_type.__name__}: {undocumented}"
        config_types[cls.__name__] = config_type

    cfg = load_config(None)
    cfg.serve.fusion = "deployment"
    cfg.simulator.mode = SimulatorMode.ON
    seen = {}

    def walk(app: Any) -> None:
        deployment = app._bound_deployment
        cls = deployment.func_or_class
        name = cls.__name__ if cls.__name__ in config_types else cls.__mro__[1].__name__
        config, *rest = deployment.init_args
        assert not deployment.init_kwargs, name
        assert isinstance(config, config_types[name]), name
        assert cls.get_deployment_options(config)["name"] == deployment.name
        seen[name] = True
        for arg in rest:
            for handle in arg.values() if isinstance(arg, dict) else [arg]:
                if handle is not None:
                    walk(handle)

    walk(build_from_config(cfg))
    assert set(seen) == set(config_types)


def test_the_old_serve_router_key_still_configures_the_health_board() -> None:
    raw = load_config(None).model_dump(mode="json")
    raw["serve"] = {"router": {"num_cpus": 0.5}}
    assert parse_config(raw).serve.health_board.num_cpus == 0.5
    raw["serve"] = {"router": {"num_cpus": 0.5}, "health_board": {"num_cpus": 0.5}}
    with pytest.raises(ConfigError, match=r"serve\.router is its old name"):
        parse_config(raw)
