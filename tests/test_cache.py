"""Response caches: exact and semantic, per team, opt-in per key or request, through a real gateway."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from openai import AsyncOpenAI
from prometheus_client import REGISTRY

from conftest import REDIS_URL, USER_KEY, GatewayServer, needs_redis, openai_deployment, wait_for
from mocks import anthropic_upstream as am
from mocks.anthropic_upstream import AnthropicUpstream
from mocks.openai_upstream import OpenAIUpstream, Reply, completion
from plinth.cache import ResponseCache, canonical
from plinth.cache.backends import MemoryBackend, RedisBackend
from plinth.cache.service import best_match
from plinth.config.schema import CacheConfig
from plinth.providers.types import (
    ChatChoice,
    ChatRequest,
    ChatResponse,
    Message,
    TextPart,
    ThinkingPart,
    ToolCall,
    Usage,
)
from plinth.storage import Database
from plinth.tenancy import Principal
from plinth.tenancy.service import TenancyService

EXACT = {"x-plinth-cache": "exact"}
SEMANTIC = {"x-plinth-cache": "semantic"}


def _config(upstream: OpenAIUpstream, db: str | None = None, **cache: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "models": [{"name": "gpt-4o-mini", "deployments": [openai_deployment(upstream.url)]}],
        "keys": [
            {"name": "team-a", "key": USER_KEY},
            {"name": "always", "key": "sk-always-cached-0001", "cache": "exact"},
        ],
        "cache": cache,
    }
    if db is not None:
        config["storage"] = {"url": db}
    return config


def _client(server: GatewayServer, key: str = USER_KEY) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def _cache(server: GatewayServer) -> ResponseCache:
    cache = server.app.state.cache
    assert isinstance(cache, ResponseCache)
    return cache


async def _settled(server: GatewayServer, timeout: float = 5.0) -> None:
    """Cache writes run in the background: wait for them before expecting a hit."""
    cache = _cache(server)
    await wait_for(lambda: cache.pending_writes == 0, timeout)


async def _ask(
    server: GatewayServer, content: str, headers: dict[str, str] | None = None, key: str = USER_KEY, **kw: Any
) -> tuple[str, str | None]:
    # Closed each time: a client left to the garbage collector closes its socket whenever GC runs,
    # and a later connection reusing that file descriptor can lose its event-loop registration
    # (seen once in CI: a response received but never read, until the 600 s timeout).
    async with _client(server, key) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": content}], extra_headers=headers, **kw
        )
    answer = raw.parse()
    await _settled(server)
    return answer.choices[0].message.content or "", raw.headers.get("x-plinth-cache")


def _team_keys(db_url: str, *teams: str, **key_args: Any) -> list[str]:
    """One database key per team name, created before the gateway starts."""
    db = Database(db_url)
    db.migrate()
    tenancy = TenancyService(db)
    org = tenancy.create_org("Acme")
    secrets = []
    for name in teams:
        team = tenancy.create_team(org.id, name)
        secrets.append(tenancy.create_key(team.id, f"{name}-key", **key_args).secret)
    db.dispose()
    return secrets


# --- exact cache through the gateway -----------------------------------------------------------


def _lookups(mode: str, result: str) -> float:
    """The Prometheus counter (the gateway under test runs in this process)."""
    value = REGISTRY.get_sample_value("plinth_cache_lookups_total", {"mode": mode, "result": result})
    return value or 0.0


async def test_exact_hit_calls_the_upstream_once(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(_config(openai_upstream))
    hits, misses = _lookups("exact", "hit_exact"), _lookups("exact", "miss")
    assert await _ask(server, "hello", EXACT) == ("echo: hello", "miss")
    assert await _ask(server, "hello", EXACT) == ("echo: hello", "hit")
    assert len(openai_upstream.requests) == 1
    assert (_lookups("exact", "hit_exact"), _lookups("exact", "miss")) == (hits + 1, misses + 1)
    # Different sampling parameters are a different question; without the header, no cache at all.
    assert await _ask(server, "hello", EXACT, temperature=0.3) == ("echo: hello", "miss")
    assert await _ask(server, "hello") == ("echo: hello", None)
    assert await _ask(server, "hello", {"x-plinth-cache": "off"}) == ("echo: hello", None)
    assert len(openai_upstream.requests) == 4
    # n > 1 is answered but never cached.
    assert (await _ask(server, "hello", EXACT, n=2))[1] == "bypass"


async def test_bad_cache_headers_are_400(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(_config(openai_upstream))
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    auth = {"authorization": f"Bearer {USER_KEY}"}
    async with httpx.AsyncClient(base_url=server.url) as http:
        for headers in ({"x-plinth-cache": "fuzzy"}, {**EXACT, "x-plinth-cache-ttl": "-1"}):
            resp = await http.post("/v1/chat/completions", json=body, headers={**auth, **headers})
            assert resp.status_code == 400 and "x-plinth-cache" in resp.json()["error"]["message"]
    assert openai_upstream.requests == []


async def test_ttl_expiry(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(_config(openai_upstream))
    short = {**EXACT, "x-plinth-cache-ttl": "0.5"}
    assert (await _ask(server, "brief", short))[1] == "miss"
    assert (await _ask(server, "brief", short))[1] == "hit"
    await asyncio.sleep(0.6)
    assert (await _ask(server, "brief", short))[1] == "miss"
    assert len(openai_upstream.requests) == 2


async def test_streamed_answer_is_cached_and_replayed_to_the_openai_sdk(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(_config(openai_upstream))
    client = _client(server)

    async def stream() -> tuple[str, str | None, Any]:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "stream me"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=EXACT,
        )
        text, usage = "", None
        async for chunk in raw.parse():
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            usage = chunk.usage or usage
        await _settled(server)
        return text, raw.headers.get("x-plinth-cache"), usage

    first = await stream()
    second = await stream()
    await client.close()
    assert first[:2] == ("echo: ok", "miss") and second[:2] == ("echo: ok", "hit")
    assert second[2] is not None and second[2].total_tokens == first[2].total_tokens == 7
    # The same question unstreamed is the same entry.
    assert await _ask(server, "stream me", EXACT) == ("echo: ok", "hit")
    assert len(openai_upstream.requests) == 1


@pytest.fixture
async def anthropic_upstream() -> AsyncIterator[AnthropicUpstream]:
    upstream = await AnthropicUpstream().start()
    yield upstream
    await upstream.close()


async def test_streamed_thinking_and_tool_use_replay_to_the_anthropic_sdk(
    gateway_factory: Callable[..., GatewayServer], anthropic_upstream: AnthropicUpstream
) -> None:
    config = {
        "models": [
            {
                "name": "claude",
                "deployments": [
                    {
                        "provider": "anthropic",
                        "model": "claude-sonnet-4-5",
                        "base_url": anthropic_upstream.url,
                        "api_key": "sk-ant-upstream",
                    }
                ],
            }
        ],
        "keys": [{"name": "team-a", "key": USER_KEY}],
    }
    server = gateway_factory(config)
    reply = am.message(
        [
            {"type": "thinking", "thinking": "Look it up.", "signature": "sig-xyz"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Tromsø"}},
        ],
        stop_reason="tool_use",
        usage_=am.usage(input_tokens=30, output_tokens=15),
    )
    anthropic_upstream.queue(am.Reply(body=reply))
    client = anthropic.AsyncAnthropic(base_url=server.url, api_key=USER_KEY, max_retries=0)
    tool = {"name": "get_weather", "input_schema": {"type": "object", "properties": {}}}

    async def ask() -> tuple[Any, str | None]:
        async with client.messages.stream(
            model="claude",
            max_tokens=4096,
            thinking={"type": "enabled", "budget_tokens": 2048},
            tools=[tool],  # type: ignore[list-item]
            messages=[{"role": "user", "content": "weather?"}],
            extra_headers=EXACT,
        ) as stream:
            header = stream.response.headers.get("x-plinth-cache")
            final = await stream.get_final_message()
        await _settled(server)
        return final, header

    first, miss = await ask()
    second, hit = await ask()
    assert (miss, hit) == ("miss", "hit")
    assert len(anthropic_upstream.requests) == 1
    assert [b.model_dump() for b in second.content] == [b.model_dump() for b in first.content]
    assert [b.type for b in second.content] == ["thinking", "text", "tool_use"]
    assert second.stop_reason == "tool_use" and second.usage.output_tokens == 15


# --- tenancy: partitions and key-level opt-in --------------------------------------------------


async def test_teams_never_share_answers_and_hits_cost_nothing(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    db_path = tmp_path / "plinth.db"
    a1, b = _team_keys(f"sqlite:///{db_path}", "team-a", "team-b", rpm_limit=1)
    server = gateway_factory(_config(openai_upstream, f"sqlite:///{db_path}"))
    openai_upstream.queue(Reply(body=completion("A's secret answer")))
    assert await _ask(server, "same question", EXACT, key=a1) == ("A's secret answer", "miss")
    # rpm_limit=1: a hit reserves nothing, so team A's key still gets its cached answers.
    for _ in range(3):
        assert await _ask(server, "same question", EXACT, key=a1) == ("A's secret answer", "hit")
    assert await _ask(server, "same question", EXACT, key=b) == ("echo: same question", "miss")
    # A config key is its own partition.
    assert await _ask(server, "same question", EXACT) == ("echo: same question", "miss")
    assert len(openai_upstream.requests) == 3

    server.stop()  # flushes the usage records
    conn = sqlite3.connect(db_path)
    rows = conn.execute("SELECT cache_hit, cost_usd, input_tokens FROM usage_records ORDER BY id").fetchall()
    conn.close()
    assert len(rows) == 6
    hits = [r for r in rows if r[0]]
    assert len(hits) == 3 and all(cost == 0 and tokens == 10 for _, cost, tokens in hits)
    assert all(cost > 0 for hit, cost, _ in rows if not hit)


async def test_key_metadata_opts_in(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path}/plinth.db"
    (secret,) = _team_keys(db, "team-c", metadata={"cache": "exact"})
    server = gateway_factory(_config(openai_upstream, db))
    for key in (secret, "sk-always-cached-0001"):  # a database key and a config key
        assert (await _ask(server, "q", key=key))[1] == "miss"
        assert (await _ask(server, "q", key=key))[1] == "hit"
        assert (await _ask(server, "q", {"x-plinth-cache": "off"}, key=key))[1] is None
    assert len(openai_upstream.requests) == 4


# --- semantic cache with the real local model --------------------------------------------------


async def test_semantic_hit_for_a_paraphrase_only(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream
) -> None:
    pytest.importorskip("torch")
    server = gateway_factory(_config(openai_upstream, semantic_threshold=0.9))

    async def ask(question: str, system: str = "Be brief.") -> tuple[str, str | None]:
        async with _client(server) as client:
            raw = await client.chat.completions.with_raw_response.create(
                model="gpt-4o-mini",
                messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                extra_headers=SEMANTIC,
            )
        await _settled(server, timeout=120)  # the first write loads the model
        return raw.parse().choices[0].message.content or "", raw.headers.get("x-plinth-cache")

    openai_upstream.queue(Reply(body=completion("Paris.")))
    semantic_hits = _lookups("semantic", "hit_semantic")
    assert await ask("What is the capital of France?") == ("Paris.", "miss")
    assert await ask("what's the capital city of France?") == ("Paris.", "hit")
    assert _lookups("semantic", "hit_semantic") == semantic_hits + 1
    assert (await ask("How do I bake sourdough bread?"))[1] == "miss"
    assert (await ask("What is the capital of Germany?"))[1] == "miss"
    # Another system prompt is another bucket, however similar the question.
    assert (await ask("what's the capital city of France?", system="Answer in French."))[1] == "miss"
    assert len(openai_upstream.requests) == 4


# --- Redis backend -----------------------------------------------------------------------------


@needs_redis
async def test_redis_backend_through_the_gateway(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream
) -> None:
    config = {**_config(openai_upstream), "redis": {"url": REDIS_URL}}
    one, two = gateway_factory(config), gateway_factory(config)  # two processes' worth of caches
    question = f"redis question {uuid.uuid4()}"
    assert await _ask(one, question, EXACT) == (f"echo: {question}", "miss")
    assert await _ask(two, question, EXACT) == (f"echo: {question}", "hit")
    assert await _ask(one, question, EXACT, key="sk-always-cached-0001") == (f"echo: {question}", "miss")
    assert len(openai_upstream.requests) == 2


@needs_redis
async def test_redis_semantic_candidates_and_expiry() -> None:
    assert REDIS_URL is not None
    backend = RedisBackend(REDIS_URL, scan=3, prefix=f"plinth:test:{uuid.uuid4().hex}:")
    try:
        near, far = _unit([1, 0.1, 0]), _unit([0, 1, 0])
        key = "ab" * 32
        await backend.put(key, b"answer", 60)
        await backend.add_candidate("bucket", key, near, 60)
        await backend.add_candidate("bucket", "cd" * 32, far, 0.05)
        await asyncio.sleep(0.1)
        candidates = await backend.candidates("bucket")
        assert candidates == [(key, near)]  # the expired one is skipped
        match = best_match(_unit([1, 0, 0]), candidates, 0.95)
        assert match is not None and match[0] == key and match[1] == pytest.approx(0.995, abs=1e-3)
        assert await backend.get(key) == b"answer"
        for i in range(5):
            await backend.add_candidate("bucket", f"{i:02d}" * 32, far, 60)
        assert len(await backend.candidates("bucket")) == 3  # trimmed to `scan`
    finally:
        await backend.aclose()


# --- units -------------------------------------------------------------------------------------


def _unit(values: list[float]) -> bytes:
    from array import array

    norm = sum(v * v for v in values) ** 0.5
    return array("f", [v / norm for v in values]).tobytes()


def _chat(text: str = "hi", **kw: Any) -> ChatRequest:
    return ChatRequest(model="m", messages=[Message("user", [TextPart(text)])], **kw)


def test_exact_key_covers_what_changes_the_answer() -> None:
    base = canonical.exact_key("team:a", "m", _chat())
    assert base == canonical.exact_key("team:a", "m", _chat(stream=True, user="u1", include_usage=True))
    assert base != canonical.exact_key("team:b", "m", _chat())
    assert base != canonical.exact_key("team:a", "m2", _chat())
    assert base != canonical.exact_key("team:a", "m", _chat(temperature=0.5))
    assert base != canonical.exact_key("team:a", "m", _chat(stop=["x"]))
    assert base != canonical.exact_key("team:a", "m", _chat("hi!"))


def test_semantic_bucket_and_text() -> None:
    def chat(system: str, text: str) -> ChatRequest:
        return ChatRequest("m", [Message("system", [TextPart(system)]), Message("user", [TextPart(text)])])

    assert canonical.semantic_bucket("p", "m", chat("s", "a")) == canonical.semantic_bucket(
        "p", "m", chat("s", "b")
    )
    assert canonical.semantic_bucket("p", "m", chat("s", "a")) != canonical.semantic_bucket(
        "p", "m", chat("t", "a")
    )
    assert canonical.semantic_text(chat("s", " question "), 100) == "question"
    assert canonical.semantic_text(chat("s", "x" * 101), 100) is None  # too long: exact only


def test_serialization_and_stream_replay_round_trip() -> None:
    message = Message(
        "assistant",
        [ThinkingPart("hmm", "sig"), TextPart("Let me check.")],
        [ToolCall("call_1", "lookup", '{"q": 1}'), ToolCall("call_2", "other", "{}")],
    )
    response = ChatResponse(
        "chatcmpl-1", "gpt", 123, [ChatChoice(0, message, "tool_calls")], Usage(10, 5, cached_input_tokens=2)
    )
    assert canonical.loads(canonical.dumps(response)) == response
    assembler = canonical.StreamAssembler()
    for event in canonical.replay_events(response):
        assembler.add(event)
    assert assembler.response(canonical.replay_stream(response)) == response
    incomplete = canonical.StreamAssembler()
    for event in canonical.replay_events(response)[:-2]:  # no finish, no usage
        incomplete.add(event)
    assert incomplete.response(canonical.replay_stream(response)) is None
    assert not canonical.cacheable(
        ChatResponse("x", "m", 1, [ChatChoice(0, message, "content_filter")], Usage())
    )


async def test_memory_backend_is_bounded() -> None:
    backend = MemoryBackend(max_entries=2, scan=2)
    for key in ("a", "b", "c"):
        await backend.put(key, key.encode(), 60)
    assert await backend.get("a") is None and await backend.get("c") == b"c"
    for key in ("x", "y", "z"):
        await backend.add_candidate("bucket", key, b"v", 60)
    assert [k for k, _ in await backend.candidates("bucket")] == ["z", "y"]


class _FakeEmbedder:
    ready = True

    def warm(self) -> None:
        pass

    async def embed(self, text: str) -> bytes:
        rng = random.Random(text)  # unrelated texts: nearly orthogonal vectors
        return _unit([rng.gauss(0, 1) for _ in range(384)])


async def test_lookup_cost() -> None:
    """Measured cost of a lookup on the in-process backend (see docs/caching.md)."""
    config = CacheConfig(semantic_threshold=0.95)
    principal = Principal(name="k", team_id="t")
    chat = ChatRequest(
        "m",
        [
            Message("system", [TextPart("You are helpful. " * 20)]),
            Message("user", [TextPart("question " * 30)]),
        ],
    )
    response = ChatResponse(
        "id", "m", 1, [ChatChoice(0, Message("assistant", [TextPart("a" * 500)]))], Usage(1, 1)
    )
    for mode, headers in (("exact", EXACT), ("semantic", SEMANTIC)):
        cache = ResponseCache(config, MemoryBackend(10_000, config.semantic_scan), _FakeEmbedder())
        plan = cache.plan(headers, principal, chat)
        assert plan is not None and await cache.lookup(plan) is None
        cache.store(plan, response)
        await cache.drain()
        for i in range(config.semantic_scan):  # a full bucket to scan
            other = cache.plan(headers, principal, _chat(f"other question {i}"))
            assert other is not None
            await cache.lookup(other)
            cache.store(other, response)
        await cache.drain()
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(200):
                miss = cache.plan(headers, principal, _chat("never asked before"))
                assert miss is not None
                await cache.lookup(miss)
            best = min(best, (time.perf_counter() - started) / 200)
        hit = cache.plan(headers, principal, chat)
        assert hit is not None and await cache.lookup(hit) == response
        print(f"{mode} miss lookup (fake embedder, {config.semantic_scan} candidates): {best * 1e6:.1f} us")
        assert best < 0.005
    assert cache.plan({}, principal, chat) is None  # not asked: no work at all
