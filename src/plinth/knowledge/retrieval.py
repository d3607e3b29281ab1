"""Ranking pieces: query terms, reciprocal-rank fusion, metadata filters, rerankers, a Python BM25.

Rerankers are named in a base's settings (`"reranker": {"name": "cross-encoder", "model": PATH}`)
and found among the built-ins, `register_reranker`, or the `plinth.rerankers` entry point group (a
factory taking the options dict and returning an object with `rerank(query, hits)`).

RRF fuses ranks, not scores, so BM25's unbounded scores and cosine similarities need no
calibration; each list's weight scales its 1 / (k + rank) contribution.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from importlib import metadata
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
    """One retrieved chunk.

    For hierarchical bases `text` is the parent's text (what a model should read; `parent_text`
    repeats it, so code that reads either gets the parent), `matched_text` the child chunk that
    matched and `parent_id` the parent row; `chunk_id` stays the child's (the citation).
    """

    chunk_id: int
    document_id: str
    text: str
    score: float
    meta: dict[str, Any] = field(default_factory=dict)
    parent_text: str | None = None
    matched_text: str | None = None
    parent_id: int | None = None


class Reranker(Protocol):
    """Reorders the fused candidates for a query (e.g. a cross-encoder); may rescore them."""

    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]: ...


RerankerFactory = Callable[[dict[str, Any]], Reranker]
ENTRY_POINT_GROUP = "plinth.rerankers"


class RerankerUnavailable(Exception):
    """A configured reranker cannot run here (package or model missing); search goes on without it."""


class NoopReranker:
    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        return hits


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder scoring (query, chunk) pairs; loaded offline, lazily.

    None ships with Plinth: `model` is a local directory (or a name already in the Hugging Face
    cache). Nothing is downloaded (HF_HUB_OFFLINE and `local_files_only`).
    """

    def __init__(self, model: str, batch_size: int = 32, max_length: int = 512) -> None:
        if not model:
            raise RerankerUnavailable("the cross-encoder reranker needs a 'model' (a local path)")
        self.model_name = model
        self.batch_size = batch_size
        self.max_length = max_length
        self._model: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                try:
                    from sentence_transformers import CrossEncoder
                except ImportError:
                    raise RerankerUnavailable(
                        "the cross-encoder reranker needs sentence-transformers: pip install 'plinth[local]'"
                    ) from None
                try:
                    self._model = CrossEncoder(
                        self.model_name, max_length=self.max_length, local_files_only=True
                    )
                except Exception as exc:  # missing files, bad config: one clear message
                    raise RerankerUnavailable(
                        f"cross-encoder model {self.model_name!r} could not be loaded offline "
                        f"({type(exc).__name__}: {str(exc)[:200]})"
                    ) from None
            return self._model

    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        if not hits:
            return hits
        model = self._load()
        pairs = [(query, h.matched_text or h.text) for h in hits]
        scores = model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False)
        rescored = [replace(h, score=float(s)) for h, s in zip(hits, scores, strict=True)]
        return sorted(rescored, key=lambda h: -h.score)


def _cross_encoder(options: dict[str, Any]) -> Reranker:
    return CrossEncoderReranker(str(options.get("model") or ""), int(options.get("batch_size", 32)))


_RERANKERS: dict[str, RerankerFactory] = {
    "none": lambda _options: NoopReranker(),
    "cross-encoder": _cross_encoder,
}
_rerankers_lock = threading.Lock()


def register_reranker(name: str, factory: RerankerFactory) -> None:
    """Add a reranker to this process (tests, embedding applications); plug-ins use the
    `plinth.rerankers` entry point group instead."""
    with _rerankers_lock:
        _RERANKERS[name] = factory


def reranker_spec(value: Any) -> dict[str, Any] | None:
    """A base's `reranker` setting as {"name", ...options}; ValueError names the field."""
    if value is None:
        return None
    spec = {"name": value} if isinstance(value, str) else value
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not spec["name"]:
        raise ValueError("'reranker' must be a name or an object with a 'name'")
    if _reranker_factory(spec["name"]) is None:
        known = ", ".join(sorted(_RERANKERS))
        raise ValueError(f"'reranker': unknown reranker {spec['name']!r} (known: {known}, or a plug-in)")
    return dict(spec)


def _reranker_factory(name: str) -> RerankerFactory | None:
    with _rerankers_lock:
        factory = _RERANKERS.get(name)
    if factory is not None:
        return factory
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            loaded = ep.load()
            if not callable(loaded):
                raise ValueError(f"entry point {ENTRY_POINT_GROUP}:{name} is not callable")
            plugin: RerankerFactory = loaded
            register_reranker(name, plugin)
            return plugin
    return None


def create_reranker(spec: dict[str, Any]) -> Reranker:
    """Build the reranker a spec names (see reranker_spec); RerankerUnavailable if it cannot run."""
    factory = _reranker_factory(spec["name"])
    if factory is None:
        raise RerankerUnavailable(f"unknown reranker {spec['name']!r}")
    reranker = factory({k: v for k, v in spec.items() if k != "name"})
    if not callable(getattr(reranker, "rerank", None)):
        raise RerankerUnavailable(f"reranker {spec['name']!r}: its factory returned no rerank() method")
    return reranker


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
