"""The ``moa`` command: one module per verb group (``serve``, ``ask``, ``keys``, ``cache``,
``config``, ``eval``, ``bench``, ``simulate``), put together by ``main``. It sits on top of
everything it runs, and nothing on the serving path imports it."""

from moa.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
