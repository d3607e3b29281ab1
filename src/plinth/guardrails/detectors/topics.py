"""Denied topics described in words, matched by meaning with the local MiniLM embedding model.

An operator writes what must not be discussed ("recommending specific stocks or funds to buy") and,
optionally, a few example requests; each is embedded once. A scanned text is embedded as a whole and
sentence by sentence (a denied question hidden in a long harmless message still counts), and the
best cosine similarity against each topic is compared with that topic's threshold. Paraphrases match
because similarity is computed on meaning, not words; for exact words use the kill-switch rules.

Findings: `DENIED_TOPIC`, rule `topics.<id>`, the best-matching segment as span, and a score of 0.5
at the topic's threshold rising to 1.0 (see `confidence`). Without a `topics` option (the built-in
`strict` profile names the scanner bare) there is nothing to match and the model is never loaded.

Cost: one MiniLM forward pass per scan (about 5-15 ms on one CPU core for a short message, more for
long ones: at most `max_segments` sentences are embedded besides the whole text).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

from plinth.guardrails.detectors import options as opt
from plinth.guardrails.detectors.embedding import encode, require_local_model
from plinth.guardrails.detectors.text import sentences
from plinth.guardrails.types import Finding, ScanContext

DEFAULT_THRESHOLD = 0.4
MAX_SEGMENTS = 32
_TOPIC_KEYS = ("id", "description", "examples", "threshold")


@dataclass(frozen=True, slots=True)
class Topic:
    id: str
    texts: tuple[str, ...]  # the description and the examples
    threshold: float


@dataclass(frozen=True, slots=True)
class TopicMatch:
    topic: str
    score: float
    start: int
    end: int


def parse_topics(raw: Any, default_threshold: float) -> list[Topic]:
    if not isinstance(raw, list) or not raw:
        raise opt.ScannerOptionError("topics: 'topics' must be a non-empty list of {id, description}")
    topics: list[Topic] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise opt.ScannerOptionError(f"topics: topics[{i}] must be a mapping with 'id' and 'description'")
        where = f"topics[{i}]"
        opt.check_keys(f"topics: {where}", item, _TOPIC_KEYS)
        topic_id = opt.string(f"topics: {where}", item, "id")
        if topic_id in seen:
            raise opt.ScannerOptionError(f"topics: {where}: duplicate id {topic_id!r}")
        seen.add(topic_id)
        description = opt.string(f"topics: {where}", item, "description")
        examples = opt.string_list(f"topics: {where}", item, "examples")
        threshold = opt.number(f"topics: {where}", item, "threshold", default_threshold, 0.0, 0.99)
        topics.append(Topic(topic_id, (description, *examples), threshold))
    return topics


def confidence(similarity: float, threshold: float) -> float:
    """A hit's finding score: 0.5 at the topic's threshold, 1.0 at identical meaning.

    Cosine similarities of a paraphrase are often 0.4-0.7; reported raw, a profile's `min_score`
    (0.5 by default) would silently drop hits the topic's own threshold accepted."""
    return round(min(1.0, 0.5 + 0.5 * (similarity - threshold) / (1.0 - threshold)), 4)


class DeniedTopicsScanner:
    """Scanner `topics`: flags text whose meaning is close to a denied topic."""

    name = "topics"
    cacheable = True  # findings depend on the text alone (plinth.guardrails.verdicts)
    finding_type = "DENIED_TOPIC"

    def __init__(self, topics: list[Topic], max_segments: int = MAX_SEGMENTS) -> None:
        self.topics = topics
        self.max_segments = max_segments
        self._lock = threading.Lock()
        self._matrix: Any = None  # rows: every topic text, embedded once
        self._owner: list[int] = [i for i, t in enumerate(topics) for _ in t.texts]

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> DeniedTopicsScanner:
        opt.check_keys("topics", options, ("topics", "threshold", "max_segments"))
        threshold = opt.number("topics", options, "threshold", DEFAULT_THRESHOLD, 0.0, 0.99)
        max_segments = int(opt.number("topics", options, "max_segments", MAX_SEGMENTS, 1, 256))
        if options.get("topics") is None:  # the built-in strict profile names the scanner bare
            return cls([], max_segments)
        topics = parse_topics(options.get("topics"), threshold)
        require_local_model("topics")
        return cls(topics, max_segments)

    def warmup(self) -> None:
        """Load the model and embed the topic descriptions now rather than on the first scan."""
        self._topic_matrix()

    def _topic_matrix(self) -> Any:
        if self._matrix is None:
            with self._lock:
                if self._matrix is None:
                    self._matrix = encode([text for topic in self.topics for text in topic.texts])
        return self._matrix

    def _segments(self, text: str) -> list[tuple[int, int]]:
        spans = [(0, len(text))]
        parts = list(sentences(text))
        if len(parts) > 1:
            if len(parts) > self.max_segments:  # group neighbouring sentences to stay within the cap
                per = -(-len(parts) // self.max_segments)
                parts = [
                    (parts[i][0], parts[min(i + per, len(parts)) - 1][1]) for i in range(0, len(parts), per)
                ]
            spans.extend(parts)
        return spans

    def match(self, text: str) -> list[TopicMatch]:
        """The best-matching segment for every topic, above its threshold or not."""
        import numpy as np

        if not text.strip() or not self.topics:
            return []
        spans = self._segments(text)
        vectors = encode([text[s:e] for s, e in spans])
        similarity = vectors @ self._topic_matrix().T  # segments x topic texts
        owner = np.asarray(self._owner)
        results: list[TopicMatch] = []
        for index, topic in enumerate(self.topics):
            columns = similarity[:, owner == index]
            flat = int(np.argmax(columns))
            row = flat // columns.shape[1]
            start, end = spans[row]
            results.append(TopicMatch(topic.id, float(columns.flat[flat]), start, end))
        return results

    def scan(self, text: str, ctx: ScanContext) -> list[Finding]:
        findings: list[Finding] = []
        for topic, hit in zip(self.topics, self.match(text), strict=False):
            if hit.score >= topic.threshold:
                findings.append(
                    Finding(
                        self.finding_type,
                        hit.start,
                        hit.end,
                        confidence(hit.score, topic.threshold),
                        self.name,
                        f"topics.{topic.id}",
                    )
                )
        return findings
