"""Ranking pieces: query terms, reciprocal-rank fusion, metadata filters, rerankers, a Python BM25.

RRF fuses ranks, not scores, so BM25's unbounded scores and cosine similarities need no
calibration; each list's weight scales its 1 / (k + rank) contribution.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

# A short English list: FTS5 has no stopwords, so they are dropped from queries instead (a query
# made only of stopwords keeps them).
_STOPWORD_TEXT = (
    "a an and are as at be been but by can do does for from has have how i if in into is it its "
    "no not of on or so such than that the their then there these they this to was were what when "
    "where which who whom why will with would you your"
)
STOPWORDS = frozenset(_STOPWORD_TEXT.split())
_TERM = re.compile(r"\w+", re.UNICODE)


class SearchMode(StrEnum):
    BM25 = "bm25"
    DENSE = "dense"
    HYBRID = "hybrid"


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk; `parent_text` is the enclosing section for hierarchical chunks."""

    chunk_id: int
    document_id: str
    text: str
    score: float
    meta: dict[str, Any] = field(default_factory=dict)
    parent_text: str | None = None


class Reranker(Protocol):
    """Reorders the fused candidates for a query (e.g. a cross-encoder)."""

    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]: ...


class NoopReranker:
    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        return hits


def query_terms(query: str) -> list[str]:
    terms = [t.lower() for t in _TERM.findall(query)]
    kept = [t for t in terms if t not in STOPWORDS]
    return list(dict.fromkeys(kept or terms))


def fts_query(query: str) -> str | None:
    """An FTS5 MATCH expression: every term quoted (no operator injection), OR-ed like BM25 expects."""
    terms = query_terms(query)
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


def rrf(rankings: Sequence[tuple[Sequence[int], float]], k: int = 60) -> dict[int, float]:
    """Reciprocal-rank fusion of (ranked ids, weight) lists."""
    fused: dict[int, float] = {}
    for ids, weight in rankings:
        for rank, item in enumerate(ids, start=1):
            fused[item] = fused.get(item, 0.0) + weight / (k + rank)
    return fused


def matches(meta: Mapping[str, Any], filters: Mapping[str, Any] | None) -> bool:
    """Equality per key; a list value means "any of these"."""
    if not filters:
        return True
    for key, wanted in filters.items():
        value = meta.get(key)
        if isinstance(wanted, list):
            if value not in wanted:
                return False
        elif value != wanted:
            return False
    return True


def tokenize_for_bm25(text: str) -> list[str]:
    """The fallback's analyzer: lower-case words minus stopwords, crude suffix stripping."""
    out = []
    for term in _TERM.findall(text.lower()):
        if term in STOPWORDS:
            continue
        for suffix in ("ing", "ed", "es", "s"):
            if len(term) > len(suffix) + 2 and term.endswith(suffix):
                term = term[: -len(suffix)]
                break
        out.append(term)
    return out


def bm25_rank(
    query: str, docs: Iterable[tuple[int, str]], limit: int, k1: float = 1.2, b: float = 0.75
) -> list[tuple[int, float]]:
    """Okapi BM25 in Python over (id, text): the PostgreSQL fallback, linear in the base's size."""
    ids: list[int] = []
    counts: list[Counter[str]] = []
    lengths: list[int] = []
    df: Counter[str] = Counter()
    for item, text in docs:
        tokens = tokenize_for_bm25(text)
        tf = Counter(tokens)
        ids.append(item)
        counts.append(tf)
        lengths.append(len(tokens))
        df.update(tf.keys())
    if not ids:
        return []
    terms = list(dict.fromkeys(tokenize_for_bm25(query)))
    n = len(ids)
    avg = sum(lengths) / n or 1.0
    idf = {t: math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in terms if df[t]}
    scored = []
    for item, tf, length in zip(ids, counts, lengths, strict=True):
        score = 0.0
        for term, weight in idf.items():
            f = tf.get(term, 0)
            if f:
                score += weight * f * (k1 + 1) / (f + k1 * (1 - b + b * length / avg))
        if score > 0:
            scored.append((item, score))
    scored.sort(key=lambda pair: -pair[1])
    return scored[:limit]
