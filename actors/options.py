"""Serve deployment options from the config's plain scheduling fields.

The core's ``DeploymentOptions`` is data only (CPUs, replicas, autoscaling bounds); what Ray Serve
makes of it lives here, on the Ray side. Each deployment class turns its own slice of the config
into its options with a ``get_deployment_options`` classmethod (as Ray Serve's LLM module does on
``LLMServer``), using this one translation, so the builder in ``moa_actors.app`` only binds.
"""

from __future__ import annotations

from typing import Any

from moa.config import DeploymentOptions


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
