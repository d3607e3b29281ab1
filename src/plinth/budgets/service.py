"""Budget operations: the one place that writes budgets and budget events.

The admin API and the CLI call `set_budget`, `list_budgets`, `delete_budget` and `list_events`.
Writes bump the tenancy change counter in the same transaction, so every worker's cached copy of
the budget definitions (see `admission.BudgetAdmission.refresh`) picks them up on its next poll.
Errors are the tenancy ones (`TenancyError` 400, `NotFound` 404), so the admin API maps them alike.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from plinth.budgets.models import Budget, BudgetEvent, BudgetPeriod, BudgetScope
from plinth.budgets.periods import Window, window
from plinth.metering.models import UsageRecord
from plinth.storage import Database, utcnow
from plinth.tenancy.models import ApiKey, Organization, Team
from plinth.tenancy.service import NotFound, TenancyError, bump_change_counter, current_change_seq

_SCOPE_TABLES: dict[str, type[ApiKey] | type[Team] | type[Organization]] = {
    BudgetScope.KEY: ApiKey,
    BudgetScope.TEAM: Team,
    BudgetScope.ORG: Organization,
}
_USAGE_COLUMNS = {
    BudgetScope.KEY: UsageRecord.key_id,
    BudgetScope.TEAM: UsageRecord.team_id,
    BudgetScope.ORG: UsageRecord.org_id,
}


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A limit crossing seen on the hot path, waiting to be written."""

    scope: str
    scope_id: str
    period: str
    period_start: dt.datetime
    kind: str
    limit_usd: float
    spent_usd: float


@dataclass(frozen=True, slots=True)
class BudgetStatus:
    """A budget with what its current period has spent so far, per the usage records."""

    budget: Budget
    period_start: dt.datetime
    period_end: dt.datetime
    spent_usd: float

    @property
    def remaining_usd(self) -> float:
        return max(0.0, self.budget.limit_usd - self.spent_usd)


def _check_amount(value: float, what: str) -> float:
    if not math.isfinite(value) or value < 0:
        raise TenancyError(f"{what} must be a finite amount of USD ≥ 0, not {value}")
    return float(value)


class BudgetService:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- definitions -------------------------------------------------------------------------

    def set_budget(
        self,
        scope: str,
        scope_id: str,
        period: str,
        limit_usd: float,
        *,
        soft_limit_usd: float | None = None,
    ) -> Budget:
        """Create the budget of a scope and period, or replace its limits if it exists."""
        if scope not in BudgetScope.__members__.values():
            raise TenancyError(f"scope must be one of {', '.join(BudgetScope)}, not '{scope}'")
        if period not in BudgetPeriod.__members__.values():
            raise TenancyError(f"period must be one of {', '.join(BudgetPeriod)}, not '{period}'")
        limit_usd = _check_amount(limit_usd, "limit_usd")
        if soft_limit_usd is not None:
            soft_limit_usd = _check_amount(soft_limit_usd, "soft_limit_usd")
            if soft_limit_usd > limit_usd:
                raise TenancyError("soft_limit_usd must not be above limit_usd")
        with self.db.session() as session:
            if session.get(_SCOPE_TABLES[scope], scope_id) is None:
                raise NotFound(f"{scope} '{scope_id}' does not exist")
            budget = session.scalar(
                select(Budget).where(
                    Budget.scope == scope, Budget.scope_id == scope_id, Budget.period == period
                )
            )
            if budget is None:
                budget = Budget(scope=scope, scope_id=scope_id, period=period)
                session.add(budget)
            budget.limit_usd = limit_usd
            budget.soft_limit_usd = soft_limit_usd
            budget.updated_at = utcnow()
            bump_change_counter(session)
            return budget

    def get_budget(self, budget_id: str) -> Budget:
        with self.db.session() as session:
            budget = session.get(Budget, budget_id)
            if budget is None:
                raise NotFound(f"budget '{budget_id}' does not exist")
            return budget

    def list_budgets(self, scope: str | None = None, scope_id: str | None = None) -> list[Budget]:
        with self.db.session() as session:
            query = select(Budget).order_by(Budget.scope, Budget.scope_id, Budget.period)
            if scope is not None:
                query = query.where(Budget.scope == scope)
            if scope_id is not None:
                query = query.where(Budget.scope_id == scope_id)
            return list(session.scalars(query))

    def delete_budget(self, budget_id: str) -> None:
        with self.db.session() as session:
            budget = session.get(Budget, budget_id)
            if budget is None:
                raise NotFound(f"budget '{budget_id}' does not exist")
            session.delete(budget)
            bump_change_counter(session)

    def status(self, budget_id: str, now: float | None = None) -> BudgetStatus:
        """The budget and its current period's spend (written usage records only)."""
        budget = self.get_budget(budget_id)
        win = window(budget.period, dt.datetime.now(dt.UTC).timestamp() if now is None else now)
        spent = self.spent(budget.scope, budget.scope_id, win)
        return BudgetStatus(budget, win.start_dt, win.end_dt, spent)

    # --- spend and events --------------------------------------------------------------------

    def spent(self, scope: str, scope_id: str, win: Window) -> float:
        """USD spent by a scope in a window: the sum of its usage records' cost."""
        column = _USAGE_COLUMNS[BudgetScope(scope)]
        with self.db.session() as session:
            total = session.scalar(
                select(func.coalesce(func.sum(UsageRecord.cost_usd), 0.0)).where(
                    column == scope_id,
                    UsageRecord.created_at >= win.start_dt,
                    UsageRecord.created_at < win.end_dt,
                )
            )
            return float(total or 0.0)

    def record_events(self, events: Iterable[PendingEvent]) -> int:
        """Write events, skipping any already recorded for its scope, window and kind."""
        written = 0
        for event in events:
            try:
                with self.db.session() as session:
                    session.add(
                        BudgetEvent(
                            scope=event.scope,
                            scope_id=event.scope_id,
                            period=event.period,
                            period_start=event.period_start,
                            kind=event.kind,
                            limit_usd=event.limit_usd,
                            spent_usd=event.spent_usd,
                        )
                    )
            except IntegrityError:
                continue  # another worker or an earlier run recorded it
            written += 1
        return written

    def list_events(
        self, scope: str | None = None, scope_id: str | None = None, *, limit: int = 100
    ) -> list[BudgetEvent]:
        """Newest first."""
        with self.db.session() as session:
            query = select(BudgetEvent).order_by(BudgetEvent.id.desc()).limit(limit)
            if scope is not None:
                query = query.where(BudgetEvent.scope == scope)
            if scope_id is not None:
                query = query.where(BudgetEvent.scope_id == scope_id)
            return list(session.scalars(query))

    def current_seq(self) -> int:
        return current_change_seq(self.db)
