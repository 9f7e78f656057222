"""The simulator's embeddings: hashed character trigrams and words, deterministic in the text.

Real embedding APIs answer with learned vectors; the simulator only needs vectors of the right
shape whose similarity follows the text (near-identical texts are close), so that a client
talking to it sees the wire protocol and sensible cosine similarities. Also the lexical baseline
of the semantic cache's precision study.
"""

from __future__ import annotations

import hashlib
import math
import re

_TOKEN = re.compile(r"\w+")


def _bucket(feature: str, dims: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(feature.encode(), digest_size=8).digest(), "big")
    return h % dims, 1.0 if (h >> 63) & 1 else -1.0


def lexical_embedding(text: str, dims: int = 256) -> list[float]:
    """A unit vector of hashed features: character trigrams of each word, and the words."""
    vec = [0.0] * dims
    for word in _TOKEN.findall(text.lower()):
        padded = f" {word} "
        for i in range(len(padded) - 2):
            idx, sign = _bucket("c:" + padded[i : i + 3], dims)
            vec[idx] += sign
        idx, sign = _bucket("w:" + word, dims)
        vec[idx] += 2 * sign
    norm = math.sqrt(sum(x * x for x in vec)) or 1.0
    return [x / norm for x in vec]
