"""Knowledge store: parsing, chunking, idempotent folder ingest, team isolation, hybrid retrieval."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from plinth.knowledge.chunking import Section, chunk_sections, fixed_windows
from plinth.knowledge.embedders import HashingEmbedder
from plinth.knowledge.parsers import ParseError, parse_file
from plinth.knowledge.retrieval import SearchMode, bm25_rank, fts_query, rrf
from plinth.knowledge.store import KnowledgeError, KnowledgeStore
from plinth.storage import Database

DOCS = {
    "volcano.md": "# Geology\n\n## Volcanoes\n\nMagma rises through the crust and erupts as lava from volcanoes.\n",
    "bread.txt": "Sourdough bread needs flour, water, salt and a lively starter culture.\n\nBake it hot.",
    "tides.html": "<html><head><style>p{}</style></head><body><h1>Ocean</h1><h2>Tides</h2>"
    "<p>The moon's gravity pulls the oceans and makes the tides rise and fall.</p>"
    "<table><tr><td>high</td><td>06:00</td></tr></table></body></html>",
    "faq.jsonl": json.dumps(
        {"title": "Passwords", "text": "Reset your password from the account page.", "lang": "en"}
    )
    + "\n",
}


@pytest.fixture
def store(database_url: str) -> Iterator[KnowledgeStore]:
    db = Database(database_url)
    db.migrate()
    yield KnowledgeStore(db, HashingEmbedder())
    db.dispose()


def write(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return folder


def test_each_text_format_is_parsed_with_structure(tmp_path: Path) -> None:
    md = parse_file(Path("a.md"), DOCS["volcano.md"].encode())
    assert md[0].heading_path == ["Geology", "Volcanoes"] and "Magma" in md[0].blocks[0]
    html = parse_file(Path("a.html"), DOCS["tides.html"].encode())
    assert html[0].heading_path == ["Ocean", "Tides"]
    assert any("moon" in b for b in html[0].blocks) and any("high | 06:00" in b for b in html[0].blocks)
    assert not any("p{}" in b for s in html for b in s.blocks)  # style content dropped
    txt = parse_file(Path("a.txt"), DOCS["bread.txt"].encode())
    assert len(txt[0].blocks) == 2
    jsonl = parse_file(Path("a.jsonl"), DOCS["faq.jsonl"].encode())
    assert jsonl[0].meta == {"lang": "en"} and jsonl[0].heading_path == ["Passwords"]


def test_bad_files_raise_clear_errors() -> None:
    with pytest.raises(ParseError, match=r"unsupported file type \.exe"):
        parse_file(Path("a.exe"), b"MZ")
    with pytest.raises(ParseError, match="line 1 is not JSON"):
        parse_file(Path("a.jsonl"), b"{oops")
    with pytest.raises(ParseError, match="PDF"):
        parse_file(Path("a.pdf"), b"%PDF-1.4 this is not really a pdf")
    with pytest.raises(ParseError, match="not UTF-8"):
        parse_file(Path("a.txt"), b"\xff\xfe\xfa")


def test_chunking_windows_overlap_and_keeps_sections_apart() -> None:
    words = [str(i) for i in range(25)]
    windows = fixed_windows(words, 10, 3)
    assert windows[0][-3:] == windows[1][:3] and windows[-1][-1] == "24"
    chunks = chunk_sections(
        [Section(["a b c", "d e"], ["H1"]), Section(["f g"], ["H2"], page=2)], size=10, overlap=2
    )
    assert [c.text for c in chunks] == ["a b c\n\nd e", "f g"]
    assert chunks[1].meta == {"heading_path": "H2", "page": 2}
    with pytest.raises(ValueError):
        fixed_windows(words, 5, 5)


def test_folder_ingest_is_idempotent_by_content_hash(store: KnowledgeStore, tmp_path: Path) -> None:
    embedder = store.embedder
    assert isinstance(embedder, HashingEmbedder)
    base = store.create_base("team_a", "docs")
    folder = write(tmp_path / "docs", {**DOCS, "broken.pdf": b"%PDF-1.7\n garbage", "notes.xyz": "?"})
    first = store.ingest_folder(base.id, folder)
    assert sorted(first.added) == sorted(DOCS)
    assert set(first.failed) == {"broken.pdf", "notes.xyz"}
    assert "PDF" in first.failed["broken.pdf"] and "unsupported file type .xyz" in first.failed["notes.xyz"]
    calls = embedder.calls
    assert calls > 0

    again = store.ingest_folder(base.id, folder)
    assert sorted(again.unchanged) == sorted(DOCS) and not again.added and not again.replaced
    assert embedder.calls == calls  # no embedding work for unchanged files

    (folder / "bread.txt").write_text("Rye bread is dense and dark.")
    (folder / "faq.jsonl").unlink()
    third = store.ingest_folder(base.id, folder)
    assert third.replaced == ["bread.txt"] and third.removed == ["faq.jsonl"]
    assert store.stats(base.id)["documents"] == 3
    hits = store.search(base.id, "sourdough starter", mode=SearchMode.BM25)
    assert hits == []  # the old text is gone from the index too
    assert store.search(base.id, "rye bread")[0].meta["source"] == "bread.txt"


def test_hybrid_ranks_the_relevant_chunk_first_with_citations(store: KnowledgeStore, tmp_path: Path) -> None:
    base = store.create_base("team_a", "docs")
    store.ingest_folder(base.id, write(tmp_path / "d", DOCS))
    for mode in SearchMode:
        hits = store.search(base.id, "why do the tides rise", mode=mode, top_k=3)
        assert hits[0].meta["source"] == "tides.html", mode
    top = store.search(base.id, "lava from volcanoes")[0]
    assert top.meta["heading_path"] == "Geology > Volcanoes"
    # the citation points to a real chunk of a real document of this base
    docs = {d.id: d.source for d in store.documents(base.id)}
    assert docs[top.document_id] == "volcano.md" and "Magma" in top.text
    filtered = store.search(base.id, "password", filters={"lang": "en"})
    assert [h.meta["source"] for h in filtered] == ["faq.jsonl"]
    assert store.search(base.id, "tides", filters={"source": ["bread.txt"]}, mode=SearchMode.BM25) == []
    high = store.search(base.id, "tides moon", mode=SearchMode.DENSE, score_threshold=0.99)
    assert high == []


def test_team_isolation_and_base_lifecycle(store: KnowledgeStore, tmp_path: Path) -> None:
    a = store.create_base("team_a", "shared-name")
    b = store.create_base("team_b", "shared-name")
    store.ingest_folder(a.id, write(tmp_path / "a", {"secret.txt": "Project Falcon launches in March."}))
    store.ingest_folder(b.id, write(tmp_path / "b", {"other.txt": "Lunch menu for Friday."}))
    with pytest.raises(KnowledgeError) as info:
        store.get_base(a.id, "team_b")
    assert info.value.status == 404
    assert store.get_base("shared-name", "team_b").id == b.id
    assert all(h.meta["source"] == "other.txt" for h in store.search(b.id, "Project Falcon launches"))
    assert [x.id for x in store.list_bases("team_a")] == [a.id]
    with pytest.raises(KnowledgeError, match="already exists"):
        store.create_base("team_a", "shared-name")
    store.delete_base(a.id, "team_a")
    assert store.list_bases("team_a") == []
    assert store.stats(a.id) == {"documents": 0, "chunks": 0}
    with pytest.raises(KnowledgeError, match="query must not be empty"):
        store.search(b.id, "  ")


def test_rrf_and_python_bm25() -> None:
    fused = rrf([([1, 2, 3], 1.0), ([3, 1], 2.0)], k=60)
    assert max(fused, key=lambda i: fused[i]) in (1, 3) and fused[3] > fused[2]
    ranked = bm25_rank("tides moon", [(1, "bread and salt"), (2, "the moon moves tides"), (3, "moon")], 3)
    assert ranked[0][0] == 2 and {i for i, _ in ranked} == {2, 3}
    assert fts_query('the "moon" OR NEAR') == '"moon" OR "near"'  # quoted: no FTS operators


def _pdf_with_text(text: str) -> bytes:
    """A minimal one-page PDF (pypdf repairs the approximate xref table)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = b"%PDF-1.4\n"
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % n + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out


def test_pdf_pages_and_docx_headings_and_tables(tmp_path: Path) -> None:
    pytest.importorskip("pypdf")
    docx = pytest.importorskip("docx")
    pdf = parse_file(Path("a.pdf"), _pdf_with_text("Glaciers carve valleys"))
    assert pdf[0].page == 1 and "Glaciers carve valleys" in pdf[0].blocks[0]
    document = docx.Document()
    document.add_heading("Handbook", level=1)
    document.add_heading("Leave", level=2)
    document.add_paragraph("Employees get 25 days of paid leave.")
    table = document.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "grade", "days"
    document.save(str(tmp_path / "h.docx"))
    sections = parse_file(Path("h.docx"), (tmp_path / "h.docx").read_bytes())
    assert sections[-1].heading_path == ["Handbook", "Leave"]
    assert "Employees get 25 days of paid leave." in sections[-1].blocks
    assert "grade | days" in sections[-1].blocks
    with pytest.raises(ParseError, match="unreadable DOCX"):
        parse_file(Path("b.docx"), b"PK not a zip")


def test_encrypted_base_stores_no_plaintext_and_binds_rows(database_url: str, tmp_path: Path) -> None:
    import base64

    from sqlalchemy import select

    from plinth.knowledge.models import KbChunk

    db = Database(database_url)
    db.migrate()
    master = bytes(range(32))
    store = KnowledgeStore(db, HashingEmbedder(), master_key=master)
    base = store.create_base("team_a", "secret")
    store.ingest_folder(base.id, write(tmp_path / "s", {"plan.txt": "Project Falcon launches in March."}))
    with db.session() as s:
        row = s.scalars(select(KbChunk)).one()
        assert row.text.startswith("enc1:") and "Falcon" not in row.text
        assert row.search_text == "falcon launch march project"  # the BM25 bag: terms, no order
        assert row.vector is not None and len(row.vector) == 256 * 4 + 12 + 16
    hit = store.search(base.id, "when does falcon launch")[0]
    assert hit.text == "Project Falcon launches in March."
    # a fresh process with the key reads it; without the key it is refused; a wrong key fails
    assert (
        KnowledgeStore(db, HashingEmbedder(), master_key=master).search(base.id, "falcon")[0].text == hit.text
    )
    with pytest.raises(KnowledgeError, match="is encrypted: set PLINTH_MASTER_KEY"):
        KnowledgeStore(db, HashingEmbedder()).search(base.id, "falcon")
    with pytest.raises(KnowledgeError, match="does not open"):
        KnowledgeStore(db, HashingEmbedder(), master_key=b"\x01" * 32).search(base.id, "falcon")
    from plinth.knowledge.crypto import CryptoError, parse_master_key

    assert parse_master_key(base64.b64encode(master).decode()) == master == parse_master_key(master.hex())
    with pytest.raises(CryptoError, match="32 bytes"):
        parse_master_key("c2hvcnQ=")
    db.dispose()
