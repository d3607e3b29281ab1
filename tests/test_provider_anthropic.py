"""AnthropicProvider against a real Messages API mock on loopback: translation both ways and errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from mocks import fixtures
from mocks.anthropic_upstream import (
    AnthropicUpstream,
    Reply,
    error_body,
    error_reply,
    message,
    stream_events,
    text_reply,
    thinking_reply,
    tool_reply,
    usage,
)
from mocks.fixtures import WEATHER, user
from plinth.config.schema import DeploymentConfig
from plinth.providers.anthropic import AnthropicProvider
from plinth.providers.base import ChatStream, ProviderError
from plinth.providers.http import HttpClient
from plinth.providers.types import (
    ChatRequest,
    FinishEvent,
    ImagePart,
    Message,
    ResponseFormat,
    StreamEvent,
    TextDelta,
    TextPart,
    ThinkingDelta,
    ThinkingPart,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    UsageEvent,
)

API_KEY = "sk-ant-test-secret-0123456789"
http = fixtures.http  # the shared HttpClient fixture


@pytest.fixture
async def upstream() -> AsyncIterator[AnthropicUpstream]:
    async with AnthropicUpstream() as server:
        yield server


def _provider(http: HttpClient, base_url: str) -> AnthropicProvider:
    deployment = DeploymentConfig(
        provider="anthropic",
        model="claude-test",
        base_url=base_url,
        api_key=SecretStr(API_KEY),
        headers={"anthropic-beta": SecretStr("beta-feature-1")},
    )
    return AnthropicProvider(deployment, http, name="claude/anthropic/0")


@pytest.fixture
def provider(upstream: AnthropicUpstream, http: HttpClient) -> AnthropicProvider:
    return _provider(http, upstream.url)


def ask(*messages: Message, **kwargs: Any) -> ChatRequest:
    return ChatRequest(model="claude", messages=list(messages) or [user("Hi")], **kwargs)


async def collect(stream: ChatStream) -> list[StreamEvent]:
    return [event async for event in stream.events]


# --- request translation ---------------------------------------------------------------------


async def test_headers_url_and_defaults(provider: AnthropicProvider, upstream: AnthropicUpstream) -> None:
    await provider.chat(ask(), "claude-upstream")
    sent = upstream.last
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == API_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "beta-feature-1"
    assert sent.headers["content-type"] == "application/json"
    assert sent.body == {
        "model": "claude-upstream",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 4096,
    }


async def test_base_url_with_v1_suffix(upstream: AnthropicUpstream, http: HttpClient) -> None:
    await _provider(http, upstream.url + "/v1/").chat(ask(), "m")
    assert upstream.last.path == "/v1/messages"


async def test_full_conversation_translation(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    request = ask(
        Message(role="system", content=[TextPart("Be brief.", cache_control={"type": "ephemeral"})]),
        Message(
            role="user",
            content=[
                TextPart("What is in these pictures?"),
                ImagePart(data="iVBORw0KGgo=", media_type="image/png"),
                ImagePart(url="https://example.com/cat.jpg"),
            ],
        ),
        user("And the weather?"),  # merged into the previous user turn
        Message(
            role="assistant",
            content=[ThinkingPart("Need weather.", signature="sig-1"), TextPart("Checking.")],
            tool_calls=[
                ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'),
                ToolCall("toolu_2", "get_weather", ""),
            ],
        ),
        Message(role="tool", tool_call_id="toolu_1", content=[TextPart("18C")]),
        Message(
            role="tool",
            tool_call_id="toolu_2",
            is_error=True,
            content=[TextPart("no city"), ImagePart(data="R0lG", media_type="image/gif")],
        ),
        Message(role="system", content=[TextPart("Answer in French.")]),  # hoisted, wherever it is
        user("Thanks"),
        tools=[WEATHER],
        tool_choice=ToolChoice(mode="required"),
        parallel_tool_calls=False,
        stop=["END"],
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        user="user-42",
        thinking={"type": "enabled", "budget_tokens": 2048},
        max_tokens=8000,
    )
    await provider.chat(request, "claude-upstream")
    body = upstream.last.body
    assert body["system"] == [
        {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "Answer in French."},
    ]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these pictures?"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {"type": "text", "text": "And the weather?"},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Need weather.", "signature": "sig-1"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [{"type": "text", "text": "18C"}],
                },
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_2",
                    "content": [
                        {"type": "text", "text": "no city"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/gif", "data": "R0lG"},
                        },
                    ],
                    "is_error": True,
                },
                {"type": "text", "text": "Thanks"},
            ],
        },
    ]
    assert body["tools"] == [
        {"name": "get_weather", "input_schema": WEATHER.parameters, "description": "Weather for a city"}
    ]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["stop_sequences"] == ["END"]
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.2, 0.9, 40)
    assert body["metadata"] == {"user_id": "user-42"}
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["max_tokens"] == 8000
    assert "stream" not in body


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (ToolChoice("auto"), {"type": "auto"}),
        (ToolChoice("none"), {"type": "none"}),
        (ToolChoice("tool", "get_weather"), {"type": "tool", "name": "get_weather"}),
    ],
)
async def test_tool_choice(
    provider: AnthropicProvider, upstream: AnthropicUpstream, choice: ToolChoice, expected: dict[str, Any]
) -> None:
    await provider.chat(ask(tools=[WEATHER], tool_choice=choice), "m")
    assert upstream.last.body["tool_choice"] == expected


async def test_thinking_budget_raises_default_max_tokens(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    await provider.chat(ask(thinking={"type": "enabled", "budget_tokens": 10000}), "m")
    assert upstream.last.body["max_tokens"] == 14096


async def test_extra_passes_through_only_from_anthropic_clients(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    await provider.chat(ask(extra={"service_tier": "auto"}, protocol="anthropic"), "m")
    assert upstream.last.body["service_tier"] == "auto"
    await provider.chat(ask(extra={"logit_bias": {"1": 2}}, protocol="openai"), "m")
    assert "logit_bias" not in upstream.last.body


async def test_invalid_tool_arguments_name_the_call(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    bad = Message(role="assistant", tool_calls=[ToolCall("call_9", "get_weather", "{city: Paris")])
    with pytest.raises(ProviderError) as info:
        await provider.chat(ask(user("Hi"), bad, Message(role="tool", tool_call_id="call_9")), "m")
    assert info.value.status == 400 and not info.value.retryable
    assert "call_9" in info.value.message and "get_weather" in info.value.message
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"
    assert upstream.requests == []


async def test_redacted_and_unsigned_thinking(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    assistant = Message(
        role="assistant",
        content=[
            ThinkingPart("", signature="opaque", redacted=True),
            ThinkingPart("unsigned"),
            TextPart("ok"),
        ],
    )
    await provider.chat(ask(user("a"), assistant, user("b")), "m")
    assert upstream.last.body["messages"][1]["content"] == [
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "text", "text": "ok"},
    ]


# --- response translation --------------------------------------------------------------------


async def test_text_response_and_cached_usage(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    upstream.queue(
        text_reply(
            "Bonjour", usage_=usage(input_tokens=7, output_tokens=3, cache_read=100, cache_creation=20)
        )
    )
    resp = await provider.chat(ask(), "m")
    assert resp.id == "msg_mock0001"
    assert resp.model == "claude-mock-1"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == [TextPart("Bonjour")]
    assert choice.finish_reason == "stop"
    assert resp.usage.input_tokens == 127
    assert resp.usage.cached_input_tokens == 100
    assert resp.usage.cache_creation_input_tokens == 20
    assert resp.usage.output_tokens == 3
    assert not resp.usage.estimated


async def test_thinking_and_tool_use_response(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    upstream.queue(
        Reply(
            body=message(
                [
                    {"type": "thinking", "thinking": "Let me check.", "signature": "sig-9"},
                    {"type": "redacted_thinking", "data": "enc"},
                    {"type": "text", "text": "Looking it up."},
                    {"type": "tool_use", "id": "toolu_7", "name": "get_weather", "input": {"city": "Oslo"}},
                ],
                stop_reason="tool_use",
            )
        )
    )
    choice = (await provider.chat(ask(tools=[WEATHER]), "m")).choices[0]
    assert choice.message.content == [
        ThinkingPart("Let me check.", signature="sig-9"),
        ThinkingPart("", signature="enc", redacted=True),
        TextPart("Looking it up."),
    ]
    assert choice.message.tool_calls == [ToolCall("toolu_7", "get_weather", '{"city":"Oslo"}')]
    assert choice.finish_reason == "tool_calls"


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("max_tokens", "length"),
        ("stop_sequence", "stop"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
    ],
)
async def test_stop_reasons(
    provider: AnthropicProvider, upstream: AnthropicUpstream, stop_reason: str, finish: str
) -> None:
    sequence = "END" if stop_reason == "stop_sequence" else None
    upstream.queue(text_reply("x", stop_reason=stop_reason, stop_sequence=sequence))
    choice = (await provider.chat(ask(), "m")).choices[0]
    assert choice.finish_reason == finish
    assert choice.stop_sequence == sequence


async def test_json_schema_is_emulated_with_a_forced_tool(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    upstream.queue(tool_reply("json_response", {"answer": 4}))
    rf = ResponseFormat(type="json_schema", name="sum", schema=schema)
    resp = await provider.chat(ask(response_format=rf), "m")
    body = upstream.last.body
    assert body["tools"][-1]["name"] == "json_response"
    assert body["tools"][-1]["input_schema"] == schema
    assert body["tool_choice"] == {"type": "tool", "name": "json_response"}
    choice = resp.choices[0]
    assert orjson.loads(choice.message.text()) == {"answer": 4}
    assert choice.message.tool_calls == []
    assert choice.finish_reason == "stop"


async def test_json_mode_keeps_real_tools_callable(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    upstream.queue(tool_reply("get_weather", {"city": "Rome"}))
    resp = await provider.chat(ask(tools=[WEATHER], response_format=ResponseFormat(type="json_object")), "m")
    body = upstream.last.body
    assert [t["name"] for t in body["tools"]] == ["get_weather", "json_response"]
    assert body["tools"][1]["input_schema"] == {"type": "object"}
    assert body["tool_choice"] == {"type": "any"}
    assert resp.choices[0].finish_reason == "tool_calls"
    assert resp.choices[0].message.tool_calls[0].name == "get_weather"


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "caller_status", "retryable"),
    [
        (429, "rate_limit_error", 429, True),
        (500, "api_error", 502, True),
        (529, "overloaded_error", 502, True),
        (400, "invalid_request_error", 400, False),
        (401, "authentication_error", 502, False),
    ],
)
async def test_http_errors_are_classified(
    provider: AnthropicProvider,
    upstream: AnthropicUpstream,
    status: int,
    kind: str,
    caller_status: int,
    retryable: bool,
) -> None:
    upstream.queue(error_reply(status, kind, f"problem {status}", retry_after=2 if status == 429 else None))
    with pytest.raises(ProviderError) as info:
        await provider.chat(ask(), "m")
    err = info.value
    assert (err.status, err.retryable) == (caller_status, retryable)
    assert f"problem {status}" in err.message
    assert API_KEY not in str(err)
    if status == 429:
        assert err.retry_after == 2.0


async def test_invalid_json_response(provider: AnthropicProvider, upstream: AnthropicUpstream) -> None:
    upstream.queue(Reply(raw=b"<html>oops</html>"))
    with pytest.raises(ProviderError, match="invalid JSON"):
        await provider.chat(ask(), "m")


# --- streaming -------------------------------------------------------------------------------


def _ends_with_one_finish_and_usage(events: list[StreamEvent]) -> tuple[FinishEvent, UsageEvent]:
    assert sum(isinstance(e, FinishEvent) for e in events) == 1
    assert sum(isinstance(e, UsageEvent) for e in events) == 1
    finish, usage_event = events[-2:]
    assert isinstance(finish, FinishEvent) and isinstance(usage_event, UsageEvent)
    return finish, usage_event


async def test_stream_text(provider: AnthropicProvider, upstream: AnthropicUpstream) -> None:
    upstream.queue(
        text_reply("Hello, streaming world!", usage_=usage(input_tokens=12, output_tokens=6, cache_read=30))
    )
    stream = await provider.stream_chat(ask(stream=True), "m")
    assert upstream.last.body["stream"] is True
    assert stream.id == "msg_mock0001"
    assert stream.model == "claude-mock-1"
    events = await collect(stream)
    texts = [e.text for e in events if isinstance(e, TextDelta)]
    assert len(texts) > 1 and "".join(texts) == "Hello, streaming world!"
    finish, usage_event = _ends_with_one_finish_and_usage(events)
    assert finish.finish_reason == "stop"
    assert usage_event.usage.input_tokens == 42
    assert usage_event.usage.cached_input_tokens == 30
    assert usage_event.usage.output_tokens == 6


async def test_stream_tools_count_from_zero(provider: AnthropicProvider, upstream: AnthropicUpstream) -> None:
    blocks: list[dict[str, Any]] = [
        {"type": "text", "text": "Two lookups."},
        {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "toolu_b", "name": "get_weather", "input": {"city": "Lima"}},
    ]
    upstream.queue(Reply(body=message(blocks, stop_reason="tool_use")))
    events = await collect(await provider.stream_chat(ask(tools=[WEATHER], stream=True), "m"))
    deltas = [e for e in events if isinstance(e, ToolCallDelta)]
    firsts = [d for d in deltas if d.id is not None]
    assert [(d.tool_index, d.id, d.name, d.arguments) for d in firsts] == [
        (0, "toolu_a", "get_weather", ""),
        (1, "toolu_b", "get_weather", ""),
    ]
    for index, city in ((0, "Paris"), (1, "Lima")):
        arguments = "".join(d.arguments for d in deltas if d.tool_index == index)
        assert orjson.loads(arguments) == {"city": city}
    finish, _ = _ends_with_one_finish_and_usage(events)
    assert finish.finish_reason == "tool_calls"


async def test_stream_thinking(provider: AnthropicProvider, upstream: AnthropicUpstream) -> None:
    upstream.queue(thinking_reply("Think first, answer later.", "sig-stream", "Done."))
    events = await collect(await provider.stream_chat(ask(stream=True), "m"))
    thinking = [e for e in events if isinstance(e, ThinkingDelta)]
    assert "".join(e.text for e in thinking) == "Think first, answer later."
    assert [e.signature for e in thinking if e.signature] == ["sig-stream"]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Done."


async def test_stream_json_mode_yields_text(provider: AnthropicProvider, upstream: AnthropicUpstream) -> None:
    upstream.queue(tool_reply("json_response", {"answer": [1, 2, 3]}))
    request = ask(stream=True, response_format=ResponseFormat(type="json_object"))
    events = await collect(await provider.stream_chat(request, "m"))
    assert not any(isinstance(e, ToolCallDelta) for e in events)
    assert orjson.loads("".join(e.text for e in events if isinstance(e, TextDelta))) == {"answer": [1, 2, 3]}
    finish, _ = _ends_with_one_finish_and_usage(events)
    assert finish.finish_reason == "stop"


async def test_stream_stop_sequence_and_cumulative_usage(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    events = stream_events(
        message([{"type": "text", "text": "a b"}], stop_reason="stop_sequence", stop_sequence="###")
    )
    # Newer API versions repeat the input counts in message_delta; they replace message_start's.
    events[-2][1]["usage"] = {"output_tokens": 9, "input_tokens": 11, "cache_read_input_tokens": 4}
    upstream.queue(Reply(events=events))
    got = await collect(await provider.stream_chat(ask(stream=True), "m"))
    finish, usage_event = _ends_with_one_finish_and_usage(got)
    assert (finish.finish_reason, finish.stop_sequence) == ("stop", "###")
    assert (usage_event.usage.input_tokens, usage_event.usage.cached_input_tokens) == (15, 4)
    assert usage_event.usage.output_tokens == 9


async def test_stream_http_error_raises_before_returning(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    upstream.queue(error_reply(429, "rate_limit_error", "too many", retry_after=3))
    with pytest.raises(ProviderError) as info:
        await provider.stream_chat(ask(stream=True), "m")
    assert (info.value.status, info.value.retryable, info.value.retry_after) == (429, True, 3.0)


async def test_stream_error_event_before_message_start_raises_before_returning(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    upstream.queue(Reply(events=[("error", error_body("overloaded_error", "Overloaded"))]))
    with pytest.raises(ProviderError) as info:
        await provider.stream_chat(ask(stream=True), "m")
    assert info.value.retryable and "overloaded_error" in info.value.message


async def test_stream_mid_stream_error_event(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    events = stream_events(message([{"type": "text", "text": "partial answer"}]))[:5]
    events.append(("error", error_body("overloaded_error", "Overloaded")))
    upstream.queue(Reply(events=events))
    stream = await provider.stream_chat(ask(stream=True), "m")
    seen: list[StreamEvent] = []
    with pytest.raises(ProviderError) as info:
        async for event in stream.events:
            seen.append(event)
    assert any(isinstance(e, TextDelta) for e in seen)
    assert info.value.retryable and info.value.status == 502
    assert "Overloaded" in info.value.message


async def test_stream_cut_before_message_stop(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    upstream.queue(Reply(body=message([{"type": "text", "text": "never finished"}]), cut_after=6))
    stream = await provider.stream_chat(ask(stream=True), "m")
    with pytest.raises(ProviderError, match="before message_stop") as info:
        await collect(stream)
    assert info.value.retryable


async def test_stream_closed_unread_frees_the_connection(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    for _ in range(3):
        stream = await provider.stream_chat(ask(stream=True), "m")
        await stream.aclose()
    assert (await provider.chat(ask(), "m")).choices[0].message.text() == "Hello from the mock."


async def test_json_mode_with_thinking_offers_the_tool(
    provider: AnthropicProvider, upstream: AnthropicUpstream
) -> None:
    # Anthropic rejects a forced tool_choice while extended thinking is on.
    request = ask(
        thinking={"type": "enabled", "budget_tokens": 1024},
        response_format=ResponseFormat(type="json_object"),
    )
    await provider.chat(request, "m")
    assert upstream.last.body["tool_choice"] == {"type": "auto"}
