"""Regex recognizers: a candidate pattern, an optional validator, and context words that raise the score.

A `Pattern` finds candidates; the validator (checksum, structure) drops look-alikes; context words
near the match (within `CONTEXT_BEFORE` characters before or `CONTEXT_AFTER` after) raise the score
or are required. The same machinery runs the built-in identifiers and the enterprise ones declared
in configuration. Matched values are never stored: a finding is a type, a span and a score.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from plinth.guardrails.pii.validators import Validator
from plinth.guardrails.types import Finding

CONTEXT_BEFORE = 48
CONTEXT_AFTER = 24
NEGATIVE_BEFORE = 20


class Words:
    """Context words, as one case-insensitive whole-word regex ("phone number" also matches
    "phone-number")."""

    __slots__ = ("items", "lowered", "regex")

    def __init__(self, *items: str) -> None:
        self.items = tuple(i.lower() for i in items)
        alternatives = "|".join(
            sorted((re.escape(i).replace(r"\ ", r"[\s_-]*") for i in self.items), key=len)[::-1]
        )
        self.regex = re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])", re.IGNORECASE)
        # The same, case-sensitive, for lower-cased text (a case-insensitive search is slower).
        self.lowered = re.compile(rf"(?<![^\W_])(?:{alternatives})(?![^\W_])")

    def near(self, text: str, start: int, end: int) -> bool:
        lo, hi = max(0, start - CONTEXT_BEFORE), min(len(text), end + CONTEXT_AFTER)
        return self.regex.search(text, lo, start) is not None or self.regex.search(text, end, hi) is not None


@dataclass(frozen=True, slots=True)
class Pattern:
    type: str
    rule: str
    regex: re.Pattern[str]
    score: float  # without context; 0: context required
    validator: Validator | None = None
    context: Words | None = None
    context_score: float = 0.0  # score when a context word is near
    context_type: str | None = None  # type when a context word is near (a date near "born": DATE_OF_BIRTH)
    data_class: str | None = None
    group: int = 0  # the regex group holding the value
    prefilter: str | None = None  # a substring the text must contain for the regex to run
    # Scan only around these substrings (an e-mail around "@"): long texts are not scanned whole.
    anchors: tuple[str, ...] = ()
    negative: Words | None = None  # words just before the match that veto it ("version 1.2.3.4")
    # Score from the value itself (a card of a known issuer scores higher); None rejects it.
    scorer: Callable[[str], float | None] | None = None
    needs_digit: bool = True  # skipped at once on a text without digits
    min_run: int = 1  # skipped when the text has no run of this many consecutive digits
    min_digits: int = 1  # skipped when the text has fewer digits in all
    # Skipped unless the lower-cased text matches this ("day" for weekday names): see `any_of`.
    any_of: re.Pattern[str] | None = None


_DIGITS = re.compile(r"\d+")
_ASCII_DIGITS = re.compile(r"[0-9]+")
_SPACE = re.compile(r"\s")
WINDOW_MARGIN = 32  # characters scanned on each side of a digit run (letters of an IBAN, a NINO...)
SHORT_TEXT = 256  # below this, a whole-text context pre-check is cheaper than the pattern itself


def digit_runs(text: str) -> list[tuple[int, int]]:
    """Spans of the runs of digits in `text`. The pii scanner finds them once for its patterns and
    its name and address rules (70 microseconds on 2 KB of prose); on ASCII text `[0-9]` finds the
    same runs as `\\d` a third faster (measured)."""
    regex = _ASCII_DIGITS if text.isascii() else _DIGITS
    return [m.span() for m in regex.finditer(text)]


def _windows(text: str, anchors: Iterable[tuple[int, int]], margin: int) -> list[tuple[int, int]]:
    """Merged spans around the anchors, widened to whitespace so no token is cut."""
    n = len(text)
    out: list[tuple[int, int]] = []
    for s, e in anchors:
        lo, hi = max(0, s - margin), min(n, e + margin)
        while lo > 0 and not text[lo - 1].isspace():
            lo -= 1
        m = _SPACE.search(text, hi)
        hi = m.start() if m is not None else n
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(hi, out[-1][1]))
        else:
            out.append((lo, hi))
    return out


def any_of(*words: str) -> re.Pattern[str]:
    """A case-sensitive alternation, searched in the lower-cased text (faster than IGNORECASE)."""
    return re.compile("|".join(re.escape(w) for w in words))


def _find_all(text: str, needle: str) -> list[int]:
    out: list[int] = []
    i = text.find(needle)
    while i >= 0:
        out.append(i)
        i = text.find(needle, i + 1)
    return out


def ordered(patterns: Iterable[Pattern]) -> tuple[Pattern, ...]:
    """Patterns without digits first, then by `min_digits`: `run_patterns` stops at the first one
    needing more digits than the text has (most texts have few), instead of checking each."""
    return tuple(sorted(patterns, key=lambda p: (p.needs_digit, p.min_digits if p.needs_digit else 0)))


def run_patterns(
    patterns: Iterable[Pattern],
    text: str,
    scanner: str,
    *,
    is_ordered: bool = False,
    runs: Sequence[tuple[int, int]] | None = None,
) -> list[Finding]:
    """Run `patterns` over `text`. Patterns of identifiers with digits only scan the windows around
    the text's digit runs: in 2 KB of prose with one card number that is a hundred characters.
    With `is_ordered` (patterns from `ordered`), the loop ends at the first pattern the text has
    too few digits for. `runs`: `digit_runs(text)` when the caller has it already."""
    out: list[Finding] = []
    if runs is None:
        runs = digit_runs(text)
    longest = max((e - s for s, e in runs), default=0)
    total = sum(e - s for s, e in runs)
    near_digits: list[tuple[int, int]] | None = None
    present: dict[int, bool] = {}  # per context word list: does the text hold any of them at all?
    lowered: str | None = None
    short = len(text) < SHORT_TEXT
    for p in patterns:
        if p.needs_digit and (longest < p.min_run or total < p.min_digits):
            if is_ordered and total < p.min_digits:
                break
            continue
        if p.prefilter is not None and p.prefilter not in text:
            continue
        if p.any_of is not None:
            if lowered is None:
                lowered = text.lower()
            if p.any_of.search(lowered) is None:
                continue
        if short and p.score <= 0 and p.context is not None:  # context required
            seen = present.get(id(p.context))
            if seen is None:
                if lowered is None:
                    lowered = text.lower()
                seen = present[id(p.context)] = p.context.lowered.search(lowered) is not None
            if not seen:
                continue
        if p.anchors and not short:
            spots = sorted((i, i + len(a)) for a in p.anchors for i in _find_all(text, a))
            matches = [m for lo, hi in _windows(text, spots, 64) for m in p.regex.finditer(text, lo, hi)]
        elif p.needs_digit and not short:
            if near_digits is None:
                near_digits = _windows(text, runs, WINDOW_MARGIN)
            matches = [m for lo, hi in near_digits for m in p.regex.finditer(text, lo, hi)]
        else:
            matches = list(p.regex.finditer(text))
        for m in matches:
            start, end = m.span(p.group)
            if start >= end:
                continue
            if p.validator is not None and not p.validator(m.group(p.group)):
                continue
            score = p.score
            if p.scorer is not None:
                rescored = p.scorer(m.group(p.group))
                if rescored is None:
                    continue
                score = rescored
            kind = p.type
            if p.context is not None and p.context.near(text, start, end):
                score = max(score, p.context_score)
                kind = p.context_type or kind
            if score <= 0:
                continue
            if p.negative is not None and p.negative.regex.search(
                text, max(0, start - NEGATIVE_BEFORE), start
            ):
                continue
            out.append(Finding(kind, start, end, score, scanner, p.rule, p.data_class))
    return out


def _rank(f: Finding) -> tuple[float, int]:
    return (-f.score, f.start - f.end)


def _start(f: Finding) -> int:
    return f.start


def resolve_overlaps(findings: Sequence[Finding]) -> list[Finding]:
    """Keep the best of overlapping findings (higher score, then longer), in text order."""
    if len(findings) < 2:
        return list(findings)
    kept: list[Finding] = []
    for f in sorted(findings, key=_rank):
        start, end = f.start, f.end
        for k in kept:
            if start < k.end and end > k.start:
                break
        else:
            kept.append(f)
    kept.sort(key=_start)
    return kept


__all__ = [
    "CONTEXT_AFTER",
    "CONTEXT_BEFORE",
    "Pattern",
    "Words",
    "any_of",
    "ordered",
    "resolve_overlaps",
    "run_patterns",
]
