"""Alembic environment: migrations run on the connection that `Database.migrate` hands over."""

from __future__ import annotations

from alembic import context

import plinth.budgets.models
import plinth.governance.models
import plinth.guardrails.models
import plinth.metering.models
import plinth.tenancy.models  # noqa: F401  (registers the tables on Base.metadata)
from plinth.storage import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through plinth (`plinth db upgrade`), which provides the connection")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
