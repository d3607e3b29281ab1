"""Grounding: is each sentence of an answer supported by the context it was supposed to use?

A simple, explainable check, not a fact checker. The answer is split into sentences; a sentence is
supported when enough of its content words (lower-cased, a plural "s" dropped, stop words ignored)
occur in one passage of the context, and every number it states occurs somewhere in the context
(invented figures are the most harmful hallucination). With `method: embedding` a sentence is also
supported when its MiniLM embedding is close to a context sentence (paraphrases), at the cost of one
embedding pass over the answer and the context.

Each unsupported sentence is a finding `UNGROUNDED` (rule `grounding.unsupported`) with its span and
score 1 - support; sentences under `min_words` content words ("Sure!", "Here you go:") are skipped.

The context is `ScanContext.system_prompt` (where retrieval-augmented applications put the retrieved
passages) or, called directly, `GroundingScanner.check(answer, passages)`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from plinth.guardrails.detectors import options as opt
from plinth.guardrails.detectors.text import fold, sentences
from plinth.guardrails.types import Finding, ScanContext, Stage

_STOP = frozenset({
    "a", "about", "above", "after", "again", "all", "also", "am", "an", "and", "any", "are", "as", "at",
    "be", "because", "been", "before", "being", "below", "between", "both", "but", "by", "can", "could",
    "did", "do", "does", "doing", "down", "during", "each", "few", "for", "from", "further", "had", "has",
    "have", "having", "he", "her", "here", "hers", "him", "his", "how", "i", "if", "in", "into", "is", "it",
    "its", "itself", "just", "me", "more", "most", "my", "no", "nor", "not", "of", "off", "on", "once",
    "only", "or", "other", "our", "ours", "out", "over", "own", "same", "she", "should", "so", "some",
    "such", "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "those",
    "through", "to", "too", "under", "until", "up", "very", "was", "we", "were", "what", "when", "where",
    "which", "while", "who", "whom", "why", "will", "with", "would", "you", "your", "yours", "yes", "sure",
})  # fmt: skip
_TOKEN = re.compile(r"\d+(?:[.,]\d+)*|[^\W\d_]+")
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_PARAGRAPHS = re.compile(r"\n\s*\n")


def _stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def content_words(text: str) -> set[str]:
    return {_stem(w) for w in _TOKEN.findall(fold(text)) if w not in _STOP and (len(w) > 1 or w.isdigit())}


def numbers(text: str) -> set[str]:
    return {n.replace(",", "") for n in _NUMBER.findall(text)}


@dataclass(frozen=True, slots=True)
class SentenceSupport:
    start: int
    end: int
    support: float  # 0..1
    missing_numbers: tuple[str, ...]


class GroundingScanner:
    """Scanner `grounding`: flags answer sentences the supplied context does not support."""

    name = "grounding"
    finding_type = "UNGROUNDED"

    def __init__(
        self, min_support: float = 0.5, min_words: int = 4, method: str = "lexical", similarity: float = 0.7
    ) -> None:
        self.min_support = min_support
        self.min_words = min_words
        self.method = method
        self.similarity = similarity

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> GroundingScanner:
        opt.check_keys("grounding", options, ("min_support", "min_words", "method", "similarity"))
        method = opt.string("grounding", options, "method", "lexical")
        if method not in ("lexical", "embedding"):
            raise opt.ScannerOptionError(
                f"grounding: 'method' must be 'lexical' or 'embedding', got {method!r}"
            )
        if method == "embedding":
            from plinth.guardrails.detectors.embedding import require_local_model

            require_local_model("grounding")
        return cls(
            min_support=opt.number("grounding", options, "min_support", 0.5, 0.0, 1.0),
            min_words=int(opt.number("grounding", options, "min_words", 4, 1, 100)),
            method=method,
            similarity=opt.number("grounding", options, "similarity", 0.7, 0.0, 1.0),
        )

    def support(self, answer: str, passages: Sequence[str]) -> list[SentenceSupport]:
        """Support of each checked sentence of `answer` by `passages`."""
        passages = [p for p in passages if p and p.strip()]
        if not passages:
            return []
        passage_words = [content_words(p) for p in passages]
        known_numbers = set().union(*(numbers(p) for p in passages))
        spans = [(s, e) for s, e in sentences(answer) if len(content_words(answer[s:e])) >= self.min_words]
        results: list[SentenceSupport] = []
        for start, end in spans:
            sentence = answer[start:end]
            wanted = content_words(sentence)
            best = max(len(wanted & words) / len(wanted) for words in passage_words)
            missing = tuple(sorted(numbers(sentence) - known_numbers))
            results.append(SentenceSupport(start, end, 0.0 if missing else best, missing))
        if self.method == "embedding" and results:
            results = self._semantic(answer, passages, results)
        return results

    def _semantic(
        self, answer: str, passages: Sequence[str], results: list[SentenceSupport]
    ) -> list[SentenceSupport]:
        from plinth.guardrails.detectors.embedding import encode

        weak = [r for r in results if r.support < self.min_support and not r.missing_numbers]
        if not weak:
            return results
        context_sentences = [p[s:e] for p in passages for s, e in sentences(p)]
        vectors = encode([answer[r.start : r.end] for r in weak] + context_sentences)
        best = (vectors[: len(weak)] @ vectors[len(weak) :].T).max(axis=1)
        lifted = {
            (r.start, r.end): SentenceSupport(r.start, r.end, max(r.support, float(b)), ())
            for r, b in zip(weak, best, strict=True)
            if float(b) >= self.similarity
        }
        return [lifted.get((r.start, r.end), r) for r in results]

    def check(self, answer: str, passages: Sequence[str]) -> list[Finding]:
        return [
            Finding(
                self.finding_type,
                r.start,
                r.end,
                round(1.0 - r.support, 4),
                self.name,
                "grounding.unsupported",
            )
            for r in self.support(answer, passages)
            if r.support < self.min_support
        ]

    def scan(self, text: str, ctx: ScanContext) -> list[Finding]:
        if ctx.stage is not Stage.OUTPUT or not ctx.system_prompt:
            return []
        return self.check(text, _PARAGRAPHS.split(ctx.system_prompt))
