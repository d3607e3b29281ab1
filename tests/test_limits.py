"""Limits: requests/min, tokens/min and concurrency per key, team and model.

Every backend test runs in-process and, when scripts/services started one, against real Redis.
The must-show: two `plinth serve` processes sharing one database and one Redis admit exactly the
key's 100 requests/min out of a 600-request burst.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from conftest import ADMIN_KEY, REDIS_URL, GatewayServer, needs_redis, openai_deployment, wait_for
from mocks.openai_upstream import OpenAIUpstream
from plinth.budgets.service import BudgetService
from plinth.config.schema import LimitsConfig, ModelConfig, PlinthConfig, RoutingConfig
from plinth.gateway.admission import Call, Outcome
from plinth.gateway.errors import GatewayError
from plinth.limits import (
    NO_HOLD,
    Backend,
    Grant,
    InProcessBackend,
    LimitHold,
    RateLimiter,
    RedisBackend,
    Refusal,
    Scope,
    exactness_problem,
)
from plinth.providers.types import Usage
from plinth.routing import ModelRoute
from plinth.storage import Database
from plinth.tenancy import Principal, RateLimits
from plinth.tenancy.service import TenancyError, TenancyService


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def uid(prefix: str) -> str:
    """Scope ids unique per test, so Redis counters of other tests (or runs) never interfere."""
    return f"{prefix}:{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["memory", pytest.param("redis", marks=needs_redis)])
async def make_backend(request: pytest.FixtureRequest) -> AsyncIterator[Callable[..., Backend]]:
    made: list[Backend] = []

    def make(window_s: float = 60.0, lease_s: float = 30.0) -> Backend:
        backend: Backend
        if request.param == "memory":
            backend = InProcessBackend(window_s=window_s, lease_s=lease_s)
        else:
            assert REDIS_URL is not None
            backend = RedisBackend(REDIS_URL, window_s=window_s, lease_s=lease_s)
        made.append(backend)
        return backend

    yield make
    for backend in made:
        await backend.aclose()


async def settled(backend: Backend) -> None:
    """Wait until released entries reached the backend (Redis releases are batched)."""
    if isinstance(backend, RedisBackend):
        await backend.flush()


# --- the algorithms -------------------------------------------------------------------------------


def granted(result: Grant | Refusal) -> Grant:
    assert isinstance(result, Grant), result
    return result


def refused(result: Grant | Refusal) -> Refusal:
    assert isinstance(result, Refusal), result
    return result


def test_sliding_window_counts_each_request_for_60_to_61_seconds() -> None:
    clock = FakeClock()
    backend = InProcessBackend(clock=clock)
    scope = [Scope("k:a", "key 'a'", rpm=3)]
    for at in (0.5, 10, 20):
        clock.now = 1000 + at
        granted(backend.acquire_now(f"l{at}", scope, 0))
    clock.now = 1030
    refusal = refused(backend.acquire_now("x", scope, 0))
    assert refusal.kind == "requests"
    # The first request (second 1000) leaves the window when second 1061 begins.
    assert refusal.retry_after_s == pytest.approx(31)
    assert refusal.requests_used == 3 and refusal.requests_reset_s == pytest.approx(51)
    clock.now = 1060.5
    refused(backend.acquire_now("x", scope, 0))  # 60 s after the first: still counted, no reset
    clock.now = 1060.999
    refused(backend.acquire_now("x", scope, 0))
    clock.now = 1061
    grant = granted(backend.acquire_now("y", scope, 0))
    assert grant.used == ((3, 0),) and grant.reset_s == pytest.approx(61)
    clock.now = 1061.5
    refusal = refused(backend.acquire_now("z", scope, 0))
    assert refusal.retry_after_s == pytest.approx(9.5)  # the second request (second 1010) leaves at 1071


def test_state_per_scope_does_not_grow_with_traffic() -> None:
    clock = FakeClock()
    backend = InProcessBackend(clock=clock)
    scope = [Scope("k:a", "key 'a'", rpm=10**9, tpm=10**12)]
    for i in range(100_000):  # 1,000 requests a second for 100 seconds
        clock.now = 1000 + i / 1000
        grant = granted(backend.acquire_now("l", scope, 10))
        backend.release("l", scope, 10, grant.second, 7)
    counters = backend._scopes["k:a"]
    assert len(counters.requests.counts) <= 61 and len(counters.tokens.counts) <= 61
    assert counters.requests.total == 61_000  # seconds 1039..1099, 1,000 each
    assert counters.tokens.total == 7 * counters.requests.total


async def test_requests_per_minute_exact_under_concurrency(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend(window_s=1)
    scope = [Scope(uid("k"), "key 'a'", rpm=25)]
    results = await asyncio.gather(*(backend.acquire(uid("l"), scope, 0) for _ in range(200)))
    assert sum(isinstance(r, Grant) for r in results) == 25
    refusal = next(r for r in results if isinstance(r, Refusal))
    assert refusal.kind == "requests" and 1.0 < refusal.retry_after_s <= 2.0
    await asyncio.sleep(refusal.retry_after_s + 0.05)  # the window slid past every entry
    granted(await backend.acquire(uid("l"), scope, 0))


async def test_tokens_reserved_then_corrected(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    scope = [Scope(uid("k"), "key 'a'", tpm=1000)]
    a = granted(await backend.acquire("a", scope, 600))
    assert a.used == ((0, 600),)
    refusal = refused(await backend.acquire("b", scope, 600))
    assert refusal.kind == "tokens" and refusal.tokens_used == 600
    backend.release("a", scope, 600, a.second, 100)  # the answer used far less than reserved
    await settled(backend)
    b = granted(await backend.acquire("b", scope, 600))  # 100 + 600
    c = granted(await backend.acquire("c", scope, 300))  # 100 + 600 + 300
    assert c.used == ((0, 1000),)
    refusal = refused(await backend.acquire("d", scope, 1))
    assert refusal.tokens_used == 1000
    backend.release("c", scope, 300, c.second, 0)  # failed without usage: the reservation is dropped
    backend.release("b", scope, 600, b.second, 0)
    await settled(backend)
    granted(await backend.acquire("d", scope, 900))
    too_big = refused(await backend.acquire("e", scope, 1001))
    assert too_big.kind == "too_large"


def test_tokens_expire_with_the_window() -> None:
    clock = FakeClock()
    backend = InProcessBackend(clock=clock)
    scope = [Scope("k:a", "key 'a'", tpm=1000)]
    a = granted(backend.acquire_now("a", scope, 700))
    clock.now += 20
    granted(backend.acquire_now("b", scope, 200))
    refusal = refused(backend.acquire_now("c", scope, 500))
    assert refusal.retry_after_s == pytest.approx(41)  # when "a" (second 1000) leaves
    clock.now += 20
    backend.release("a", scope, 700, a.second, 300)  # settles now: its 300 tokens count from now on
    granted(backend.acquire_now("c", scope, 500))  # 300 + 200 + 500
    clock.now += 42  # "b" (second 1020) left the window, "a" (settled in second 1040) has not
    refusal = refused(backend.acquire_now("d", scope, 600))
    assert refusal.tokens_used == 800


def test_settling_after_the_reservation_left_the_window_takes_nothing_back() -> None:
    clock = FakeClock()
    backend = InProcessBackend(clock=clock)
    scope = [Scope("k:a", "key 'a'", tpm=1000)]
    a = granted(backend.acquire_now("a", scope, 700))
    clock.now += 90  # a very long stream: its reservation already left the window
    granted(backend.acquire_now("b", scope, 500))
    backend.release("a", scope, 700, a.second, 400)
    refusal = refused(backend.acquire_now("c", scope, 200))
    assert refusal.tokens_used == 900  # "b"'s 500 reserved and "a"'s 400 used, nothing subtracted


@needs_redis
async def test_redis_releases_survive_a_flushed_script_cache() -> None:
    assert REDIS_URL is not None
    backend = RedisBackend(REDIS_URL)
    scope = [Scope(uid("k"), "key 'a'", tpm=1000)]
    a = granted(await backend.acquire("a", scope, 900))
    await backend.client.script_flush()  # as after a Redis restart
    backend.release("a", scope, 900, a.second, 100)
    await backend.flush()
    assert granted(await backend.acquire("b", scope, 900)).used == ((0, 1000),)
    await backend.aclose()


async def test_concurrency_leases(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    scope = [Scope(uid("m"), "model 'm'", max_concurrency=2)]
    a = granted(await backend.acquire("a", scope, 0))
    granted(await backend.acquire("b", scope, 0))
    assert refused(await backend.acquire("c", scope, 0)).kind == "concurrency"
    backend.release("a", scope, 0, a.second, 0)
    await settled(backend)
    granted(await backend.acquire("c", scope, 0))
    refused(await backend.acquire("d", scope, 0))


async def test_leaked_leases_expire(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend(lease_s=0.3)
    scope = [Scope(uid("k"), "key 'a'", max_concurrency=1)]
    granted(await backend.acquire("crashed", scope, 0))  # never released: its process died
    refused(await backend.acquire("b", scope, 0))
    await asyncio.sleep(0.35)
    granted(await backend.acquire("b", scope, 0))


async def test_running_requests_keep_their_slots_dropped_holds_do_not(
    make_backend: Callable[..., Backend],
) -> None:
    limiter = RateLimiter(make_backend(lease_s=0.3), lease_s=0.3)
    call = make_call(key_limits=RateLimits(max_concurrency=1), key_id=uid("key"))
    hold = await limiter.admit(call)
    assert isinstance(hold, LimitHold)
    await asyncio.sleep(0.7)  # two lease lifetimes: renewed in the background, still held
    with pytest.raises(GatewayError, match="Concurrency limit reached for key 'ci'"):
        await limiter.admit(call)
    del hold  # a bug lost the hold without settling: no more renewals, the slot expires
    gc.collect()
    await asyncio.sleep(0.45)
    (await limiter.admit(call)).settle(Outcome(200))
    await limiter.aclose()


async def test_all_or_nothing_across_scopes(make_backend: Callable[..., Backend]) -> None:
    backend = make_backend()
    key = Scope(uid("k"), "key 'ci'", rpm=2, tpm=10_000, max_concurrency=5)
    team = Scope(uid("t"), "team 'payments'", rpm=1)
    a = granted(await backend.acquire("a", [key, team], 100))
    assert a.used == ((1, 100), (1, 0))
    refusal = refused(await backend.acquire("b", [key, team], 100))
    assert refusal == Refusal(1, "requests", refusal.retry_after_s, 1, refusal.requests_reset_s, 0, 0.0)
    # The refused request left no trace in the key's scope: one request, 100 tokens, one lease.
    c = granted(await backend.acquire("c", [key], 9_900))
    assert c.used == ((2, 10_000),)
    refused(await backend.acquire("d", [key], 0))
    backend.release("a", [key], 100, a.second, 0)
    backend.release("c", [key], 9_900, c.second, 0)
    await settled(backend)
    assert refused(await backend.acquire("e", [key], 0)).kind == "requests"


# --- the admission step ----------------------------------------------------------------------


class ExplodingBackend(InProcessBackend):
    async def acquire(self, lease: str, scopes: Sequence[Scope], tokens: int) -> Grant | Refusal:
        raise AssertionError("a request without limits must not reach the backend")


def make_call(
    *,
    key_limits: RateLimits | None = None,
    team_limits: RateLimits | None = None,
    model_limits: LimitsConfig | None = None,
    key_id: str = "key_1",
    team_id: str = "team_1",
    input_tokens: int = 50,
    max_output: int | None = 100,
) -> Call:
    principal = Principal(
        name="ci",
        key_id=key_id,
        team_id=team_id,
        team_name="payments",
        limits=key_limits,
        team_limits=team_limits,
    )
    config = ModelConfig(
        name="gpt-4o-mini", deployments=[{"provider": "openai", "model": "gpt-4o-mini"}], limits=model_limits
    )
    route = ModelRoute(config=config, deployments=[], routing=RoutingConfig())
    return Call("req", principal, route, route.name, input_tokens, max_output)


async def test_no_limit_no_backend_call() -> None:
    limiter = RateLimiter(ExplodingBackend())
    assert await limiter.admit(make_call()) is NO_HOLD
    only_default = LimitsConfig(default_max_output_tokens=10)  # no ceiling: still nothing to count
    assert await limiter.admit(make_call(model_limits=only_default)) is NO_HOLD


async def test_tokens_reservation_and_settle_through_the_limiter() -> None:
    backend = InProcessBackend()
    limiter = RateLimiter(backend)
    call = make_call(team_limits=RateLimits(tpm=1000), input_tokens=200, max_output=300)
    hold = await limiter.admit(call)  # reserves 500
    await limiter.admit(call)  # 1000
    with pytest.raises(GatewayError) as refused:
        await limiter.admit(call)
    err = refused.value
    assert err.status == 429 and err.code == "rate_limit_exceeded"
    assert "team 'payments': 1000 tokens per minute" in err.message
    assert err.headers["x-ratelimit-limit-tokens"] == "1000"
    assert err.headers["x-ratelimit-remaining-tokens"] == "0"
    assert err.headers["x-ratelimit-reset-tokens"].endswith("s")
    assert "x-ratelimit-limit-requests" not in err.headers  # the team has no requests/min limit
    hold.settle(Outcome(200, usage=Usage(input_tokens=180, output_tokens=20)))
    hold.settle(Outcome(200, usage=Usage(input_tokens=999)))  # settling twice changes nothing
    # 200 used + 500 reserved: a 300-token request fits, nothing more does.
    await limiter.admit(make_call(team_limits=RateLimits(tpm=1000), input_tokens=100, max_output=200))
    with pytest.raises(GatewayError):
        await limiter.admit(make_call(team_limits=RateLimits(tpm=1000), input_tokens=1, max_output=0))
    # Without max_tokens the model's configured default is reserved.
    call = make_call(
        model_limits=LimitsConfig(tpm=400, default_max_output_tokens=350), input_tokens=60, max_output=None
    )
    with pytest.raises(GatewayError, match="Request too large for model 'gpt-4o-mini'") as too_big:
        await limiter.admit(call)
    assert too_big.value.headers["x-should-retry"] == "false"


async def test_changed_limits_of_a_key_apply_to_its_next_request() -> None:
    """The limiter keeps each principal's scopes; a key whose limits changed comes back from the key
    store as a new principal, and its new limits must apply at once."""
    limiter = RateLimiter(InProcessBackend())
    tight = make_call(key_limits=RateLimits(rpm=1))
    await limiter.admit(tight)
    with pytest.raises(GatewayError, match="1 requests per minute"):
        await limiter.admit(tight)  # the same principal again: its remembered scope still counts
    loose = make_call(key_limits=RateLimits(rpm=3))  # same key id, raised limit
    hold = await limiter.admit(loose)
    assert hold.headers["x-ratelimit-limit-requests"] == "3"
    assert hold.headers["x-ratelimit-remaining-requests"] == "1"  # the first request still counts


async def test_refusal_headers_for_requests() -> None:
    clock = FakeClock()
    clock.now = 1000.25
    limiter = RateLimiter(InProcessBackend(clock=clock))
    call = make_call(key_limits=RateLimits(rpm=2, tpm=5000))
    await limiter.admit(call)
    await limiter.admit(call)
    with pytest.raises(GatewayError) as refusal:
        await limiter.admit(call)
    err = refusal.value
    assert err.message.startswith("Rate limit reached for key 'ci': 2 requests per minute.")
    assert err.retry_after == 61  # 60.75 s, rounded up
    assert err.headers["x-ratelimit-limit-requests"] == "2"
    assert err.headers["x-ratelimit-remaining-requests"] == "0"
    assert err.headers["x-ratelimit-reset-requests"] == "1m0.75s"
    assert err.headers["x-ratelimit-remaining-tokens"] == "4700"


async def test_admitted_requests_carry_the_tightest_scopes_headers() -> None:
    clock = FakeClock()
    limiter = RateLimiter(InProcessBackend(clock=clock))
    call = make_call(
        key_limits=RateLimits(rpm=10, tpm=100_000),
        team_limits=RateLimits(rpm=1000, tpm=1000),
        input_tokens=200,
        max_output=100,
    )
    hold = await limiter.admit(call)
    assert dict(hold.headers) == {
        "x-ratelimit-limit-requests": "10",  # the key's 10/min is tighter than the team's 1000
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "1m1s",
        "x-ratelimit-limit-tokens": "1000",  # the team's 1000 tokens/min is tighter than the key's
        "x-ratelimit-remaining-tokens": "700",
        "x-ratelimit-reset-tokens": "1m1s",
    }
    only_rpm = await limiter.admit(make_call(key_limits=RateLimits(rpm=5), key_id="key_2"))
    assert only_rpm.headers["x-ratelimit-remaining-requests"] == "4"
    assert "x-ratelimit-limit-tokens" not in only_rpm.headers


def test_service_validates_limits(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/plinth.db")
    db.migrate()
    service = TenancyService(db)
    team = service.create_team(service.create_org("o").id, "payments", rpm_limit=10)
    with pytest.raises(TenancyError, match="rpm_limit must be a whole number of at least 1"):
        service.create_key(team.id, "ci", rpm_limit=0)
    key = service.create_key(team.id, "ci", tpm_limit=5000).key
    assert (key.rpm_limit, key.tpm_limit, key.max_concurrency) == (None, 5000, None)
    rotated = service.rotate_key(key.id).key
    assert rotated.tpm_limit == 5000


# --- through a real gateway ------------------------------------------------------------------------

USER = "sk-user-limits-0123456789abcdef"


def limited_config(upstream: OpenAIUpstream, **limits: int) -> dict[str, Any]:
    return {
        "models": [
            {"name": "gpt-4o-mini", "deployments": [openai_deployment(upstream.url)], "limits": limits}
        ],
        "keys": [{"name": "team-a", "key": USER}],
    }


async def test_keys_declared_in_the_config_file_have_their_own_limits(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream
) -> None:
    config = {
        "models": [{"name": "gpt-4o-mini", "deployments": [openai_deployment(openai_upstream.url)]}],
        "keys": [
            {"name": "batch-job", "key": USER, "limits": {"rpm": 1}},
            {"name": "other", "key": USER + "-other"},
        ],
    }
    gw = gateway_factory(config)
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=gw.url) as http:
        limited = {"authorization": f"Bearer {USER}"}
        assert (await http.post("/v1/chat/completions", json=chat, headers=limited)).status_code == 200
        reply = await http.post("/v1/chat/completions", json=chat, headers=limited)
        assert reply.status_code == 429
        assert "key 'batch-job': 1 requests per minute" in reply.json()["error"]["message"]
        other = await http.post(
            "/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {USER}-other"}
        )
        assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers


def test_config_key_limits_are_validated() -> None:
    with pytest.raises(ValidationError, match="rpm"):
        PlinthConfig.model_validate({"keys": [{"name": "a", "key": "k", "limits": {"rpm": 0}}]})
    with pytest.raises(ValidationError, match="rpx"):
        PlinthConfig.model_validate({"keys": [{"name": "a", "key": "k", "limits": {"rpx": 5}}]})


async def test_429_in_openai_and_anthropic_shapes(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream
) -> None:
    gw = gateway_factory(limited_config(openai_upstream, rpm=2, tpm=100_000))
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    async with httpx.AsyncClient(base_url=gw.url, headers={"authorization": f"Bearer {USER}"}) as http:
        first = await http.post("/v1/chat/completions", json=chat)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-requests"] == "2"  # on success too, like OpenAI's
        assert first.headers["x-ratelimit-remaining-requests"] == "1"
        assert 100_000 - 20 - 50 < int(first.headers["x-ratelimit-remaining-tokens"]) < 100_000 - 20
        streamed = await http.post("/v1/chat/completions", json={**chat, "stream": True})
        assert streamed.status_code == 200 and streamed.headers["x-ratelimit-remaining-requests"] == "0"
        reply = await http.post("/v1/chat/completions", json=chat)
        assert reply.status_code == 429
        error = reply.json()["error"]
        assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
        assert "model 'gpt-4o-mini': 2 requests per minute" in error["message"]
        assert 55 <= int(reply.headers["retry-after"]) <= 61
        assert reply.headers["x-ratelimit-limit-requests"] == "2"
        assert reply.headers["x-ratelimit-remaining-requests"] == "0"
        assert reply.headers["x-ratelimit-reset-requests"].endswith("s")
        assert reply.headers["x-ratelimit-limit-tokens"] == "100000"
        assert "x-ratelimit-remaining-tokens" in reply.headers and "x-ratelimit-reset-tokens" in reply.headers
        anthropic = await http.post(
            "/v1/messages",
            json={"model": "gpt-4o-mini", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": USER, "anthropic-version": "2023-06-01"},
        )
        assert anthropic.status_code == 429
        body = anthropic.json()
        assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"
        assert "model 'gpt-4o-mini'" in body["error"]["message"]
        assert anthropic.headers["x-ratelimit-limit-requests"] == "2" and "retry-after" in anthropic.headers
    assert len(openai_upstream.requests) == 2  # refused requests never went upstream


async def test_concurrency_limit_through_the_gateway(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream
) -> None:
    from mocks.openai_upstream import Reply, completion

    gw = gateway_factory(limited_config(openai_upstream, max_concurrency=1))
    openai_upstream.queue(Reply(body=completion(), delay_s=0.5))
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=gw.url, headers={"authorization": f"Bearer {USER}"}) as http:
        slow = asyncio.create_task(http.post("/v1/chat/completions", json=chat))
        await wait_for(lambda: len(openai_upstream.requests) == 1)
        busy = await http.post("/v1/chat/completions", json=chat)
        assert busy.status_code == 429 and "Concurrency limit reached for model 'gpt-4o-mini'" in busy.text
        assert (await slow).status_code == 200
        assert (await http.post("/v1/chat/completions", json=chat)).status_code == 200  # slot released


async def test_key_and_team_limits_set_through_the_service_reach_the_gateway(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path}/plinth.db"
    gw = gateway_factory(
        {
            "storage": {"url": url, "key_refresh_s": 0.05},
            "models": [{"name": "gpt-4o-mini", "deployments": [openai_deployment(openai_upstream.url)]}],
        }
    )
    service = TenancyService(Database(url))
    team = service.create_team(service.create_org("acme").id, "payments")
    key = service.create_key(team.id, "ci")
    other = service.create_key(team.id, "nightly")
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}

    async def post(secret: str) -> httpx.Response:
        async with httpx.AsyncClient(base_url=gw.url) as http:
            return await http.post(
                "/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {secret}"}
            )

    service.set_key_limits(key.key.id, rpm_limit=1, tpm_limit=None, max_concurrency=None)
    await asyncio.sleep(0.3)  # a few refresh intervals
    assert (await post(key.secret)).status_code == 200
    refused = await post(key.secret)
    assert refused.status_code == 429 and "key 'ci'" in refused.json()["error"]["message"]
    assert (await post(other.secret)).status_code == 200  # another key of the team: unaffected

    service.set_team_limits(team.id, rpm_limit=2, tpm_limit=None, max_concurrency=None)
    await asyncio.sleep(0.3)
    # Counting starts with the limit: requests admitted before it are not in the team's window.
    assert (await post(other.secret)).status_code == 200
    assert (await post(other.secret)).status_code == 200
    refused = await post(other.secret)
    assert refused.status_code == 429 and "team 'payments'" in refused.json()["error"]["message"]

    service.set_key_limits(key.key.id, rpm_limit=None, tpm_limit=None, max_concurrency=None)
    service.set_team_limits(team.id, rpm_limit=None, tpm_limit=None, max_concurrency=None)
    await asyncio.sleep(0.3)
    assert (await post(key.secret)).status_code == 200


# --- start-up check ----------------------------------------------------------------------------------


def test_several_workers_without_redis_refuse_to_start(tmp_path: Path) -> None:
    config = tmp_path / "plinth.yaml"
    config.write_text(
        f"storage: {{url: 'sqlite:///{tmp_path}/p.db'}}\n"
        "models:\n  - name: m\n    limits: {rpm: 10}\n"
        "    deployments: [{provider: openai, model: gpt-4o-mini, api_key: sk-x}]\n"
    )
    env = {**os.environ, "PLINTH_ADMIN_KEY": ADMIN_KEY}
    command = [sys.executable, "-m", "plinth", "serve", "--config", str(config), "--workers", "2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "limits or budgets are set (model 'm')" in done.stderr and "redis.url" in done.stderr

    parsed = __import__("plinth.config", fromlist=["load_config"]).load_config(config)
    assert exactness_problem(parsed, 1) is None
    db = Database(f"sqlite:///{tmp_path}/p.db")
    db.migrate()
    service = TenancyService(db)
    team = service.create_team(service.create_org("o").id, "payments", max_concurrency=3)
    no_model_limits = parsed.model_copy(update={"models": []})
    problem = exactness_problem(no_model_limits, 4, db)
    assert problem is not None and "team 'payments'" in problem and "4 worker" in problem
    service.set_team_limits(team.id, rpm_limit=None, tpm_limit=None, max_concurrency=None)
    assert exactness_problem(no_model_limits, 4, db) is None
    BudgetService(db).set_budget("team", team.id, "month", limit_usd=100.0)
    problem = exactness_problem(no_model_limits, 2, db)
    assert problem is not None and "budget 'team:month'" in problem


# --- the must-show: exact across processes ---------------------------------------------------------


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


@needs_redis
async def test_burst_across_two_processes_admits_exactly_the_limit(
    database_url: str, openai_upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    config = tmp_path / "plinth.yaml"
    config.write_text(
        f"storage: {{url: '{database_url}', key_refresh_s: 0.1}}\n"
        f"redis: {{url: '{REDIS_URL}'}}\n"
        "models:\n  - name: gpt-4o-mini\n"
        f"    deployments: [{{provider: openai, model: gpt-4o-mini, base_url: '{openai_upstream.url}', "
        "api_key: sk-upstream}]\n"
    )
    db = Database(database_url)
    db.migrate()
    service = TenancyService(db)
    team = service.create_team(service.create_org("o").id, "payments")
    created = service.create_key(team.id, "ci", rpm_limit=100)
    env = {**os.environ, "PLINTH_ADMIN_KEY": ADMIN_KEY}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    ports = [_free_port(), _free_port()]

    def serve(port: int) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "plinth", "serve", "--config", str(config), "--port", str(port)]
        command += ["--workers", "2", "--log-level", "warning"]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    procs = [serve(port) for port in ports]
    headers = {"authorization": f"Bearer {created.secret}"}
    try:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=30, limits=limits) as http:
            for port in ports:
                for _ in range(600):
                    try:
                        models = await http.get(f"http://127.0.0.1:{port}/v1/models", headers=headers)
                        if models.status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"plinth serve on port {port} never accepted the key")
            chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
            started = time.monotonic()
            replies = await asyncio.gather(
                *(
                    http.post(
                        f"http://127.0.0.1:{ports[i % 2]}/v1/chat/completions", json=chat, headers=headers
                    )
                    for i in range(600)
                )
            )
            elapsed = time.monotonic() - started
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    per_port = {p: {"admitted": 0, "refused": 0} for p in ports}
    for i, reply in enumerate(replies):
        per_port[ports[i % 2]]["admitted" if reply.status_code == 200 else "refused"] += 1
    admitted = sum(r.status_code == 200 for r in replies)
    refused = sum(r.status_code == 429 for r in replies)
    print(
        f"\n600-request burst, key limit 100 requests/min, 2 processes x 2 workers ({database_url.split(':')[0]}):"
        f" admitted {admitted}, refused {refused} (429), other {600 - admitted - refused};"
        f" per process {per_port}; {elapsed:.2f}s"
    )
    assert refused + admitted == 600
    assert abs(admitted - 100) <= 1
    assert all(r.headers.get("x-ratelimit-limit-requests") == "100" for r in replies if r.status_code == 429)
