"""Bytes at once through Ray Serve's HTTP proxy: a streaming request gets its headers, its role
chunk and keep-alive comments while its proposers are still working, not after them."""

from __future__ import annotations

from typing import Any

import pytest

from moa.simulator.server import SimulatorServer
from tests.test_streaming import (
    QUESTION,
    SLOW_PROPOSER_S,
    data_events,
    proposers_answered,
    slow_proposers,
    sse_lines_probed,
)

pytest.importorskip("ray")
pytestmark = [pytest.mark.ray]


def test_first_bytes_cross_the_proxy_before_the_proposers_finish(
    cluster: dict[str, Any], sim: SimulatorServer
) -> None:
    slow_proposers(sim)
    before = proposers_answered(sim)
    body = {"model": "moa-lite", "messages": QUESTION, "stream": True, "moa": {"progress": True}}
    status, lines, (_, at_role) = sse_lines_probed(str(cluster["url"]), body, lambda: proposers_answered(sim))
    assert status == 200
    events = data_events(lines)
    role_at = events[0][0]
    assert events[0][1]["choices"][0]["delta"]["role"] == "assistant"
    first_text_at = next(
        t
        for t, e in events
        if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content")
    )
    # The role chunk crossed the proxy before any proposer had answered (an ordering, not a clock).
    assert at_role == before, (before, at_role)
    assert proposers_answered(sim) != before
    assert first_text_at >= SLOW_PROPOSER_S, first_text_at
    # Keep-alive comments (every 0.5 s in the test config) and progress chunks crossed the proxy
    # while the proposers worked, each as it was written.
    waiting = [t for t, line in lines if line.startswith(":") and role_at < t < first_text_at]
    assert len(waiting) >= 2, lines[:12]
    progress = [(t, e) for t, e in events if isinstance(e, dict) and not e.get("choices") and "moa" in e]
    assert any(e["moa"]["progress"]["stage"] == "proposers" and t < first_text_at for t, e in progress)
    assert events[-1][1] == "[DONE]"
