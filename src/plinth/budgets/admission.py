"""The budget admission step: reserve the estimated cost at admission, settle the real cost after.

Hot path: the budget definitions are a dict in memory (refreshed from the database in the
background), so a request with no applicable budget costs three dict lookups and no I/O. A request
under budgets reserves `price * (estimated input + max output tokens)` on its key's, team's and
org's budgets at once; the hold replaces that reservation with the metered cost when the request
is over. A burst can therefore overspend a budget by at most what was reserved in flight when the
limit was reached, and only when the real usage exceeds the estimates.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from prometheus_client import Counter

from plinth.budgets.periods import Window, window
from plinth.budgets.service import BudgetService, PendingEvent
from plinth.budgets.tracker import (
    NANO,
    Check,
    LoadSpent,
    LocalSpendTracker,
    OnCrossing,
    RedisSpendTracker,
    Rule,
    SpendTracker,
)
from plinth.gateway.admission import Call, Hold, Outcome
from plinth.gateway.errors import GatewayError
from plinth.metering.prices import PriceBook
from plinth.routing import ModelRoute
from plinth.storage import Database

log = logging.getLogger("plinth.budgets")

REFUSED = Counter("plinth_budget_refusals", "Requests refused by a budget.", ["scope", "period"])
EVENTS = Counter(
    "plinth_budget_events", "Budget limits crossed (once per window).", ["scope", "period", "kind"]
)

DEFAULT_OUTPUT_TOKENS = 4096  # reserved when the client sets no max_tokens
_PERIOD_WORDS = {"day": "daily", "month": "monthly"}


class _NoHold:
    __slots__ = ()

    headers: Mapping[str, str] = MappingProxyType({})

    def settle(self, outcome: Outcome) -> None:
        return None


NO_HOLD = _NoHold()


@dataclass(frozen=True, slots=True)
class _RoutePrice:
    """The dearest deployment's price per token (nano-USD): routing is not decided yet."""

    input: float
    output: float


class BudgetEvents:
    """Limit crossings: logged and counted at once, written to `budget_events` in the background."""

    def __init__(self, service: BudgetService) -> None:
        self._service = service
        self._pending: deque[PendingEvent] = deque()

    def crossed(self, check: Check, kind: str, spent: int) -> None:
        rule = check.rule
        limit = rule.soft if kind == "soft" and rule.soft is not None else rule.limit
        log.warning(
            "%s limit of the %s budget of %s %s reached (window from %s): spent $%.6f, limit $%.6f%s",
            kind, rule.period, rule.scope, rule.scope_id, check.window.start_dt.isoformat(),
            spent / NANO, limit / NANO, "; requests are refused" if kind == "hard" else "",
        )  # fmt: skip
        EVENTS.labels(rule.scope, rule.period, kind).inc()
        self._pending.append(
            PendingEvent(
                rule.scope,
                rule.scope_id,
                rule.period,
                check.window.start_dt,
                kind,
                limit / NANO,
                spent / NANO,
            )
        )

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def flush(self) -> None:
        if not self._pending:
            return
        batch = list(self._pending)
        self._pending.clear()
        try:
            await asyncio.to_thread(self._service.record_events, batch)
        except Exception:
            log.exception("could not write %d budget events; will retry", len(batch))
            self._pending.extendleft(reversed(batch))


class BudgetAdmission:
    """Admission step enforcing the budgets of a request's key, team and organization."""

    def __init__(
        self,
        service: BudgetService,
        prices: PriceBook,
        *,
        make_tracker: Callable[[LoadSpent, OnCrossing], SpendTracker] | None = None,
        redis_url: str | None = None,
        default_output_tokens: int = DEFAULT_OUTPUT_TOKENS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.prices = prices
        self.events = BudgetEvents(service)
        self.default_output_tokens = default_output_tokens
        self.clock = clock
        if make_tracker is not None:
            tracker = make_tracker(self.load_spent, self.events.crossed)
        elif redis_url:
            tracker = RedisSpendTracker.from_url(redis_url, self.load_spent, self.events.crossed, clock=clock)
        else:
            tracker = LocalSpendTracker(self.load_spent, self.events.crossed)
        self.tracker = tracker
        self._rules: dict[tuple[str, str], tuple[Rule, ...]] = {}
        self._seq = -1
        self._windows: dict[str, Window] = {}
        self._route_prices: dict[str, _RoutePrice] = {}
        self._task: asyncio.Task[None] | None = None

    # --- definitions ---------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Reload the budget definitions if anything changed since the last look. Blocking."""
        seq = self.service.current_seq()
        if seq == self._seq:
            return False
        rules: dict[tuple[str, str], list[Rule]] = {}
        for budget in self.service.list_budgets():
            soft = None if budget.soft_limit_usd is None else round(budget.soft_limit_usd * NANO)
            rule = Rule(budget.scope, budget.scope_id, budget.period, round(budget.limit_usd * NANO), soft)
            rules.setdefault((budget.scope, budget.scope_id), []).append(rule)
        self._rules = {scope: tuple(found) for scope, found in rules.items()}  # one atomic swap
        self._seq = seq
        return True

    def load_spent(self, check: Check) -> int:
        """A window's spend so far from the usage records (blocking; trackers call it in a thread)."""
        return round(self.service.spent(check.rule.scope, check.rule.scope_id, check.window) * NANO)

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self, interval_s: float = 0.5) -> None:
        """Follow definition changes and write events from a task on the running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._follow(interval_s), name="plinth-budgets")

    async def _follow(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                log.exception("could not refresh budgets from the database; keeping the cached ones")
            await self.events.flush()
            self.tracker.purge(self.clock())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.tracker.aclose()  # settlements in flight land first
        await self.events.flush()

    # --- hot path ------------------------------------------------------------------------------

    def rules(self) -> list[Rule]:
        """Every cached budget definition."""
        return [rule for found in self._rules.values() for rule in found]

    def applicable(self, call: Call) -> list[Rule]:
        rules = self._rules
        if not rules:
            return []
        p = call.principal
        found: list[Rule] = []
        for scope, ident in (("key", p.key_id), ("team", p.team_id), ("org", p.org_id)):
            if ident is not None:
                found.extend(rules.get((scope, ident), ()))
        return found

    async def admit(self, call: Call) -> Hold:
        rules = self.applicable(call)
        if not rules:
            return NO_HOLD
        now = self.clock()
        checks = [Check.of(rule, self._window(rule.period, now)) for rule in rules]
        amount = self.estimate(call)
        try:
            refused = await self.tracker.reserve(checks, amount)
        except Exception as exc:
            # Fail open: an unreachable Redis must not stop every request. Logged and visible.
            log.error("budget check failed, request %s admitted unchecked: %s", call.request_id, exc)
            return NO_HOLD
        if refused is not None:
            raise self._refusal(call, refused, now)
        return BudgetHold(self, call, checks, amount)

    def estimate(self, call: Call) -> int:
        """Nano-USD to reserve: input estimate and max output tokens at the dearest deployment."""
        price = self._route_price(call.route, call.model)
        output = call.max_output_tokens or self.default_output_tokens
        return math.ceil(price.input * call.estimated_input_tokens + price.output * output)

    def cost(self, call: Call, outcome: Outcome) -> int:
        """Nano-USD actually spent, priced exactly as the usage recorder prices it."""
        if outcome.usage is None or outcome.cache_hit:
            return 0
        return round(self.prices.cost(call.route.name, outcome.deployment, call.model, outcome.usage) * NANO)

    def _window(self, period: str, now: float) -> Window:
        current = self._windows.get(period)
        if current is None or not current.contains(now):
            current = self._windows[period] = window(period, now)
        return current

    def _route_price(self, route: ModelRoute, model: str) -> _RoutePrice:
        cached = self._route_prices.get(model)
        if cached is None:
            inputs, outputs = [0.0], [0.0]
            for dep in route.deployments:
                price, _upstream = self.prices.price(route.name, dep.name, model)
                if price is not None:
                    inputs.append(price.input_per_mtok)
                    outputs.append(price.output_per_mtok)
            # USD per million tokens = nano-USD per thousand tokens.
            cached = self._route_prices[model] = _RoutePrice(max(inputs) * 1000, max(outputs) * 1000)
        return cached

    def _refusal(self, call: Call, check: Check, now: float) -> GatewayError:
        rule = check.rule
        REFUSED.labels(rule.scope, rule.period).inc()
        who = f"{rule.scope} '{rule.scope_id}'"
        if rule.scope == "key" and call.principal.name:
            who = f"key '{call.principal.name}' ({rule.scope_id})"
        resets = dt.datetime.fromtimestamp(check.window.end, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return GatewayError(
            429,
            f"Budget exceeded: the {_PERIOD_WORDS.get(rule.period, rule.period)} budget of {who} "
            f"(${rule.limit / NANO:.2f}) has no room for this request; it resets at {resets}.",
            code="budget_exceeded",
            retry_after=max(1.0, check.window.end - now),
            headers={"x-should-retry": "false"},
        )


class BudgetHold:
    """Settles one admitted request: its reservation is replaced by its real cost."""

    __slots__ = ("_admission", "_call", "_checks", "amount", "done")

    headers: Mapping[str, str] = MappingProxyType({})

    def __init__(self, admission: BudgetAdmission, call: Call, checks: list[Check], amount: int) -> None:
        self._admission = admission
        self._call = call
        self._checks = checks
        self.amount = amount
        self.done = False

    def settle(self, outcome: Outcome) -> None:
        if self.done:
            return
        self.done = True
        admission = self._admission
        try:
            actual = admission.cost(self._call, outcome)
            now = admission.clock()
            # The usage record is dated at completion, so the cost goes to the window it ends in.
            charged = [
                c if c.window.contains(now) else Check.of(c.rule, window(c.rule.period, now))
                for c in self._checks
            ]
            admission.tracker.settle(self._checks, self.amount, charged, actual)
        except Exception:
            log.exception("settling budget reservation of request %s failed", self._call.request_id)


def create_budgets(database: Database, prices: PriceBook, redis_url: str | None = None) -> BudgetAdmission:
    """The budget step for an application: Redis-backed when `redis.url` is set, else in-process."""
    admission = BudgetAdmission(BudgetService(database), prices, redis_url=redis_url)
    admission.refresh()
    return admission
