"""Serve deployment options from the config's plain scheduling fields, and the one way a
deployment is bound.

The core's ``DeploymentOptions`` is data only (CPUs, replicas, autoscaling bounds); what Ray Serve
makes of it lives here, on the Ray side. Each deployment class turns its own typed config into its
options with a ``get_deployment_options(config)`` classmethod (as Ray Serve's LLM module does on
``LLMServer``), using this one translation, and is bound with that same config (``bind``), so the
builder in ``moa_actors.app`` only wires.
"""

from __future__ import annotations

from typing import Any, Protocol, TypeVar

from ray import serve
from ray.serve.deployment import Application

from moa.config import DeploymentOptions

ConfigT = TypeVar("ConfigT")
ConfigT_contra = TypeVar("ConfigT_contra", contravariant=True)


class Configured(Protocol[ConfigT_contra]):
    """A deployment class of this package: its Serve options come from the config it is bound with."""

    @classmethod
    def get_deployment_options(cls, config: ConfigT_contra) -> dict[str, Any]: ...


def bind(cls: type[Configured[ConfigT]], config: ConfigT, *handles: Any) -> Application:
    """``cls`` as a Serve deployment with the options it computes from ``config``, bound with that
    config first and then the handles of the deployments it calls: a replica receives the typed
    config as built here, never a dict to parse again."""
    return serve.deployment(cls, **cls.get_deployment_options(config)).bind(config, *handles)


def serve_options(opts: DeploymentOptions, default_max_ongoing: int) -> dict[str, Any]:
    """Keyword arguments for ``serve.deployment``: actor resources, the request bound per replica
    (``default_max_ongoing`` when the config leaves it open), and a fixed replica count or, when
    none is set, Serve's autoscaling."""
    out: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": opts.num_cpus, "resources": dict(opts.resources)},
        "max_ongoing_requests": opts.max_ongoing_requests or default_max_ongoing,
    }
    if opts.max_replicas_per_node is not None:
        out["max_replicas_per_node"] = opts.max_replicas_per_node
    if opts.num_replicas is not None:
        out["num_replicas"] = opts.num_replicas
    else:
        out["autoscaling_config"] = opts.autoscaling.model_dump()
    return out
