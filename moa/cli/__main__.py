"""``python -m moa.cli``: the ``moa`` command, run by the tests and the benchmark as a user runs it."""

from moa.cli.main import main

raise SystemExit(main())
