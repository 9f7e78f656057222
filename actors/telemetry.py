"""Per-replica observability setup: tracing with the replica's identity as resource attributes,
JSON logs, and a flush when the replica stops."""

from __future__ import annotations

import logging

import ray
from ray import serve
from ray.serve._private.constants import SERVE_LOGGER_NAME

from moa.config import ObservabilityConfig
from moa_observability.logs import configure_json_logging
from moa_observability.tracing import flush_tracing, setup_tracing


def replica_identity() -> dict[str, str]:
    ctx = serve.get_replica_context()
    replica = getattr(ctx, "replica_id", None)
    return {
        "ray.node_id": ray.get_runtime_context().get_node_id(),
        "ray.serve.app": getattr(ctx, "app_name", "") or "",
        "ray.serve.deployment": getattr(ctx, "deployment", "") or "",
        "ray.serve.replica_id": str(getattr(replica, "unique_id", None) or getattr(ctx, "replica_tag", "")),
    }


def replica_log_file() -> str | None:
    """The log file Ray Serve writes for this replica (``logs/serve/replica_*.log``)."""
    for handler in logging.getLogger(SERVE_LOGGER_NAME).handlers:
        target = getattr(handler, "target", None) or handler  # Serve buffers through a MemoryHandler
        name = getattr(target, "baseFilename", None)
        if name:
            return str(name)
    return None


def init_replica_telemetry(observability: ObservabilityConfig) -> dict[str, str]:
    """Tracing and logs for this replica; it needs only the config's ``observability`` section,
    so a deployment bound with a slice of the config can call it."""
    identity = replica_identity()
    setup_tracing({**identity, "service.instance.id": identity["ray.serve.replica_id"]})
    if observability.json_logs:
        # Straight into the replica's own log file, line by line. Writing to stderr is not
        # enough: Serve redirects a replica's stderr into its logger, which (in the
        # throughput-optimised mode) buffers 1,000 records before it writes any.
        configure_json_logging(path=replica_log_file())
    return identity


def shutdown_replica_telemetry() -> None:
    flush_tracing()
