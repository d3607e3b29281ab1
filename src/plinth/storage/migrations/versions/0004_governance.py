"""governance: model hub, provider reviews, approvals, kill switches, hash-chained audit trail

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def _stamps() -> list[sa.Column[Any]]:
    return [
        sa.Column("source", sa.String(length=10), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("change_seq", sa.BigInteger(), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "catalog_models",
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=True),
        sa.Column("description", sa.String(length=1000), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("data_class", sa.String(length=20), nullable=False),
        sa.Column("context_window", sa.Integer(), nullable=True),
        sa.Column("capabilities", sa.JSON(), nullable=False),
        sa.Column("prices", sa.JSON(), nullable=True),
        sa.Column("card_text", sa.Text(), nullable=True),
        sa.Column("card_links", sa.JSON(), nullable=False),
        *_stamps(),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("catalog_models", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_catalog_models_change_seq"), ["change_seq"], unique=False)

    op.create_table(
        "provider_reviews",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("display_name", sa.String(length=200), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("data_retention_days", sa.Integer(), nullable=True),
        sa.Column("training_opt_out", sa.Boolean(), nullable=False),
        sa.Column("certifications", sa.JSON(), nullable=False),
        sa.Column("allowed_regions", sa.JSON(), nullable=False),
        sa.Column("data_class", sa.String(length=20), nullable=False),
        sa.Column("reviewer", sa.String(length=200), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(), nullable=True),
        sa.Column("expires_at", sa.DateTime(), nullable=True),
        sa.Column("notes", sa.Text(), nullable=True),
        *_stamps(),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("provider_reviews", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_provider_reviews_change_seq"), ["change_seq"], unique=False)

    op.create_table(
        "catalog_deployments",
        sa.Column("name", sa.String(length=300), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("provider", sa.String(length=100), nullable=False),
        sa.Column("regions", sa.JSON(), nullable=False),
        sa.Column("data_class", sa.String(length=20), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=True),
        *_stamps(),
        sa.ForeignKeyConstraint(["model"], ["catalog_models.name"], ondelete="RESTRICT"),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("catalog_deployments", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_catalog_deployments_model"), ["model"], unique=False)
        batch_op.create_index(batch_op.f("ix_catalog_deployments_change_seq"), ["change_seq"], unique=False)

    op.create_table(
        "approval_requests",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("target", sa.String(length=300), nullable=False),
        sa.Column("change", sa.JSON(), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("requested_by", sa.String(length=200), nullable=False),
        sa.Column("requested_at", sa.DateTime(), nullable=False),
        sa.Column("decided_by", sa.String(length=200), nullable=True),
        sa.Column("decided_at", sa.DateTime(), nullable=True),
        sa.Column("decision_note", sa.String(length=1000), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("approval_requests", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_approval_requests_state"), ["state"], unique=False)
        batch_op.create_index(batch_op.f("ix_approval_requests_target"), ["target"], unique=False)

    op.create_table(
        "kill_switches",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("target_type", sa.String(length=20), nullable=False),
        sa.Column("target", sa.String(length=300), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=False),
        sa.Column("created_by", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("lifted_at", sa.DateTime(), nullable=True),
        sa.Column("lifted_by", sa.String(length=200), nullable=True),
        sa.Column("lift_reason", sa.String(length=1000), nullable=True),
        sa.Column("change_seq", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("kill_switches", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_kill_switches_change_seq"), ["change_seq"], unique=False)
        batch_op.create_index("ix_kill_switches_target", ["target_type", "target"], unique=False)

    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    # The chain's head exists from the start, so every writer can lock it with an UPDATE (no racy
    # first insert); seq 0 and the all-zero hash are the genesis that record 1 links to.
    op.execute(f"INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, '{'0' * 64}')")
    op.create_table(
        "audit_records",
        sa.Column("seq", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("actor", sa.String(length=200), nullable=False),
        sa.Column("action", sa.String(length=100), nullable=False),
        sa.Column("target", sa.String(length=300), nullable=True),
        sa.Column("outcome", sa.String(length=20), nullable=False),
        sa.Column("reason", sa.String(length=1000), nullable=True),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("policy_ids", sa.JSON(), nullable=False),
        sa.Column("detail", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("hash"),
    )
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_records_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_records_kind"), ["kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_audit_records_request_id"), ["request_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("audit_records", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_records_request_id"))
        batch_op.drop_index(batch_op.f("ix_audit_records_kind"))
        batch_op.drop_index(batch_op.f("ix_audit_records_created_at"))
    op.drop_table("audit_records")
    op.drop_table("audit_head")
    with op.batch_alter_table("kill_switches", schema=None) as batch_op:
        batch_op.drop_index("ix_kill_switches_target")
        batch_op.drop_index(batch_op.f("ix_kill_switches_change_seq"))
    op.drop_table("kill_switches")
    with op.batch_alter_table("approval_requests", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_approval_requests_target"))
        batch_op.drop_index(batch_op.f("ix_approval_requests_state"))
    op.drop_table("approval_requests")
    with op.batch_alter_table("catalog_deployments", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_catalog_deployments_change_seq"))
        batch_op.drop_index(batch_op.f("ix_catalog_deployments_model"))
    op.drop_table("catalog_deployments")
    with op.batch_alter_table("provider_reviews", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_provider_reviews_change_seq"))
    op.drop_table("provider_reviews")
    with op.batch_alter_table("catalog_models", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_catalog_models_change_seq"))
    op.drop_table("catalog_models")
