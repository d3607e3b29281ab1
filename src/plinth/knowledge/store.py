"""The knowledge store: bases per team, idempotent document ingestion, hybrid retrieval.

Vectors are float32 blobs in `kb_chunks.vector`; search is numpy brute force over a per-base matrix
cached in memory (100k x 384 is 150 MB and a few ms per query). The cache is keyed by the base's
chunk count and highest chunk id plus a generation bumped by this process's writes, so another
process's ingest is picked up on the next query.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError

from plinth.knowledge.chunking import Chunk, Section, chunk_sections
from plinth.knowledge.crypto import ENV, CryptoError, TeamCipher, unwrap, wrap
from plinth.knowledge.embedders import Embedder, Matrix
from plinth.knowledge.models import KbChunk, KbDocument, KbTeamKey, KnowledgeBase
from plinth.knowledge.parsers import SUPPORTED, ParseError, parse_file
from plinth.knowledge.retrieval import (
    Hit,
    NoopReranker,
    Reranker,
    SearchMode,
    bm25_rank,
    fts_query,
    matches,
    rrf,
    tokenize_for_bm25,
)
from plinth.storage import Database, utcnow

EMBED_BATCH = 256


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


def _hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class KnowledgeStore:
    def __init__(
        self,
        db: Database,
        embedder: Embedder,
        reranker: Reranker | None = None,
        master_key: bytes | None = None,
    ) -> None:
        """`master_key` (see plinth.knowledge.crypto): new bases are encrypted when it is given."""
        self.db = db
        self.master_key = master_key
        self._ciphers: dict[str, TeamCipher] = {}
        self.embedder = embedder
        self.reranker = reranker or NoopReranker()
        self._matrices: dict[str, _Matrix] = {}
        self._generation = 0
        self._lock = threading.Lock()

    # -- bases -----------------------------------------------------------------------------------

    def create_base(
        self, team_id: str, name: str, settings: Mapping[str, Any] | None = None
    ) -> KnowledgeBase:
        if not name.strip():
            raise KnowledgeError("knowledge base name must not be empty")
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
                    **(settings or {}),
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
            chunks = s.scalar(select(func.count()).select_from(KbChunk).where(KbChunk.kb_id == kb_id))
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
        size, overlap = int(settings.get("chunk_size", 180)), int(settings.get("chunk_overlap", 30))
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
                todo.append((source, content_hash, chunk_sections(sections, size, overlap)))
        if not todo:
            return result
        cipher = self._cipher(kb_id)
        vectors = self._embed([self._search_text(c) for _, _, chunks in todo for c in chunks])
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
                s.add_all(
                    KbChunk(
                        kb_id=kb_id,
                        document_id=document_id,
                        ordinal=n,
                        text=cipher.seal_text(chunk.text, kb_id) if cipher else chunk.text,
                        search_text=self._indexed_text(chunk, cipher is not None),
                        meta={"source": source, **chunk.meta},
                        vector=cipher.seal(vectors[offset + n].tobytes(), kb_id)
                        if cipher
                        else vectors[offset + n].tobytes(),
                    )
                    for n, chunk in enumerate(chunks)
                )
                offset += len(chunks)
                result.chunks += len(chunks)
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

    def _cipher(self, kb_id: str) -> TeamCipher | None:
        """The team's cipher for an encrypted base (creating the team's data key once), else None."""
        with self.db.session() as s:
            base = s.get(KnowledgeBase, kb_id)
            if base is None:
                raise KnowledgeError(f"knowledge base {kb_id!r} not found", 404)
            encrypted, team_id = bool(base.settings.get("encrypted")), base.team_id
        if not encrypted:
            return None
        if self.master_key is None:
            raise KnowledgeError(f"knowledge base {kb_id} is encrypted: set {ENV} to use it")
        cached = self._ciphers.get(team_id)
        if cached is not None:
            return cached
        with self.db.session() as s:
            row = s.get(KbTeamKey, team_id)
            wrapped = row.wrapped_key if row is not None else None
        if wrapped is None:
            data_key = secrets.token_bytes(32)
            try:
                with self.db.session() as s:
                    s.add(KbTeamKey(team_id=team_id, wrapped_key=wrap(self.master_key, data_key, team_id)))
            except IntegrityError:  # another process created it first: use theirs
                return self._cipher(kb_id)
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
        hits = self._load_hits(
            kb_id, scored[: max(top_k, pool if not isinstance(self.reranker, NoopReranker) else 0)]
        )
        return self.reranker.rerank(query, hits)[:top_k]

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
        with self.db.session() as s:
            rows = s.execute(
                select(KbChunk.id, KbChunk.search_text, KbChunk.meta).where(KbChunk.kb_id == kb_id)
            ).all()
        return bm25_rank(query, ((r[0], r[1]) for r in rows if matches(r[2], filters)), limit)

    def _dense(
        self,
        kb_id: str,
        query: str,
        limit: int,
        filters: Mapping[str, Any] | None,
        query_vector: Matrix | None,
    ) -> list[tuple[int, float]]:
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

    def _matrix(self, kb_id: str) -> _Matrix:
        with self.db.session() as s:
            count, highest = s.execute(
                select(func.count(), func.max(KbChunk.id)).where(KbChunk.kb_id == kb_id)
            ).one()
        key = (int(count or 0), int(highest or 0), self._generation)
        with self._lock:
            cached = self._matrices.get(kb_id)
            if cached is not None and cached.key == key:
                return cached
        with self.db.session() as s:
            rows = s.execute(
                select(KbChunk.id, KbChunk.vector, KbChunk.meta)
                .where(KbChunk.kb_id == kb_id)
                .order_by(KbChunk.id)
            ).all()
        dims = self.embedder.dimensions
        cipher = self._cipher(kb_id)
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
        if not scored:
            return []
        cipher = self._cipher(kb_id)
        ids = [i for i, _ in scored]
        with self.db.session() as s:
            rows = {c.id: c for c in s.scalars(select(KbChunk).where(KbChunk.id.in_(ids)))}
        return [
            Hit(
                chunk_id=i,
                document_id=rows[i].document_id,
                text=cipher.open_text(rows[i].text, kb_id) if cipher else rows[i].text,
                score=score,
                meta=dict(rows[i].meta),
            )
            for i, score in scored
            if i in rows
        ]


def _json(value: Any) -> dict[str, Any]:
    import json

    if isinstance(value, dict):
        return value
    loaded = json.loads(value) if isinstance(value, str | bytes) else {}
    return loaded if isinstance(loaded, dict) else {}
