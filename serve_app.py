"""The Ray Serve application's builder: ``serve run moa_serve_app:build_app config=PATH`` and
``serve deploy`` import ``build_app``. The application is wired in ``moa_actors.app``; ``moa serve``
runs it on a Ray instance of its own (``moa_actors.lifecycle``).
"""

from __future__ import annotations

from ray.serve.deployment import Application

from moa.config import load_config
from moa_actors.app import build_from_config


def build_app(args: dict[str, str] | None = None) -> Application:
    """Serve's application builder; ``args`` may name ``config`` (a YAML path)."""
    args = args or {}
    return build_from_config(load_config(args.get("config")))
