"""knowledge ingestion jobs: one row per folder/URL/upload ingest with status and counts, one per file

`kb_job_files` is what makes a job resumable: each file's state and outcome, and an uploaded
file's bytes until it is processed (then cleared).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "kb_jobs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("kb_id", sa.String(length=40), nullable=False),
        sa.Column("team_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("source", sa.String(length=2000), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=True),
        sa.Column("files_total", sa.Integer(), nullable=False),
        sa.Column("files_done", sa.Integer(), nullable=False),
        sa.Column("added", sa.Integer(), nullable=False),
        sa.Column("replaced", sa.Integer(), nullable=False),
        sa.Column("unchanged", sa.Integer(), nullable=False),
        sa.Column("removed", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("errors", sa.JSON(), nullable=False),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=True),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
        sa.Column("heartbeat_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["kb_id"], ["knowledge_bases.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("kb_jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_kb_jobs_kb_id"), ["kb_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_kb_jobs_team_id"), ["team_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_kb_jobs_status"), ["status"], unique=False)
    op.create_table(
        "kb_job_files",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("source", sa.String(length=1000), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("outcome", sa.String(length=20), nullable=True),
        sa.Column("reason", sa.String(length=500), nullable=True),
        sa.Column("size", sa.Integer(), nullable=True),
        sa.Column("data", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["kb_jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "source", name="uq_kb_job_files_job_source"),
    )
    with op.batch_alter_table("kb_job_files", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_kb_job_files_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    op.drop_table("kb_job_files")
    op.drop_table("kb_jobs")
