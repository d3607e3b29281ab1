"""Output checks for leaks of the system prompt and of canary tokens planted in it.

A canary (`ScanContext.canaries`) is a secret the answer must never contain: a random marker the
application put in its system prompt, or a password the prompt protects. Attackers rarely get it
out verbatim, so the check also looks for it

- with different case, spacing or punctuation ("L-A-B-Y-R-I-N-T-H", "z e i t g e i s t"),
- encoded: reversed, ROT13, base64, hex or decimal character codes,
- spelled one letter per token (`input[0] == "s"`, `input[1] == "n"`...),
- by its words, or their stems ("Ontologie" for "ontology"): all of them score 0.68-0.85 (by how
  many are stems only); fewer score below the default threshold.

The system prompt (`ScanContext.system_prompt`) leaks when the answer copies a run of at least
`run_words` consecutive words of it, or a share of its 5-word sequences (the score is that share
over `full_overlap`). A short system prompt (under 8 words) is checked like a canary.

What this cannot see: a secret paraphrased, translated or hinted at ("the loser of the 2018 World
Cup final"). Those need a model of the meaning; measured on Tensor Trust in bench/leak_bench.py.
"""

from __future__ import annotations

import base64
import codecs
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from plinth.guardrails.detectors import options as opt
from plinth.guardrails.detectors.text import alnum_only, clean, fold, span_in_original, words
from plinth.guardrails.types import Finding, ScanContext

DEFAULT_THRESHOLD = 0.5
SHINGLE = 5
RUN_WORDS = 12
FULL_OVERLAP = 0.5
SHORT_PROMPT_WORDS = 8
_STOP = frozenset({
    "a", "an", "and", "are", "as", "at", "be", "by", "for", "from", "i", "in", "is", "it", "me", "my", "of", "on",
    "or", "our", "so", "that", "the", "this", "to", "we", "with", "you", "your",
    "der", "die", "das", "und", "ist", "ein", "eine", "zu",
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class Leak:
    score: float
    how: str  # exact, normalized, encoded, spelled, symbols, partial, verbatim, overlap
    start: int
    end: int


def _encodings(secret: str) -> Iterable[str]:
    """Forms of `secret` an attacker asks for to slip past an exact-match filter."""
    raw = secret.strip().encode("utf-8")
    squeezed = alnum_only(fold(secret))
    if len(squeezed) >= 4:
        yield squeezed[::-1]
        if squeezed.isascii() and any(c.isalpha() for c in squeezed):
            yield codecs.encode(squeezed, "rot13")
    if len(raw) >= 4:
        yield base64.b64encode(raw).decode().rstrip("=").casefold()
        yield base64.urlsafe_b64encode(raw).decode().rstrip("=").casefold()
        yield raw.hex()
        yield " ".join(f"{b:02x}" for b in raw)
        yield " ".join(str(b) for b in raw)
        yield " ".join(f"{b:03d}" for b in raw)
        yield ",".join(str(b) for b in raw)


def _stem_match(token: str, candidates: set[str]) -> bool:
    """A word sharing a long prefix with `token`: "hologram"/"holographic", "ontology"/"ontologie"."""
    if len(token) < 5:
        return False
    need = max(5, -(-len(token) * 3 // 4))
    prefix = token[:need]
    return any(len(w) >= need and w.startswith(prefix) for w in candidates)


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


def canary_leak(secret: str, output: str) -> Leak | None:
    """How `output` reveals `secret`, if it does: the strongest of the checks in the module doc."""
    folded_secret = fold(secret)
    if not folded_secret or not output:
        return None
    cleaned = clean(output)
    # Exact (any case, any run of whitespace); short secrets only as a whole word.
    pattern = r"\s+".join(re.escape(p) for p in folded_secret.split(" "))
    if len(folded_secret) < 4:
        if folded_secret[0].isalnum():
            pattern = r"(?<!\w)" + pattern
        if folded_secret[-1].isalnum():
            pattern += r"(?!\w)"
    match = re.search(pattern, cleaned, re.IGNORECASE)
    if match is not None:
        start, end = span_in_original(output, cleaned, match.start(), match.end())
        return Leak(1.0, "exact", start, end)
    whole = (0, len(output))
    folded_output = fold(output)
    squeezed_secret = alnum_only(folded_secret)
    squeezed_output = alnum_only(folded_output)
    if len(squeezed_secret) >= 5 and squeezed_secret in squeezed_output:
        return Leak(0.95, "normalized", *whole)
    spaced_output = folded_output.replace(" ", "")
    for form in _encodings(secret):
        if not form or form == squeezed_secret:
            continue
        compact = form.replace(" ", "")
        if (
            form in folded_output
            or compact in spaced_output
            or (compact.isalnum() and compact in squeezed_output)
        ):
            return Leak(0.9, "encoded", *whole)
    output_words = words(folded_output)
    vocabulary = set(output_words)
    if len(squeezed_secret) >= 3:
        alpha = squeezed_secret.isalpha()
        letters = "".join(w for w in output_words if len(w) == 1 and (w.isalpha() or not alpha))
        if squeezed_secret in letters:
            return Leak(0.8, "spelled", *whole)
    unit = _repeated_unit(squeezed_secret)
    if unit is not None and (not unit.isascii() or len(unit) >= 4) and unit in vocabulary:
        return Leak(0.8, "repeated", *whole)
    if " " not in folded_secret and len(squeezed_secret) >= 6 and _split_match(squeezed_secret, vocabulary):
        return Leak(0.8, "split", *whole)
    symbols = {c for c in folded_secret if not c.isspace() and not c.isascii() and not c.isalnum()}
    mostly_symbols = bool(symbols) and len(symbols) * 2 >= len(set(folded_secret.replace(" ", "")))
    if mostly_symbols and all(c in folded_output for c in symbols):
        return Leak(0.8, "symbols", *whole)
    tokens = [t for t in dict.fromkeys(words(folded_secret)) if t not in _STOP]
    if not tokens:
        return None
    found = sum(1.0 if t in vocabulary else 0.8 if _stem_match(t, vocabulary) else 0.0 for t in tokens)
    if found == 0:
        return None
    share = found / len(tokens)
    # All of its words (some as stems) is a leak; some of them is a hint below the default threshold.
    return Leak(round(0.85 * share if found >= len(tokens) * 0.8 else 0.45 * share, 4), "partial", *whole)


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
    ) -> None:
        self.threshold = threshold
        self.check_system_prompt = system_prompt
        self.run_words = run_words
        self.full_overlap = full_overlap

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> LeakScanner:
        opt.check_keys("leak", options, ("threshold", "system_prompt", "run_words", "full_overlap"))
        return cls(
            threshold=opt.number("leak", options, "threshold", DEFAULT_THRESHOLD, 0.0, 1.0),
            system_prompt=opt.boolean("leak", options, "system_prompt", True),
            run_words=int(opt.number("leak", options, "run_words", RUN_WORDS, 5, 1000)),
            full_overlap=opt.number("leak", options, "full_overlap", FULL_OVERLAP, 0.01, 1.0),
        )

    def leaks(self, text: str, ctx: ScanContext) -> list[tuple[str, str, Leak]]:
        """(finding type, rule, leak) for every canary and the system prompt, above threshold or not."""
        found: list[tuple[str, str, Leak]] = []
        for canary in ctx.canaries:
            leak = canary_leak(canary, text)
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
