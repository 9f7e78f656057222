"""``moa config schema``, ``moa config check`` and ``moa config show``: the config file's JSON
schema, a config validated exactly as the service would load it (one line per problem, naming the
field), and the effective config with where each value came from."""

from __future__ import annotations

import argparse
import json

from moa.config import config_schema, config_sources, load_config

CONFIG_HELP = "config YAML (default: $MOA_CONFIG or the bundled one)"


def add_config_option(parser: argparse.ArgumentParser, *verbs: argparse.ArgumentParser) -> None:
    """``--config`` on a command with verbs (``moa cache``, ``moa keys``), taken before the verb
    or after it: ``moa cache stats --config F`` was refused, the option being the command's
    alone. The verbs' copies default to nothing at all (``SUPPRESS``), so the value given before
    the verb stands unless one is given after it."""
    parser.add_argument("--config", default=None, help=CONFIG_HELP)
    for verb in verbs:
        verb.add_argument("--config", default=argparse.SUPPRESS, help=CONFIG_HELP)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("config", help="the config file: its JSON schema, or check one")
    cs = p.add_subparsers(dest="config_command", required=True)
    sc = cs.add_parser(
        "schema",
        help="print the config's JSON schema (docs/config.schema.json): every field, documented",
    )
    sc.set_defaults(func=_schema)
    ck = cs.add_parser("check", help="validate a config file as moa serve would load it")
    ck.add_argument(
        "path", nargs="?", default=None, help="config YAML (default: $MOA_CONFIG or the bundled one)"
    )
    ck.set_defaults(func=_check)
    sh = cs.add_parser(
        "show",
        help="print the effective config, one value a line, with where each came from "
        "(the file, the bundled config, or a built-in default)",
    )
    sh.add_argument(
        "path", nargs="?", default=None, help="config YAML (default: $MOA_CONFIG or the bundled one)"
    )
    sh.set_defaults(func=_show)


def schema_text() -> str:
    """The schema as published: sorted keys, two-space indent, a final newline."""
    return json.dumps(config_schema(), indent=2, sort_keys=True) + "\n"


def _schema(args: argparse.Namespace) -> int:
    print(schema_text(), end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    cfg = load_config(args.path)  # a ConfigError is reported by main, exit status 2
    print(f"ok: {len(cfg.providers)} providers, {len(cfg.presets)} presets")
    return 0


def _show(args: argparse.Namespace) -> int:
    """A file holds only what it changes (it is laid over the bundled config): this shows the
    whole that results, so nobody has to merge the two in their head."""
    for name, value, origin in config_sources(args.path):
        print(f"{name}: {json.dumps(value)}  # {origin}")
    return 0
