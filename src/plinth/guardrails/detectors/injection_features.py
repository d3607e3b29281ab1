"""Features of the injection classifier: character n-grams of the folded text.

Imported by the run-time scorer and by `scripts/train_injection_classifier.py`, so training and
scoring can never disagree on what a feature is. Character n-grams (not words) because the data mixes
English and German, attacks misspell on purpose ("igmre what I said") and they need no tokenizer.
"""

from __future__ import annotations

from collections import Counter
from operator import add

from plinth.guardrails.detectors.text import fold

NGRAM_MIN = 1
NGRAM_MAX = 5


def char_ngrams(text: str, lo: int = NGRAM_MIN, hi: int = NGRAM_MAX) -> list[str]:
    """All character n-grams of the folded text, lo <= n <= hi (what scikit-learn's `char` analyzer does).

    Each size's n-grams are the previous size's with the next character appended, by `map` over
    `operator.add` (a loop in C): a third faster than slicing the text once per n-gram (measured:
    17 against 26 microseconds for a one-line prompt). Same n-grams, same order."""
    folded = fold(text)
    level = list(folded)
    out = level[:] if lo <= 1 else []
    for size in range(2, hi + 1):
        level = list(map(add, level, folded[size - 1 :]))  # stops at the shorter: len - size + 1
        if size >= lo:
            out += level
    return out


def ngram_counts(text: str) -> Counter[str]:
    return Counter(char_ngrams(text))
