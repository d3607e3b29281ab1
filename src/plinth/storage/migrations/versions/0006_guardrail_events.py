"""guardrail events: one row per finding acted on (type, rule, action, key, team), never the value

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "guardrail_events",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("stage", sa.String(length=10), nullable=False),
        sa.Column("profile", sa.String(length=100), nullable=False),
        sa.Column("scanner", sa.String(length=100), nullable=False),
        sa.Column("rule", sa.String(length=200), nullable=False),
        sa.Column("type", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("location", sa.String(length=200), nullable=False),
        sa.Column("data_class", sa.String(length=20), nullable=True),
        sa.Column("key_id", sa.String(length=200), nullable=True),
        sa.Column("team_id", sa.String(length=40), nullable=True),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("guardrail_events", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_guardrail_events_request_id"), ["request_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_guardrail_events_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_guardrail_events_rule"), ["rule"], unique=False)
        batch_op.create_index(batch_op.f("ix_guardrail_events_key_id"), ["key_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_guardrail_events_team_id"), ["team_id"], unique=False)


def downgrade() -> None:
    op.drop_table("guardrail_events")
