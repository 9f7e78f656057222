"""The service itself: does a client that leaves cancel moa-lite's fan-out, and does the drain hold?
A manual check against a running ``moa simulate`` and ``moa serve`` (HAProxy on or not).

Usage::

    moa simulate --port 38900 &
    # a config whose simulator.url is http://127.0.0.1:38900 (simulator: {mode: on, url: ...})
    moa serve --config CONFIG --port 38000 &                 # with or without HAProxy's variables
    python docs/moa_serve_disconnect_check.py --api http://127.0.0.1:38000 \\
        --sim http://127.0.0.1:38900 [--also-port PORT] [--drain-pid PID]

Every simulated call hangs. For each way of leaving (httpx's client with its request task
cancelled, as tests/test_serve.py leaves; a raw client writing the request's head and body in
two writes, or in one), three times: POST a moa-lite request, wait until its three proposer
calls are at the simulator, leave, and count how many of them the simulator saw cancelled within
5 s. ``--also-port``: the same with the raw two-write client straight to that port (the ingress
replica's own). ``--drain-pid``: then, with calls that take 4 s, send SIGINT to that ``moa serve``
during a request and show that the request finishes (200) while a new one gets 503.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

BODY = json.dumps({"model": "moa-lite", "messages": [{"role": "user", "content": "hi"}]}).encode()
HEAD = (
    "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    f"Content-Length: {len(BODY)}\r\n\r\n"
).encode()


def counts(sim: str) -> tuple[int, int, int]:
    """Calls received, in flight and cancelled at the simulator, all models."""
    models = httpx.get(sim + "/admin/stats").json()["models"].values()
    return tuple(sum(m[k] for m in models) for k in ("requests", "in_flight", "cancelled"))  # type: ignore[return-value]


def wait_started(sim: str, before: int) -> None:
    end = time.monotonic() + 30
    while counts(sim)[0] - before < 3 and time.monotonic() < end:
        time.sleep(0.05)


def leave_once(api: str, sim: str, how: str) -> str:
    received, in_flight, cancelled = counts(sim)
    if how == "httpx":

        async def go() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                headers = {"content-type": "application/json"}
                task = asyncio.create_task(
                    client.post(api + "/v1/chat/completions", content=BODY, headers=headers)
                )
                await asyncio.to_thread(wait_started, sim, received)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

        asyncio.run(go())
    else:
        url = urlsplit(api)
        s = socket.create_connection((url.hostname or "127.0.0.1", url.port or 80))
        if how == "two writes":
            s.sendall(HEAD)
            time.sleep(0.01)
            s.sendall(BODY)
        else:
            s.sendall(HEAD + BODY)
        wait_started(sim, received)
        s.close()
    left = time.monotonic()
    while time.monotonic() - left < 5 and counts(sim)[1] > in_flight:
        time.sleep(0.05)
    now = counts(sim)
    return f"{now[0] - received} calls, {now[2] - cancelled} cancelled"


def drain(api: str, sim: str, pid: int) -> dict[str, Any]:
    httpx.delete(sim + "/admin/faults/*")
    httpx.put(sim + "/admin/faults/*", json={"hang": {"rate": 1.0, "hang_s": 4}}).raise_for_status()
    seen: dict[str, Any] = {}

    def in_progress() -> None:
        r = httpx.post(
            api + "/v1/chat/completions",
            content=BODY,
            headers={"content-type": "application/json"},
            timeout=60,
        )
        seen["request in progress"] = r.status_code

    worker = threading.Thread(target=in_progress)
    worker.start()
    time.sleep(1.5)
    os.kill(pid, signal.SIGINT)
    time.sleep(1.0)
    r = httpx.post(
        api + "/v1/chat/completions", content=BODY, headers={"content-type": "application/json"}, timeout=10
    )
    seen["new request during the drain"] = (
        f"{r.status_code} {r.json()['error']['code'] if r.status_code != 200 else ''}"
    )
    worker.join()
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api", required=True)
    parser.add_argument("--sim", required=True)
    parser.add_argument("--also-port", type=int)
    parser.add_argument("--drain-pid", type=int)
    args = parser.parse_args()
    httpx.delete(args.sim + "/admin/faults/*")
    httpx.put(args.sim + "/admin/faults/*", json={"hang": {"rate": 1.0}}).raise_for_status()
    print(f"load {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")
    print("way of leaving | each of three requests: proposer calls, of them cancelled within 5 s")
    for how in ("httpx", "two writes", "one write"):
        print(f"{how} | " + "; ".join(leave_once(args.api, args.sim, how) for _ in range(3)))
    if args.also_port:
        direct = f"http://127.0.0.1:{args.also_port}"
        print(
            f"two writes, port {args.also_port} | "
            + "; ".join(leave_once(direct, args.sim, "two writes") for _ in range(3))
        )
    if args.drain_pid:
        print(f"drain: {drain(args.api, args.sim, args.drain_pid)}")


if __name__ == "__main__":
    main()
