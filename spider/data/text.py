"""How built-in texts are split into words, and how numbers are written.

A word-level tokenizer is built from :func:`spider.data.vocabulary`; it must split text with
:func:`split_words` so that every built-in question and answer maps onto known words.
"""

from __future__ import annotations

import re

from spider.data.records import IMAGE_MARKER

# The exact rule: lowercase the text, then take, left to right, the image marker as one
# token, or a run of ASCII letters/digits, or any single other non-space character
# (punctuation: "?", ",", "."). Whitespace (including the newline after the marker) only
# separates words.
WORDS = r"[a-z0-9]+|[^\sa-z0-9]"  # the tiny model's tokenizer splits with this too
WORD_PATTERN = re.compile(re.escape(IMAGE_MARKER) + "|" + WORDS)

NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
    "seventeen", "eighteen",
)  # fmt: skip


def split_words(text: str) -> list[str]:
    """Split ``text`` into lowercase words the way the word-level tokenizer does.

    ``"<image>\\nHow many circles are there?"`` -> ``["<image>", "how", "many", "circles",
    "are", "there", "?"]``. The image marker stays one token; it is not part of
    :func:`~spider.data.vocabulary` because tokenizers add it as a special token.
    """
    return WORD_PATTERN.findall(text.lower())


def number_word(n: int) -> str:
    """Write ``n`` (0-18) as a word: built-in answers always use words (``3`` -> ``"three"``)."""
    return NUMBER_WORDS[n]
