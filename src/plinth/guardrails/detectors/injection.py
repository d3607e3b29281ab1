"""Prompt-injection and jailbreak detection: a shipped classifier plus hand-written rules.

- The classifier is TF-IDF over character 1-5 grams and a logistic regression, trained by
  `scripts/train_injection_classifier.py` on deepset/prompt-injections (Apache-2.0). Its weights
  ship in this package (`injection_model.json.gz`, loaded once per process) and are scored by the
  package's C extension (`_ngrams.c`: 2.4 against 52 µs for a one-line prompt), else in numpy where
  it is installed (`injection_vectorized.py`, n-grams as integers), else in pure Python; the same
  scores every way, and no scikit-learn at run time.
- Rules (`injection_rules.py`) catch the well-known phrasings exactly and name them.
- Indirect injection: text that came from retrieval or a tool (`ScanContext.source`) is held to the
  lower `indirect_threshold` (by default the threshold aimed at 15% instead of 8% false positives
  in the training script's inner cross-validation), because instructions have no business appearing
  there at all.
- Findings: `PROMPT_INJECTION` with rule `injection.rule.<id>` (score 0.95) or
  `injection.classifier` (score 0.5 at the threshold in force, rising to 1.0; see `confidence`).
- The system prompt (`Source.SYSTEM`) is the operator's own instructions, which read exactly like
  an injection ("You are... never reveal..."): it is skipped unless `scan_system: true`.
- Long text is scored in overlapping windows and the worst window counts, so one injected paragraph
  in a long page is not diluted by the rest of it.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import threading
from collections.abc import Mapping
from importlib import resources
from itertools import repeat
from typing import TYPE_CHECKING, Any, NamedTuple

from plinth.guardrails.detectors import options as opt
from plinth.guardrails.detectors.injection_features import ngram_counts
from plinth.guardrails.detectors.injection_rules import (
    RULE_KEYWORDS,
    RULES,
    STRONG,
    Rule,
    keyword_text,
    keywords_of,
)
from plinth.guardrails.detectors.text import clean, fold, span_in_original, windows
from plinth.guardrails.types import Finding, ScanContext, Source

if TYPE_CHECKING:
    from plinth.guardrails.detectors._ngrams import Table as NgramTable
    from plinth.guardrails.detectors.injection_vectorized import VectorizedDecision

log = logging.getLogger("plinth.guardrails")

MODEL_RESOURCE = "injection_model.json.gz"
MODEL_FORMAT = 1
RULE_SCORE = STRONG  # a rule naming an attack is reported with this confidence (weak ones: `Rule.score`)
WINDOW_CHARS = 500
WINDOW_OVERLAP = 150
INDIRECT_SOURCES = frozenset({Source.TOOL, Source.RETRIEVED})


def _compiled(weight: dict[str, complex]) -> NgramTable | None:
    """The C scorer's table (`_ngrams.c`), or None where the extension was not built (no C compiler
    at install time): the scorers below give the same scores, only slower."""
    try:
        from plinth.guardrails.detectors._ngrams import Table
    except ImportError:
        return None
    try:
        return Table(weight)
    except ValueError:  # two n-grams of a retrained vocabulary share a 64-bit hash: not seen yet
        log.warning("injection model: the C scorer cannot index this vocabulary; scoring in Python")
        return None


def _vectorized(vocab: Mapping[str, tuple[float, float]]) -> VectorizedDecision | None:
    """The numpy scorer where numpy is installed (it comes with the `local` extra), else None."""
    try:
        from plinth.guardrails.detectors.injection_vectorized import VectorizedDecision, VocabularyDoesNotFit
    except ImportError:
        return None
    try:
        return VectorizedDecision(vocab)
    except VocabularyDoesNotFit:
        return None


class ModelError(RuntimeError):
    """The classifier's weights file is missing or malformed."""


class Window(NamedTuple):
    """The highest-scoring stretch of a text (a NamedTuple: one is built per scan)."""

    probability: float
    start: int
    end: int


class InjectionClassifier:
    """The exported TF-IDF + logistic-regression model, scored with dictionaries."""

    def __init__(
        self,
        vocab: Mapping[str, tuple[float, float]],
        intercept: float,
        threshold: float,
        threshold_sensitive: float,
        info: Mapping[str, Any] | None = None,
        *,
        compiled: bool = True,
    ) -> None:
        """`compiled=False` leaves the C scorer out (the tests of the numpy and Python scorers)."""
        # n-gram -> (idf, coefficient). The most frequent n-grams (lowest idf) first, each with a
        # fresh key object: the entries, keys and weights of the n-grams nearly every text has then
        # sit together in memory, which matters when a scan starts with cold CPU caches, as in the
        # gateway (measured: 114 -> 90 microseconds of lookups for a one-line prompt).
        by_frequency = sorted(vocab.items(), key=lambda item: item[1][0])
        self._vocab = {gram.encode().decode(): value for gram, value in by_frequency}
        # What one occurrence of an n-gram adds to the dot product (real part) and to the squared
        # norm (imaginary part), for `decision_python`: one `sum` of complex numbers over `map`
        # runs in C, where a Python loop over the n-grams cost twice as much (measured).
        self._weight = {gram: complex(idf * coef, idf * idf) for gram, (idf, coef) in self._vocab.items()}
        self._compiled = _compiled(self._weight) if compiled else None
        # numpy only where the C scorer is missing: building its tables costs load time and memory.
        self._vectorized = _vectorized(self._vocab) if self._compiled is None else None
        self.intercept = intercept
        self.threshold = threshold
        self.threshold_sensitive = threshold_sensitive
        self.info = dict(info or {})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InjectionClassifier:
        if data.get("format") != MODEL_FORMAT:
            raise ModelError(f"injection model format {data.get('format')!r}, expected {MODEL_FORMAT}")
        try:
            vocab = {str(g): (float(v[0]), float(v[1])) for g, v in data["vocab"].items()}
            return cls(
                vocab,
                float(data["intercept"]),
                float(data["threshold"]),
                float(data["threshold_sensitive"]),
                info=data.get("training") or {},
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ModelError(f"injection model is malformed: {exc!r}") from None

    @classmethod
    def packaged(cls) -> InjectionClassifier:
        """The model shipped in this package, loaded once per process."""
        global _PACKAGED
        if _PACKAGED is None:
            with _LOAD_LOCK:
                if _PACKAGED is None:
                    _PACKAGED = cls.load_resource()
        return _PACKAGED

    @classmethod
    def load_resource(cls) -> InjectionClassifier:
        resource = resources.files("plinth.guardrails.detectors").joinpath(MODEL_RESOURCE)
        try:
            raw = resource.read_bytes()
        except FileNotFoundError:
            raise ModelError(
                f"{MODEL_RESOURCE} is missing from the plinth package; reinstall plinth"
            ) from None
        return cls.from_dict(json.loads(gzip.decompress(raw)))

    def __len__(self) -> int:
        return len(self._vocab)

    @property
    def compiled(self) -> bool:
        """Whether `decision` runs in the C extension (20x faster than pure Python on a short text)."""
        return self._compiled is not None

    @property
    def vectorized(self) -> bool:
        """Whether numpy scores long texts (about 4x faster than Python); only without the C scorer."""
        return self._vectorized is not None

    def decision(self, text: str) -> float:
        """w . tfidf(text) + b, exactly as scikit-learn computes it (sublinear tf, smooth idf, l2 norm)."""
        if self._compiled is not None:
            return self.decision_compiled(text)
        # numpy's fixed cost (a dozen array calls, about 100 microseconds) is only worth paying past
        # a few dozen characters; a short prompt is scored faster in pure Python (same scores).
        if self._vectorized is not None and len(text) >= VECTORIZE_FROM_CHARS:
            return self.intercept + self._vectorized.dot(text)
        return self.decision_python(text)

    def decision_compiled(self, text: str) -> float:
        """`decision` in the C extension (`_ngrams.c`); only when `compiled`."""
        assert self._compiled is not None
        total = self._compiled.score(fold(text))
        dot, norm = total.real, total.imag
        return self.intercept + (dot / math.sqrt(norm) if norm > 0.0 else 0.0)

    def decision_python(self, text: str) -> float:
        """`decision` without numpy (not a core dependency): about 1.5 microseconds per character."""
        counts = ngram_counts(text)
        weight = self._weight
        total = sum(map(weight.get, counts, repeat(0j)))  # as if every n-gram occurred once
        for gram, count in counts.items():
            if count > 1:
                w = weight.get(gram)
                if w is not None:  # sublinear tf: 1 + log(count) instead of 1
                    tf = 1.0 + math.log(count)
                    total += complex((tf - 1.0) * w.real, (tf * tf - 1.0) * w.imag)
        dot, norm = total.real, total.imag
        return self.intercept + (dot / math.sqrt(norm) if norm > 0.0 else 0.0)

    def probability(self, text: str) -> float:
        return _sigmoid(self.decision(text))

    def worst_window(self, text: str, size: int = WINDOW_CHARS, overlap: int = WINDOW_OVERLAP) -> Window:
        """The highest-scoring window of `text` (the whole text when it is short)."""
        if len(text) <= size:
            return Window(_sigmoid(self.decision(text)), 0, len(text))
        spans = list(windows(text, size, overlap))
        if self._compiled is not None:
            decisions = [self.decision_compiled(text[s:e]) for s, e in spans]
        elif self._vectorized is not None and len(text) >= VECTORIZE_FROM_CHARS:
            decisions = [self.intercept + d for d in self._vectorized.dots([text[s:e] for s, e in spans])]
        else:
            decisions = [self.decision_python(text[s:e]) for s, e in spans]
        best = Window(0.0, 0, len(text))
        for (start, end), z in zip(spans, decisions, strict=True):
            p = _sigmoid(z)
            if p > best.probability:
                best = Window(p, start, end)
        return best


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


_PACKAGED: InjectionClassifier | None = None
VECTORIZE_FROM_CHARS = 64  # measured crossover: about 50 characters
_LOAD_LOCK = threading.Lock()


def rule_matches(text: str, rules: tuple[Rule, ...] = RULES) -> list[tuple[Rule, int, int]]:
    """Every rule that matches, with the span of its first match in `text`."""
    cleaned = clean(text)
    keywords = keyword_text(cleaned)
    candidates = RULE_KEYWORDS if rules is RULES else keywords_of(rules)
    present = {need for need in candidates if need in keywords}
    found: list[tuple[Rule, int, int]] = []
    for rule in rules:
        if rule.needs and present.isdisjoint(rule.needs):
            continue
        match = rule.search(cleaned)
        if match is not None:
            start, end = span_in_original(text, cleaned, match.start(), match.end())
            found.append((rule, start, end))
    return found


def confidence(probability: float, threshold: float) -> float:
    """A classifier finding's score: 0.5 at the threshold in force, 1.0 at probability 1.

    The thresholds sit near 0.5 (0.46 for retrieved text): reported raw, a profile's `min_score`
    (0.5 by default) would drop findings the scanner's own threshold accepted."""
    if threshold >= 1.0:
        return 1.0
    return round(min(1.0, 0.5 + 0.5 * (probability - threshold) / (1.0 - threshold)), 4)


class InjectionScanner:
    """Scanner `injection`: classifier and rules on user input and on retrieved or tool content."""

    name = "injection"
    cacheable = True  # findings depend on the text and its source (plinth.guardrails.verdicts)
    finding_type = "PROMPT_INJECTION"

    def __init__(
        self,
        *,
        threshold: float | None = None,
        indirect_threshold: float | None = None,
        rules: bool = True,
        classifier: bool = True,
        scan_system: bool = False,
        model: InjectionClassifier | None = None,
    ) -> None:
        self.use_rules = rules
        self.scan_system = scan_system
        self.model = (model or InjectionClassifier.packaged()) if classifier else None
        default = self.model.threshold if self.model else 0.5
        sensitive = self.model.threshold_sensitive if self.model else 0.5
        self.threshold = default if threshold is None else threshold
        self.indirect_threshold = (
            min(sensitive, self.threshold) if indirect_threshold is None else indirect_threshold
        )

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> InjectionScanner:
        opt.check_keys(
            "injection", options, ("threshold", "indirect_threshold", "rules", "classifier", "scan_system")
        )
        scanner = cls(
            threshold=opt.optional_number("injection", options, "threshold", 0.0, 1.0),
            indirect_threshold=opt.optional_number("injection", options, "indirect_threshold", 0.0, 1.0),
            rules=opt.boolean("injection", options, "rules", True),
            classifier=opt.boolean("injection", options, "classifier", True),
            scan_system=opt.boolean("injection", options, "scan_system", False),
        )
        if not scanner.use_rules and scanner.model is None:
            raise opt.ScannerOptionError("injection: 'rules' and 'classifier' cannot both be false")
        return scanner

    def threshold_for(self, ctx: ScanContext | None) -> float:
        if ctx is not None and ctx.source in INDIRECT_SOURCES:
            return self.indirect_threshold
        return self.threshold

    def score(self, text: str) -> float:
        """0..1: how much `text` looks like an injection (a rule match counts as its `score`).

        Reported to the session-risk scorer even when below the blocking threshold: a run of
        borderline turns is what a multi-turn attack looks like.
        """
        best = self.model.worst_window(text).probability if self.model else 0.0
        if self.use_rules and best < RULE_SCORE:
            best = max([best, *(rule.score for rule, _, _ in rule_matches(text))])
        return best

    def scan(self, text: str, ctx: ScanContext) -> list[Finding]:
        findings: list[Finding] = []
        if not text or (ctx.source is Source.SYSTEM and not self.scan_system):
            return findings
        if self.use_rules:
            for rule, start, end in rule_matches(text):
                findings.append(
                    Finding(self.finding_type, start, end, rule.score, self.name, f"injection.rule.{rule.id}")
                )
        if self.model is not None:
            window = self.model.worst_window(text)
            threshold = self.threshold_for(ctx)
            if window.probability >= threshold:
                findings.append(
                    Finding(
                        self.finding_type,
                        window.start,
                        window.end,
                        confidence(window.probability, threshold),
                        self.name,
                        "injection.classifier",
                    )
                )
        return findings
