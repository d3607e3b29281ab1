"""Names, places, organizations and addresses without a NER model: rules over capitalized runs.

Used when no NER backend is configured. What it finds, and how sure it is:
- a person after an honorific ("Mrs. Yudina", 0.85) or a cue ("my name is", "Dear", "Name:", 0.75);
- countries and nationalities from a word list (0.85 / 0.75);
- organizations ending in a company word ("Careset Systems", "Acme GmbH", 0.75) or after
  "work for" / "employed by" (0.7);
- places after "in", "from", "flew to"... (0.55) and in address blocks;
- street addresses by shape: number + name + street type ("12 Baker St"), a street word before the
  name ("Via Roma 12", "ul. Długa 5") or as its suffix ("Hauptstraße 5"), units ("Apt. 3"), P.O.
  and military boxes; postal codes after an address or after "zip";
- ages after "aged", "turned", "I am" or before "years old";
- otherwise two or more capitalized words that are not common words: a person, at 0.5.
Lower-case names, single unknown names without a cue, and most organizations are missed: configure
an NER backend (`guardrails.ner`) where that matters.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import regex as rx

from plinth.guardrails.pii.gazetteer import (
    COUNTRIES,
    DEMONYMS,
    HONORIFICS,
    NOT_NAMES,
    ORG_SUFFIXES,
    STREET_PREFIXES,
    STREET_SUFFIXES,
    STREET_TYPES,
)
from plinth.guardrails.pii.patterns import digit_runs
from plinth.guardrails.types import Finding

CONFIDENTIAL = "confidential"

_CAP = r"[\p{Lu}\p{Lt}][\p{L}\p{M}'\u2019\-]*\.?"
_LINK = r"(?:van|von|der|den|de|da|di|del|della|des|du|dos|das|le|la|bin|ibn|al|el|ter|ten|y)"
_RUN = rx.compile(
    rf"(?<![\p{{L}}\p{{M}}\d'\u2019\-@./])(?:{_CAP})(?:[ \t]+(?:{_LINK}[ \t]+)*{_CAP})*(?![\p{{L}}\p{{M}}\d@])"
)
# The same runs in ASCII text, where the letters are A-Z and a-z, by the standard library's `re`:
# about 30% faster warm and much more in the gateway, where the `regex` module's code is cold by the
# time a request scans (rules._runs in a running gateway, short texts: 27 -> 18 microseconds each).
# tests/test_guardrails_pii.py holds the two to the same matches.
_CAP_ASCII = r"[A-Z][A-Za-z'\-]*\.?"
_RUN_ASCII = re.compile(
    rf"(?<![A-Za-z\d'\-@./])(?:{_CAP_ASCII})(?:[ \t]+(?:{_LINK}[ \t]+)*{_CAP_ASCII})*(?![A-Za-z\d@])"
)

# Words just before a capitalized run that say what it is; the longest matching cue wins.
_PERSON_CUES = frozenset(
    """my name is|name is|name:|i am|i'm|this is|call me|called|named|dear|hi|hello|hey|thanks|thank you|
    regards|sincerely|signed|contact|ask for|speak to|speak with|talk to|talk with|meet|met|with|by|cc|cc:|
    attn|attn:|patient|customer|client|employee|son|daughter|wife|husband|kid|child|mother|father|brother|
    sister|friend|colleague|add|under|tribute to|follow up with|user:|songwriter|singer|artist|author|
    writer|actor|actress|founders:|founder|guardian|dr|dr.|prof|prof.|change it to|manager|assistant|owner|
    name on the account is|last name is|first name is|surname is|name's|named after|married|invite|invited|
    ask|asked|tell|told|email|e-mail|call|by:|from:|to:|signed:|contact:|name:|patient:|employee:""".replace("\n", "").split("|")
)  # fmt: skip
_PLACE_CUES = frozenset(
    """in|from|to|near|visit|visited|visiting|live in|lives in|lived in|moved to|based in|flew to|fly to|
    city of|born in|travel to|traveled to|travelled to|travelling to|traveling to|go to|going to|went to|
    around|at|across|throughout|outside|inside|located in|capital of|town of|village of|north of|south of|
    east of|west of|back to|arrived in|arrived at|trip to|flight to|office in""".replace("\n", "").split("|")
)  # fmt: skip
_ORG_CUES = frozenset(
    """work for|works for|worked for|working for|work at|works at|worked at|working at|work with|
    employed by|employed at|join|joined|joining|company|firm|employer|acquired by|partnered with|client of|
    invest in|invested in|job at|position at|intern at|shares of|stock of|ceo of|founder of|
    president of""".replace("\n", "").split("|")
)  # fmt: skip


def _cue(before: str) -> str | None:
    """ "person", "place", "org" or None, from the (up to three) words just before."""
    words = [w.strip(",;").lower() for w in before.split()[-4:]]
    for n in (4, 3, 2, 1):
        if len(words) < n:
            continue
        phrase = " ".join(words[-n:])
        if phrase in _ORG_CUES:
            return "org"
        if phrase in _PERSON_CUES:
            return "person"
        if phrase in _PLACE_CUES:
            return "place"
    return None


_PERSON_AFTER = rx.compile(
    r"(?:'s\b|\u2019s\b|\s+(?:said|says|wrote|will|was|is|has|had|and (?:i|me)|who|lives|works|called|"
    r"replied|asked|told)\b|\s*,\s*(?:can|could|would|please|do|are|is)\b)",
    rx.IGNORECASE,
)
_NUM = r"\d{1,6}[A-Za-z]?"
_TOK = r"[\p{L}\p{M}'\u2019.\-]+"
_UNIT = r"(?:apt|apartment|suite|ste|unit|flat|floor|fl|room|rm|bldg|building)\.?\s*#?\s*\d{1,6}[A-Za-z]?"

# 12 Baker Street, 370 3911 Fourth Avenue: from the street type back to the house number
_BEFORE_TYPE = rx.compile(rf"(?<![\w.])(?:{_NUM}[ \t]+)?{_NUM}[ \t]+(?:{_TOK}[ \t]+){{0,4}}$")
_ADDRESS = (
    # 4596 Tylova 285: house number, a capitalized name, a number
    (
        rx.compile(
            rf"(?<![\w.,])\d{{2,6}}[ \t]+{_CAP}(?:[ \t]+{_CAP}){{0,2}}[ \t]+\d{{1,4}}[A-Za-z]?(?![\w,.]|\.\d)"
        ),
        0.6,
    ),
)
_BOXES = (
    (re.compile(r"(?<![\w.])p\.?\s?o\.?\s?box[ \t]+\d{1,6}\b", re.I), 0.8),
    (re.compile(r"(?<![\w.])(?:(?:psc|unit|usns|usnv|uss|uscgc)[ \t]+[\w ]{1,40}?,?[ \t]*(?:box[ \t]+\d{1,5})?\s*\n?\s*)?[adf]po[ \t]+a[aep][ \t]+\d{5}\b", re.I), 0.8),
)  # fmt: skip
_UNIT_AT = rx.compile(rf"{_UNIT}\b", rx.I)
_UNITS = frozenset(
    ("apt", "apartment", "suite", "ste", "unit", "flat", "floor", "fl", "room", "rm", "bldg", "building")
)
# Street words found by a token scan (a regex alternation of them would be tried at every position).
_WORD = rx.compile(r"(?<![\p{L}\p{M}'\u2019\-])[\p{L}\p{M}'\u2019\-]{2,40}")
# Via Roma 12, ul. Długa 5, Rue de la Paix 3 (matched from the street word on)
_PREFIX_AT = rx.compile(rf"\p{{L}}+\.?[ \t]+(?:{_TOK}[ \t]+){{0,3}}?{_TOK}[ \t]+\d{{1,5}}[A-Za-z]?\b")
# 33 avenue de Provence (matched from the number on)
_NUM_PREFIX = re.compile(rf"{_NUM}[ \t]+$")
_PREFIX_NAME = rx.compile(rf"\p{{L}}+\.?[ \t]+(?:{_LINK}[ \t]+)*{_CAP}(?:[ \t]+{_CAP}){{0,2}}")
# Hauptstraße 5, Mellemvej 32, Koskikatu 25
_SUFFIX_AT = rx.compile(r"[\p{L}\p{M}'\u2019\-]+\.?[ \t]+\d{1,5}[A-Za-z]?\b")
_DIGIT = re.compile(r"\d")
_TOKEN = re.compile(r"\S+")
_ZIP_CUE = re.compile(r"\b(?:zip|zip code|postal code|postcode|post code|plz|cap|cp)\b\s*(?:is|:)?\s*$", re.I)
_ZIP = re.compile(
    r"(?<![\w-])(?:\d{5}(?:-\d{3,4})?|\d{3}[ ]\d{2}|\d{4}|[A-Z]\d[A-Z][ ]?\d[A-Z]\d|[A-Z]{1,2}\d[\dA-Z]?[ ]?\d[A-Z]{2})(?![\w-])"
)
# Ages: a number of at most three digits, after "aged", "turned", "I am"... or before "years old".
_SMALL_NUMBER = re.compile(r"(?<![\d.,:/$€£-])\d{1,3}(?![\d,:/%]|\.\d)")
_AGE_BEFORE = re.compile(r"\b(?:aged?|age\s*:|turned|turning|i am|i'm|he is|she is|he's|she's)\s+$", re.I)
_AGE_AFTER = re.compile(r"[ -](?:years?|yrs?)[ -]old\b", re.I)
_NOT_AGE_AFTER = re.compile(r"\s*(?:%|percent|kg|lbs?|cm|km|am|pm|dollars|euros|\$|:\d)", re.I)


def _norm(token: str) -> str:
    return token.lower().rstrip(".")


def scan(text: str, scanner: str, runs: Sequence[tuple[int, int]] | None = None) -> list[Finding]:
    """Names, places, organizations, addresses and ages; `runs` is `digit_runs(text)` if known."""
    out: list[Finding] = []
    windows = _digit_windows(text, digit_runs(text) if runs is None else runs, 60)
    if windows:
        _addresses(text, windows, scanner, out)
    _runs(text, scanner, out)
    for lo, hi in windows:
        for m in _SMALL_NUMBER.finditer(text, lo, hi):
            start, end = m.span()
            if not 0 < int(m.group()) < 125:
                continue
            after = _AGE_AFTER.match(text, end)
            if after is None and (
                _AGE_BEFORE.search(text, max(0, start - 16), start) is None or _NOT_AGE_AFTER.match(text, end)
            ):
                continue
            out.append(Finding("AGE", start, end, 0.7, scanner, "pii.age", CONFIDENTIAL))
    return out


def _digit_windows(text: str, runs: Sequence[tuple[int, int]], margin: int = 40) -> list[tuple[int, int]]:
    """Merged spans of `margin` characters around each number (ages and addresses live there)."""
    spans: list[tuple[int, int]] = []
    for start, end in runs:
        lo, hi = max(0, start - margin), min(len(text), end + margin)
        if spans and lo <= spans[-1][1]:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    return spans


def _addresses(text: str, spans: list[tuple[int, int]], scanner: str, out: list[Finding]) -> None:
    found: list[tuple[int, int]] = []

    def add(start: int, end: int, score: float) -> None:
        if not any(start < e and end > s for s, e in found):
            found.append((start, end))
            out.append(Finding("STREET_ADDRESS", start, end, score, scanner, "pii.address", CONFIDENTIAL))

    # Every address shape has a number within a few words of its street or unit word.
    words = [m for lo, hi in spans for m in _WORD.finditer(text, lo, hi)]
    for m in words:
        word = m.group().lower()
        if word in STREET_PREFIXES:
            hit = _PREFIX_AT.match(text, m.start())
            if hit is not None:
                add(hit.start(), hit.end(), 0.7)
                continue
            number = _NUM_PREFIX.search(text, max(0, m.start() - 12), m.start())
            named = _PREFIX_NAME.match(text, m.start()) if number is not None else None
            if number is not None and named is not None:
                add(number.start(), named.end(), 0.7)
        if word in _UNITS:
            hit = _UNIT_AT.match(text, m.start())
            if hit is not None:
                add(hit.start(), hit.end(), 0.7)
                continue
        if word in STREET_TYPES:
            head = _BEFORE_TYPE.search(text, max(0, m.start() - 80), m.start())
            if head is not None:
                add(head.start(), m.end(), 0.75)
        elif word.endswith(STREET_SUFFIXES) and word not in STREET_SUFFIXES:
            hit = _SUFFIX_AT.match(text, m.start())
            if hit is not None:
                add(hit.start(), hit.end(), 0.7)
    for pattern, score in _ADDRESS:
        for lo, hi in spans:
            for m in pattern.finditer(text, lo, hi):
                add(m.start(), m.end(), score)
    lowered = text.lower()
    if "box" in lowered or "po " in lowered:
        for pattern, score in _BOXES:
            for m in pattern.finditer(text):
                add(m.start(), m.end(), score)
    # Postal codes: in the 80 characters after an address, or after "zip code".
    windows = [(e, min(len(text), e + 80)) for _s, e in found]
    if any(k in lowered for k in ("zip", "postal", "postcode", "post code", "plz")):
        windows.append((0, len(text)))
    seen: set[int] = set()
    for lo, hi in windows:
        for m in _ZIP.finditer(text, lo, hi):
            start, end = m.span()
            if start in seen or any(start < e and end > s for s, e in found):
                continue
            seen.add(start)
            cue = _ZIP_CUE.search(text, max(0, start - 24), start)
            near = any(0 <= start - e <= 80 for _s, e in found)
            if cue or near:
                out.append(
                    Finding(
                        "ZIP_CODE", start, end, 0.7 if cue else 0.6, scanner, "pii.zip_code", CONFIDENTIAL
                    )
                )


def _runs(text: str, scanner: str, out: list[Finding]) -> None:
    for m in (_RUN_ASCII if text.isascii() else _RUN).finditer(text):
        run = m.group()
        base = m.start()
        if " " not in run and "\t" not in run:  # one word: most runs, most of them sentence starters
            low = _norm(run)
            if low in NOT_NAMES:
                continue
            if low in HONORIFICS:
                out.append(Finding("TITLE", base, m.end(), 0.6, scanner, "pii.title", None))
                continue
            _classify(text, [(0, len(run))], base, scanner, out)
            continue
        tokens = [t.span() for t in _TOKEN.finditer(run)]
        # Split the run at words that are not names; classify each piece.
        piece: list[tuple[int, int]] = []
        for s, e in tokens:
            word = text[base + s : base + e]
            low = _norm(word)
            if low in HONORIFICS and not piece:
                out.append(Finding("TITLE", base + s, base + e, 0.6, scanner, "pii.title", None))
                piece = []
                _honorific_person(text, base + e, m.end(), scanner, out)
                break
            if low in NOT_NAMES or (word.isupper() and len(word) <= 3 and len(tokens) > 1):
                _classify(text, piece, base, scanner, out)
                piece = []
                continue
            piece.append((s, e))
        else:
            _classify(text, piece, base, scanner, out)


def _honorific_person(text: str, start: int, end: int, scanner: str, out: list[Finding]) -> None:
    while start < end and text[start] in " \t.":
        start += 1
    words = text[start:end].split()
    keep: list[str] = []
    for w in words[:3]:
        if _norm(w) in NOT_NAMES:
            break
        keep.append(w)
    if keep:
        stop = text.index(keep[-1], start) + len(keep[-1])
        out.append(Finding("PERSON", start, stop, 0.85, scanner, "pii.person", CONFIDENTIAL))


def _classify(text: str, piece: list[tuple[int, int]], base: int, scanner: str, out: list[Finding]) -> None:
    if not piece:
        return
    start, end = base + piece[0][0], base + piece[-1][1]
    if text[end - 1] == "." and not (end - start == 2 or text[end - 2].isupper()):
        end -= 1  # a sentence's full stop, not an initial
    phrase = text[start:end]
    low = phrase.lower()
    words = low.split()
    if low in COUNTRIES:
        out.append(Finding("LOCATION", start, end, 0.85, scanner, "pii.location", None))
        return
    if low in DEMONYMS:
        out.append(Finding("NRP", start, end, 0.75, scanner, "pii.nrp", None))
        return
    if len(words) >= 2 and _norm(words[-1]) in ORG_SUFFIXES:
        out.append(Finding("ORGANIZATION", start, end, 0.75, scanner, "pii.organization", None))
        return
    cue = _cue(text[max(0, start - 40) : start]) if start and text[start - 1] != "\n" else None
    if cue == "org":
        out.append(Finding("ORGANIZATION", start, end, 0.7, scanner, "pii.organization", None))
        return
    if cue == "person" or (cue is None and _PERSON_AFTER.match(text, end, end + 24)):
        out.append(Finding("PERSON", start, end, 0.75, scanner, "pii.person", CONFIDENTIAL))
        return
    if cue == "place":
        out.append(Finding("LOCATION", start, end, 0.55, scanner, "pii.location", None))
        return
    if len(words) >= 2 and all(not w.isupper() or len(w) > 3 for w in phrase.split()):
        out.append(Finding("PERSON", start, end, 0.5, scanner, "pii.person", CONFIDENTIAL))


__all__ = ["scan"]
