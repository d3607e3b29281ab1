"""Budget tables: spend limits per key, team or organization and period, and their alert events.

Spend itself is not stored here: it is the sum of `usage_records.cost_usd` for the scope and period,
so reports and budgets can never disagree about what was spent.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum

from sqlalchemy import BigInteger, DateTime, Float, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from plinth.storage import Base, utcnow
from plinth.tenancy.models import new_id


class BudgetScope(StrEnum):
    KEY = "key"
    TEAM = "team"
    ORG = "org"


class BudgetPeriod(StrEnum):
    DAY = "day"  # UTC calendar day
    MONTH = "month"  # UTC calendar month


class EventKind(StrEnum):
    SOFT = "soft"  # spend crossed the soft limit (an alert; requests still pass)
    HARD = "hard"  # the hard limit was reached or first refused a request


class Budget(Base):
    """A hard (and optional soft) spend limit in USD for one scope and period."""

    __tablename__ = "budgets"
    __table_args__ = (UniqueConstraint("scope", "scope_id", "period"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True, default=lambda: new_id("bud"))
    scope: Mapped[str] = mapped_column(String(8))
    scope_id: Mapped[str] = mapped_column(String(40), index=True)
    period: Mapped[str] = mapped_column(String(8))
    limit_usd: Mapped[float] = mapped_column(Float)
    soft_limit_usd: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class BudgetEvent(Base):
    """A soft or hard limit crossing, once per budget scope, period window and kind."""

    __tablename__ = "budget_events"
    __table_args__ = (UniqueConstraint("scope", "scope_id", "period", "period_start", "kind"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, index=True)
    scope: Mapped[str] = mapped_column(String(8))
    scope_id: Mapped[str] = mapped_column(String(40), index=True)
    period: Mapped[str] = mapped_column(String(8))
    period_start: Mapped[dt.datetime] = mapped_column(DateTime)
    kind: Mapped[str] = mapped_column(String(8))
    limit_usd: Mapped[float] = mapped_column(Float)
    spent_usd: Mapped[float] = mapped_column(Float)
