"""The HTTP ingress: the OpenAI-compatible API, running the MoA engine over deployment handles.

It routes with its own copy of the routing policy over the health board's view of the providers,
refreshed in the background: the decision costs no handle call on the request path. By default
it also runs the final fusion itself, calling the aggregator model's provider deployment directly
(``serve.fusion``). Each saves one sequential hop per request, measured with ``moa bench``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from ray import serve

from moa.api.app import Api, create_api
from moa.config import MoAConfig
from moa.engine.assembly import assemble
from moa.state import open_store
from moa.types import HealthView
from moa_actors.handles import BoardReceipts, HandleCaller, RemoteFuser
from moa_actors.options import serve_options
from moa_actors.telemetry import init_replica_telemetry, shutdown_replica_telemetry
from moa_observability.metrics import control_plane_metrics

# How stale the ingress's view of provider health may get (providers report every 2 s);
# also how soon a replica learns that `moa serve` asked it to drain.
HEALTH_REFRESH_S = 0.5
# A health board that does not answer this fast is taken as restarting: the last view stays.
BOARD_TIMEOUT_S = 5.0


@serve.ingress()
class IngressDeployment:
    """Bound with the whole config, its own (it runs the engine and the API, which read all of it),
    the provider deployments' handles, the health board's and the aggregator's, if any."""

    @classmethod
    def get_deployment_options(cls, config: MoAConfig) -> dict[str, Any]:
        """Its Serve options from ``serve.ingress``; by default a little above the API's own bound
        on requests in progress (``server.max_concurrent_requests``), so the API, not Serve's
        queue, answers an overload (with 429 and Retry-After)."""
        default_max_ongoing = config.server.max_concurrent_requests + 16
        return {"name": "ingress", **serve_options(config.serve.ingress, default_max_ongoing)}

    async def __init__(
        self,
        config: MoAConfig,
        providers: Mapping[str, Any],
        board: Any,
        aggregator: Any | None = None,
    ) -> None:
        self.config = config
        self.replica = init_replica_telemetry(self.config.observability)["ray.serve.replica_id"]
        self.board = board
        self._view = HealthView()
        caller = HandleCaller(providers)
        fuser = RemoteFuser(aggregator) if aggregator is not None else None
        engine = assemble(self.config, caller, health=lambda: self._view, fuser=fuser)
        # Keys and the spend ledger: shared by every replica (state.redis_url on a cluster). A
        # cut call is charged what its provider replica saw, from its receipt on the board.
        store = open_store(self.config.state)
        self._asgi = create_api(self.config, engine, self._health, store, BoardReceipts(board))
        self.api: Api = self._asgi.state.api
        self._drain: asyncio.Task[int] | None = None
        self._refresher = asyncio.create_task(self._refresh())

    async def _refresh(self) -> None:
        while True:
            await self._checkin()
            await asyncio.sleep(HEALTH_REFRESH_S)

    async def _checkin(self) -> None:
        """Tell the health board how this replica is doing; take its view and any drain request."""
        drain = self._drain
        drained = drain is not None and drain.done()
        ended = drained and not drain.cancelled() and drain.exception() is None  # type: ignore[union-attr]
        state = {
            "in_flight": self.api.in_flight,
            "drained": drained,
            "cut": drain.result() if ended else 0,  # type: ignore[union-attr]
        }
        try:
            async with asyncio.timeout(BOARD_TIMEOUT_S):
                answer = await self.board.checkin.remote(self.replica, state)
        except Exception:  # the health board may be restarting: keep the last view
            control_plane_metrics().call("health_board", ok=False)
            return
        control_plane_metrics().call("health_board", ok=True)
        self._view = answer["view"]
        asked = answer["drain"]
        if asked is not None and self._drain is None:
            self._drain = asyncio.create_task(self.api.drain(asked["drain_s"]))
            # Report the end of the drain at once: `moa serve` is waiting for it.
            self._drain.add_done_callback(lambda _: self._report_now())
        if asked is not None and asked["hurry"]:
            self.api.hurry()

    def _report_now(self) -> None:
        self._reporting = asyncio.ensure_future(self._checkin())

    async def _health(self) -> dict[str, Any]:
        summary: dict[str, Any] = await self.board.health.remote()
        return summary

    def __serve_build_asgi_app__(self) -> Any:
        return self._asgi

    def __del__(self) -> None:
        self._refresher.cancel()
        shutdown_replica_telemetry()
