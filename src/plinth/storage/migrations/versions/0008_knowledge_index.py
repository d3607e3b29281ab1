"""knowledge index: parent chunks (hierarchical chunking), tsvector + GIN for BM25 on PostgreSQL

`kb_chunks.parent_id` points a child chunk at its parent row (parents are stored but not indexed:
empty search text, no vector). On PostgreSQL `search_tsv` is a generated tsvector ('english'
configuration) with a GIN index, replacing the Python BM25 scan. The pgvector extension is
created when the server has it (inside a savepoint, so a server without it just skips); the
store creates its `kb_vectors` table at run time once the extension exists.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch mode): rebuilding kb_chunks on SQLite would drop the FTS triggers.
    op.add_column(
        "kb_chunks",
        sa.Column("parent_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=True),
    )
    op.create_index("ix_kb_chunks_parent_id", "kb_chunks", ["parent_id"])
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    op.execute(
        "ALTER TABLE kb_chunks ADD COLUMN search_tsv tsvector "
        "GENERATED ALWAYS AS (to_tsvector('english', search_text)) STORED"
    )
    op.execute("CREATE INDEX ix_kb_chunks_search_tsv ON kb_chunks USING gin (search_tsv)")
    savepoint = bind.begin_nested()
    try:
        bind.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS vector")
        savepoint.commit()
    except sa.exc.DBAPIError:  # not installed on this server, or no privilege: numpy search is used
        savepoint.rollback()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TABLE IF EXISTS kb_vectors")
        op.execute("DROP INDEX IF EXISTS ix_kb_chunks_search_tsv")
        op.execute("ALTER TABLE kb_chunks DROP COLUMN IF EXISTS search_tsv")
    op.drop_index("ix_kb_chunks_parent_id", "kb_chunks")
    op.drop_column("kb_chunks", "parent_id")
