"""moa-serve's public API: what a program embedding the engine, or testing a config, relies on.

Everything else under ``moa`` is internal and may move between releases (httpx keeps its
transports, models and config in private modules the same way and re-exports a small surface).
The names resolve lazily, on first use: ``import moa`` stays cheap and never pulls in the
engine's dependencies (OpenTelemetry, the cache, provider SDKs), let alone Ray, which the core
never imports at all.

- the engine: ``MoAEngine``; its failures: ``MoAError``, ``AllProvidersFailed``, ``DeadlineExceeded``
- config loading: ``load_config``, ``parse_config``, ``MoAConfig``
- plans: ``Plan``, ``LayerSpec``, ``ProposerSpec``, ``AggregatorSpec``, ``ModelRef``, ``PlanMode``
- results: ``MoAResult``, ``CallRecord``, ``Stage``, ``RouteDecision``, ``Progress``
- the transport seam: ``ModelCaller`` and the call types it speaks (``CallRequest``,
  ``CallResult``, ``CallError``, ``ErrorKind``, ``ChatMessage`` and its ``ImagePart``s,
  ``GenerationParams``, ``Usage``, ``TextDelta``, ``StreamEvent``)
- the test double at that seam: ``ScriptedCaller`` and its ``Reply``
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moa.caller import ModelCaller
    from moa.config import MoAConfig, load_config, parse_config
    from moa.engine.engine import MoAEngine
    from moa.errors import AllProvidersFailed, DeadlineExceeded, MoAError
    from moa.plan import AggregatorSpec, LayerSpec, ModelRef, Plan, PlanMode, ProposerSpec
    from moa.result import CallRecord, MoAResult, Progress, RouteDecision, Stage
    from moa.testing import Reply, ScriptedCaller
    from moa.types import (
        CallError,
        CallRequest,
        CallResult,
        ChatMessage,
        ErrorKind,
        GenerationParams,
        ImagePart,
        StreamEvent,
        TextDelta,
        Usage,
    )

# Public name -> the private module that defines it.
_HOMES: dict[str, str] = {
    "MoAEngine": "moa.engine.engine",
    "MoAError": "moa.errors",
    "AllProvidersFailed": "moa.errors",
    "DeadlineExceeded": "moa.errors",
    "MoAConfig": "moa.config",
    "load_config": "moa.config",
    "parse_config": "moa.config",
    "Plan": "moa.plan",
    "LayerSpec": "moa.plan",
    "ProposerSpec": "moa.plan",
    "AggregatorSpec": "moa.plan",
    "ModelRef": "moa.plan",
    "PlanMode": "moa.plan",
    "MoAResult": "moa.result",
    "CallRecord": "moa.result",
    "Stage": "moa.result",
    "RouteDecision": "moa.result",
    "Progress": "moa.result",
    "ModelCaller": "moa.caller",
    "CallRequest": "moa.types",
    "CallResult": "moa.types",
    "CallError": "moa.types",
    "ErrorKind": "moa.types",
    "ChatMessage": "moa.types",
    "GenerationParams": "moa.types",
    "ImagePart": "moa.types",
    "Usage": "moa.types",
    "TextDelta": "moa.types",
    "StreamEvent": "moa.types",
    "ScriptedCaller": "moa.testing",
    "Reply": "moa.testing",
}

__all__ = [
    "AggregatorSpec",
    "AllProvidersFailed",
    "CallError",
    "CallRecord",
    "CallRequest",
    "CallResult",
    "ChatMessage",
    "DeadlineExceeded",
    "ErrorKind",
    "GenerationParams",
    "ImagePart",
    "LayerSpec",
    "MoAConfig",
    "MoAEngine",
    "MoAError",
    "MoAResult",
    "ModelCaller",
    "ModelRef",
    "Plan",
    "PlanMode",
    "Progress",
    "ProposerSpec",
    "Reply",
    "RouteDecision",
    "ScriptedCaller",
    "Stage",
    "StreamEvent",
    "TextDelta",
    "Usage",
    "load_config",
    "parse_config",
]


def __getattr__(name: str) -> Any:
    """Resolve a public name on first use (PEP 562) and keep it, so the import happens once."""
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'moa' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
