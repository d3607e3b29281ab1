"""Knowledge bases: per-team document stores with hybrid (BM25 + dense) retrieval.

See docs/knowledge.md. The store lives in the main database (migration 0005); on SQLite BM25 is
FTS5, on PostgreSQL a Python BM25 over the knowledge base's chunks (a simple fallback).
Nothing is imported here: the gateway imports `plinth.knowledge.http` at start-up, and numpy,
cryptography and the model load only when a knowledge base is first used. Import the modules:
`store.KnowledgeStore`, `embedders.LocalEmbedder`, `retrieval.SearchMode`.
"""
