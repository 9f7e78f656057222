"""``moa simulate``: run the provider simulator in the foreground for SDKs, benchmarks and demos."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import ValidationError

from moa.simulator.profile import (
    FAULT_KINDS,
    Faults,
    ModelProfile,
    ProfileError,
    SimProfile,
    load_profile,
)
from moa.simulator.server import serve_forever


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "simulate",
        help="run the provider simulator (OpenAI, Anthropic and Gemini wire protocols)",
        description=(
            "Serve simulated OpenAI, Anthropic and Gemini APIs that the official SDKs reach through "
            "their base_url. Answers are synthetic; latency and faults follow the profile."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8900, help="port to listen on (default: 8900; 0 picks one)")
    d = ModelProfile()
    p.add_argument(
        "--profile", default=None, metavar="FILE", help="simulator profile, YAML or JSON (default: none)"
    )
    p.add_argument(
        "--ttft",
        type=float,
        default=None,
        metavar="S",
        help=f"time to first token of every model, s (default: the profile's, else {d.ttft_s:g})",
    )
    p.add_argument(
        "--tps",
        type=float,
        default=None,
        metavar="N",
        help=f"tokens per second of every model (default: the profile's, else {d.tokens_per_s:g})",
    )
    p.add_argument(
        "--jitter",
        type=float,
        default=None,
        metavar="F",
        help=f"latency jitter, 0.1 = ±10%% (default: the profile's, else {d.jitter:g})",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="MODEL:KIND=RATE",
        help=f"inject a fault, e.g. 'gpt-4.1:error_429=0.3' or '*:hang=1' (kinds: {', '.join(FAULT_KINDS)})",
    )
    p.set_defaults(func=run)
    return p


def parse_fault(text: str) -> tuple[str, str, float]:
    """``MODEL:KIND=RATE`` (MODEL may be a glob and may itself contain colons) -> (model, kind, rate)."""
    target, eq, rate_text = text.partition("=")
    model, colon, kind = target.rpartition(":")
    if not eq or not colon or not model or not kind:
        raise ProfileError(f"--fault {text!r}: expected MODEL:KIND=RATE, e.g. 'gpt-4.1:error_429=0.3'")
    if kind not in FAULT_KINDS:
        raise ProfileError(f"--fault {text!r}: unknown fault kind {kind!r} (one of {', '.join(FAULT_KINDS)})")
    try:
        rate = float(rate_text)
    except ValueError:
        raise ProfileError(f"--fault {text!r}: the rate must be a number between 0 and 1") from None
    if not 0.0 <= rate <= 1.0:
        raise ProfileError(f"--fault {text!r}: the rate must be between 0 and 1")
    return model, kind, rate


def build_profile(args: argparse.Namespace) -> SimProfile:
    """The profile file (or the defaults) with the command line's overrides applied."""
    profile = load_profile(args.profile) if args.profile else SimProfile()
    overrides = {
        name: value
        for name, value in (("ttft_s", args.ttft), ("tokens_per_s", args.tps), ("jitter", args.jitter))
        if value is not None
    }
    faults: dict[str, dict[str, Any]] = {
        k: v.model_dump(exclude_none=True) for k, v in profile.faults.items()
    }
    for text in args.fault:
        model, kind, rate = parse_fault(text)
        faults.setdefault(model, {})[kind] = {"rate": rate}
    try:
        default = ModelProfile.model_validate({**profile.default.model_dump(), **overrides})
        return profile.model_copy(
            update={"default": default, "faults": {k: Faults.model_validate(v) for k, v in faults.items()}}
        )
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ProfileError(f"invalid command-line override: {problems}") from None


def _announce(url: str) -> None:
    print(f"Provider simulator listening on {url}", flush=True)
    print(f"  OpenAI SDK:     OpenAI(base_url='{url}/v1', api_key=...)")
    print(f"  Anthropic SDK:  Anthropic(base_url='{url}', api_key=...)")
    print(f"  Gemini SDK:     genai.Client(api_key=..., http_options=HttpOptions(base_url='{url}'))")
    print("  Any API key works except one starting with 'sim-invalid-key'. Answers are synthetic.")
    print(f"  Counters: GET {url}/admin/stats   Faults: PUT {url}/admin/faults/MODEL", flush=True)


def run(args: argparse.Namespace) -> int:
    try:
        profile = build_profile(args)
    except ProfileError as e:
        print(f"moa simulate: {e}", file=sys.stderr)
        return 2
    try:
        serve_forever(profile, args.host, args.port, on_ready=_announce)
    except OSError as e:
        print(f"moa simulate: cannot listen on {args.host}:{args.port}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
