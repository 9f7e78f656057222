"""``--max-cost-usd``: every call reserves its worst case before it is sent and settles to what it
cost, so a run stops before a call that could take it over the limit, never after."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Budget:
    limit_usd: float | None = None
    spent_usd: float = 0.0
    reserved_usd: float = 0.0
    # Why the run stopped early, if it did ("max_cost"); set by the first refused reservation.
    stopped: str | None = None

    def reserve(self, amount: float | None) -> bool:
        """Hold ``amount`` (None: unknown, counted after the fact) if it fits under the limit."""
        if self.stopped:
            return False
        amount = amount or 0.0
        if self.limit_usd is not None and self.spent_usd + self.reserved_usd + amount > self.limit_usd:
            self.stopped = "max_cost"
            return False
        self.reserved_usd += amount
        return True

    def settle(self, reserved: float | None, cost: float | None) -> None:
        self.reserved_usd = max(0.0, self.reserved_usd - (reserved or 0.0))
        self.spent_usd += cost or 0.0
        if self.limit_usd is not None and self.spent_usd >= self.limit_usd:
            self.stopped = self.stopped or "max_cost"
