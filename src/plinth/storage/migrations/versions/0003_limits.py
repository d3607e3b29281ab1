"""limits on keys and teams: requests/min, tokens/min, concurrent requests (null: unlimited)

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

COLUMNS = ("rpm_limit", "tpm_limit", "max_concurrency")


def upgrade() -> None:
    for table in ("api_keys", "teams"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in COLUMNS:
                batch_op.add_column(sa.Column(column, sa.Integer(), nullable=True))


def downgrade() -> None:
    for table in ("api_keys", "teams"):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in reversed(COLUMNS):
                batch_op.drop_column(column)
