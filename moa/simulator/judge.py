"""The simulator as a judge: verdicts with known biases, for proving ``moa eval`` on ground truth.

A request carrying the judge prompt's answer blocks (``[The Start of Assistant A's Answer]`` ...,
the default judge templates) gets a short explanation and a verdict instead of prose. The verdict
is drawn from the model's ``JudgeProfile``: which model wrote each answer (the simulator remembers
the author of every answer it produced), which was shown first, and their lengths decide it, with
the probabilities the profile sets. Draws are deterministic in (model, messages, seed), like every
other answer, so a rerun gives the same verdicts; a retry (a different conversation) draws afresh.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable

from moa.simulator.profile import JudgeProfile, match_pattern
from moa.simulator.text import stable_hash
from moa.tokens import approx_tokens

_PAIR = re.compile(
    r"\[The Start of Assistant A's Answer\]\n(.*?)\n\[The End of Assistant A's Answer\].*?"
    r"\[The Start of Assistant B's Answer\]\n(.*?)\n\[The End of Assistant B's Answer\]",
    re.DOTALL,
)
_SINGLE = re.compile(
    r"\[The Start of Assistant's Answer\]\n(.*?)\n\[The End of Assistant's Answer\]", re.DOTALL
)
# moa eval renders a multi-turn conversation's answers as "[Turn N]" sections.
_TURN = re.compile(r"^\[Turn \d+\]$", re.MULTILINE)

Authors = Callable[[str], str | None]


def author_of(block: str, authors: Authors) -> str | None:
    """The model that wrote an answer block (the first of its turns the simulator recognises)."""
    for part in [block, *_TURN.split(block)]:
        text = part.strip()
        if text:
            who = authors(text)
            if who is not None:
                return who
    return None


def _favoured(judge: JudgeProfile, author: str | None) -> bool:
    return (
        judge.favour is not None and author is not None and bool(match_pattern({judge.favour: True}, author))
    )


def _pairwise(judge: JudgeProfile, first: str, second: str, authors: Authors, rng: random.Random) -> str:
    """'A', 'B' or 'C' (a tie) for the answers shown first (A) and second (B)."""
    if rng.random() < judge.tie_rate:
        return "C"
    if rng.random() < judge.position_bias:
        return "A"
    fa, fb = _favoured(judge, author_of(first, authors)), _favoured(judge, author_of(second, authors))
    if fa != fb:
        favoured_wins = rng.random() < judge.favour_p
        return "A" if favoured_wins == fa else "B"
    extra = (approx_tokens(first) - approx_tokens(second)) / 100  # hundreds of tokens longer
    p_first = 1.0 / (1.0 + math.exp(-judge.length_bias * extra))
    return "A" if rng.random() < p_first else "B"


def _score(judge: JudgeProfile, answer: str, authors: Authors, rng: random.Random) -> int:
    author = author_of(answer, authors)
    mean = judge.default_score
    if author is not None:
        got = match_pattern(judge.scores, author)
        if got is not None:
            mean = got
    # An integer score whose expectation is ``mean`` (a fractional mean is rounded up or down at
    # random in proportion), spread uniformly by the noise; clipped to 1-10.
    base = math.floor(mean)
    noisy = base + (rng.random() < mean - base) + rng.randint(-judge.score_noise, judge.score_noise)
    return max(1, min(10, noisy))


_EXPLAIN = (
    "Both responses address the question. Assistant A is organised differently from Assistant B, "
    "and they differ in depth and in the detail they give."
)
_OFF = {
    "A": "On balance I lean towards the first response, though it is close.",
    "B": "On balance I lean towards the second response, though it is close.",
    "C": "Honestly, I find the two responses about equally good.",
}


def judge_reply(
    model: str,
    transcript: tuple[tuple[str, str], ...],
    seed: int | None,
    judge: JudgeProfile,
    authors: Authors,
) -> str | None:
    """The judge's reply when the conversation is a judge prompt, else ``None``."""
    everything = "\n".join(t for r, t in transcript if r == "user")
    pair = _PAIR.search(everything)
    single = None if pair else _SINGLE.search(everything)
    if pair is None and single is None:
        return None
    rng = random.Random(stable_hash("judge", model, transcript, seed))
    off_format = rng.random() < judge.off_format
    if pair is not None:
        verdict = _pairwise(judge, pair.group(1), pair.group(2), authors, rng)
        return _OFF[verdict] if off_format else f"{_EXPLAIN}\n\n[[{verdict}]]"
    assert single is not None
    score = _score(judge, single.group(1), authors, rng)
    if off_format:
        return "The response is reasonable, and I would put it somewhere in the middle of the range."
    return f"The response addresses the question with some detail.\n\nRating: [[{score}]]"
