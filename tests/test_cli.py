"""The ``moa`` command line, run as a user runs it."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from moa.config import load_config
from moa.simulator.server import SimulatorServer

FAST_SIM = "default: {ttft_s: 0.01, tokens_per_s: 4000, jitter: 0}\n"


def run_moa(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "MOA_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "moa.cli", *args],
        env=base | (env or {}),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    """The bundled providers with a fast simulator profile and no simulator URL: the CLI starts one."""
    profile = tmp_path / "sim.yaml"
    profile.write_text(FAST_SIM)
    from moa.config import load_config

    raw = load_config(None).model_dump(mode="json", exclude={"simulator"})
    raw["simulator"] = {"mode": "auto", "profile": str(profile)}
    path = tmp_path / "moa.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def test_ask_streams_the_answer_and_shows_the_calls(config_file: Path) -> None:
    out = run_moa(
        "ask",
        "How do vaccines train the immune system?",
        "--preset",
        "moa-lite",
        "--config",
        str(config_file),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Synthesis of 3 references")
    assert "answers come from the built-in simulator" in out.stderr and "synthetic" in out.stderr
    assert "proposer" in out.stderr and "aggregator" in out.stderr and "total: 4 calls" in out.stderr


def test_ask_json_from_stdin(config_file: Path) -> None:
    out = run_moa(
        "ask", "-", "--preset", "self-moa", "--json", "--config", str(config_file), stdin="Explain TCP."
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["preset"] == "self-moa" and len(result["calls"]) == 5


def test_ask_reports_bad_input_cleanly(config_file: Path, tmp_path: Path) -> None:
    out = run_moa("ask", "hi", "--preset", "nope", "--config", str(config_file))
    assert (
        out.returncode == 1
        and "unknown preset or model 'nope'" in out.stderr
        and "Traceback" not in out.stderr
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: {openai: {kind: nope}}\n")  # laid over the bundled config
    out = run_moa("ask", "hi", "--config", str(bad))
    assert out.returncode == 2 and str(bad) in out.stderr and "providers.openai.kind" in out.stderr


def test_ask_against_a_running_simulator(sim: SimulatorServer, tmp_path: Path) -> None:
    path = tmp_path / "moa.yaml"
    # A bare YAML `on` is a boolean; the config takes it as meant.
    providers = "providers:\n  o: {kind: openai, models: {gpt-4o-mini: {}}}\n"
    path.write_text(providers + f"simulator: {{mode: on, url: '{sim.url}'}}\n")
    out = run_moa("ask", "Hi", "--preset", "o/gpt-4o-mini", "--no-stream", env={"MOA_CONFIG": str(path)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()  # an answer was printed
    # It used the simulator that was already running: that one served the call.
    served = httpx.get(f"{sim.url}/admin/stats").json()["models"]
    assert {m: (v["requests"], v["completed"]) for m, v in served.items()} == {"gpt-4o-mini": (1, 1)}
    assert "built-in simulator" not in out.stderr


def test_bench_and_simulate_help_show_defaults_and_scenarios() -> None:
    from moa.benchmark.options import SCENARIOS

    wide = {"COLUMNS": "1000"}  # one line per option, as argparse wraps to the terminal
    bench = run_moa("bench", "--help", env=wide)
    assert bench.returncode == 0, bench.stderr
    assert "(default: 1,8,32)" in bench.stdout and "(default: none,hang,flaky,burst429)" in bench.stdout
    assert all(f"{name}: " in bench.stdout for name in SCENARIOS)  # each scenario says what it does
    assert "(default: 0.3)" in bench.stdout and "(default: bench-results/)" in bench.stdout
    simulate = run_moa("simulate", "--help", env=wide)
    assert simulate.returncode == 0, simulate.stderr
    assert "(default: the profile's, else 0.3)" in simulate.stdout
    assert "(default: the profile's, else 50)" in simulate.stdout


def test_the_start_up_hint_names_a_model_the_config_serves(tmp_path: Path) -> None:
    from moa.config import parse_config
    from moa.service import banner

    only = {"providers": {"o": {"kind": "openai", "models": {"gpt-4o-mini": {}}}}}
    with_presets = load_config(None).model_dump(mode="json")
    for raw, model in [
        (with_presets, "moa"),
        (only, "o/gpt-4o-mini"),
        (
            only | {"presets": {"quick": {"aggregators": [{"provider": "o", "model": "gpt-4o-mini"}]}}},
            "quick",
        ),
    ]:
        for keys in (False, True):
            lines = banner(
                parse_config(raw, "test"), "http://127.0.0.1:8000", mode="local", keys_required=keys
            )
            (hint,) = [line for line in lines if "chat.completions.create" in line]
            assert f"model='{model}'" in hint


URL = "http://127.0.0.1:8000"


def test_the_banner_of_an_open_service_shows_the_keyless_calls() -> None:
    """No key exists: the service is open, and a call without a key is what works."""
    from moa.service import banner

    text = "\n".join(banner(load_config(None), URL, mode="local", keys_required=False))
    assert f"  curl {URL}/v1/models\n" in text
    assert "api_key='unused'" in text
    assert "MOA_API_KEY" not in text and "Authorization" not in text


def test_the_banner_with_keys_sends_one_and_says_where_to_get_it() -> None:
    """Once a key exists, every request needs one: the keyless curl and ``api_key='unused'`` the
    banner once printed both got a 401. It shows calls that send ``$MOA_API_KEY`` and says how to
    get a key."""
    from moa.service import banner

    lines = banner(load_config(None), URL, mode="local", keys_required=True)
    text = "\n".join(lines)
    assert "unused" not in text
    curls = [line for line in lines if "curl" in line]
    assert curls == [f'  curl -H "Authorization: Bearer $MOA_API_KEY" {URL}/v1/models']
    (client,) = [line for line in lines if "OpenAI(" in line]
    assert "api_key=os.environ['MOA_API_KEY']" in client
    assert "`moa keys create NAME`" in text and "export MOA_API_KEY=" in text


@pytest.mark.parametrize("token_auth", [True, False], ids=["token-auth", "auth-disabled"])
def test_the_ray_lines_name_a_serve_status_that_reaches_the_dashboard(token_auth: bool) -> None:
    """With Ray's token auth on (a new local instance's default), Ray's CLI sends its token only
    with ``RAY_AUTH_MODE=token`` in its environment: the command printed carries it (a bare
    ``serve status`` fails with an AuthenticationError); with auth off it needs nothing."""
    from moa.service import ray_lines

    dash = "http://127.0.0.1:8265"
    lines = ray_lines(9100, dash, token_auth=token_auth)
    assert "  Metrics (Prometheus): http://127.0.0.1:9100/metrics" in lines
    assert f"  Ray dashboard: {dash}" in lines
    (status,) = [line for line in lines if "serve status" in line]
    prefix = "RAY_AUTH_MODE=token " if token_auth else ""
    assert status == f"  {prefix}serve status --address {dash}"
    # No dashboard, no command to reach it; no metrics port known, no URL with "None" in it.
    assert ray_lines(None, None, token_auth=token_auth) == []


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every command and verb of ``moa``, by its full name."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_no_help_text_shows_an_escaped_percent() -> None:
    """argparse %-formats help strings but prints a description as written: ``moa eval --help``
    said "bootstrap 95%% intervals"."""
    from moa.cli import build_parser

    shown = {name: p.format_help() for name, p in _parsers(build_parser())}
    assert len(shown) > 15
    assert [name for name, text in shown.items() if "%%" in text] == []
    assert "95% intervals" in shown["moa eval"]


def test_only_revoke_is_called_final_in_moa_keys_help() -> None:
    """``disable`` and ``enable`` once both said "(revoking is final)"; a disabled key comes back."""
    from moa.cli import build_parser

    keys = dict(_parsers(build_parser()))["moa keys"].format_help()
    verbs = {
        line.split()[0]: line
        for line in keys.splitlines()
        if line.strip().split()[:1] in (["revoke"], ["disable"], ["enable"])
    }
    assert "final" in verbs["revoke"]
    assert "final" not in verbs["disable"] and "final" not in verbs["enable"]


@pytest.mark.parametrize(
    "argv", [["cache", "stats"], ["cache", "clear"], ["keys", "list"], ["keys", "revoke", "k"]]
)
def test_config_is_taken_before_or_after_the_verb(argv: list[str]) -> None:
    """``moa cache stats --config F`` was refused (the option belonged to ``cache`` alone)."""
    from moa.cli import build_parser

    command, *verb = argv
    parse = build_parser().parse_args
    assert parse([command, "--config", "before.yaml", *verb]).config == "before.yaml"
    assert parse([*argv, "--config", "after.yaml"]).config == "after.yaml"
    assert parse([command, "--config", "before.yaml", *verb, "--config", "after.yaml"]).config == "after.yaml"
    assert parse(argv).config is None


def test_core_never_imports_ray() -> None:
    """The core package is plain asyncio: importing it pulls in neither Ray nor the bench extra."""
    code = (
        "import sys, moa.cli, moa.cli.ask, moa.cli.bench, moa.cli.eval, moa.cli.serve, moa.api.app, "
        "moa.engine.engine, moa.providers.registry, moa.simulator.server, moa.local, "
        "moa.service, moa_observability.tracing, moa_observability.metrics\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'psutil', 'matplotlib')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    # Nor does the benchmark (which needs the bench extra): it reaches its Ray side, the Serve app
    # and the floor probe, through an entry point, never by importing the Ray-side modules.
    bench = (
        "import sys, pkgutil, importlib, moa.benchmark as b\n"
        "for m in pkgutil.iter_modules(b.__path__): importlib.import_module('moa.benchmark.' + m.name)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'moa_actors', 'moa_serve_app')))\n"
    )
    out = subprocess.run([sys.executable, "-c", bench], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
