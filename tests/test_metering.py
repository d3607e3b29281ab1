"""Metering: prices and cost, the batched usage recorder (through a real gateway), spend reports."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import logging
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI
from sqlalchemy import func, insert, select

from conftest import ADMIN_KEY, USER_KEY, GatewayServer
from mocks.openai_upstream import OpenAIUpstream, Reply, text_stream
from plinth.config import ConfigError, parse_config
from plinth.metering import Price, PriceBook, UsageRecorder, catalog_price, csv_columns, spend, to_csv
from plinth.metering.models import UsageRecord
from plinth.providers.http import HttpClient
from plinth.providers.types import Usage
from plinth.routing import Router
from plinth.storage import Database
from plinth.tenancy import Principal
from plinth.tenancy.service import TenancyService

# --- prices ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("upstream", "catalog_name"),
    [
        ("gpt-4o-mini", "gpt-4o-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("GPT-4o", "gpt-4o"),
        ("gpt-4-0613", "gpt-4"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("claude-3-5-sonnet-20241022", "claude-3-5-sonnet"),
        ("claude-3-5-sonnet-latest", "claude-3-5-sonnet"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-3-5-sonnet-v2@20241022", "claude-3-5-sonnet"),
        ("anthropic.claude-3-5-sonnet-20240620-v1:0", "claude-3-5-sonnet"),
        ("us.anthropic.claude-3-7-sonnet-20250219-v1:0", "claude-3-7-sonnet"),
        ("amazon.nova-pro-v1:0", "amazon.nova-pro"),
        ("eu.amazon.nova-lite-v1:0", "amazon.nova-lite"),
        ("amazon.titan-embed-text-v2:0", "amazon.titan-embed-text"),
        ("meta.llama3-1-70b-instruct-v1:0", "meta.llama3-1-70b-instruct"),
        ("gemini-1.5-pro-002", "gemini-1.5-pro"),
        ("models/gemini-2.0-flash", "gemini-2.0-flash"),
        ("gemini-2.5-flash", "gemini-2.5-flash"),
        ("text-embedding-3-small", "text-embedding-3-small"),
    ],
)
def test_catalog_matches_snapshots_and_provider_spellings(upstream: str, catalog_name: str) -> None:
    from plinth.metering import BUILTIN_PRICES

    assert catalog_price(upstream) == BUILTIN_PRICES[catalog_name]


@pytest.mark.parametrize("upstream", ["gpt-4o-realtime-preview", "llama3:8b", "my-finetune", "gpt-4o-mini-x"])
def test_catalog_does_not_guess(upstream: str) -> None:
    # Priced by loose prefix these would be silently wrong; unknown is visible (cost 0, logged).
    assert catalog_price(upstream) is None


@pytest.mark.parametrize(
    ("price", "usage", "expected"),
    [
        # uncached input x input + cached x cached + output x output, per million
        (Price(2.5, 10.0, 1.25), Usage(1_000_000, 0), 2.5),
        (Price(2.5, 10.0, 1.25), Usage(0, 1_000_000), 10.0),
        (Price(2.5, 10.0, 1.25), Usage(1000, 500, 400), (600 * 2.5 + 400 * 1.25 + 500 * 10.0) / 1e6),
        (Price(0.15, 0.60, 0.075), Usage(10, 3), (10 * 0.15 + 3 * 0.60) / 1e6),
        # no cached price: cached tokens cost as much as input
        (Price(10.0, 30.0), Usage(1000, 100, 800), (1000 * 10.0 + 100 * 30.0) / 1e6),
        # Anthropic-style cache writes (input_tokens counts reads and writes)
        (
            Price(3.0, 15.0, 0.30, 3.75),
            Usage(
                input_tokens=3000,
                output_tokens=200,
                cached_input_tokens=1000,
                cache_creation_input_tokens=1500,
            ),
            (500 * 3.0 + 1000 * 0.30 + 1500 * 3.75 + 200 * 15.0) / 1e6,
        ),
        (Price(3.0, 15.0), Usage(0, 0), 0.0),
        # more cached than input reported (a broken upstream) never gives a negative part
        (Price(1.0, 1.0, 0.5), Usage(10, 0, 20), 20 * 0.5 / 1e6),
    ],
)
def test_cost(price: Price, usage: Usage, expected: float) -> None:
    assert price.cost(usage) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def _router(models: list[dict[str, Any]]) -> Router:
    return Router(parse_config({"models": models}), HttpClient())


def test_price_book_overrides_and_unknown_models(caplog: pytest.LogCaptureFixture) -> None:
    dep = {"provider": "openai", "api_key": "sk-x"}
    router = _router(
        [
            # catalog price by upstream model, not by alias
            {"name": "fast", "deployments": [{**dep, "model": "gpt-4o-mini-2024-07-18"}]},
            {
                "name": "smart",
                "price": {"input_per_mtok": 1, "output_per_mtok": 2},
                "deployments": [
                    {**dep, "model": "gpt-4o", "name": "a"},
                    {
                        **dep,
                        "model": "gpt-4o",
                        "name": "b",
                        "price": {"input_per_mtok": 5, "output_per_mtok": 6, "cached_input_per_mtok": 0.5},
                    },
                ],
            },
            {"name": "openai/*", "deployments": [{**dep, "model": "*"}]},
            {"name": "mine", "deployments": [{**dep, "model": "my-finetune"}]},
        ]
    )
    book = PriceBook(router.all_routes())
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000, cached_input_tokens=500_000)
    assert book.cost("fast", "fast/openai/0", "fast", usage) == pytest.approx(0.5 * 0.15 + 0.5 * 0.075 + 0.60)
    assert book.cost("smart", "a", "smart", usage) == pytest.approx(1 + 2)  # model override
    assert book.cost("smart", "b", "smart", usage) == pytest.approx(2.5 + 0.25 + 6)  # deployment wins
    # a wildcard alias prices the upstream model the client named
    assert book.cost("openai/*", "openai/*/openai/0", "openai/gpt-4o", usage) == pytest.approx(
        0.5 * 2.5 + 0.5 * 1.25 + 10
    )
    assert book.cost("fast", None, "fast", usage) == 0.0  # never reached a deployment
    with caplog.at_level(logging.WARNING, logger="plinth.metering"):
        for _ in range(3):
            assert book.cost("mine", "mine/openai/0", "mine", usage) == 0.0
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "my-finetune" in caplog.records[0].getMessage()
    assert book.unpriced == {"my-finetune"}


@pytest.mark.parametrize(
    "price",
    [{"input_per_mtok": -1, "output_per_mtok": 1}, {"input_per_mtok": 1}, {"input_per_mtok": 1, "output": 2}],
)
def test_config_validates_prices(price: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="price"):
        parse_config(
            {"models": [{"name": "m", "price": price, "deployments": [{"provider": "openai", "model": "x"}]}]}
        )


# --- the recorder ----------------------------------------------------------------------------


def _db(tmp_path: Path, *, migrate: bool = True) -> Database:
    db = Database(f"sqlite:///{tmp_path}/plinth.db")
    if migrate:
        db.migrate()
    return db


def _count(db: Database) -> int:
    with db.session() as session:
        return int(session.scalar(select(func.count(UsageRecord.id))) or 0)


def _record(recorder: UsageRecorder, i: int, **extra: Any) -> None:
    fields: dict[str, Any] = {
        "request_id": f"req_{i}",
        "principal": Principal(name="k", key_id="key_1", team_id="team_1", org_id="org_1"),
        "route": "chat_completions",
        "alias": "fast",
        "model": "fast",
        "deployment": "fast/openai/0",
        "status": 200,
        "usage": Usage(10, 3),
        "latency_ms": 1.5,
        **extra,
    }
    recorder.record(**fields)


async def test_recorder_flushes_in_batches_and_on_close(database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    book = PriceBook(
        _router(
            [{"name": "fast", "deployments": [{"provider": "openai", "model": "gpt-4o-mini"}]}]
        ).all_routes()
    )
    recorder = UsageRecorder(db, book, interval_s=60, batch_size=50)
    recorder.start()
    for i in range(120):
        _record(recorder, i)
    # 50 waiting wakes the task long before the 60 s interval
    deadline = time.monotonic() + 5
    while _count(db) < 100 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert _count(db) >= 100
    await recorder.aclose()
    assert _count(db) == 120 and recorder.pending == 0 and recorder.written == 120
    with db.session() as session:
        row = session.scalars(select(UsageRecord).where(UsageRecord.request_id == "req_7")).one()
    assert (row.team_id, row.key_id, row.org_id, row.key_name, row.model) == (
        "team_1",
        "key_1",
        "org_1",
        "k",
        "fast",
    )
    assert (row.input_tokens, row.output_tokens, row.status) == (10, 3, 200)
    assert row.cost_usd == pytest.approx((10 * 0.15 + 3 * 0.60) / 1e6)
    db.dispose()


async def test_recorder_retries_while_the_database_is_down_and_bounds_its_buffer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = _db(tmp_path, migrate=False)  # no table yet: every insert fails
    recorder = UsageRecorder(
        db, PriceBook([]), interval_s=0.02, batch_size=10, max_buffer=100, retry_max_s=0.05
    )
    recorder.start()
    with caplog.at_level(logging.ERROR, logger="plinth.metering"):
        for i in range(150):
            _record(recorder, i)
            if i % 10 == 0:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
    assert recorder.dropped == 50 and recorder.pending == 100
    failures = [r for r in caplog.records if "will retry" in r.getMessage()]
    assert len(failures) == 1  # logged once per outage, not once per attempt
    db.migrate()  # the database is back
    deadline = time.monotonic() + 5
    while recorder.pending and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await recorder.aclose()
    assert _count(db) == 100
    with db.session() as session:
        ids = set(session.scalars(select(UsageRecord.request_id)))
    assert ids == {f"req_{i}" for i in range(50, 150)}  # the oldest were dropped
    db.dispose()


async def test_recorder_gives_up_at_shutdown_after_its_timeout(tmp_path: Path) -> None:
    db = _db(tmp_path, migrate=False)
    recorder = UsageRecorder(db, PriceBook([]), interval_s=60)
    recorder.start()
    _record(recorder, 1)
    await recorder.aclose(timeout_s=0.3)
    assert recorder.pending == 0 and recorder.dropped == 1
    db.dispose()


def test_record_is_cheap(tmp_path: Path) -> None:
    """The hot-path cost of one record (no loop needed: record() only appends)."""
    recorder = UsageRecorder(_db(tmp_path, migrate=False), PriceBook([]), batch_size=10**9, max_buffer=10**9)
    principal = Principal(name="k")
    usage = Usage(10, 3)
    n = 100_000
    best = float("inf")
    for _round in range(3):
        started = time.perf_counter()
        for _ in range(n):
            recorder.record("req", principal, "chat_completions", "m", "m", "d", 200, usage, 1.0, False)
        best = min(best, (time.perf_counter() - started) / n)
        recorder._buffer.clear()
    print(f"UsageRecorder.record: {best * 1e6:.2f} us per call")
    assert best < 20e-6  # ~0.45 us alone on the dev machine; generous for loaded CI


# --- through a real gateway ------------------------------------------------------------------


def _rows(db_path: str) -> list[dict[str, Any]]:
    conn = sqlite3.connect(db_path)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM usage_records ORDER BY id")]
    finally:
        conn.close()


def _team_key(db_url: str) -> tuple[str, str]:
    """A database key for a team, created before the gateway starts (it loads keys at start-up)."""
    db = Database(db_url)
    db.migrate()
    tenancy = TenancyService(db)
    org = tenancy.create_org("Acme")
    team = tenancy.create_team(org.id, "Payments")
    created = tenancy.create_key(team.id, "payments-prod")
    db.dispose()
    return created.secret, team.id


async def test_one_record_per_answered_request_after_a_burst(
    gateway_factory: Callable[..., GatewayServer],
    openai_upstream: OpenAIUpstream,
    basic_config: dict[str, Any],
    tmp_path: Path,
) -> None:
    db_path = f"{tmp_path}/usage.db"
    team_secret, team_id = _team_key(f"sqlite:///{db_path}")
    server = gateway_factory({**basic_config, "storage": {"url": f"sqlite:///{db_path}"}})
    secret_prompt = "PROMPT-CONTENT-MUST-NOT-BE-STORED-4711"
    user = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=USER_KEY, max_retries=0)
    team = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=team_secret, max_retries=0)
    admin = AsyncOpenAI(base_url=f"{server.url}/v1", api_key=ADMIN_KEY, max_retries=0)
    messages: Any = [{"role": "user", "content": secret_prompt}]

    # Errors that reached routing: the upstream refuses (passed through as 400), and a stream that
    # breaks after its first chunks (the error goes in-band).
    openai_upstream.queue(
        Reply(status=400, body={"error": {"message": "bad", "type": "invalid_request_error"}}),
        Reply(status=400, body={"error": {"message": "bad", "type": "invalid_request_error"}}),
        Reply(stream=text_stream("a", "b", "c"), error_after=2),
    )
    for _ in range(2):
        with pytest.raises(openai.BadRequestError):
            await user.chat.completions.create(model="gpt-4o-mini", messages=messages)
    broken = await user.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
    with pytest.raises(openai.APIError):
        async for _ in broken:
            pass

    async def plain(client: AsyncOpenAI) -> None:
        await client.chat.completions.create(model="gpt-4o-mini", messages=messages)

    async def streamed(client: AsyncOpenAI) -> None:
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages, stream=True)
        async for _ in stream:
            pass

    async def embedded() -> None:
        await admin.embeddings.create(model="text-embedding-3-small", input=[secret_prompt])

    async def unrouted() -> None:
        # Never reach routing: no usage record (bad key, unknown model, model not allowed).
        bad = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="sk-nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await bad.chat.completions.create(model="gpt-4o-mini", messages=messages)
        with pytest.raises(openai.NotFoundError):
            await user.chat.completions.create(model="no-such-model", messages=messages)
        with pytest.raises(openai.PermissionDeniedError):
            await user.embeddings.create(model="text-embedding-3-small", input="x")

    calls = (
        [plain(user) for _ in range(60)]
        + [streamed(user) for _ in range(40)]
        + [plain(team) for _ in range(30)]
        + [streamed(team) for _ in range(20)]
        + [embedded() for _ in range(15)]
        + [unrouted() for _ in range(5)]
    )
    await asyncio.gather(*calls)
    answered = 3 + 60 + 40 + 30 + 20 + 15

    server.stop()  # graceful shutdown: the lifespan flushes what is still buffered
    rows = _rows(db_path)
    assert len(rows) == answered
    assert len({r["request_id"] for r in rows}) == answered

    statuses = sorted(r["status"] for r in rows)
    assert statuses.count(400) == 2
    assert statuses.count(502) == 1  # the broken stream, recorded with its in-band error
    assert statuses.count(200) == answered - 3
    ok_chat = [r for r in rows if r["status"] == 200 and r["route"] == "chat_completions"]
    assert {(r["input_tokens"], r["output_tokens"]) for r in ok_chat} == {(10, 3), (5, 2)}
    assert all(r["cost_usd"] > 0 and r["deployment"] == "gpt-4o-mini/openai/0" for r in ok_chat)
    plain_cost = next(r["cost_usd"] for r in ok_chat if r["input_tokens"] == 10)
    assert plain_cost == pytest.approx((10 * 0.15 + 3 * 0.60) / 1e6)
    team_rows = [r for r in rows if r["team_id"] == team_id]
    assert len(team_rows) == 50 and {r["key_name"] for r in team_rows} == {"payments-prod"}
    assert all(r["key_id"] and r["org_id"] for r in team_rows)
    assert {r["key_name"] for r in rows if r["route"] == "embeddings"} == {"admin"}
    assert all(r["latency_ms"] > 0 for r in rows)

    # No prompt content anywhere in the database files.
    for path in Path(tmp_path).glob("usage.db*"):
        assert secret_prompt.encode() not in path.read_bytes()


async def test_stream_abandoned_by_the_client_is_recorded_once(
    gateway_factory: Callable[..., GatewayServer],
    openai_upstream: OpenAIUpstream,
    basic_config: dict[str, Any],
    tmp_path: Path,
) -> None:
    db_path = f"{tmp_path}/usage.db"
    server = gateway_factory({**basic_config, "storage": {"url": f"sqlite:///{db_path}"}})
    openai_upstream.queue(Reply(stream=text_stream(*["x"] * 50), chunk_delay_s=0.05))
    body = {"model": "gpt-4o-mini", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        httpx.AsyncClient() as client,
        client.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {USER_KEY}"},
        ) as response,
    ):
        async for _ in response.aiter_bytes():
            break  # hang up after the first chunk
    await asyncio.sleep(0.5)
    server.stop()
    rows = _rows(db_path)
    assert [(r["status"], r["model"]) for r in rows] == [(499, "gpt-4o-mini")]


# --- reports ---------------------------------------------------------------------------------


def _usage_rows() -> list[dict[str, Any]]:
    base: dict[str, Any] = {"route": "chat_completions", "status": 200, "estimated": False, "latency_ms": 1.0,
                            "cache_hit": False, "org_id": "org_1", "project_id": None, "deployment": "d"}  # fmt: skip
    rows = []
    day1, day2 = dt.datetime(2025, 3, 1, 10), dt.datetime(2025, 3, 2, 23, 59)
    spec = [
        # team, key, model, when, input, output, cached, cost
        ("team_a", "key_a1", "gpt-4o", day1, 100, 10, 0, 1.0),
        ("team_a", "key_a1", "gpt-4o", day2, 200, 20, 50, 2.0),
        ("team_a", "key_a2", "claude", day1, 300, 30, 0, 4.0),
        ("team_b", "key_b1", "gpt-4o", day2, 400, 40, 100, 8.0),
        ("team_b", "key_b1", "gpt-4o", dt.datetime(2025, 3, 3), 1, 1, 0, 100.0),  # outside the range
        ("team_b", "key_b1", "gpt-4o", dt.datetime(2025, 2, 28, 23, 59), 1, 1, 0, 100.0),  # outside
    ]
    for i, (team, key, model, when, inp, out, cached, cost) in enumerate(spec):
        rows.append(
            {**base, "request_id": f"r{i}", "team_id": team, "key_id": key, "key_name": key.upper(),
             "model": model, "created_at": when, "input_tokens": inp, "output_tokens": out,
             "cached_input_tokens": cached, "cost_usd": cost}
        )  # fmt: skip
    return rows


@pytest.fixture
def report_db(database_url: str) -> Database:
    db = Database(database_url)
    db.migrate()
    with db.session() as session:
        session.execute(insert(UsageRecord), _usage_rows())
    return db


SINCE, UNTIL = dt.date(2025, 3, 1), dt.date(2025, 3, 3)


def test_spend_totals_and_groupings(report_db: Database) -> None:
    total = spend(report_db, [], SINCE, UNTIL)
    assert len(total) == 1 and total[0].group == {}
    assert (total[0].requests, total[0].input_tokens, total[0].cached_input_tokens, total[0].cost_usd) == (
        4, 1000, 150, 15.0,
    )  # fmt: skip

    by_team = {r.group["team_id"]: (r.requests, r.cost_usd) for r in spend(report_db, ["team"], SINCE, UNTIL)}
    assert by_team == {"team_a": (3, 7.0), "team_b": (1, 8.0)}

    by_key = [(r.group, r.requests) for r in spend(report_db, ["key"], SINCE, UNTIL)]
    assert by_key == [
        ({"key_id": "key_a1", "key_name": "KEY_A1"}, 2),
        ({"key_id": "key_a2", "key_name": "KEY_A2"}, 1),
        ({"key_id": "key_b1", "key_name": "KEY_B1"}, 1),
    ]

    by_day = [(r.group["day"], r.cost_usd, r.output_tokens) for r in spend(report_db, ["day"], SINCE, UNTIL)]
    assert by_day == [("2025-03-01", 5.0, 40), ("2025-03-02", 10.0, 60)]

    combined = spend(report_db, ["team", "model", "day"], SINCE, UNTIL)
    assert [(r.group["team_id"], r.group["model"], r.group["day"], r.cost_usd) for r in combined] == [
        ("team_a", "claude", "2025-03-01", 4.0),
        ("team_a", "gpt-4o", "2025-03-01", 1.0),
        ("team_a", "gpt-4o", "2025-03-02", 2.0),
        ("team_b", "gpt-4o", "2025-03-02", 8.0),
    ]

    only_a = spend(report_db, ["model"], SINCE, UNTIL, team_id="team_a")
    assert {r.group["model"]: r.cost_usd for r in only_a} == {"gpt-4o": 3.0, "claude": 4.0}

    # Aware datetimes are converted to UTC: 2025-03-02T01:00+02:00 is 2025-03-01T23:00Z.
    aware = dt.datetime(2025, 3, 2, 1, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert spend(report_db, [], SINCE, aware)[0].requests == 2

    with pytest.raises(ValueError, match="cannot group usage by 'colour'"):
        spend(report_db, ["colour"], SINCE, UNTIL)
    report_db.dispose()


def test_csv_export_parses(report_db: Database) -> None:
    rows = spend(report_db, ["team", "key", "day"], SINCE, UNTIL)
    text = to_csv(rows, ["team", "key", "day"])
    parsed = list(csv.DictReader(io.StringIO(text)))
    assert list(parsed[0]) == csv_columns(["team", "key", "day"])
    assert list(parsed[0]) == [
        "team_id", "key_id", "key_name", "day",
        "requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost_usd",
    ]  # fmt: skip
    assert len(parsed) == 4
    assert sum(float(r["cost_usd"]) for r in parsed) == pytest.approx(15.0)
    assert parsed[0] == {
        "team_id": "team_a", "key_id": "key_a1", "key_name": "KEY_A1", "day": "2025-03-01",
        "requests": "1", "input_tokens": "100", "output_tokens": "10", "cached_input_tokens": "0",
        "cost_usd": "1.000000",
    }  # fmt: skip
    report_db.dispose()
