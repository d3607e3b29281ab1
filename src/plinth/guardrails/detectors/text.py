"""Text normalization shared by the detectors (and by the injection classifier's training script).

Why one place: a detector that matches raw text is bypassed by full-width letters, zero-width joiners
or odd spacing. Every detector cleans text the same way before matching, and the classifier sees at
run time exactly the folding it was trained on.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

# Format characters (zero-width space/joiners, soft hyphen, BOM, bidi controls) carry no meaning for a
# reader but split words for a matcher.
_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")
_WORD = re.compile(r"\w+")
_SENTENCE_END = re.compile("(?<=[.!?;:\u3002\uff01\uff1f])\\s+|\n+")  # also CJK full stops


def clean(text: str) -> str:
    """NFKC (full-width and styled letters become plain ones) and invisible characters removed."""
    if text.isascii():  # nothing to normalize or remove: the common case costs one scan
        return text
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))


def fold(text: str) -> str:
    """`clean`, case folded, runs of whitespace made one space (and none at either end).

    `str.split` and the regex `\\s` agree on what whitespace is (tests/test_guardrails_injection_speed.py
    checks every code point); split-and-join is four times faster than `re.sub` (measured)."""
    return " ".join(clean(text).casefold().split())


def span_in_original(text: str, cleaned: str, start: int, end: int) -> tuple[int, int]:
    """Map a span of `clean(text)` back to `text`; the whole text where the mapping is ambiguous."""
    if cleaned == text:
        return start, end
    offsets: list[int] = []
    rebuilt: list[str] = []
    for index, ch in enumerate(text):
        if _INVISIBLE.match(ch):
            continue
        piece = unicodedata.normalize("NFKC", ch)
        rebuilt.append(piece)
        offsets.extend([index] * len(piece))
    if "".join(rebuilt) != cleaned or not offsets or start >= len(offsets):
        return 0, len(text)
    return offsets[start], offsets[max(start, end - 1)] + 1


def words(text: str) -> list[str]:
    """Word tokens (letters and digits) of `text`."""
    return _WORD.findall(text)


def word_matches(text: str) -> Iterator[re.Match[str]]:
    """The same tokens as `words`, with their spans."""
    return _WORD.finditer(text)


def alnum_only(text: str) -> str:
    """Letters and digits only: `L-A-B-Y-R-I-N-T-H` and `l a b y r i n t h` both become `labyrinth`."""
    return "".join(ch for ch in text if ch.isalnum())


def sentences(text: str) -> Iterator[tuple[int, int]]:
    """Spans of the sentences (or lines) of `text`, blank ones skipped."""
    start = 0
    for match in _SENTENCE_END.finditer(text):
        if text[start : match.start()].strip():
            yield start, match.start()
        start = match.end()
    if text[start:].strip():
        yield start, len(text)


def windows(text: str, size: int, overlap: int) -> Iterator[tuple[int, int]]:
    """Spans of at most `size` characters overlapping by about `overlap`, cut at a space where possible.

    Long documents are scored window by window: one injected paragraph in a long retrieved page must
    not be diluted by the rest of the page.
    """
    n = len(text)
    if n <= size:
        yield 0, n
        return
    start = 0
    while True:
        end = min(n, start + size)
        if end < n:
            cut = text.rfind(" ", start + size // 2, end)
            if cut > start:
                end = cut
        yield start, end
        if end >= n:
            return
        start = max(end - overlap, start + 1)
