"""Assembling an engine from a config: the one place every way of serving builds its engine (``moa
serve --local``, ``moa ask``, ``moa eval``, the benchmark's service, the Ray ingress)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

from moa.caller import ModelCaller
from moa.config import MoAConfig
from moa.engine.engine import MoAEngine
from moa.engine.fusion import Fuser
from moa.types import HealthView


@runtime_checkable
class KeepsHealth(Protocol):
    """A caller that keeps its providers' health (the in-process provider pool)."""

    def health_view(self) -> HealthView: ...


def assemble(
    config: MoAConfig,
    caller: ModelCaller,
    *,
    health: Callable[[], HealthView] | None = None,
    fuser: Fuser | None = None,
) -> MoAEngine:
    """The engine over ``caller``, its router, fuser and response cache made from ``config``.

    The router sees provider health through ``health``, else through the caller when it keeps it
    (the provider pool does); a caller that keeps none (the Ray handles) is given ``health`` from
    the health board. ``fuser`` runs fusion elsewhere (the aggregator deployment); by default it
    runs in-process over ``caller``."""
    if health is None and isinstance(caller, KeepsHealth):
        health = caller.health_view
    return MoAEngine(config, caller, health=health, fuser=fuser)
