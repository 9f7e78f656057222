"""The Ray side of ``moa batch run --address``: the moa app on a running Ray cluster, and the URL
its requests go to.

The batch command is core code and never imports Ray or this package by name: it finds this
module through the ``moa.cluster`` entry point group (``ray`` in ``pyproject.toml``), as ``moa
bench`` finds its Ray side. ``find_service`` joins the cluster as a driver just long enough to ask
Serve's controller what runs there, then leaves: the batch's requests go over HTTP to a Serve
proxy of the cluster, and the app runs them on its provider deployments across the cluster's nodes,
under their cluster-wide rate limits, as any client's requests.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import ray

from moa.batch.senders import FoundService, ServiceNotFound

# Deployments every moa app has (``moa_actors.app.build_from_config``): how a moa app is told
# from the cluster's other Serve applications.
MOA_DEPLOYMENTS = frozenset({"ingress", "health-board"})
# The name ``moa serve`` and serve_config.yaml give the app: chosen when several moa apps run.
DEFAULT_APP = "moa"
WILDCARD = frozenset({"0.0.0.0", "::", ""})
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})
# How long the app's /healthz may take to answer the check that it can be reached from here.
REACH_TIMEOUT_S = 10.0


def find_service(address: str, app: str | None = None) -> FoundService:
    """The moa app (``app``, or the only one, or the one named ``moa``) on the Ray cluster at
    ``address`` (``auto``, ``HOST:6379``, ``ray://HOST:10001``), reached over HTTP from here.
    ``ServiceNotFound`` says why not: no cluster there, no Serve, no moa app, or none reachable."""
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except Exception as e:  # ConnectionError, or a RuntimeError or ValueError for a bad address
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ServiceNotFound(f"no Ray cluster at {address}: {first}") from None
    try:
        return _find(address, app)
    finally:
        ray.shutdown()  # this driver leaves; the cluster and its apps run on


def _find(address: str, wanted: str | None) -> FoundService:
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        raise ServiceNotFound(
            f"the Ray cluster at {address} runs no Serve: deploy the service first "
            "(serve deploy serve_config.yaml, or moa serve)"
        )
    details: dict[str, Any] = client.get_serve_details()
    name, app = _pick(address, details.get("applications") or {}, wanted)
    status = app.get("status")
    if status != "RUNNING":
        raise ServiceNotFound(f"the moa app {name!r} on {address} is {status}: {app.get('message') or ''}")
    http = details.get("http_options") or {}
    here = None if address.startswith("ray://") else ray.get_runtime_context().get_node_id()
    host = service_host(address, str(http.get("host") or ""), details.get("proxies") or {}, here)
    host = f"[{host}]" if ":" in host else host
    url = f"http://{host}:{http.get('port', 8000)}{(app.get('route_prefix') or '/').rstrip('/')}"
    try:
        httpx.get(url + "/healthz", timeout=REACH_TIMEOUT_S)
    except httpx.HTTPError as e:
        raise ServiceNotFound(f"the moa app {name!r} on {address} does not answer at {url}: {e}") from None
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return FoundService(url=url, app=name, nodes=nodes)


def _pick(address: str, apps: Mapping[str, Any], wanted: str | None) -> tuple[str, Mapping[str, Any]]:
    """The moa app asked for, or the only one, or the one named ``moa``."""
    ours = {n: a for n, a in apps.items() if set(a.get("deployments") or {}) >= MOA_DEPLOYMENTS}
    listed = ", ".join(sorted(ours)) or "none"
    if wanted is not None:
        if wanted not in ours:
            raise ServiceNotFound(f"no moa app named {wanted!r} on {address} (moa apps: {listed})")
        return wanted, ours[wanted]
    if len(ours) == 1:
        return next(iter(ours.items()))
    if DEFAULT_APP in ours:
        return DEFAULT_APP, ours[DEFAULT_APP]
    if not ours:
        others = ", ".join(sorted(apps)) or "none"
        raise ServiceNotFound(f"no moa app runs on the Ray cluster at {address} (its apps: {others})")
    raise ServiceNotFound(f"several moa apps run on {address} ({listed}): choose one with --app")


def service_host(address: str, http_host: str, proxies: Mapping[str, Any], here: str | None) -> str:
    """Where to reach a Serve proxy from this process. Through a Ray client (``ray://``): the head
    node, whose address the client used. On a node with a proxy: this node's. Else any healthy
    proxy's node. A proxy bound to loopback (``http_options.host``) is reachable only on its own
    node; one bound to an address other than a wildcard is reached there."""
    healthy = {n: p for n, p in proxies.items() if p.get("status") == "HEALTHY"}
    if not healthy:
        raise ServiceNotFound(f"no Serve HTTP proxy is running on the Ray cluster at {address}")
    if http_host not in WILDCARD | LOOPBACK:
        return http_host
    if here is not None and here in healthy:
        return "127.0.0.1"
    if http_host in LOOPBACK:
        raise ServiceNotFound(
            f"Serve's HTTP proxies on {address} listen on {http_host} only, and none runs on this "
            "machine's node: run moa batch on a node of the cluster, or set http_options.host: 0.0.0.0"
        )
    if address.startswith("ray://"):
        return urlsplit(address).hostname or str(next(iter(healthy.values())).get("node_ip"))
    return str(next(iter(healthy.values())).get("node_ip"))
