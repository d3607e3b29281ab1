"""Features of the injection classifier: character n-grams of the folded text.

Imported by the run-time scorer and by `scripts/train_injection_classifier.py`, so training and
scoring can never disagree on what a feature is. Character n-grams (not words) because the data mixes
English and German, attacks misspell on purpose ("igmre what I said") and they need no tokenizer.
"""

from __future__ import annotations

from collections import Counter

from plinth.guardrails.detectors.text import fold

NGRAM_MIN = 1
NGRAM_MAX = 5


def char_ngrams(text: str, lo: int = NGRAM_MIN, hi: int = NGRAM_MAX) -> list[str]:
    """All character n-grams of the folded text, lo <= n <= hi (what scikit-learn's `char` analyzer does)."""
    folded = fold(text)
    out: list[str] = []
    n = len(folded)
    for size in range(lo, hi + 1):
        out += [folded[i : i + size] for i in range(n - size + 1)]
    return out


def ngram_counts(text: str) -> Counter[str]:
    return Counter(char_ngrams(text))
