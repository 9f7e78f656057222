"""Every ``moa ...`` command in the README's and docs/' shell blocks parses with today's flags,
and every file it names is in the repository: a stale flag, or a path outside the repository
(``../shared/data/...``), fails here rather than in a newcomer's first hour (issue 26, item 3)."""

from __future__ import annotations

import itertools
import re
import shlex
from pathlib import Path

import pytest

from moa.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Options whose value is a file the command reads (written files, --out, are not checked).
FILE_OPTIONS = {"--prompts", "--workload", "--config", "--sim-profile", "--reference-outputs", "--profile"}
# Public workloads: a document may name one only if it says where it comes from (its source's
# name appears in the same document): FastChat's MT-Bench questions, AlpacaEval's files.
PUBLIC = {
    "mt_bench_questions.jsonl": "lm-sys/FastChat",
    "alpaca_eval.jsonl": "alpaca_eval.json",
    "reference_outputs.jsonl": "alpaca_eval.json",
}


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for each ``moa`` line of a bash/shell block, continuations joined."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                line = line.strip()
                for part in re.split(r"\s*(?:&&|\|)\s*", line):
                    part = re.sub(r"^(?:[A-Z_]+=\S+\s+)+", "", part)  # VAR=value prefixes
                    if part.startswith("moa "):
                        found.append((f"{doc.relative_to(ROOT)}: {part}", part))
    return found


COMMANDS = doc_commands()


def test_the_docs_have_moa_commands_to_check() -> None:
    assert len(COMMANDS) > 20, COMMANDS


@pytest.mark.parametrize(("where", "command"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_a_documented_command_parses_and_its_files_exist(where: str, command: str) -> None:
    """Mutation caught: a README example naming ``--prompts ../shared/data/x.jsonl`` (outside the
    repository), or a flag the parser no longer has."""
    argv = shlex.split(command.split(" #")[0], posix=True)[1:]
    argv = [a for a in argv if a not in ("<", ">")]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: does not parse (exit {e.code})")
    for option, value in itertools.pairwise(argv):
        doc = (ROOT / where.split(":", 1)[0]).read_text()
        public = value in PUBLIC and PUBLIC[value] in doc
        if option in FILE_OPTIONS and not public:
            path = (ROOT / value).resolve()
            assert ROOT in path.parents, f"{where}: {value} is outside the repository"
            assert path.exists(), f"{where}: {value} is not in the repository"


def test_a_missing_workload_is_one_line() -> None:
    """Mutation caught: load_prompts letting the OSError out (a traceback)."""
    from tests.test_cli import run_moa

    out = run_moa("bench", "--prompts", "no-such-file.jsonl", "--targets", "baseline")
    assert out.returncode == 2, out.stderr
    assert (
        out.stderr.strip()
        == "moa: cannot read the prompts file no-such-file.jsonl: No such file or directory"
    )


def test_one_jaeger_image_is_named_everywhere() -> None:
    """The README ran Jaeger v2 (``jaegertracing/jaeger``) while serve_config.local.yaml named
    v1's ``jaegertracing/all-in-one``: two images, two sets of ports and flags, for one recipe."""
    files = [*DOCS, *ROOT.glob("*.yaml"), *(ROOT / "kuberay").glob("*.yaml")]
    images = {m for f in files for m in re.findall(r"jaegertracing/[\w.:-]+", f.read_text())}
    assert images == {"jaegertracing/jaeger:latest"}
