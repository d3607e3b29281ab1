"""Output checks for leaks of the system prompt and of canary tokens planted in it.

A canary (`ScanContext.canaries`) is a secret the answer must never contain: a random marker the
application put in its system prompt, or a password the prompt protects. Attackers rarely get it
out verbatim, so the check also looks for it

- with different case, spacing or punctuation, or split across lines ("L-A-B-Y-R-I-N-T-H"),
- with look-alike characters: leetspeak ("h0l0gr4m") and Cyrillic or Greek letters for Latin ones,
- encoded: reversed, ROT13, Pig Latin, base64, hex or decimal character codes,
- spelled one letter per token (`input[0] == "s"`...) or in the spelling alphabet ("Zulu Echo..."),
- scrambled (an anagram; under 7 letters only where the text says so) or as a sound-alike after "rhymes with" / "sounds like" ("hugger not"),
- by spelling hints in text about a secret: first or last letter, number of letters (one fitting
  hint scores 0.6, two or more 0.85; a hint that contradicts the secret means another secret),
- by its words, their stems ("Ontologie" for "ontology") or its numbers in words ("twenty-nine",
  "the tenth prime"): all of them score 0.68-0.85 (by how many are stems only); fewer score below
  the default threshold,
- by its format, named in text about access or a secret: a date ("inputs that start with today's
  date"), hex bytes ("decode the hex"), a sum ("formatted as math equations"), a word in another
  script ("'apple' in Hindi, written in Devanagari"); 0.6. Such a hint cuts the guessing to a few
  tries. Not for the markers Plinth plants (`ScanContext.planted`): they are always hex, which is no
  secret; and off with the option `formats: false`, for an application whose answers talk about
  its canary's format anyway (a date canary in a booking assistant).

The system prompt (`ScanContext.system_prompt`) leaks when the answer copies a run of at least
`run_words` consecutive words of it, or a share of its 5-word sequences (the score is that share
over `full_overlap`). A short system prompt (under 8 words) is checked like a canary.

What this cannot see: a secret paraphrased, translated or described by meaning ("the loser of the
2018 World Cup final", 全息图 for hologram). Those need a model of the meaning; measured on Tensor
Trust in bench/leak_bench.py. Each canary's derived forms are computed once and cached (the same
canaries are checked on every window of a streamed answer); the cache lives in process memory only.
"""

from __future__ import annotations

import base64
import codecs
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from plinth.guardrails.detectors import options as opt
from plinth.guardrails.detectors.text import clean, fold, span_in_original, word_matches, words
from plinth.guardrails.types import Finding, ScanContext

DEFAULT_THRESHOLD = 0.5
SHINGLE = 5
RUN_WORDS = 12
FULL_OVERLAP = 0.5
SHORT_PROMPT_WORDS = 8
FORMAT_SCORE = 0.6  # the secret's format named in text about access (a date, hex, a sum, a script)
_STOP = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "i", "in", "is", "it", "me", "my", "of", "on",
    "or", "our", "so", "that", "the", "this", "to", "we", "with", "you", "your",
    "der", "die", "das", "und", "ist", "ein", "eine", "zu",
})  # fmt: skip


_NOT_ALNUM = re.compile(r"[\W_]+")


def alnum_only(text: str) -> str:
    """Letters and digits only (as `text.alnum_only`, by one regex: this runs on every output window)."""
    return _NOT_ALNUM.sub("", text)


@dataclass(frozen=True, slots=True)
class Leak:
    score: float
    how: str  # exact, normalized, encoded, lookalike, spelled, repeated, split, symbols, anagram,
    # sounds_like, hint, format, partial; for the system prompt: verbatim, overlap
    start: int
    end: int


# Look-alike characters an attacker swaps in so the secret survives an exact-match filter: digits and
# symbols read as letters (leetspeak), and Cyrillic or Greek letters that look like Latin ones. Both
# sides are mapped, so "1" and "l" and "i" all become "i".
_LOOKALIKE = str.maketrans(
    "01l!|34@5$7+8"
    "\u0430\u0432\u0435\u0451\u043a\u043c\u043d\u043e\u0440\u0441\u0442\u0443"
    "\u0445\u0456\u0457\u0458\u0455\u04bb\u04cf\u0501\u051b\u051d\u03b1\u03b2"
    "\u03b5\u03b7\u03b9\u03ba\u03bc\u03bd\u03bf\u03c1\u03c4\u03c5\u03c7\u03c9",
    "oiiiieaassttbabeekmhopctyxiijshidqwabenikuvoptuxw",
)


def _lookalike(folded: str) -> str:
    """Letters and digits only, look-alikes mapped: "p4$$w0rd", or with Cyrillic o and a, gives "password"."""
    return alnum_only(folded.translate(_LOOKALIKE))


_SMALL = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
]  # fmt: skip
_UNITS = {w: i for i, w in enumerate(_SMALL)}
_TENS = {
    w: 10 * i
    for i, w in enumerate(
        ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
    )
    if i >= 2
}
_ORDINALS = {
    w: i + 1
    for i, w in enumerate([
        "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
        "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth", "eighteenth", "nineteenth",
        "twentieth",
    ])
}  # fmt: skip
_NTH_PRIME = re.compile(r"\b(\d{1,3})(?:st|nd|rd|th)\s+prime\b|\b([a-z]+)\s+prime\b")


def _nth_prime(n: int) -> int:
    """The n-th prime (1-based), n at most a few hundred."""
    count, candidate = 0, 1
    while count < n:
        candidate += 1
        if all(candidate % p for p in range(2, int(candidate**0.5) + 1)):
            count += 1
    return candidate


def _described_numbers(folded: str, tokens: list[str]) -> set[str]:
    """Numbers the text gives in words: "twenty-nine", "one two three", "the 10th prime" (riddles)."""
    found: set[str] = set()
    total = current = 0
    active = False
    digits = ""
    for token in [*tokens, ""]:
        if token in _UNITS or token in _TENS:
            value = _UNITS.get(token, _TENS.get(token, 0))
            current += value
            active = True
            digits = digits + str(value) if token in _UNITS and value < 10 else ""
            continue
        if active and token == "hundred":
            current *= 100
        elif active and token == "thousand":
            total, current = total + current * 1000, 0
        elif active and token == "and":
            pass
        else:
            if active:
                found.add(str(total + current))
                if len(digits) >= 2:
                    found.add(digits)
            total = current = 0
            active = False
            digits = ""
    if "prime" in folded:
        for match in _NTH_PRIME.finditer(folded):
            n = int(match.group(1)) if match.group(1) else _ORDINALS.get(match.group(2), 0)
            if 0 < n <= 500:
                found.add(str(_nth_prime(n)))
    return found


# Hints about the secret's spelling: "starts with the letter "Z"", "the last letter is h",
# "a three-letter word", "six characters long". Counted only in text that talks about a secret.
_SECRET_NAMES = r"password|passphrase|passcode|pass code|access code|secret|code ?word|keyword"
_SECRET_TALK = re.compile(rf"\b(?:(?:{_SECRET_NAMES}|answer)s?|word|phrase)\b")
_FIRST_CUE = re.compile(
    r"\b(?:starts?|starting|begins?|beginning)\s+with\b|\bfirst\s+(?:letter|character|digit)s?\b"
    r"(?:\s+of\s+[^.\n:]{0,30}?)?\s*(?:is|are|:)"
)
_LAST_CUE = re.compile(
    r"\b(?:ends?|ending)\s+(?:with|in)\b|\blast\s+(?:letter|character|digit)s?\b"
    r"(?:\s+of\s+[^.\n:]{0,30}?)?\s*(?:is|are|:)"
)
_CUE_VALUE = re.compile(
    r"\s*(?:(?:the|a|an|capital|uppercase|lowercase|small)\s+)*(?:(?:letters?|characters?|digits?)\s+)?"
    "[\"'\u201c\u2018\u00ab`]?(?P<val>\\w+)(?P<q>[\"'\u201d\u2019\u00bb`])?"
)
_LENGTH = re.compile(
    r"\b(\d{1,2}|" + "|".join(_SMALL[1:17]) + r")(?:\s+|-)(?:letters?|characters?|chars|digits?)\b"
)
_SOUND_CUE = re.compile(
    r"\b(?:rhymes?\s+with|sounds?\s+like|homophone\s+of|pronounced\s+(?:like|as))\s+"
    "[\"'\u201c\u2018]?(?P<val>[^\"'\u201d\u2019.,;:!?\\n]{2,30})"
)
_VOWELS = frozenset("aeiouy")
_HINT_WORDS = ("start", "begin", "first", "end", "last", "letter", "character", "char", "digit")
_SCRAMBLE_WORDS = ("anagram", "scrambl", "shuffl", "jumbl", "rearrang", "mixed up")
_SOUND_WORDS = ("rhym", "sound", "homophone", "pronounc")


def _cue_values(cue: re.Pattern[str], folded: str) -> Iterable[str]:
    """The letter or quoted string after each cue: one character bare, any length quoted."""
    for match in cue.finditer(folded):
        value = _CUE_VALUE.match(folded, match.end())
        if value is not None and (value.group("q") or len(value.group("val")) == 1):
            yield value.group("val")


def _skeleton(squeezed: str) -> str:
    """Consonants after the first sound, doubles collapsed: what rhymes keep ("juggernaut" -> "grnt")."""
    consonants = [c for c in squeezed if c not in _VOWELS]
    collapsed = [c for i, c in enumerate(consonants) if i == 0 or c != consonants[i - 1]]
    return "".join(collapsed[1:])


def _hint_score(squeezed_secret: str, folded_output: str) -> float:
    """Spelling hints that fit the secret and none that contradict it (those describe another one)."""
    if not any(cue in folded_output for cue in _HINT_WORDS) or not _SECRET_TALK.search(folded_output):
        return 0.0
    support = contra = 0
    for value in _cue_values(_FIRST_CUE, folded_output):
        if squeezed_secret.startswith(value) and value != squeezed_secret:
            support += 1
        else:
            contra += 1
    for value in _cue_values(_LAST_CUE, folded_output):
        if squeezed_secret.endswith(value) and value != squeezed_secret:
            support += 1
        else:
            contra += 1
    for match in _LENGTH.finditer(folded_output):
        n = match.group(1)
        if (int(n) if n.isdigit() else _UNITS[n]) == len(squeezed_secret):
            support += 1  # another length is often about the input, not the secret: not a contradiction
    if contra or not support:
        return 0.0
    return 0.85 if support >= 2 else 0.6


def _sounds_like(secret: _Secret, folded_output: str) -> bool:
    """ "A word that rhymes with 'hugger not'" for "juggernaut": same consonants after the first sound."""
    if len(secret.skeleton) < 3 or not any(cue in folded_output for cue in _SOUND_WORDS):
        return False
    for match in _SOUND_CUE.finditer(folded_output):
        value = alnum_only(match.group("val"))
        if value != secret.squeezed and _skeleton(value) == secret.skeleton:
            return True
    return False


def _anagram(key: str, vocabulary: set[str]) -> bool:
    """The secret's letters scrambled into one word ("lohgamor" for "hologram"); `key`: them sorted."""
    size = len(key)
    return any(len(w) == size and "".join(sorted(w)) == key for w in vocabulary)


# The secret's format, and the words that name it. A format is told only in text about access or a
# secret ("the password is a date"): "date" or "hex" alone is everyday vocabulary.
_HEX_BYTES = re.compile(r"(?:[0-9a-f]{2}[\s:,-]?){4,}")
_DATE = re.compile(
    r"\d{1,2}[./-]\d{1,2}[./-](?:\d{4}|\d{2})|\d{4}[./-]\d{1,2}[./-]\d{1,2}"
    r"|\d{1,2}(?:st|nd|rd|th)?\s+(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?\s+\d{4}"
)
_SUM = re.compile(r"\d\s*[-+*/x\u00d7\u00f7^=]\s*\d")
_FORMAT_WORDS = {
    "date": ("date", "dates", "birthday", "birthdate"),
    "hex": ("hex", "hexadecimal"),
    "sum": ("math", "maths", "mathematical", "equation", "equations", "arithmetic", "calculation", "sum"),
}
# Letters of another script name the languages written in it.
_SCRIPT_WORDS = {
    "DEVANAGARI": ("devanagari", "hindi", "sanskrit", "marathi", "nepali"),
    "CJK": ("chinese", "mandarin", "cantonese", "kanji", "hanzi"),
    "HIRAGANA": ("japanese", "hiragana"),
    "KATAKANA": ("japanese", "katakana"),
    "HANGUL": ("korean", "hangul"),
    "CYRILLIC": ("cyrillic", "russian", "ukrainian", "bulgarian", "serbian"),
    "GREEK": ("greek",),
    "ARABIC": ("arabic", "persian", "farsi", "urdu"),
    "HEBREW": ("hebrew", "yiddish"),
    "THAI": ("thai",),
    "BENGALI": ("bengali", "bangla"),
    "TAMIL": ("tamil",),
    "GEORGIAN": ("georgian",),
    "ARMENIAN": ("armenian",),
}
FORMAT_REACH = 100  # characters: "the access code is 'apple' in Hindi", "inputs ... as math equations"
_ACCESS_TALK = re.compile(rf"\b(?:{_SECRET_NAMES}|access|code|input|instruction)s?\b")


def _format_told(format_words: frozenset[str], folded_output: str) -> bool:
    """A word naming the secret's format within `FORMAT_REACH` characters of talk about access."""
    for match in word_matches(folded_output):
        if match.group() in format_words and _ACCESS_TALK.search(
            folded_output, max(0, match.start() - FORMAT_REACH), match.end() + FORMAT_REACH
        ):
            return True
    return False


def _format_words(folded: str, squeezed: str) -> frozenset[str]:
    """Words that name the format of a secret (folded, and letters and digits only)."""
    named: set[str] = set()
    if _HEX_BYTES.fullmatch(folded) and any(c.isdigit() for c in squeezed) and len(squeezed) >= 8:
        named.update(_FORMAT_WORDS["hex"])
    if _DATE.fullmatch(folded):
        named.update(_FORMAT_WORDS["date"])
    elif _SUM.search(folded) and not any(c.isalpha() for c in squeezed):
        named.update(_FORMAT_WORDS["sum"])
    letters = [c for c in squeezed if c.isalpha()]
    if letters and not any(c.isascii() for c in letters):
        scripts = {unicodedata.name(c, "").split(" ")[0] for c in letters}
        if len(scripts) == 1:
            named.update(_SCRIPT_WORDS.get(scripts.pop(), ()))
    return frozenset(named)


# Spelling alphabets: "Zulu Echo November India Tango Hotel" spells "zenith".
_NATO = {
    w: w[0]
    for w in [
        "alpha", "alfa", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet",
        "juliett", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
        "uniform", "victor", "whiskey", "whisky", "xray", "yankee", "zulu",
    ]
}  # fmt: skip


def _pig_latin(word: str) -> str:
    """ "hologram" -> "ologramhay"; "" for a word that is not plain ASCII letters."""
    if not (word.isascii() and word.isalpha()):
        return ""
    if word[0] in "aeiou":
        return word + "way"
    head = next((i for i, c in enumerate(word) if c in "aeiouy" and i > 0), len(word))
    return word[head:] + word[:head] + "ay"


def _encodings(secret: str) -> Iterable[str]:
    """Forms of `secret` an attacker asks for to slip past an exact-match filter."""
    raw = secret.strip().encode("utf-8")
    squeezed = alnum_only(fold(secret))
    if len(squeezed) >= 4:
        yield squeezed[::-1]
        if squeezed.isascii() and any(c.isalpha() for c in squeezed):
            yield codecs.encode(squeezed, "rot13")
    latin = [_pig_latin(w) for w in words(fold(secret))]
    if all(latin) and sum(map(len, latin)) >= 6:
        yield " ".join(latin)
    if len(raw) >= 4:
        yield base64.b64encode(raw).decode().rstrip("=").casefold()
        yield base64.urlsafe_b64encode(raw).decode().rstrip("=").casefold()
        yield raw.hex()
        yield " ".join(f"{b:02x}" for b in raw)
        yield " ".join(str(b) for b in raw)
        yield " ".join(f"{b:03d}" for b in raw)
        yield ",".join(str(b) for b in raw)


def _stem_match(token: str, stems: dict[str, list[str]]) -> bool:
    """A word sharing a long prefix with `token`: "hologram"/"holographic", "ontology"/"ontologie".

    `stems`: the output's words of 5 or more characters by their first 5.
    """
    if len(token) < 5:
        return False
    need = max(5, -(-len(token) * 3 // 4))
    prefix = token[:need]
    return any(len(w) >= need and w.startswith(prefix) for w in stems.get(token[:5], ()))


def _repeated_unit(squeezed: str) -> str | None:
    """ "abcabc" -> "abc"; None when `squeezed` is not one unit repeated."""
    n = len(squeezed)
    for size in range(1, n // 2 + 1):
        if n % size == 0 and squeezed[:size] * (n // size) == squeezed:
            return squeezed[:size]
    return None


def _split_match(squeezed: str, vocabulary: set[str]) -> bool:
    """The secret given as two words: "a combination of the words 'rational' and 'ussy'"."""
    return any(
        squeezed[:i] in vocabulary and squeezed[i:] in vocabulary and squeezed[:i] not in _STOP
        for i in range(3, len(squeezed) - 2)
    )


@dataclass(frozen=True, slots=True)
class _Secret:
    """What the checks need of a canary, computed once: the same canaries are checked on every window."""

    folded: str
    squeezed: str
    pattern: str  # compiled only when the folded canary is in the folded output (compiling costs more)
    forms: tuple[str, ...]  # encodings (`_encodings`), spaces kept
    compact_forms: tuple[str, ...]  # the same without spaces
    lookalike: str  # "" where the canary is too short or has too few letters for it
    unit: str | None  # the repeated unit of "abcabc"
    split: bool  # one word that may be given as two
    symbols: frozenset[str]  # the canary's symbols where it is mostly symbols
    word_like: bool  # letters only, 5 or more: anagrams and sound-alikes are checked
    skeleton: str
    anagram_key: str
    tokens: tuple[str, ...]
    format_words: frozenset[str]  # words that name its format (`_format_words`)


@lru_cache(maxsize=1024)
def _prepare(secret: str) -> _Secret | None:
    """The canary's derived forms (None for a blank one); cached in process memory, never logged."""
    folded = fold(secret)
    if not folded:
        return None
    squeezed = alnum_only(folded)
    # Exact (any case, any run of whitespace); short secrets only as a whole word.
    pattern = r"\s+".join(re.escape(p) for p in folded.split(" "))
    if len(folded) < 4:
        if folded[0].isalnum():
            pattern = r"(?<!\w)" + pattern
        if folded[-1].isalnum():
            pattern += r"(?!\w)"
    forms = tuple(f for f in dict.fromkeys(_encodings(secret)) if f and f != squeezed)
    unit = _repeated_unit(squeezed)
    symbols = {c for c in folded if not c.isspace() and not c.isascii() and not c.isalnum()}
    mostly_symbols = bool(symbols) and len(symbols) * 2 >= len(set(folded.replace(" ", "")))
    word_like = squeezed.isalpha() and len(squeezed) >= 5
    return _Secret(
        folded=folded,
        squeezed=squeezed,
        pattern=pattern,
        forms=forms,
        compact_forms=tuple(f.replace(" ", "") for f in forms),
        lookalike=_lookalike(folded)
        if len(squeezed) >= 6 and sum(c.isalpha() for c in squeezed) >= 3
        else "",
        unit=unit if unit is not None and (not unit.isascii() or len(unit) >= 4) else None,
        split=" " not in folded and len(squeezed) >= 6,
        symbols=frozenset(symbols) if mostly_symbols else frozenset(),
        word_like=word_like,
        skeleton=_skeleton(squeezed) if word_like else "",
        anagram_key="".join(sorted(squeezed)) if word_like else "",
        tokens=tuple(t for t in dict.fromkeys(words(folded)) if t not in _STOP),
        format_words=_format_words(folded, squeezed),
    )


def canary_leak(secret: str, output: str, *, formats: bool = True) -> Leak | None:
    """How `output` reveals `secret`, if it does: the strongest of the checks in the module doc.
    `formats`: whether naming the secret's format counts (not for Plinth's planted markers, always
    hex, nor where the scanner's `formats` option is off)."""
    prepared = _prepare(secret) if output else None
    if prepared is None:
        return None
    folded_output = fold(output)
    if prepared.folded in folded_output:
        cleaned = clean(output)
        match = re.search(prepared.pattern, cleaned, re.IGNORECASE)
        if match is not None:
            start, end = span_in_original(output, cleaned, match.start(), match.end())
            return Leak(1.0, "exact", start, end)
    whole = (0, len(output))
    squeezed_secret = prepared.squeezed
    squeezed_output = alnum_only(folded_output)
    if len(squeezed_secret) >= 5 and squeezed_secret in squeezed_output:
        return Leak(0.95, "normalized", *whole)
    spaced_output = folded_output.replace(" ", "")
    for form, compact in zip(prepared.forms, prepared.compact_forms, strict=True):
        if (
            form in folded_output
            or compact in spaced_output
            or (compact.isalnum() and compact in squeezed_output)
        ):
            return Leak(0.9, "encoded", *whole)
    if prepared.lookalike and prepared.lookalike in _lookalike(folded_output):
        return Leak(0.9, "lookalike", *whole)
    output_words = words(folded_output)
    vocabulary = set(output_words)
    if len(squeezed_secret) >= 3:
        alpha = squeezed_secret.isalpha()
        letters = "".join(
            w if len(w) == 1 else _NATO.get(w, "")
            for w in output_words
            if (len(w) == 1 and (w.isalpha() or not alpha)) or w in _NATO
        )
        if squeezed_secret in letters:
            return Leak(0.8, "spelled", *whole)
    if prepared.unit is not None and prepared.unit in vocabulary:
        return Leak(0.8, "repeated", *whole)
    if prepared.split and _split_match(squeezed_secret, vocabulary):
        return Leak(0.8, "split", *whole)
    if prepared.symbols and all(c in folded_output for c in prepared.symbols):
        return Leak(0.8, "symbols", *whole)
    if prepared.word_like:
        # Short words have common anagrams ("paris"/"pairs", "denied"/"indeed"): those need a cue.
        scrambled = len(squeezed_secret) >= 7 or any(cue in folded_output for cue in _SCRAMBLE_WORDS)
        if scrambled and _anagram(prepared.anagram_key, vocabulary):
            return Leak(0.8, "anagram", *whole)
        if _sounds_like(prepared, folded_output):
            return Leak(0.8, "sounds_like", *whole)
    partial = _partial(prepared.tokens, folded_output, output_words, vocabulary)
    hint = _hint_score(squeezed_secret, folded_output) if len(squeezed_secret) <= 32 else 0.0
    told = (
        FORMAT_SCORE
        if formats
        and prepared.format_words
        and not prepared.format_words.isdisjoint(vocabulary)
        and _format_told(prepared.format_words, folded_output)
        else 0.0
    )
    best, how = max((partial, "partial"), (hint, "hint"), (told, "format"), key=lambda item: item[0])
    return Leak(best, how, *whole) if best > 0 else None


def _partial(
    tokens: tuple[str, ...], folded_output: str, output_words: list[str], vocabulary: set[str]
) -> float:
    """Score for the secret's words (or their stems, or numbers given in words) found in the output."""
    if not tokens:
        return 0.0
    if any(t.isdigit() for t in tokens):
        vocabulary = vocabulary | _described_numbers(folded_output, output_words)
    stems: dict[str, list[str]] = {}
    if any(t not in vocabulary and len(t) >= 5 for t in tokens):
        for w in vocabulary:
            if len(w) >= 5:
                stems.setdefault(w[:5], []).append(w)
    found = sum(1.0 if t in vocabulary else 0.8 if _stem_match(t, stems) else 0.0 for t in tokens)
    share = found / len(tokens)
    # All of its words (some as stems) is a leak; some of them is a hint below the default threshold.
    return round(0.85 * share if found >= len(tokens) * 0.8 else 0.45 * share, 4)


def _shingles(tokens: list[str], size: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + size]) for i in range(len(tokens) - size + 1)}


def system_prompt_leak(
    system_prompt: str, output: str, run_words: int = RUN_WORDS, full_overlap: float = FULL_OVERLAP
) -> Leak | None:
    """Verbatim runs or a large share of the prompt's 5-word sequences in `output`."""
    prompt_words = words(fold(system_prompt))
    if len(prompt_words) < SHORT_PROMPT_WORDS:
        return canary_leak(system_prompt, output) if prompt_words else None
    output_words = words(fold(output))
    if len(output_words) < SHINGLE:
        return None
    whole = (0, len(output))
    if len(prompt_words) >= run_words and _shingles(prompt_words, run_words) & _shingles(
        output_words, run_words
    ):
        return Leak(0.9, "verbatim", *whole)
    prompt_set = _shingles(prompt_words, SHINGLE)
    share = len(prompt_set & _shingles(output_words, SHINGLE)) / len(prompt_set)
    if share == 0:
        return None
    return Leak(round(min(1.0, share / full_overlap), 4), "overlap", *whole)


class LeakScanner:
    """Scanner `leak`: canary and system-prompt leaks in model output (the context carries both)."""

    name = "leak"

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        system_prompt: bool = True,
        run_words: int = RUN_WORDS,
        full_overlap: float = FULL_OVERLAP,
        formats: bool = True,
    ) -> None:
        self.threshold = threshold
        self.check_formats = formats
        self.check_system_prompt = system_prompt
        self.run_words = run_words
        self.full_overlap = full_overlap

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> LeakScanner:
        opt.check_keys(
            "leak", options, ("threshold", "system_prompt", "run_words", "full_overlap", "formats")
        )
        return cls(
            threshold=opt.number("leak", options, "threshold", DEFAULT_THRESHOLD, 0.0, 1.0),
            system_prompt=opt.boolean("leak", options, "system_prompt", True),
            run_words=int(opt.number("leak", options, "run_words", RUN_WORDS, 5, 1000)),
            full_overlap=opt.number("leak", options, "full_overlap", FULL_OVERLAP, 0.01, 1.0),
            formats=opt.boolean("leak", options, "formats", True),
        )

    def leaks(self, text: str, ctx: ScanContext) -> list[tuple[str, str, Leak]]:
        """(finding type, rule, leak) for every canary and the system prompt, above threshold or not."""
        found: list[tuple[str, str, Leak]] = []
        for canary in ctx.canaries:
            leak = canary_leak(canary, text, formats=self.check_formats and canary not in ctx.planted)
            if leak is not None:
                found.append(("CANARY_LEAK", f"leak.canary.{leak.how}", leak))
        if self.check_system_prompt and ctx.system_prompt:
            leak = system_prompt_leak(ctx.system_prompt, text, self.run_words, self.full_overlap)
            if leak is not None:
                found.append(("SYSTEM_PROMPT_LEAK", f"leak.system_prompt.{leak.how}", leak))
        return found

    def scan(self, text: str, ctx: ScanContext) -> list[Finding]:
        return [
            Finding(kind, leak.start, leak.end, leak.score, self.name, rule)
            for kind, rule, leak in self.leaks(text, ctx)
            if leak.score >= self.threshold
        ]
