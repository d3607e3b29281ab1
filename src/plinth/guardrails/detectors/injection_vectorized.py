"""The injection classifier's decision function in numpy, used when numpy is installed.

Per 1,000-character window, the pure-Python scorer builds and hashes ~5,000 n-gram strings and loops
over them (about 2.5 microseconds per character). Here each n-gram is an integer instead (its
characters' indexes in the vocabulary's alphabet, 7 bits each, plus its length), looked up in a
direct-mapped hash table of the vocabulary's keys (a `searchsorted` over the sorted keys cost twice
as much: measured 459 against 207 microseconds for the 14,000 n-grams of a 2 KB prompt's windows),
and only the n-grams found are counted. The result equals the pure-Python `decision_python` to
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
_EMPTY = -1  # a free slot of the hash table (every key is >= 0)
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # multiplicative hashing: 2**64 / golden ratio
_TF = np.concatenate(([0.0], 1.0 + np.log(np.arange(1, 4096, dtype=np.float64))))  # sublinear tf by count
_POSITIONS = np.arange(8192, dtype=np.int64)  # n-gram start positions, sliced rather than made anew


class VocabularyDoesNotFit(ValueError):
    """The vocabulary does not fit the integer coding: more distinct characters than an n-gram key
    can hold, NUL in an n-gram, or more n-grams than the packed hash table can index."""


class VectorizedDecision:
    """`w . tfidf(text)` (without the intercept) over integer-coded n-grams."""

    def __init__(self, vocab: Mapping[str, tuple[float, float]]) -> None:
        alphabet = sorted(set("".join(vocab)))
        if len(alphabet) >= 1 << _BITS:
            raise VocabularyDoesNotFit(f"{len(alphabet)} distinct characters in the injection vocabulary")
        if "\0" in alphabet:  # `dots` joins windows with it
            raise VocabularyDoesNotFit("the injection vocabulary has NUL in an n-gram")
        self._table = np.zeros(max(map(ord, alphabet), default=0) + 1, dtype=np.int64)
        for index, ch in enumerate(alphabet, start=1):
            self._table[ord(ch)] = index
        keys = np.array([self._key(gram) for gram in vocab], dtype=np.int64)
        idf = np.array([v[0] for v in vocab.values()], dtype=np.float64)
        coef = np.array([v[1] for v in vocab.values()], dtype=np.float64)
        # Per n-gram, what one occurrence adds to the dot product and to the squared norm (before tf):
        # side by side, so one gather (one cache line) fetches both.
        self._weights = np.column_stack((idf * coef, idf * idf))
        self._build_hash_table(keys)

    def _key(self, gram: str) -> int:
        key = 0
        for ch in gram:
            key = (key << _BITS) | int(self._table[ord(ch)])
        return key | (len(gram) << _LENGTH_SHIFT)

    def _build_hash_table(self, keys: npt.NDArray[np.int64]) -> None:
        """A direct-mapped table at a load of at most 1/4 (each slot holds `key << index bits | index`,
        so one gather answers most lookups), and the keys that lost their home slot to another in a
        small sorted array. Open addressing with probe rounds cost more in numpy: each round is a
        dozen array calls, and a 2 KB prompt needed up to nine (measured)."""
        bits = max(4, (4 * len(keys) - 1).bit_length())
        self._shift = np.uint64(64 - bits)
        self._index_bits = max(1, (len(keys) - 1).bit_length())
        if _LENGTH_SHIFT + 3 + self._index_bits > 63:
            raise VocabularyDoesNotFit(f"{len(keys)} n-grams are too many for the packed hash table")
        self._slots = np.full(1 << bits, _EMPTY, dtype=np.int64)
        home = self._home(keys)
        homes, first = np.unique(home, return_index=True)
        self._slots[homes] = (keys[first] << self._index_bits) | first
        displaced = np.ones(len(keys), dtype=bool)
        displaced[first] = False
        order = np.argsort(keys[displaced])
        self._overflow_keys = keys[displaced][order]
        self._overflow_index = np.flatnonzero(displaced)[order]

    def _home(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        return ((keys.view(np.uint64) * _FIBONACCI) >> self._shift).view(np.int64)

    def _lookup(self, keys: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The vocabulary index of each key, -1 for keys not in it."""
        slot = self._slots[self._home(keys)]
        index_mask = (1 << self._index_bits) - 1
        found = np.where((slot >> self._index_bits) == keys, slot & index_mask, -1)
        # A key whose home slot holds another key may be among the displaced ones.
        doubtful = np.flatnonzero((found < 0) & (slot != _EMPTY))
        if len(doubtful) and len(self._overflow_keys):
            wanted = keys[doubtful]
            at = np.searchsorted(self._overflow_keys, wanted)
            at[at == len(self._overflow_keys)] = 0
            hit = self._overflow_keys[at] == wanted
            found[doubtful[hit]] = self._overflow_index[at[hit]]
        return found

    def dot(self, text: str) -> float:
        return self.dots([text])[0]

    def dots(self, texts: Sequence[str]) -> list[float]:
        """`dot` of each text (the windows of one document) in one pass: the windows are joined by
        a character outside the alphabet, which no counted n-gram can span. numpy's fixed costs are
        then paid once per document."""
        folded = [fold(text) for text in texts]
        grams, positions = self._grams("\0".join(folded))
        index = self._lookup(grams)
        known = np.flatnonzero(index >= 0)
        if not len(known):  # no n-gram of any text is in the vocabulary
            return [0.0] * len(texts)
        lengths = np.fromiter((len(f) + 1 for f in folded), dtype=np.int64, count=len(folded))
        window_of = np.repeat(np.arange(len(folded), dtype=np.int64), lengths)
        # Count each (window, n-gram) pair by sorting the pairs as single integers; int32 sorts in
        # half the time of int64 (measured), and short documents fit.
        pairs = (window_of[positions[known]] << self._index_bits) | index[known]
        if len(folded) < 1 << (31 - self._index_bits):
            pairs = pairs.astype(np.int32)
        pairs.sort()
        first = np.empty(len(pairs), dtype=bool)
        first[0] = True
        np.not_equal(pairs[1:], pairs[:-1], out=first[1:])
        starts = np.flatnonzero(first)
        counts = np.diff(starts, append=len(pairs))
        distinct = pairs[starts]
        window = distinct >> self._index_bits
        # `take` rather than `[...]`: 10x faster on rows of a 2-D array (measured)
        weights = np.take(self._weights, distinct & ((1 << self._index_bits) - 1), axis=0)
        tf = _TF[counts] if counts.max() < len(_TF) else 1.0 + np.log(counts)  # 1 + log(1) is 1.0
        dots = np.bincount(window, weights=tf * weights[:, 0], minlength=len(texts))
        norms = np.bincount(window, weights=tf * tf * weights[:, 1], minlength=len(texts))
        return [float(d) / float(np.sqrt(n)) if n > 0.0 else 0.0 for d, n in zip(dots, norms, strict=True)]

    def _codes(self, folded: str) -> npt.NDArray[np.int64]:
        points = np.frombuffer(folded.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        inside = points < len(self._table)
        return np.where(inside, self._table[np.where(inside, points, 0)], 0)

    def _grams(self, folded: str) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """The integer key of every n-gram of `folded`, and the position each starts at.

        An n-gram with a character outside the alphabet gets a key with a zero digit, which no
        vocabulary key has: it is simply not found (cheaper than filtering such n-grams out here)."""
        codes = self._codes(folded)
        key = codes  # the n-grams of one size, built from those of the size below
        keys: list[npt.NDArray[np.int64]] = [np.empty(0, np.int64)]
        positions: list[npt.NDArray[np.int64]] = [np.empty(0, np.int64)]
        for size in range(1, NGRAM_MAX + 1):
            stop = len(codes) - size + 1
            if stop <= 0:
                break
            if size > 1:
                key = (key[:stop] << _BITS) | codes[size - 1 :]
            if size >= NGRAM_MIN:
                keys.append(key | (size << _LENGTH_SHIFT))
                positions.append(_POSITIONS[:stop] if stop <= len(_POSITIONS) else np.arange(stop))
        return np.concatenate(keys), np.concatenate(positions)
