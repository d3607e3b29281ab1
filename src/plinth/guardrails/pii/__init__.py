"""Personal data: structured identifiers with validators, plus names, places and organizations from
an optional NER backend or, without one, from rules (cue words, honorifics, address shapes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from plinth.guardrails.pii.patterns import digit_runs, ordered, resolve_overlaps, run_patterns
from plinth.guardrails.pii.structured import PATTERNS
from plinth.guardrails.types import Finding, ScanContext

# Types the rules and NER produce: a NER backend, when configured, replaces the rules for these.
NAMED_TYPES = frozenset(
    {"PERSON", "LOCATION", "ORGANIZATION", "STREET_ADDRESS", "NRP", "TITLE", "AGE", "ZIP_CODE"}
)
_OPTIONS = {"entities", "exclude", "rules", "min_score"}


# A NER backend: text -> [(type, start, end, score)] (see plinth.guardrails.pii.ner).
NerBackend = Callable[[str], list[tuple[str, int, int, float]]]


class PiiScanner:
    """Options: `entities` (only these types), `exclude` (not these), `rules` (name/address rules
    when no NER backend is configured; default true), `min_score`."""

    name = "pii"
    cacheable = True  # findings depend on the text alone, NER included (plinth.guardrails.verdicts)

    def __init__(self, options: dict[str, Any] | None = None, *, ner: NerBackend | None = None) -> None:
        opts = dict(options or {})
        unknown = sorted(set(opts) - _OPTIONS)
        if unknown:
            raise ValueError(
                f"unknown option(s) for scanner 'pii': {', '.join(unknown)} (known: {', '.join(sorted(_OPTIONS))})"
            )
        entities = set(opts["entities"]) if opts.get("entities") is not None else None
        exclude = set(opts.get("exclude") or ())
        self._keep = None if entities is None and not exclude else (entities, exclude)
        self._patterns = ordered(
            p for p in PATTERNS if (entities is None or p.type in entities) and p.type not in exclude
        )
        self._ner = ner
        self._rules = bool(opts.get("rules", True)) and ner is None
        self._min_score = float(opts.get("min_score", 0.0))
        if self._rules:
            from plinth.guardrails.pii import rules

            self._rule_scan = rules.scan
        named = NAMED_TYPES if entities is None else NAMED_TYPES & entities
        self._named = bool(named - exclude)

    def scan(self, text: str, ctx: ScanContext) -> list[Finding]:
        runs = digit_runs(text)
        found = run_patterns(self._patterns, text, self.name, is_ordered=True, runs=runs)
        if self._named:
            if self._ner is not None:
                found.extend(
                    Finding(t, s, e, sc, self.name, f"pii.{t.lower()}", _NAMED_CLASS.get(t))
                    for t, s, e, sc in self._ner(text)
                )
            elif self._rules:
                found.extend(self._rule_scan(text, self.name, runs))
        if self._keep is not None:
            entities, exclude = self._keep
            found = [f for f in found if (entities is None or f.type in entities) and f.type not in exclude]
        if self._min_score:
            found = [f for f in found if f.score >= self._min_score]
        return resolve_overlaps(found)


_NAMED_CLASS = {
    "PERSON": "confidential",
    "STREET_ADDRESS": "confidential",
    "LOCATION": None,
    "ORGANIZATION": None,
}

__all__ = ["NAMED_TYPES", "NerBackend", "PiiScanner"]
