"""Routing: strategies, retries on retryable errors only, cooldown, timeouts, stream fallback."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from conftest import ADMIN_KEY, GatewayServer, openai_deployment
from mocks.openai_upstream import OpenAIUpstream, Reply, completion, text_stream
from plinth.config import RoutingConfig, parse_config
from plinth.providers.http import HttpClient
from plinth.routing import Router
from plinth.routing.router import backoff_delay


@pytest.fixture
async def second_upstream() -> AsyncIterator[OpenAIUpstream]:
    upstream = await OpenAIUpstream().start()
    yield upstream
    await upstream.close()


def two_deployments(a: str, b: str, routing: dict[str, Any] | None = None, **a_extra: Any) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "gpt-4o-mini",
                "routing": routing or {},
                "deployments": [
                    openai_deployment(a, name="primary", priority=0, **a_extra),
                    openai_deployment(b, name="secondary", priority=1),
                ],
            }
        ]
    }


def client(server: GatewayServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=ADMIN_KEY, max_retries=0)


def closed_port_url() -> str:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connections are refused
    return f"http://127.0.0.1:{port}/v1"


async def ask(server: GatewayServer, **kwargs: Any) -> Any:
    return await client(server).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], **kwargs
    )


async def test_priority_fallback_on_server_error(
    gateway_factory: Any, openai_upstream: OpenAIUpstream, second_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(two_deployments(openai_upstream.url, second_upstream.url))
    openai_upstream.queue(Reply(status=503, body={"error": {"message": "overloaded"}}))
    raw = await ask(server)
    assert raw.headers["x-plinth-deployment"] == "secondary"
    assert raw.parse().choices[0].message.content == "echo: hi"
    assert len(openai_upstream.requests) == 1 and len(second_upstream.requests) == 1


async def test_no_retry_on_client_error(
    gateway_factory: Any, openai_upstream: OpenAIUpstream, second_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(two_deployments(openai_upstream.url, second_upstream.url))
    openai_upstream.queue(Reply(status=400, body={"error": {"message": "bad image"}}))
    with pytest.raises(openai.BadRequestError, match="bad image"):
        await ask(server)
    assert len(openai_upstream.requests) == 1 and second_upstream.requests == []


async def test_retries_same_deployment_with_backoff_until_success(
    gateway_factory: Any, openai_upstream: OpenAIUpstream
) -> None:
    config = {
        "models": [
            {
                "name": "gpt-4o-mini",
                "routing": {"retries": 2, "backoff_base_s": 0.01, "allowed_fails": 10},
                "deployments": [openai_deployment(openai_upstream.url)],
            }
        ]
    }
    server = gateway_factory(config)
    openai_upstream.queue(
        Reply(status=429, body={"error": {"message": "slow down"}}),
        Reply(status=500, body={"error": {"message": "oops"}}),
    )
    raw = await ask(server)
    assert raw.parse().choices[0].message.content == "echo: hi"
    assert len(openai_upstream.requests) == 3


async def test_retries_exhausted_returns_last_error(
    gateway_factory: Any, openai_upstream: OpenAIUpstream
) -> None:
    config = {
        "models": [
            {
                "name": "gpt-4o-mini",
                "routing": {"retries": 1, "backoff_base_s": 0.01},
                "deployments": [openai_deployment(openai_upstream.url)],
            }
        ]
    }
    server = gateway_factory(config)
    openai_upstream.queue(
        *[Reply(status=429, body={"error": {"message": "slow down"}}, headers={"retry-after": "0"})] * 2
    )
    with pytest.raises(openai.RateLimitError) as info:
        await ask(server)
    assert "retry-after" in info.value.response.headers
    assert len(openai_upstream.requests) == 2


async def test_failing_deployment_cools_down(
    gateway_factory: Any, openai_upstream: OpenAIUpstream, second_upstream: OpenAIUpstream
) -> None:
    routing = {"allowed_fails": 1, "cooldown_s": 60}
    server = gateway_factory(two_deployments(openai_upstream.url, second_upstream.url, routing))
    openai_upstream.queue(Reply(status=500, body={"error": {"message": "down"}}))
    await ask(server)
    for _ in range(3):
        raw = await ask(server)
        assert raw.headers["x-plinth-deployment"] == "secondary"
    assert len(openai_upstream.requests) == 1  # resting: no traffic after its failure


async def test_connect_error_and_timeout_fall_back(
    gateway_factory: Any, openai_upstream: OpenAIUpstream, second_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(two_deployments(closed_port_url(), second_upstream.url))
    assert (await ask(server)).headers["x-plinth-deployment"] == "secondary"

    slow = gateway_factory(two_deployments(openai_upstream.url, second_upstream.url, timeout_s=0.2))
    openai_upstream.queue(Reply(body={}, delay_s=1.0))
    raw = await ask(slow)
    assert raw.headers["x-plinth-deployment"] == "secondary"


async def test_stream_falls_back_before_first_byte(
    gateway_factory: Any, openai_upstream: OpenAIUpstream, second_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(two_deployments(openai_upstream.url, second_upstream.url))
    openai_upstream.queue(Reply(status=502, body={"error": {"message": "bad gateway"}}))
    second_upstream.queue(Reply(stream=text_stream("from ", "secondary")))
    raw = await client(server).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert raw.headers["x-plinth-deployment"] == "secondary"
    text = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
    assert text == "from secondary"

    # An upstream that accepts the stream, then dies before sending any event, also falls back.
    openai_upstream.queue(Reply(stream=text_stream("never"), error_after=0))
    raw = await client(server).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert raw.headers["x-plinth-deployment"] == "secondary"


async def test_lowest_latency_prefers_the_fast_deployment(
    gateway_factory: Any, openai_upstream: OpenAIUpstream, second_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(
        two_deployments(openai_upstream.url, second_upstream.url, {"strategy": "latency"})
    )
    openai_upstream.queue(*[Reply(body=_ok(), delay_s=0.05) for _ in range(20)])
    for _ in range(4):  # both get measured
        await ask(server)
    used = Counter([(await ask(server)).headers["x-plinth-deployment"] for _ in range(10)])
    assert used["secondary"] == 10


async def test_least_busy_spreads_concurrent_requests(
    gateway_factory: Any, openai_upstream: OpenAIUpstream, second_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(
        two_deployments(openai_upstream.url, second_upstream.url, {"strategy": "least_busy"})
    )
    openai_upstream.queue(*[Reply(body=_ok(), delay_s=0.2) for _ in range(8)])
    second_upstream.queue(*[Reply(body=_ok(), delay_s=0.2) for _ in range(8)])
    results = await asyncio.gather(*(ask(server) for _ in range(8)))
    used = Counter(r.headers["x-plinth-deployment"] for r in results)
    assert used["primary"] == 4 and used["secondary"] == 4


def _ok() -> dict[str, Any]:
    return completion("ok")


def _router(strategy: str, weights: tuple[float, ...] = (1.0, 1.0)) -> Router:
    config = parse_config(
        {
            "models": [
                {
                    "name": "m",
                    "routing": {"strategy": strategy},
                    "deployments": [
                        {"provider": "openai", "model": "m", "name": f"d{i}", "weight": w, "priority": i}
                        for i, w in enumerate(weights)
                    ],
                }
            ]
        }
    )
    return Router(config, HttpClient())


def test_weighted_strategy_follows_weights() -> None:
    route = _router("weighted", (3.0, 1.0)).resolve("m")
    firsts = Counter(route.order()[0].name for _ in range(4000))
    assert 0.70 < firsts["d0"] / 4000 < 0.80


def test_priority_strategy_orders_and_resting_deployments_go_last() -> None:
    route = _router("priority", (1.0, 1.0, 1.0)).resolve("m")
    assert [d.name for d in route.order()] == ["d0", "d1", "d2"]
    route.deployments[0].record_failure(RoutingConfig(allowed_fails=1, cooldown_s=60))
    assert [d.name for d in route.order()] == ["d1", "d2", "d0"]


def test_wildcard_alias_maps_suffix_to_upstream_model() -> None:
    config = parse_config(
        {"models": [{"name": "openai/*", "deployments": [{"provider": "openai", "model": "*"}]}]}
    )
    router = Router(config, HttpClient())
    route = router.resolve("openai/gpt-4.1")
    assert route.upstream_model(route.deployments[0], "openai/gpt-4.1") == "gpt-4.1"
    with pytest.raises(LookupError):
        router.resolve("openai/")


def test_backoff_is_capped_jittered_and_respects_retry_after() -> None:
    routing = RoutingConfig(backoff_base_s=0.1, backoff_max_s=1.0)
    delays = [backoff_delay(5, routing, None) for _ in range(200)]
    assert all(0 <= d <= 1.0 for d in delays) and len(set(delays)) > 100
    assert backoff_delay(0, routing, 0.8) >= 0.8
    assert backoff_delay(0, routing, 30) == 1.0  # never wait past the cap


async def test_bad_credentials_fall_back_without_retrying_the_broken_deployment(
    gateway_factory: Any, openai_upstream: OpenAIUpstream, second_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(two_deployments(openai_upstream.url, second_upstream.url, {"retries": 0}))
    openai_upstream.queue(Reply(status=401, body={"error": {"message": "invalid api key"}}))
    raw = await ask(server)
    assert raw.headers["x-plinth-deployment"] == "secondary"
    assert len(openai_upstream.requests) == 1  # asked once, not retried

    single = gateway_factory(
        {"models": [{"name": "gpt-4o-mini", "deployments": [openai_deployment(openai_upstream.url)]}]}
    )
    openai_upstream.queue(Reply(status=404, body={"error": {"message": "no such model"}}))
    with pytest.raises(openai.APIStatusError) as info:
        await ask(single)
    assert info.value.status_code == 502 and len(openai_upstream.requests) == 2


async def test_backoff_waits_do_not_count_as_plinth_overhead(
    gateway_factory: Any, openai_upstream: OpenAIUpstream
) -> None:
    config = {
        "models": [
            {
                "name": "gpt-4o-mini",
                "routing": {"retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.6},
                "deployments": [openai_deployment(openai_upstream.url)],
            }
        ]
    }
    server = gateway_factory(config)
    openai_upstream.queue(
        Reply(status=429, body={"error": {"message": "wait"}}, headers={"retry-after": "0.5"})
    )
    raw = await ask(server)
    assert len(openai_upstream.requests) == 2
    assert float(raw.headers["x-plinth-overhead-ms"]) < 250  # the 500 ms wait is the upstream's
