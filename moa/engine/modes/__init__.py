"""The aggregation modes (``Plan.aggregation``), each an ``Aggregation`` the engine drives the same
way: ``final``, ``early`` and ``staircase``, one module each; ``mode_for`` chooses one per run."""

from __future__ import annotations

from moa.engine.modes.base import Aggregation, Proposed
from moa.engine.modes.early import Early
from moa.engine.modes.final import Final
from moa.engine.modes.staircase import Staircase
from moa.plan import Plan, PlanMode

__all__ = ["Aggregation", "Proposed", "mode_for"]


def mode_for(plan: Plan, stream: bool) -> Aggregation:
    """The mode ``plan`` runs in: staircase only where it can climb (a streamed layered plan;
    ``Plan.as_run`` says the same of the plan a request runs), early, else final."""
    if plan.aggregation == "staircase" and stream and plan.mode is not PlanMode.REFINE:
        return Staircase()
    if plan.aggregation == "early":
        return Early()
    return Final()
