"""Per-replica observability setup: tracing with the replica's identity as resource attributes,
JSON logs, and a flush when the replica stops."""

from __future__ import annotations

import ray
from ray import serve

from moa.config import MoAConfig
from observability.logs import configure_json_logging
from observability.tracing import flush_tracing, setup_tracing


def replica_identity() -> dict[str, str]:
    ctx = serve.get_replica_context()
    replica = getattr(ctx, "replica_id", None)
    return {
        "ray.node_id": ray.get_runtime_context().get_node_id(),
        "ray.serve.app": getattr(ctx, "app_name", "") or "",
        "ray.serve.deployment": getattr(ctx, "deployment", "") or "",
        "ray.serve.replica_id": str(getattr(replica, "unique_id", None) or getattr(ctx, "replica_tag", "")),
    }


def init_replica_telemetry(config: MoAConfig) -> dict[str, str]:
    identity = replica_identity()
    setup_tracing({**identity, "service.instance.id": identity["ray.serve.replica_id"]})
    if config.observability.json_logs:
        configure_json_logging()
    return identity


def shutdown_replica_telemetry() -> None:
    flush_tracing()
