"""``early`` aggregation: as ``final``, but the next stage starts as soon as a layer's quorum is
met; its other proposers are cut then (billed for what they wrote)."""

from __future__ import annotations

from moa.engine.layer import Grace
from moa.engine.modes.final import Final
from moa.plan import Plan


class Early(Final):
    """Stages in turn, with no grace past the quorum."""

    def grace(self, plan: Plan) -> Grace:
        return Grace(0.0, "early aggregation")
