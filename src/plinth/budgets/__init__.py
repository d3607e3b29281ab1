"""Budgets: spend limits per key, team and org, per day and month, reserved at admission."""

from plinth.budgets.admission import BudgetAdmission, BudgetHold, create_budgets
from plinth.budgets.models import Budget, BudgetEvent, BudgetPeriod, BudgetScope, EventKind
from plinth.budgets.periods import Window, window
from plinth.budgets.service import BudgetService, BudgetStatus
from plinth.budgets.tracker import LocalSpendTracker, RedisSpendTracker, SpendTracker

__all__ = [
    "Budget",
    "BudgetAdmission",
    "BudgetEvent",
    "BudgetHold",
    "BudgetPeriod",
    "BudgetScope",
    "BudgetService",
    "BudgetStatus",
    "EventKind",
    "LocalSpendTracker",
    "RedisSpendTracker",
    "SpendTracker",
    "Window",
    "create_budgets",
    "window",
]
