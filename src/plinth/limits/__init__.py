"""Limits: requests/min, tokens/min and concurrent requests per key, team and model alias.

In-process counters when one process serves; Redis (`redis.url`) when several workers or replicas
do, so the limits stay exact across all of them. See docs/limits.md.
"""

from __future__ import annotations

from sqlalchemy import or_, select

from plinth.config.schema import PlinthConfig
from plinth.limits.base import LEASE_S, WINDOW_S, Backend, Grant, Refusal, Scope
from plinth.limits.limiter import NO_HOLD, CountedHold, LimitHold, RateLimiter, rate_limit_error
from plinth.limits.memory import InProcessBackend
from plinth.limits.redis_backend import RedisBackend
from plinth.storage import Database

__all__ = [
    "LEASE_S",
    "NO_HOLD",
    "WINDOW_S",
    "Backend",
    "CountedHold",
    "Grant",
    "InProcessBackend",
    "LimitHold",
    "RateLimiter",
    "RedisBackend",
    "Refusal",
    "Scope",
    "build_limiter",
    "exactness_problem",
    "rate_limit_error",
]


def build_limiter(config: PlinthConfig) -> RateLimiter:
    """Redis counters when `redis.url` is set, otherwise this process's memory."""
    url = config.redis.url
    backend: Backend = RedisBackend(url.get_secret_value()) if url is not None else InProcessBackend()
    return RateLimiter(backend)


def _configured_limits(config: PlinthConfig) -> list[str]:
    models = [
        f"model '{m.name}'"
        for m in config.models
        if m.limits is not None and (m.limits.rpm or m.limits.tpm or m.limits.max_concurrency)
    ]
    keys = [
        f"key '{k.name}'"
        for k in config.keys
        if k.limits is not None and (k.limits.rpm or k.limits.tpm or k.limits.max_concurrency)
    ]
    return models + keys


def _database_limits(database: Database) -> list[str]:
    from plinth.tenancy.models import ApiKey, Team

    found: list[str] = []
    with database.session() as session:
        for model, what in ((ApiKey, "key"), (Team, "team")):
            has_limit = or_(
                model.rpm_limit.is_not(None), model.tpm_limit.is_not(None), model.max_concurrency.is_not(None)
            )
            query = select(model.name).where(has_limit)
            if model is ApiKey:
                query = query.where(ApiKey.revoked_at.is_(None))
            found += [f"{what} '{name}'" for name in session.scalars(query.limit(3))]
        # Budgets reserve in the same kind of counters: per worker, each would let the whole
        # budget through.
        from plinth.budgets.models import Budget

        budgets = session.scalars(select(Budget.scope + ":" + Budget.period).limit(3))
        found += [f"budget '{label}'" for label in budgets]
    return found


def exactness_problem(config: PlinthConfig, workers: int, database: Database | None = None) -> str | None:
    """Why these limits could not be enforced exactly by in-process counters, or None.

    Several worker processes each counting in their own memory would each admit the full limit;
    with any limit or budget configured (in the file, or on keys, teams and budgets in the
    database) they need Redis."""
    if config.redis.url is not None or workers <= 1:
        return None
    limited = _configured_limits(config) + (_database_limits(database) if database is not None else [])
    if not limited:
        return None
    return (
        f"limits or budgets are set ({', '.join(limited[:3])}{', …' if len(limited) > 3 else ''}) but {workers} worker "
        "processes would each count them separately, admitting up to "
        f"{workers} times the limit. Set redis.url (shared, exact counters) or run one worker."
    )
