"""Storage: one relational schema on SQLite (embedded default) or PostgreSQL (scaled out).

Every part of Plinth keeps its tables in its own package (`tenancy.models`, `metering.models`, …)
on the shared `Base`; Alembic migrations in `storage/migrations` create them on either database.
Nothing here runs on the request hot path.
"""

from plinth.storage.db import Base, Database, utcnow

__all__ = ["Base", "Database", "utcnow"]
