"""The injection classifier's decision function in numpy, used when numpy is installed.

Per 1,000-character window, the pure-Python scorer builds and hashes ~5,000 n-gram strings and loops
over them (about 2.5 microseconds per character). Here each n-gram is an integer instead (its
characters' indexes in the vocabulary's alphabet, 7 bits each, plus its length), and counting and
vocabulary lookup are sorted-array operations. The result equals the pure-Python `decision_python` to
rounding (the sums run in another order; tests/test_guardrails_injection_speed.py holds it to 1e-9).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from plinth.guardrails.detectors.injection_features import NGRAM_MAX, NGRAM_MIN
from plinth.guardrails.detectors.text import fold

_BITS = 7  # up to 127 distinct characters in the vocabulary; index 0 is "not in any n-gram"
_LENGTH_SHIFT = _BITS * NGRAM_MAX
_WINDOW_SHIFT = _LENGTH_SHIFT + 4  # `dots` tags each n-gram key with its text's index above this
_GRAM_MASK = (1 << _WINDOW_SHIFT) - 1


class AlphabetTooLarge(ValueError):
    """The vocabulary has more distinct characters than an n-gram key can hold (or NUL)."""


class VectorizedDecision:
    """`w . tfidf(text)` (without the intercept) over integer-coded n-grams."""

    def __init__(self, vocab: Mapping[str, tuple[float, float]]) -> None:
        alphabet = sorted(set("".join(vocab)))
        if len(alphabet) >= 1 << _BITS:
            raise AlphabetTooLarge(f"{len(alphabet)} distinct characters in the injection vocabulary")
        if "\0" in alphabet:  # `dots` joins windows with it
            raise AlphabetTooLarge("the injection vocabulary has NUL in an n-gram")
        self._table = np.zeros(max(map(ord, alphabet), default=0) + 1, dtype=np.int64)
        for index, ch in enumerate(alphabet, start=1):
            self._table[ord(ch)] = index
        keys = np.array([self._key(gram) for gram in vocab], dtype=np.int64)
        order = np.argsort(keys)
        self._keys = keys[order]
        self._idf = np.array([v[0] for v in vocab.values()], dtype=np.float64)[order]
        self._coef = np.array([v[1] for v in vocab.values()], dtype=np.float64)[order]

    def _key(self, gram: str) -> int:
        key = 0
        for ch in gram:
            key = (key << _BITS) | int(self._table[ord(ch)])
        return key | (len(gram) << _LENGTH_SHIFT)

    def _codes(self, folded: str) -> npt.NDArray[np.int64]:
        points = np.frombuffer(folded.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        inside = points < len(self._table)
        return np.where(inside, self._table[np.where(inside, points, 0)], 0)

    def dot(self, text: str) -> float:
        return self.dots([text])[0]

    def dots(self, texts: Sequence[str]) -> list[float]:
        """`dot` of each text (the windows of one document) in one pass: the windows are joined by
        a character outside the alphabet, which no counted n-gram can span, and each n-gram is
        tagged with its window. numpy's fixed costs are then paid once per document."""
        folded = [fold(text) for text in texts]
        grams, positions = self._grams("\0".join(folded))
        if not len(grams):  # no text had a character of the vocabulary's alphabet
            return [0.0] * len(texts)
        lengths = np.fromiter((len(f) + 1 for f in folded), dtype=np.int64, count=len(folded))
        window_of = np.repeat(np.arange(len(folded), dtype=np.int64), lengths)
        # Count by sorting (a stable sort is the fastest for these keys), then look the distinct ones up.
        ordered = np.sort(grams | (window_of[positions] << _WINDOW_SHIFT), kind="stable")
        first = np.empty(len(ordered), dtype=bool)
        first[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        tagged = ordered[starts]
        counts = np.diff(starts, append=len(ordered))
        keys = tagged & _GRAM_MASK
        where = np.searchsorted(self._keys, keys)
        where[where == len(self._keys)] = 0
        hit = self._keys[where] == keys
        where = where[hit]
        window = tagged[hit] >> _WINDOW_SHIFT
        tally = counts[hit]
        tf = np.where(tally == 1, 1.0, 1.0 + np.log(tally))
        values = tf * self._idf[where]
        norms = np.bincount(window, weights=values * values, minlength=len(texts))
        dots = np.bincount(window, weights=values * self._coef[where], minlength=len(texts))
        return [float(d) / float(np.sqrt(n)) if n > 0.0 else 0.0 for d, n in zip(dots, norms, strict=True)]

    def _grams(self, folded: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The integer keys of every n-gram of `folded` whose characters are all in the alphabet,
        and the position each starts at."""
        codes = self._codes(folded)
        known = codes != 0
        key = codes  # the n-grams of one size, built from those of the size below
        valid = known
        keys: list[npt.NDArray[np.int64]] = [np.empty(0, np.int64)]
        positions: list[npt.NDArray[np.int64]] = [np.empty(0, np.int64)]
        for size in range(1, NGRAM_MAX + 1):
            stop = len(codes) - size + 1
            if stop <= 0:
                break
            if size > 1:
                key = (key[:stop] << _BITS) | codes[size - 1 :]
                valid = valid[:stop] & known[size - 1 :]
            if size >= NGRAM_MIN:
                at = np.flatnonzero(valid)
                keys.append(key[at] | (size << _LENGTH_SHIFT))
                positions.append(at)
        return np.concatenate(keys), np.concatenate(positions)
