"""budgets and budget events

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "budgets",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("scope_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("limit_usd", sa.Float(), nullable=False),
        sa.Column("soft_limit_usd", sa.Float(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("scope", "scope_id", "period"),
    )
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_budgets_scope_id"), ["scope_id"], unique=False)

    op.create_table(
        "budget_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("scope", sa.String(length=8), nullable=False),
        sa.Column("scope_id", sa.String(length=40), nullable=False),
        sa.Column("period", sa.String(length=8), nullable=False),
        sa.Column("period_start", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("limit_usd", sa.Float(), nullable=False),
        sa.Column("spent_usd", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("scope", "scope_id", "period", "period_start", "kind"),
    )
    with op.batch_alter_table("budget_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_budget_events_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_budget_events_scope_id"), ["scope_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("budget_events", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budget_events_scope_id"))
        batch_op.drop_index(batch_op.f("ix_budget_events_created_at"))
    op.drop_table("budget_events")
    with op.batch_alter_table("budgets", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budgets_scope_id"))
    op.drop_table("budgets")
