"""The ``moa`` command line: one parser with a sub-command per verb group, each registered by its
own module of this package, and the exit statuses every command shares (2 for a bad config, 1 for
an error the engine reports, 130 for Ctrl-C)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from moa.cli import ask, batch, bench, cache, config, eval, keys, serve, simulator
from moa.config import ConfigError
from moa.errors import MoAError

# In the order ``moa --help`` lists them.
VERB_GROUPS = (ask, serve, simulator, bench, eval, batch, keys, cache, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moa", description="Mixture-of-Agents LLM service.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in VERB_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"moa: {e}", file=sys.stderr)
        return 2
    except MoAError as e:
        print(f"moa: {e.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
