"""Budgets: reservation arithmetic, all-or-nothing across scopes, periods, soft-limit events,
restart from usage records, and refusals and a concurrent burst through a real gateway.

Every spend test runs on the in-process tracker and, when scripts/services started one, on Redis.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime as dt
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anthropic
import openai
import pytest
import redis
from sqlalchemy import func, insert, select

from conftest import REDIS_URL, GatewayServer, needs_redis, openai_deployment
from mocks.openai_upstream import OpenAIUpstream, Reply, completion
from plinth.budgets import (
    BudgetAdmission,
    BudgetEvent,
    BudgetService,
    LocalSpendTracker,
    RedisSpendTracker,
    window,
)
from plinth.budgets.admission import NO_HOLD
from plinth.budgets.tracker import NANO, Check, LoadSpent, OnCrossing, Rule, SpendTracker
from plinth.config import parse_config
from plinth.gateway.admission import Call, Outcome
from plinth.metering import PriceBook
from plinth.metering.models import UsageRecord
from plinth.providers.http import HttpClient
from plinth.providers.types import Usage
from plinth.routing import Router
from plinth.storage import Database
from plinth.tenancy import Principal
from plinth.tenancy.service import NotFound, TenancyError, TenancyService

# 10 USD per million input and output tokens: 1 token = 10_000 nano-USD.
PRICE = {"input_per_mtok": 10.0, "output_per_mtok": 10.0}
TOKEN = 10_000


def ts(*args: int) -> float:
    return float(calendar.timegm(dt.datetime(*args).timetuple()))  # type: ignore[arg-type]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("redis", marks=needs_redis)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def tracker_factory(backend: str, clock: Callable[[], float] = time.time) -> Any:
    """None for the in-process tracker; for Redis, one with a prefix of its own (shared server)."""
    if backend == "local":
        return None
    assert REDIS_URL is not None
    prefix = f"plinth:{{budget-test-{uuid.uuid4().hex[:10]}}}:"

    def make(load: LoadSpent, crossed: OnCrossing) -> SpendTracker:
        return RedisSpendTracker.from_url(REDIS_URL, load, crossed, prefix=prefix, clock=clock)

    return make


class Tenant:
    """A database with an org, a team, a key in it, and a one-model catalog priced at PRICE."""

    def __init__(self, url: str) -> None:
        self.db = Database(url)
        self.db.migrate()
        self.tenancy = TenancyService(self.db)
        self.budgets = BudgetService(self.db)
        self.org = self.tenancy.create_org("acme")
        self.team = self.tenancy.create_team(self.org.id, "search")
        self.key = self.tenancy.create_key(self.team.id, "svc").key
        self.principal = Principal(name="svc", key_id=self.key.id, team_id=self.team.id, org_id=self.org.id)
        config = parse_config(
            {
                "models": [
                    {
                        "name": "m",
                        "price": PRICE,
                        "deployments": [
                            {"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:9"}
                        ],
                    }
                ]
            }
        )
        self.router = Router(config, HttpClient())
        self.route = self.router.resolve("m")
        self.prices = PriceBook(self.router.all_routes())
        self.deployment = self.route.deployments[0].name

    def admission(self, backend: str, clock: Callable[[], float] = time.time) -> BudgetAdmission:
        admission = BudgetAdmission(
            self.budgets, self.prices, make_tracker=tracker_factory(backend, clock), clock=clock
        )
        admission.refresh()
        return admission

    def call(
        self, input_tokens: int = 10, max_output: int | None = 10, principal: Principal | None = None
    ) -> Call:
        return Call(
            request_id="req_" + uuid.uuid4().hex,
            principal=principal or self.principal,
            route=self.route,
            model=self.route.name,
            estimated_input_tokens=input_tokens,
            max_output_tokens=max_output,
        )

    def outcome(self, input_tokens: int, output_tokens: int) -> Outcome:
        return Outcome(200, Usage(input_tokens, output_tokens), deployment=self.deployment)

    def add_usage(self, cost_usd: float, when: float, **ids: str) -> None:
        with self.db.session() as session:
            session.execute(
                insert(UsageRecord),
                [
                    {
                        "request_id": "req_old",
                        "created_at": dt.datetime.fromtimestamp(when, dt.UTC).replace(tzinfo=None),
                        "route": "chat_completions",
                        "model": "m",
                        "status": 200,
                        "cost_usd": cost_usd,
                        **ids,
                    }
                ],
            )


@pytest.fixture
def tenant(database_url: str) -> Iterator[Tenant]:
    t = Tenant(database_url)
    yield t
    t.db.dispose()


async def settle_all(admission: BudgetAdmission) -> None:
    """Redis settlements run as tasks: wait for them before looking."""
    if isinstance(admission.tracker, RedisSpendTracker):
        await admission.tracker.drain()


async def state(
    admission: BudgetAdmission, scope: str, scope_id: str, period: str, now: float
) -> tuple[int, ...]:
    rule = next(r for r in admission.rules() if (r.scope, r.scope_id, r.period) == (scope, scope_id, period))
    snap = await admission.tracker.snapshot(Check.of(rule, window(period, now)))
    assert snap is not None
    return snap


# --- periods and definitions -------------------------------------------------------------------


def test_windows_are_utc_days_and_months() -> None:
    day = window("day", ts(2024, 12, 31, 23, 59, 59))
    assert (day.start, day.end) == (ts(2024, 12, 31), ts(2025, 1, 1))
    month = window("month", ts(2024, 2, 29, 12))
    assert (month.start, month.end) == (ts(2024, 2, 1), ts(2024, 3, 1))
    december = window("month", ts(2024, 12, 15))
    assert december.end == ts(2025, 1, 1)
    assert december.contains(ts(2024, 12, 31, 23, 59)) and not december.contains(ts(2025, 1, 1))
    with pytest.raises(ValueError):
        window("week", 0)


def test_service_sets_replaces_lists_and_deletes(tenant: Tenant) -> None:
    svc = tenant.budgets
    first = svc.set_budget("team", tenant.team.id, "month", 100.0, soft_limit_usd=80.0)
    again = svc.set_budget("team", tenant.team.id, "month", 50.0)
    assert again.id == first.id and again.limit_usd == 50.0 and again.soft_limit_usd is None
    svc.set_budget("key", tenant.key.id, "day", 1.0)
    assert [(b.scope, b.period) for b in svc.list_budgets()] == [("key", "day"), ("team", "month")]
    assert [b.scope for b in svc.list_budgets(scope_id=tenant.team.id)] == ["team"]
    with pytest.raises(NotFound):
        svc.set_budget("org", "org_missing", "day", 1.0)
    with pytest.raises(TenancyError, match="soft_limit_usd"):
        svc.set_budget("org", tenant.org.id, "day", 1.0, soft_limit_usd=2.0)
    with pytest.raises(TenancyError, match="period"):
        svc.set_budget("org", tenant.org.id, "week", 1.0)
    with pytest.raises(TenancyError, match="scope"):
        svc.set_budget("project", tenant.org.id, "day", 1.0)
    with pytest.raises(TenancyError, match="limit_usd"):
        svc.set_budget("org", tenant.org.id, "day", float("nan"))
    svc.delete_budget(first.id)
    assert [b.scope for b in svc.list_budgets()] == ["key"]
    with pytest.raises(NotFound):
        svc.delete_budget(first.id)


async def test_definitions_are_cached_and_refreshed_on_change(tenant: Tenant) -> None:
    admission = tenant.admission("local")
    assert admission.applicable(tenant.call()) == []
    assert await admission.admit(tenant.call()) is NO_HOLD  # no budget: no tracker work at all
    assert admission.refresh() is False  # nothing changed: no reload
    budget = tenant.budgets.set_budget("key", tenant.key.id, "day", 1.0)
    assert admission.refresh() is True
    assert [r.limit for r in admission.applicable(tenant.call())] == [NANO]
    other = Principal(name="other", key_id="key_other", team_id="team_other", org_id="org_other")
    assert admission.applicable(tenant.call(principal=other)) == []
    tenant.budgets.delete_budget(budget.id)
    admission.refresh()
    assert admission.applicable(tenant.call()) == []


# --- arithmetic --------------------------------------------------------------------------------


async def test_reservation_and_settlement_arithmetic(tenant: Tenant, backend: str) -> None:
    now = ts(2025, 3, 10, 12)
    clock = Clock(now)
    # Each call reserves (10 in + 10 out) tokens = 200_000 nano-USD; the limit holds 2.5 of them.
    tenant.budgets.set_budget("key", tenant.key.id, "day", 500_000 / NANO)
    admission = tenant.admission(backend, clock)
    try:
        call = tenant.call()
        assert admission.estimate(call) == 20 * TOKEN
        first = await admission.admit(call)
        second = await admission.admit(tenant.call())
        assert await state(admission, "key", tenant.key.id, "day", now) == (0, 400_000, 400_000)
        with pytest.raises(Exception) as refused:
            await admission.admit(tenant.call())  # 0 + 400_000 + 200_000 > 500_000
        assert getattr(refused.value, "status", None) == 429
        first.settle(tenant.outcome(5, 3))  # real cost 8 tokens replaces the 20 reserved
        await settle_all(admission)
        assert await state(admission, "key", tenant.key.id, "day", now) == (80_000, 200_000, 400_000)
        third = await admission.admit(tenant.call())  # 80_000 + 200_000 + 200_000 fits
        second.settle(Outcome(502))  # upstream failed: no usage, the reservation is simply released
        third.settle(tenant.outcome(10, 10))
        third.settle(tenant.outcome(10, 10))  # a second settle is ignored
        await settle_all(admission)
        assert await state(admission, "key", tenant.key.id, "day", now) == (280_000, 0, 400_000)
        # Without max_tokens the default output allowance is reserved.
        assert admission.estimate(tenant.call(max_output=None)) == (10 + 4096) * TOKEN
    finally:
        await admission.aclose()


async def test_reservation_is_all_or_nothing_across_scopes(tenant: Tenant, backend: str) -> None:
    now = ts(2025, 3, 10, 12)
    tenant.budgets.set_budget("key", tenant.key.id, "day", 10.0)
    tenant.budgets.set_budget("team", tenant.team.id, "month", 10.0)
    tenant.budgets.set_budget("org", tenant.org.id, "month", 300_000 / NANO)  # room for one
    admission = tenant.admission(backend, Clock(now))
    try:
        held = await admission.admit(tenant.call())
        with pytest.raises(Exception, match="monthly budget of org") as refused:
            await admission.admit(tenant.call())
        assert getattr(refused.value, "code", None) == "budget_exceeded"
        # The refused call reserved nothing anywhere, not even on the budgets that had room.
        for scope, ident, period in (
            ("key", tenant.key.id, "day"),
            ("team", tenant.team.id, "month"),
            ("org", tenant.org.id, "month"),
        ):
            assert (await state(admission, scope, ident, period, now))[1] == 200_000
        held.settle(tenant.outcome(1, 1))
        await settle_all(admission)
        for scope, ident, period in (("key", tenant.key.id, "day"), ("org", tenant.org.id, "month")):
            assert (await state(admission, scope, ident, period, now))[:2] == (2 * TOKEN, 0)
    finally:
        await admission.aclose()


async def test_zero_limit_blocks_and_used_up_budget_refuses_even_free_calls(
    tenant: Tenant, backend: str
) -> None:
    tenant.budgets.set_budget("team", tenant.team.id, "day", 0.0)
    admission = tenant.admission(backend)
    try:
        with pytest.raises(Exception, match="daily budget of team"):
            await admission.admit(tenant.call(input_tokens=0, max_output=0))
    finally:
        await admission.aclose()


# --- periods, events, restart ------------------------------------------------------------------


async def test_period_rollover_starts_a_fresh_window(tenant: Tenant, backend: str) -> None:
    clock = Clock(ts(2025, 3, 10, 23, 59, 50))
    tenant.budgets.set_budget("key", tenant.key.id, "day", 300_000 / NANO)
    admission = tenant.admission(backend, clock)
    try:
        hold = await admission.admit(tenant.call())
        hold.settle(tenant.outcome(15, 10))  # 250_000 spent on March 10
        await settle_all(admission)
        with pytest.raises(Exception, match="resets at 2025-03-11T00:00:00Z") as refused:
            await admission.admit(tenant.call())
        assert 1 <= getattr(refused.value, "retry_after", 0) <= 10
        late = await admission.admit(tenant.call(input_tokens=1, max_output=1))  # 20_000 still fits
        clock.now = ts(2025, 3, 11, 0, 0, 5)  # midnight: a new window, its spend read from the database
        fresh = await admission.admit(tenant.call())
        assert await state(admission, "key", tenant.key.id, "day", clock.now) == (0, 200_000, 200_000)
        # A request admitted yesterday and finished today is charged to today, as its usage record is.
        late.settle(tenant.outcome(1, 1))
        fresh.settle(tenant.outcome(1, 1))
        await settle_all(admission)
        assert await state(admission, "key", tenant.key.id, "day", clock.now) == (40_000, 0, 200_000)
        assert await state(admission, "key", tenant.key.id, "day", ts(2025, 3, 10, 12)) == (
            250_000,
            0,
            200_000,
        )
        clock.now = ts(2025, 3, 13)
        admission.tracker.purge(clock.now)  # windows that are over are forgotten (in-process)
    finally:
        await admission.aclose()


async def test_soft_limit_event_is_recorded_once_per_window(tenant: Tenant, backend: str) -> None:
    now = ts(2025, 3, 10, 12)
    tenant.budgets.set_budget("team", tenant.team.id, "day", 10.0, soft_limit_usd=250_000 / NANO)
    admission = tenant.admission(backend, Clock(now))
    try:
        for _ in range(5):  # 100_000 each: crosses 250_000 on the third
            hold = await admission.admit(tenant.call())
            hold.settle(tenant.outcome(5, 5))
            await settle_all(admission)
        await admission.events.flush()
        events = tenant.budgets.list_events(scope="team")
        assert [(e.kind, e.scope_id, e.period, e.spent_usd) for e in events] == [
            ("soft", tenant.team.id, "day", 300_000 / NANO)
        ]
        assert events[0].period_start == dt.datetime(2025, 3, 10)
        # Another worker (or a restart) seeing the same crossing does not record it twice.
        second = tenant.admission(backend, Clock(now))
        try:
            second.events.crossed(
                Check.of(second.applicable(tenant.call())[0], window("day", now)), "soft", 300_000
            )
            await second.events.flush()
        finally:
            await second.aclose()
        with tenant.db.session() as session:
            assert session.scalar(select(func.count()).select_from(BudgetEvent)) == 1
    finally:
        await admission.aclose()


async def test_hard_limit_refusal_records_a_hard_event(tenant: Tenant, backend: str) -> None:
    tenant.budgets.set_budget("key", tenant.key.id, "month", 100_000 / NANO)
    admission = tenant.admission(backend)
    try:
        for _ in range(3):
            with pytest.raises(Exception, match="monthly budget of key 'svc'"):
                await admission.admit(tenant.call())
        await admission.events.flush()
        assert [e.kind for e in tenant.budgets.list_events(scope_id=tenant.key.id)] == ["hard"]
    finally:
        await admission.aclose()


async def test_restart_picks_up_spend_from_usage_records(tenant: Tenant, backend: str) -> None:
    now = ts(2025, 3, 10, 12)
    tenant.budgets.set_budget("key", tenant.key.id, "day", 1.0)
    tenant.budgets.set_budget("org", tenant.org.id, "month", 5.0)
    ids = {"key_id": tenant.key.id, "team_id": tenant.team.id, "org_id": tenant.org.id}
    tenant.add_usage(0.99, ts(2025, 3, 10, 1), **ids)  # today
    tenant.add_usage(3.0, ts(2025, 3, 2), **ids)  # this month, not today
    tenant.add_usage(50.0, ts(2025, 2, 28), **ids)  # last month: does not count
    tenant.add_usage(7.0, ts(2025, 3, 10, 2), org_id="org_other")  # someone else
    admission = tenant.admission(backend, Clock(now))  # a fresh process after a restart
    try:
        with pytest.raises(Exception, match="daily budget of key"):
            await admission.admit(tenant.call(input_tokens=1000, max_output=1000))  # 0.02 > 0.01 left
        hold = await admission.admit(tenant.call())
        hold.settle(tenant.outcome(10, 10))
        await settle_all(admission)
        assert (await state(admission, "key", tenant.key.id, "day", now))[0] == 990_000_000 + 200_000
        assert (await state(admission, "org", tenant.org.id, "month", now))[0] == 3_990_000_000 + 200_000
        status = tenant.budgets.status(tenant.budgets.list_budgets(scope="key")[0].id, now=now)
        assert status.spent_usd == pytest.approx(0.99) and status.remaining_usd == pytest.approx(0.01)
    finally:
        await admission.aclose()


def test_local_tracker_keeps_windows_with_reservations_in_flight() -> None:
    rule = Rule("key", "key_x", "day", 100)
    tracker = LocalSpendTracker(lambda _check: 0, lambda *_: None)
    old = Check.of(rule, window("day", ts(2025, 1, 1, 12)))

    async def scenario() -> None:
        assert await tracker.reserve([old], 10) is None
        tracker.purge(ts(2025, 1, 3))
        assert await tracker.snapshot(old) == (0, 10, 10)  # still in flight: kept
        tracker.settle([old], 10, [old], 5)
        tracker.purge(ts(2025, 1, 3))
        assert await tracker.snapshot(old) is None

    asyncio.run(scenario())


# --- through a real gateway --------------------------------------------------------------------

USAGE = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}  # 300_000 nano-USD


class BudgetGateway:
    """A gateway on a database prepared with an org, team, key and budget."""

    def __init__(self, upstream: OpenAIUpstream, backend: str, limit_usd: float) -> None:
        url = f"sqlite:///{tempfile.mkdtemp(prefix='plinth-budget-')}/plinth.db"
        self.tenant = Tenant(url)
        created = self.tenant.tenancy.create_key(self.tenant.team.id, "burst")
        self.key_id, self.secret = created.key.id, created.secret
        self.tenant.budgets.set_budget("key", self.key_id, "day", limit_usd)
        self.limit = round(limit_usd * NANO)
        config: dict[str, Any] = {
            "storage": {"url": url},
            "models": [
                {"name": "gpt-4o-mini", "price": PRICE, "deployments": [openai_deployment(upstream.url)]}
            ],
        }
        if backend == "redis":
            config["redis"] = {"url": REDIS_URL}
        self.server = GatewayServer(config).start()
        self.backend = backend

    def budgets(self) -> BudgetAdmission:
        found = getattr(self.server.app.state, "budgets", None)
        assert isinstance(found, BudgetAdmission), "app.state.budgets is not set"
        return found

    def window_state(self) -> tuple[int, int, int]:
        """(spent, reserved, peak reserved) of the key's window, read without the server's loop."""
        admission = self.budgets()
        check = Check.of(admission.rules()[0], window("day", time.time()))
        tracker = admission.tracker
        if isinstance(tracker, RedisSpendTracker):
            assert REDIS_URL is not None
            client = redis.Redis.from_url(REDIS_URL)
            values = client.hmget("plinth:{budget}:" + check.key, ["spent", "reserved", "peak"])
            client.close()
            return int(values[0]), int(values[1]), int(values[2])  # type: ignore[arg-type]
        assert isinstance(tracker, LocalSpendTracker)
        counter = tracker._counters[check.key]
        return counter.spent, counter.reserved, counter.peak

    def recorded_spend(self) -> tuple[int, float]:
        """(usage records, their total cost) for the key, after the server wrote them all."""
        with self.tenant.db.session() as session:
            count, total = session.execute(
                select(func.count(), func.coalesce(func.sum(UsageRecord.cost_usd), 0.0)).where(
                    UsageRecord.key_id == self.key_id, UsageRecord.status == 200
                )
            ).one()
        return int(count), float(total)

    def stop(self) -> None:
        self.server.stop()
        self.tenant.db.dispose()


@pytest.fixture
async def budget_gateway(openai_upstream: OpenAIUpstream) -> AsyncIterator[Callable[..., BudgetGateway]]:
    started: list[BudgetGateway] = []

    def start(backend: str, limit_usd: float) -> BudgetGateway:
        gw = BudgetGateway(openai_upstream, backend, limit_usd)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        await asyncio.to_thread(gw.stop)


async def test_hard_limit_refuses_with_429_in_openai_and_anthropic_shapes(
    openai_upstream: OpenAIUpstream, budget_gateway: Callable[..., BudgetGateway], backend: str
) -> None:
    # Room for one request (reserve 25 tokens; real cost 30 tokens), not two.
    gw = budget_gateway(backend, 500_000 / NANO)
    openai_upstream.queue(Reply(body=completion("one", usage=USAGE)))
    client = openai.AsyncOpenAI(base_url=gw.server.url + "/v1", api_key=gw.secret, max_retries=2)
    first = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )
    assert first.choices[0].message.content == "one"
    await asyncio.sleep(0.05)  # the settlement lands (Redis settles in a task)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20
        )
    assert time.monotonic() - started < 1.0  # the SDK did not retry: x-should-retry: false
    err = refused.value
    assert err.status_code == 429 and err.code == "budget_exceeded"
    assert err.response.headers["x-should-retry"] == "false"
    assert int(err.response.headers["retry-after"]) >= 1
    assert "daily budget of key 'burst'" in err.message
    assert len(openai_upstream.requests) == 1

    claude = anthropic.AsyncAnthropic(base_url=gw.server.url, api_key=gw.secret, max_retries=2)
    with pytest.raises(anthropic.RateLimitError) as refused_a:
        await claude.messages.create(
            model="gpt-4o-mini", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
        )
    body = refused_a.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert "daily budget of key 'burst'" in body["error"]["message"]
    assert refused_a.value.response.headers["x-should-retry"] == "false"
    assert len(openai_upstream.requests) == 1
    await client.close()
    await claude.close()


async def test_concurrent_burst_overspends_at_most_the_reservations_in_flight(
    openai_upstream: OpenAIUpstream, budget_gateway: Callable[..., BudgetGateway], backend: str
) -> None:
    """SPEC part 2 must-show: 200 concurrent requests against a budget for about five."""
    limit_usd = 5 * 300_000 / NANO  # five requests at their real cost
    gw = budget_gateway(backend, limit_usd)
    openai_upstream.queue(*[Reply(body=completion("ok", usage=USAGE), delay_s=0.05) for _ in range(200)])
    # The SDK allows 1000 connections: all 200 requests are in flight at once.
    client = openai.AsyncOpenAI(base_url=gw.server.url + "/v1", api_key=gw.secret, max_retries=0)

    async def one() -> int:
        try:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=20
            )
        except openai.RateLimitError as exc:
            assert exc.code == "budget_exceeded"
            return 429
        return 200

    statuses = await asyncio.gather(*(one() for _ in range(200)))
    await client.close()
    await asyncio.sleep(0.1)  # let the last settlements land
    spent, reserved, peak = gw.window_state()
    await asyncio.to_thread(gw.server.stop)  # flushes every usage record
    records, recorded_usd = gw.recorded_spend()
    admitted, refused = statuses.count(200), statuses.count(429)
    print(
        f"\nbudget burst [{backend}]: admitted={admitted} refused={refused} "
        f"spend=${recorded_usd:.6f} (tracker ${spent / NANO:.6f}) limit=${limit_usd:.6f} "
        f"max in-flight reservation=${peak / NANO:.6f} overspend=${max(0.0, recorded_usd - limit_usd):.6f}"
    )
    assert admitted + refused == 200 and admitted >= 1 and refused >= 150
    assert records == admitted == len(openai_upstream.requests)
    assert reserved == 0
    assert spent == round(recorded_usd * NANO)  # the tracker agrees with the usage records
    assert recorded_usd * NANO <= gw.limit + peak
