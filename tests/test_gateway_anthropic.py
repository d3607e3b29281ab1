"""End-to-end: the official Anthropic SDK → Plinth's `/v1/messages` → Anthropic and OpenAI upstreams.

With an Anthropic upstream Plinth must pass the Messages API through without loss (system blocks
with cache_control, tools, tool results, thinking, images, cache token counts, stop sequences);
with an OpenAI upstream it must translate both ways. Errors come back in Anthropic's own shape, so
the SDK raises its own exception classes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import pytest

from conftest import USER_KEY, GatewayServer, openai_deployment
from mocks import anthropic_upstream as am
from mocks.anthropic_upstream import AnthropicUpstream
from mocks.openai_upstream import OpenAIUpstream, Reply, chunk, completion, text_stream

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture
async def anthropic_upstream() -> AsyncIterator[AnthropicUpstream]:
    upstream = await AnthropicUpstream().start()
    yield upstream
    await upstream.close()


@pytest.fixture
def config(anthropic_upstream: AnthropicUpstream, openai_upstream: OpenAIUpstream) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "claude-sonnet",
                "deployments": [
                    {
                        "provider": "anthropic",
                        "model": "claude-sonnet-4-5",
                        "base_url": anthropic_upstream.url,
                        "api_key": "sk-ant-upstream-secret",
                    }
                ],
                "routing": {"retries": 0},
            },
            {
                "name": "gpt-4o-mini",
                "deployments": [openai_deployment(openai_upstream.url)],
                "routing": {"retries": 0},
            },
        ],
        "keys": [{"name": "team-a", "key": USER_KEY, "models": ["claude-sonnet", "gpt-4o-mini"]}],
    }


def client(server: GatewayServer, key: str = USER_KEY, **kwargs: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key=key, max_retries=0, **kwargs)


# --- Anthropic upstream: native pass-through ---------------------------------------------------


async def test_native_pass_through_of_system_tools_thinking_images_and_cache_usage(
    gateway_factory: Any, config: dict[str, Any], anthropic_upstream: AnthropicUpstream
) -> None:
    server = gateway_factory(config)
    anthropic_upstream.queue(
        am.thinking_reply(
            "Oslo is rainy in spring.",
            "sig-anthropic-1",
            "Take an umbrella.",
            usage_=am.usage(input_tokens=12, output_tokens=9, cache_read=100, cache_creation=20),
        )
    )
    system = [{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}]
    messages: list[Any] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Where is this and what is the weather?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Need the weather.", "signature": "sig-prev"},
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {"city": "Oslo"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "rain", "is_error": False},
                {"type": "text", "text": "And so?"},
            ],
        },
    ]
    raw = await client(server).messages.with_raw_response.create(
        model="claude-sonnet",
        max_tokens=2048,
        system=system,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "auto"},
        thinking={"type": "enabled", "budget_tokens": 1024},
        metadata={"user_id": "u-42"},
        extra_body={"top_k": 5},
    )
    answer = await raw.parse()
    assert raw.headers["request-id"] == raw.headers["x-request-id"]
    assert raw.headers["request-id"].startswith("req_")
    assert answer.model == "claude-sonnet"
    assert [b.type for b in answer.content] == ["thinking", "text"]
    thinking = answer.content[0]
    assert thinking.type == "thinking" and thinking.signature == "sig-anthropic-1"
    assert thinking.thinking == "Oslo is rainy in spring."
    assert answer.content[1].type == "text" and answer.content[1].text == "Take an umbrella."
    assert answer.stop_reason == "end_turn"
    usage = answer.usage
    assert (usage.input_tokens, usage.output_tokens) == (12, 9)
    assert usage.cache_read_input_tokens == 100 and usage.cache_creation_input_tokens == 20

    sent = anthropic_upstream.last
    assert sent.headers["x-api-key"] == "sk-ant-upstream-secret"  # the deployment's key, not the caller's
    assert USER_KEY not in json.dumps(sent.headers)
    body = sent.body
    assert body["model"] == "claude-sonnet-4-5" and body["max_tokens"] == 2048 and body["top_k"] == 5
    assert body["system"] == system
    assert body["tools"] == [WEATHER_TOOL] and body["tool_choice"] == {"type": "auto"}
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert body["metadata"] == {"user_id": "u-42"}
    assert body["messages"][0]["content"][1] == messages[0]["content"][1]
    assert body["messages"][1]["content"] == messages[1]["content"]
    assert body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_01", "content": [{"type": "text", "text": "rain"}]},
        {"type": "text", "text": "And so?"},
    ]


async def test_native_stop_sequence_and_tool_use_stop_reasons(
    gateway_factory: Any, config: dict[str, Any], anthropic_upstream: AnthropicUpstream
) -> None:
    server = gateway_factory(config)
    anthropic_upstream.queue(
        am.text_reply("1, 2, 3", stop_reason="stop_sequence", stop_sequence="4"),
        am.tool_reply("get_weather", {"city": "Bergen"}, id="toolu_77", text="Checking."),
    )
    answer = await client(server).messages.create(
        model="claude-sonnet",
        max_tokens=50,
        stop_sequences=["4"],
        messages=[{"role": "user", "content": "count"}],
    )
    assert answer.stop_reason == "stop_sequence" and answer.stop_sequence == "4"
    assert anthropic_upstream.last.body["stop_sequences"] == ["4"]

    answer = await client(server).messages.create(
        model="claude-sonnet",
        max_tokens=50,
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "weather in Bergen?"}],
    )
    assert answer.stop_reason == "tool_use"
    assert [b.type for b in answer.content] == ["text", "tool_use"]
    use = answer.content[1]
    assert use.type == "tool_use" and use.id == "toolu_77" and use.input == {"city": "Bergen"}


async def test_native_stream_with_thinking_and_tool_use(
    gateway_factory: Any, config: dict[str, Any], anthropic_upstream: AnthropicUpstream
) -> None:
    server = gateway_factory(config)
    reply = am.message(
        [
            {"type": "thinking", "thinking": "Look it up.", "signature": "sig-xyz"},
            {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Tromsø"}},
        ],
        stop_reason="tool_use",
        usage_=am.usage(input_tokens=30, output_tokens=15, cache_read=8),
    )
    anthropic_upstream.queue(am.Reply(body=reply))
    deltas: list[str] = []
    async with client(server).messages.stream(
        model="claude-sonnet",
        max_tokens=4096,
        thinking={"type": "enabled", "budget_tokens": 2048},
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "weather?"}],
    ) as stream:
        async for event in stream:
            if event.type == "content_block_delta":
                deltas.append(event.delta.type)
        final = await stream.get_final_message()
    assert "input_json_delta" in deltas and "signature_delta" in deltas and "thinking_delta" in deltas
    assert [b.type for b in final.content] == ["thinking", "tool_use"]
    assert final.content[0].type == "thinking" and final.content[0].signature == "sig-xyz"
    assert final.content[1].type == "tool_use" and final.content[1].input == {"city": "Tromsø"}
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == 15 and final.usage.cache_read_input_tokens == 8
    assert final.usage.input_tokens == 30
    assert anthropic_upstream.last.body["stream"] is True


# --- OpenAI upstream: translation --------------------------------------------------------------


async def test_translation_to_an_openai_upstream(
    gateway_factory: Any, config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(config)
    call = {
        "id": "call_abc",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    usage = {
        "prompt_tokens": 50,
        "completion_tokens": 7,
        "total_tokens": 57,
        "prompt_tokens_details": {"cached_tokens": 32},
    }
    openai_upstream.queue(Reply(body=completion("Let me check.", tool_calls=[call], usage=usage)))
    answer = await client(server).messages.create(
        model="gpt-4o-mini",
        max_tokens=300,
        system="Be brief.",
        stop_sequences=["END"],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "?"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "unknown city"}],
            },
        ],
        extra_body={"temperature": 0.3, "top_k": 40},
    )
    assert answer.stop_reason == "tool_use"
    assert [b.type for b in answer.content] == ["text", "tool_use"]
    use = answer.content[1]
    assert use.type == "tool_use" and use.id == "call_abc" and use.input == {"city": "Oslo"}
    # Anthropic's input_tokens excludes cache reads; OpenAI's prompt_tokens includes them.
    assert answer.usage.input_tokens == 18 and answer.usage.cache_read_input_tokens == 32
    assert answer.usage.output_tokens == 7

    sent = openai_upstream.requests[-1]
    assert sent["model"] == "gpt-4o-mini" and sent["max_completion_tokens"] == 300
    assert sent["temperature"] == 0.3 and sent["stop"] == ["END"]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["messages"][1]["content"] == [
        {"type": "text", "text": "Weather here?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]
    assert sent["messages"][2]["tool_calls"] == [
        {
            "id": "toolu_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"?"}'},
        }
    ]
    assert sent["messages"][3] == {"role": "tool", "content": "unknown city", "tool_call_id": "toolu_1"}
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": WEATHER_TOOL["input_schema"],
            },
        }
    ]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert "metadata" not in sent and "system" not in sent  # Anthropic-only fields never leak
    assert "top_k" not in sent  # OpenAI refuses top_k (an OpenAI-compatible server gets it)


async def test_streamed_text_from_an_openai_upstream(
    gateway_factory: Any, config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(config)
    openai_upstream.queue(
        Reply(
            stream=text_stream(
                "Hel", "lo", usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
            )
        )
    )
    async with client(server).messages.stream(
        model="gpt-4o-mini", max_tokens=20, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Hello"
    assert final.content[0].type == "text" and final.content[0].text == "Hello"
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (9, 2)
    # Plinth meters the stream: it asked the upstream for usage though the client cannot ask.
    assert openai_upstream.requests[-1]["stream_options"] == {"include_usage": True}


async def test_streamed_tool_use_from_an_openai_upstream(
    gateway_factory: Any, config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(config)
    first = {
        "index": 0,
        "id": "call_7",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    openai_upstream.queue(
        Reply(
            stream=[
                chunk({"role": "assistant", "content": "On it. "}),
                chunk({"tool_calls": [first]}),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
                chunk(finish="tool_calls"),
                chunk(usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
            ]
        )
    )
    partials: list[str] = []
    async with client(server).messages.stream(
        model="gpt-4o-mini",
        max_tokens=100,
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "weather in Oslo"}],
    ) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partials.append(event.delta.partial_json)
        final = await stream.get_final_message()
    assert partials == ['{"city":', '"Oslo"}']
    assert [b.type for b in final.content] == ["text", "tool_use"]
    use = final.content[1]
    assert use.type == "tool_use" and use.id == "call_7" and use.name == "get_weather"
    assert use.input == {"city": "Oslo"}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 4


# --- auth, errors, headers ---------------------------------------------------------------------


async def test_x_api_key_and_bearer_auth(gateway_factory: Any, config: dict[str, Any]) -> None:
    server = gateway_factory(config)
    by_key = await client(server).messages.create(
        model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert by_key.content[0].type == "text" and by_key.content[0].text == "Hello from the mock."
    bearer = anthropic.AsyncAnthropic(base_url=server.url, auth_token=USER_KEY, max_retries=0)
    by_token = await bearer.messages.create(
        model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
    )
    assert by_token.content[0].type == "text"
    with pytest.raises(anthropic.AuthenticationError) as info:
        await client(server, "sk-not-a-key-000000").messages.create(
            model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": info.value.body["error"]["message"]},
    }
    assert info.value.response.headers["request-id"]
    assert "sk-not-a-key-000000" not in info.value.response.text


async def test_errors_in_anthropic_shape(
    gateway_factory: Any, config: dict[str, Any], anthropic_upstream: AnthropicUpstream
) -> None:
    server = gateway_factory(config)
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client(server).messages.create(
            model="claude-nope", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert missing.value.body["error"]["type"] == "not_found_error"
    assert "claude-nope" in missing.value.message
    assert missing.value.response.headers["request-id"] == missing.value.response.headers["x-request-id"]

    with pytest.raises(anthropic.BadRequestError) as bad:
        await client(server).messages.create(
            model="claude-sonnet",
            max_tokens=10,
            messages=[{"role": "user", "content": [{"type": "bogus", "x": 1}]}],
        )
    assert "messages.0.content.0.type" in bad.value.message
    assert bad.value.body["error"]["type"] == "invalid_request_error"

    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        await client(server).messages.create(
            model="claude-sonnet", max_tokens=0, messages=[{"role": "user", "content": "hi"}]
        )

    anthropic_upstream.queue(am.error_reply(429, "rate_limit_error", "slow down", retry_after=3))
    with pytest.raises(anthropic.RateLimitError) as limited:
        await client(server).messages.create(
            model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert limited.value.response.headers["retry-after"] == "3"
    assert limited.value.body["error"]["type"] == "rate_limit_error"
    assert "slow down" in limited.value.message

    # An upstream refusal of the request itself passes through as the caller's 400.
    anthropic_upstream.queue(am.error_reply(400, "invalid_request_error", "prompt is too long"))
    with pytest.raises(anthropic.BadRequestError, match="prompt is too long"):
        await client(server).messages.create(
            model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )


async def test_malformed_bodies_get_anthropic_errors(gateway_factory: Any, config: dict[str, Any]) -> None:
    server = gateway_factory(config)
    async with httpx.AsyncClient(base_url=server.url, headers={"x-api-key": USER_KEY}) as http:
        not_json = await http.post(
            "/v1/messages", content=b"{oops", headers={"content-type": "application/json"}
        )
        no_messages = await http.post("/v1/messages", json={"model": "claude-sonnet", "max_tokens": 5})
        wrong_type = await http.post(
            "/v1/messages",
            json={
                "model": "claude-sonnet",
                "max_tokens": "5",
                "messages": [{"role": "user", "content": "x"}],
            },
        )
        wrong_method = await http.get("/v1/messages")
    for reply in (not_json, no_messages, wrong_type):
        assert reply.status_code == 400
        assert reply.json()["type"] == "error"
        assert reply.json()["error"]["type"] == "invalid_request_error"
        assert reply.headers["request-id"] and reply.headers["x-request-id"]
    assert "messages" in no_messages.json()["error"]["message"]
    assert "max_tokens" in wrong_type.json()["error"]["message"]
    assert wrong_method.status_code == 405 and wrong_method.json()["type"] == "error"
    assert wrong_method.headers["request-id"]
    for path in ("/healthz", "/readyz", "/metrics"):  # x-request-id on every response
        assert (
            httpx.get(server.url + path, headers={"x-request-id": "trace-1"}).headers["x-request-id"]
            == "trace-1"
        )


async def test_mid_stream_failure_is_an_error_event(
    gateway_factory: Any,
    config: dict[str, Any],
    anthropic_upstream: AnthropicUpstream,
    openai_upstream: OpenAIUpstream,
) -> None:
    server = gateway_factory(config)
    # The Anthropic upstream stops after the first text delta, without message_stop.
    anthropic_upstream.queue(
        am.Reply(body=am.message([{"type": "text", "text": "abcdefghijkl"}]), cut_after=5)
    )
    with pytest.raises(anthropic.APIStatusError, match="ended before message_stop"):
        async with client(server).messages.stream(
            model="claude-sonnet", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            async for _ in stream:
                pass

    # The OpenAI upstream drops the connection after two chunks.
    openai_upstream.queue(Reply(stream=text_stream("a", "b", "c"), error_after=2))
    body = {
        "model": "gpt-4o-mini",
        "max_tokens": 10,
        "stream": True,
        "messages": [{"role": "user", "content": "x"}],
    }
    async with (
        httpx.AsyncClient() as http,
        http.stream("POST", server.url + "/v1/messages", headers={"x-api-key": USER_KEY}, json=body) as reply,
    ):
        assert reply.status_code == 200 and reply.headers["request-id"]
        text = (await reply.aread()).decode()
    assert text.startswith("event: message_start")
    assert "event: error" in text and "message_stop" not in text
    error = json.loads(text.split("event: error\ndata: ", 1)[1].split("\n", 1)[0])
    assert error["type"] == "error" and error["error"]["type"] == "api_error"
