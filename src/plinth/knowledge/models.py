"""Knowledge-base tables (migrations 0005 and 0008).

Raw SQL, not mapped here: the FTS5 index (SQLite), the generated `search_tsv` column with its GIN
index (PostgreSQL), and `kb_vectors` (PostgreSQL with pgvector, created by the store).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, BigInteger, DateTime, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from plinth.storage import Base, utcnow


class KnowledgeBase(Base):
    __tablename__ = "knowledge_bases"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    team_id: Mapped[str] = mapped_column(String(40), index=True)
    name: Mapped[str] = mapped_column(String(200))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class KbDocument(Base):
    __tablename__ = "kb_documents"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kb_id: Mapped[str] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"))
    source: Mapped[str] = mapped_column(String(1000))
    content_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20))
    error: Mapped[str | None] = mapped_column(String(500))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class KbChunk(Base):
    __tablename__ = "kb_chunks"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    kb_id: Mapped[str] = mapped_column(String(40), index=True)
    document_id: Mapped[str] = mapped_column(ForeignKey("kb_documents.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    search_text: Mapped[str] = mapped_column(Text)  # what BM25 indexes (heading path + text)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    vector: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Hierarchical chunking: a child's parent row. Parents have no vector and empty search_text.
    parent_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), index=True, default=None
    )


class KbTeamKey(Base):
    """A team's data key, wrapped by the master key (see plinth.knowledge.crypto)."""

    __tablename__ = "kb_team_keys"

    team_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    wrapped_key: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
