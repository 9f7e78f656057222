"""The health board's roster of ingress replicas holds the live ones only.

Every ingress replica checks in with the board every ``HEALTH_REFRESH_S``, under its own replica
id; autoscaling starts and stops replicas, each with a new id. A replica that stopped checking in
is forgotten at the next check-in, so the board's memory follows the replicas alive now, not every
replica the app ever ran (before, only ``moa serve``'s drain-status call on shutdown pruned it).
"""

from __future__ import annotations

from moa_actors.health_board import INGRESS_STALE_S, IngressRoster

STATE = {"in_flight": 0, "drained": False, "cut": 0}


def test_an_ingress_replica_that_stopped_checking_in_is_forgotten_at_the_next_check_in() -> None:
    roster = IngressRoster()
    # Autoscaling churn: a hundred replicas, one after the other, each checking in while it lives.
    for k in range(100):
        start = k * 60.0
        for t in (start, start + 0.5, start + 1.0):
            roster.checkin(f"replica-{k}", STATE, t)
    assert len(roster) == 1
    assert roster.live(99 * 60.0 + 1.0) == {"replica-99": STATE}


def test_replicas_that_keep_checking_in_are_all_kept() -> None:
    roster = IngressRoster()
    for step in range(40):  # three replicas taking turns, each within the stale limit
        roster.checkin(f"replica-{step % 3}", {**STATE, "in_flight": step}, step * 0.5)
    assert len(roster) == 3
    assert roster.live(19.5) == {
        "replica-0": {**STATE, "in_flight": 39},
        "replica-1": {**STATE, "in_flight": 37},
        "replica-2": {**STATE, "in_flight": 38},
    }
    # Silent past the limit: gone from what the drain status reports.
    assert roster.live(19.5 + INGRESS_STALE_S + 1.0) == {}
