"""Knowledge-base retrieval quality and speed on BEIR SciFact (not a test; prints its figures).

    .venv/bin/python bench/knowledge_bench.py [--data /work/shared/data/scifact] [--scale 100000]

Quality: the corpus (title + abstract) is ingested with the local all-MiniLM-L6-v2 into a fresh
SQLite database; each train query (809, qrels_train.tsv) is run as BM25 (FTS5), dense (numpy) and
hybrid (RRF). Chunks map back to their document (best chunk wins); nDCG@10 and Recall@100.
Speed: ingestion chunks/s (parse + chunk + embed + write), then hybrid query latency at the corpus
size and again after adding perturbed copies up to --scale chunks: each copy drops ~15% of the
words at random (so FTS terms and statistics change) and gets the original vector plus Gaussian noise
(sigma 0.02 per component) renormalized, written straight to the table (no model time). Latency
excludes query embedding (precomputed), reported separately.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import random
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from plinth.knowledge.chunking import Section
from plinth.knowledge.embedders import LocalEmbedder
from plinth.knowledge.retrieval import SearchMode
from plinth.knowledge.store import KnowledgeStore
from plinth.storage import Database


def load(data: Path) -> tuple[list[dict[str, str]], dict[str, str], dict[str, dict[str, int]]]:
    corpus = [json.loads(line) for line in (data / "corpus.jsonl").open()]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (data / "queries_train.jsonl").open())}
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with (data / "qrels_train.tsv").open() as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            qrels[row["query-id"]][row["corpus-id"]] = int(row["score"])
    return corpus, {q: t for q, t in queries.items() if q in qrels}, qrels


def ndcg10(ranked: list[str], rel: dict[str, int]) -> float:
    dcg = sum(rel.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sorted(rel.values(), reverse=True)[:10]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def recall100(ranked: list[str], rel: dict[str, int]) -> float:
    wanted = {d for d, g in rel.items() if g > 0}
    return len(wanted & set(ranked[:100])) / len(wanted) if wanted else 0.0


def doc_ranking(hits: list[tuple[str, float]]) -> list[str]:
    seen: dict[str, None] = {}
    for doc, _ in hits:
        seen.setdefault(doc, None)
    return list(seen)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def vector_index_comparison(n: int, dims: int = 384, queries: int = 200) -> None:
    """Top-100 latency of exact numpy search vs sqlite-vec's vec0 table at `n` vectors.

    Both are exact (vec0 0.1.x is a brute-force scan). Python's stdlib sqlite3 here is built
    without extension loading, so sqlite-vec is loaded through apsw for the measurement.
    """
    rng = np.random.default_rng(3)
    matrix = rng.normal(size=(n, dims)).astype(np.float32)
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    qs = matrix[rng.integers(0, n, queries)] + rng.normal(0, 0.05, (queries, dims)).astype(np.float32)
    qs /= np.linalg.norm(qs, axis=1, keepdims=True)

    def numpy_top(q: np.ndarray) -> list[int]:
        scores = matrix @ q
        top = np.argpartition(-scores, 99)[:100]
        return [int(i) for i in top[np.argsort(-scores[top])]]

    lat = []
    for q in qs:
        t = time.perf_counter()
        numpy_top(q)
        lat.append((time.perf_counter() - t) * 1000)
    print(f"numpy exact top-100 at {n}x{dims}: p50 {pct(lat, 0.5):.2f} ms, p99 {pct(lat, 0.99):.2f} ms")
    try:
        import apsw  # type: ignore[import-not-found]
        import sqlite_vec  # type: ignore[import-not-found]
    except ImportError as exc:
        print(f"sqlite-vec comparison skipped: {exc.name} is not installed (pip install sqlite-vec apsw)")
        return
    folder = tempfile.mkdtemp(prefix="kb-vec-")
    conn = apsw.Connection(f"{folder}/vec.db")
    conn.enable_load_extension(True)
    conn.load_extension(sqlite_vec.loadable_path())
    conn.execute(f"CREATE VIRTUAL TABLE v USING vec0(embedding float[{dims}] distance_metric=cosine)")
    t0 = time.perf_counter()
    with conn:
        conn.executemany(
            "INSERT INTO v(rowid, embedding) VALUES (?, ?)", ((i, matrix[i].tobytes()) for i in range(n))
        )
    print(
        f"sqlite-vec {sqlite_vec.__version__ if hasattr(sqlite_vec, '__version__') else ''} insert: "
        f"{time.perf_counter() - t0:.1f} s"
    )
    sql = "SELECT rowid, distance FROM v WHERE embedding MATCH ? AND k = 100"
    agree = 0
    lat = []
    for q in qs:
        t = time.perf_counter()
        rows = list(conn.execute(sql, (q.tobytes(),)))
        lat.append((time.perf_counter() - t) * 1000)
        agree += rows[0][0] == numpy_top(q)[0]
    print(
        f"sqlite-vec exact top-100 at {n}x{dims}: p50 {pct(lat, 0.5):.2f} ms, p99 {pct(lat, 0.99):.2f} ms "
        f"(same first hit as numpy in {agree}/{len(qs)})"
    )


def postgres_bm25_comparison(url: str, data: Path, queries_n: int) -> None:
    """BM25-only quality and latency on PostgreSQL: tsvector + ts_rank_cd vs the Python Okapi BM25.

    `url` names a server database where a scratch database is created (and dropped). No model:
    the hashing embedder fills the vectors, which BM25 does not read.
    """
    import uuid

    import sqlalchemy

    from plinth.knowledge.embedders import HashingEmbedder
    from plinth.knowledge.models import KbChunk
    from plinth.knowledge.retrieval import bm25_rank

    corpus, queries, qrels = load(data)
    name = f"kb_bench_{uuid.uuid4().hex[:8]}"
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    db = Database(url.rsplit("/", 1)[0] + "/" + name)
    try:
        db.migrate()
        store = KnowledgeStore(db, HashingEmbedder(64))
        base = store.create_base("team_bench", "scifact", {"chunk_size": 400, "chunk_overlap": 40})
        batch = [
            (d["_id"], [Section([d["title"], d["text"]], meta={"doc_id": d["_id"]})], d["_id"])
            for d in corpus
        ]
        t0 = time.perf_counter()
        chunks = store.ingest_batch(base.id, batch).chunks
        print(f"postgres: {chunks} chunks ingested in {time.perf_counter() - t0:.1f} s (hashing vectors)")
        with db.session() as s:
            rows = s.execute(
                sqlalchemy.select(KbChunk.id, KbChunk.search_text, KbChunk.meta).where(
                    KbChunk.kb_id == base.id
                )
            ).all()
        doc_of = {int(i): m["doc_id"] for i, _, m in rows}
        ids = list(queries)[:queries_n]
        for label in ("tsvector", "python"):
            n10, r100, lat = [], [], []
            for q in ids:
                t = time.perf_counter()
                if label == "tsvector":
                    scored = store._bm25(base.id, queries[q], 200, None)
                else:
                    scored = bm25_rank(queries[q], ((r[0], r[1]) for r in rows), 200)
                lat.append((time.perf_counter() - t) * 1000)
                ranked = doc_ranking([(doc_of[i], sc) for i, sc in scored])
                n10.append(ndcg10(ranked, qrels[q]))
                r100.append(recall100(ranked, qrels[q]))
            print(
                f"postgres bm25 {label:>8}: nDCG@10 {statistics.mean(n10):.4f}  Recall@100 "
                f"{statistics.mean(r100):.4f}  p50 {pct(lat, 0.5):.1f} ms p99 {pct(lat, 0.99):.1f} ms "
                f"({len(ids)} queries; python excludes reading the rows)"
            )
    finally:
        db.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/scifact"))
    parser.add_argument("--scale", type=int, default=100_000)
    parser.add_argument("--chunk-size", type=int, default=400)
    parser.add_argument("--weights", default="1,1", help="RRF weights bm25,dense")
    parser.add_argument("--chunking", default="structure", help="structure|fixed|semantic|hierarchical")
    parser.add_argument(
        "--vector-index", type=int, metavar="N", help="only compare numpy and sqlite-vec at N vectors"
    )
    parser.add_argument("--pg-bm25", metavar="URL", help="only compare BM25 engines on this PostgreSQL")
    parser.add_argument("--queries", type=int, default=809)
    args = parser.parse_args()
    if args.pg_bm25:
        postgres_bm25_comparison(args.pg_bm25, args.data, args.queries)
        return
    if args.vector_index:
        vector_index_comparison(args.vector_index)
        return
    weights = tuple(float(w) for w in args.weights.split(","))
    corpus, queries, qrels = load(args.data)
    db = Database(f"sqlite:///{tempfile.mkdtemp(prefix='kb-bench-')}/kb.db")
    db.migrate()
    store = KnowledgeStore(db, LocalEmbedder())
    base = store.create_base(
        "team_bench",
        "scifact",
        {"chunk_size": args.chunk_size, "chunk_overlap": 40, "chunking": args.chunking},
    )
    store.embedder.embed(["warm up"])  # model load is not ingestion

    started = time.perf_counter()
    chunks = 0
    for i in range(0, len(corpus), 512):
        batch = []
        for doc in corpus[i : i + 512]:
            body = f"{doc['title']}\n\n{doc['text']}"
            sections = [Section([doc["title"], doc["text"]], meta={"doc_id": doc["_id"]})]
            batch.append((doc["_id"], sections, hashlib.sha256(body.encode()).hexdigest()))
        chunks += store.ingest_batch(base.id, batch).chunks
    ingest_s = time.perf_counter() - started
    print(f"corpus {len(corpus)} docs -> {chunks} chunks ({args.chunking}, chunk size {args.chunk_size})")
    print(f"ingestion: {ingest_s:.1f} s = {ingest_s / 60:.2f} min, {chunks / ingest_s:.1f} chunks/s")

    ids = list(queries)
    t0 = time.perf_counter()
    qvecs = store.embedder.embed([queries[q] for q in ids])
    embed_ms = (time.perf_counter() - t0) * 1000 / len(ids)
    print(f"queries: {len(ids)}; query embedding {embed_ms:.2f} ms/query (batched)")

    for mode in (SearchMode.BM25, SearchMode.DENSE, SearchMode.HYBRID):
        n10, r100, lat = [], [], []
        for q, vec in zip(ids, qvecs, strict=True):
            t = time.perf_counter()
            hits = store.search(
                base.id, queries[q], top_k=200, mode=mode, candidates=200, weights=weights, query_vector=vec
            )
            lat.append((time.perf_counter() - t) * 1000)
            ranked = doc_ranking([(h.meta["doc_id"], h.score) for h in hits])
            n10.append(ndcg10(ranked, qrels[q]))
            r100.append(recall100(ranked, qrels[q]))
        print(
            f"{mode.value:>6}: nDCG@10 {statistics.mean(n10):.4f}  Recall@100 {statistics.mean(r100):.4f}  "
            f"latency p50 {pct(lat, 0.5):.1f} ms p99 {pct(lat, 0.99):.1f} ms ({chunks} chunks, top 200)"
        )

    def latency(kb_id: str, label: str) -> None:
        lat = []
        for q, vec in list(zip(ids, qvecs, strict=True))[:300]:
            t = time.perf_counter()
            store.search(kb_id, queries[q], top_k=10, mode=SearchMode.HYBRID, query_vector=vec)
            lat.append((time.perf_counter() - t) * 1000)
        print(f"hybrid top-10 latency at {label}: p50 {pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms")

    store.search(base.id, "warm", query_vector=qvecs[0])
    latency(base.id, f"{chunks} chunks")

    rng = random.Random(7)
    noise = np.random.default_rng(7)
    with db.engine.begin() as conn:
        rows = conn.exec_driver_sql(
            "SELECT document_id, ordinal, text, search_text, meta, vector FROM kb_chunks "
            "WHERE kb_id = ? AND vector IS NOT NULL",
            (base.id,),
        ).all()
    total = len(rows)
    t0 = time.perf_counter()
    copy = 0
    while total < args.scale:
        copy += 1
        batch = []
        for document_id, ordinal, text, search_text, meta, vector in rows:
            if total >= args.scale:
                break
            words = [w for w in search_text.split() if rng.random() > 0.15]
            vec = np.frombuffer(vector, dtype=np.float32) + noise.normal(0, 0.02, 384).astype(np.float32)
            vec /= np.linalg.norm(vec)
            batch.append(
                (base.id, document_id, ordinal + 1000 * copy, text, " ".join(words), meta, vec.tobytes())
            )
            total += 1
        with db.engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO kb_chunks (kb_id, document_id, ordinal, text, search_text, meta, vector) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                batch,
            )
    print(f"synthesized {total - len(rows)} perturbed chunks in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    store.search(base.id, "warm", query_vector=qvecs[0])
    print(f"vector matrix load at {total} chunks: {time.perf_counter() - t0:.2f} s (once, then cached)")
    latency(base.id, f"{total} chunks")


if __name__ == "__main__":
    main()
