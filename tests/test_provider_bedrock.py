"""The Bedrock provider against a loopback Bedrock runtime that checks SigV4 signatures."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mocks import fixtures
from mocks.bedrock_upstream import (
    ACCESS_KEY,
    REGION,
    SECRET_KEY,
    BedrockUpstream,
    JsonResponse,
    StreamResponse,
    converse_answer,
    error,
    event,
    exception,
    fake_vector,
    text_stream,
    usage,
)
from mocks.fixtures import WEATHER, user
from plinth.config.schema import DeploymentConfig
from plinth.providers.base import ProviderError, UnsupportedOperation
from plinth.providers.bedrock import BedrockProvider
from plinth.providers.http import HttpClient
from plinth.providers.types import (
    ChatRequest,
    EmbeddingRequest,
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

MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
http = fixtures.http  # the shared HttpClient fixture


@pytest.fixture
async def upstream() -> AsyncIterator[BedrockUpstream]:
    async with BedrockUpstream() as server:
        yield server


def deployment(upstream: BedrockUpstream, **overrides: Any) -> DeploymentConfig:
    fields: dict[str, Any] = {
        "provider": "bedrock",
        "model": MODEL,
        "base_url": upstream.url,
        "region": REGION,
        "aws_access_key_id": ACCESS_KEY,
        "aws_secret_access_key": SECRET_KEY,
        **overrides,
    }
    return DeploymentConfig(**{k: v for k, v in fields.items() if v is not None})


def provider(upstream: BedrockUpstream, http: HttpClient, **overrides: Any) -> BedrockProvider:
    return BedrockProvider(deployment(upstream, **overrides), http, name="test/bedrock/0")


def chat_request(*messages: Message, **kwargs: Any) -> ChatRequest:
    return ChatRequest(model="claude", messages=list(messages), **kwargs)


async def collect(events: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [e async for e in events]


# --- Converse: request translation --------------------------------------------------------------


async def test_chat_translates_request_and_response(upstream: BedrockUpstream, http: HttpClient) -> None:
    upstream.queue(
        JsonResponse(
            converse_answer(
                [{"text": "Bonjour"}],
                token_usage=usage(12, 3, cacheReadInputTokens=100, cacheWriteInputTokens=20),
            )
        )
    )
    request = chat_request(
        Message(role="system", content=[TextPart("Be brief.")]),
        Message(role="system", content=[TextPart("Answer in French.", cache_control={"type": "ephemeral"})]),
        user("Hello"),
        user("Again"),
        max_tokens=256,
        temperature=0.2,
        top_p=0.9,
        stop=["END"],
    )
    response = await provider(upstream, http).chat(request, MODEL)

    [sent] = upstream.requests
    assert sent.operation == "converse"
    assert sent.raw_path == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    assert sent.model == MODEL
    assert sent.headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={ACCESS_KEY}/")
    assert sent.json == {
        "system": [
            {"text": "Be brief."},
            {"text": "Answer in French."},
            {"cachePoint": {"type": "default"}},
        ],
        "messages": [{"role": "user", "content": [{"text": "Hello"}, {"text": "Again"}]}],
        "inferenceConfig": {"maxTokens": 256, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END"]},
    }
    [choice] = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.text() == "Bonjour"
    assert choice.finish_reason == "stop"
    assert response.model == MODEL
    # inputTokens excludes the cache: canonical input counts every prompt token.
    assert response.usage.input_tokens == 132
    assert response.usage.output_tokens == 3
    assert response.usage.cached_input_tokens == 100
    assert response.usage.cache_creation_input_tokens == 20
    assert not response.usage.estimated


async def test_chat_translates_tools_images_reasoning_and_results(
    upstream: BedrockUpstream, http: HttpClient
) -> None:
    request = chat_request(
        Message(
            role="user",
            content=[
                TextPart("What is in this picture, and the weather?"),
                ImagePart(data="iVBORw0KGgo=", media_type="image/png"),
            ],
        ),
        Message(
            role="assistant",
            content=[ThinkingPart(text="Need the weather.", signature="sig-1"), TextPart("Let me check.")],
            tool_calls=[
                ToolCall(id="tu_1", name="get_weather", arguments='{"city": "Paris"}'),
                ToolCall(id="tu_2", name="get_weather", arguments=""),
            ],
        ),
        Message(role="tool", tool_call_id="tu_1", content=[TextPart('{"temp": 21}')]),
        Message(role="tool", tool_call_id="tu_2", content=[TextPart("city missing")], is_error=True),
        user("Thanks"),
        tools=[WEATHER],
        tool_choice=ToolChoice(mode="tool", name="get_weather"),
        top_k=40,
        thinking={"type": "enabled", "budget_tokens": 2048},
    )
    await provider(upstream, http).chat(request, MODEL)
    body = upstream.requests[0].json
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"text": "What is in this picture, and the weather?"},
                {"image": {"format": "png", "source": {"bytes": "iVBORw0KGgo="}}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"reasoningContent": {"reasoningText": {"text": "Need the weather.", "signature": "sig-1"}}},
                {"text": "Let me check."},
                {"toolUse": {"toolUseId": "tu_1", "name": "get_weather", "input": {"city": "Paris"}}},
                {"toolUse": {"toolUseId": "tu_2", "name": "get_weather", "input": {}}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"toolResult": {"toolUseId": "tu_1", "content": [{"text": '{"temp": 21}'}]}},
                {
                    "toolResult": {
                        "toolUseId": "tu_2",
                        "content": [{"text": "city missing"}],
                        "status": "error",
                    }
                },
                {"text": "Thanks"},
            ],
        },
    ]
    assert body["toolConfig"] == {
        "tools": [
            {
                "toolSpec": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "inputSchema": {"json": WEATHER.parameters},
                }
            }
        ],
        "toolChoice": {"tool": {"name": "get_weather"}},
    }
    assert body["additionalModelRequestFields"] == {
        "top_k": 40,
        "thinking": {"type": "enabled", "budget_tokens": 2048},
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        (ToolChoice(mode="auto"), {"auto": {}}),
        (ToolChoice(mode="required"), {"any": {}}),
    ],
)
async def test_tool_choice(
    upstream: BedrockUpstream, http: HttpClient, choice: ToolChoice | None, expected: Any
) -> None:
    await provider(upstream, http).chat(chat_request(user("hi"), tools=[WEATHER], tool_choice=choice), MODEL)
    config = upstream.requests[0].json["toolConfig"]
    assert config.get("toolChoice") == expected
    assert [t["toolSpec"]["name"] for t in config["tools"]] == ["get_weather"]


async def test_tool_choice_none(upstream: BedrockUpstream, http: HttpClient) -> None:
    prov = provider(upstream, http)
    await prov.chat(chat_request(user("hi"), tools=[WEATHER], tool_choice=ToolChoice(mode="none")), MODEL)
    assert "toolConfig" not in upstream.requests[0].json
    # With tool blocks in the history Bedrock requires toolConfig: tools stay, with no forced choice.
    history = [
        user("weather?"),
        Message(role="assistant", tool_calls=[ToolCall(id="t1", name="get_weather", arguments="{}")]),
        Message(role="tool", tool_call_id="t1", content=[TextPart("sunny")]),
    ]
    await prov.chat(chat_request(*history, tools=[WEATHER], tool_choice=ToolChoice(mode="none")), MODEL)
    assert upstream.requests[1].json["toolConfig"] == {
        "tools": [
            {
                "toolSpec": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "inputSchema": {"json": WEATHER.parameters},
                }
            }
        ]
    }
    # No tools declared at all: stub specs for the names the history uses.
    await prov.chat(chat_request(*history), MODEL)
    assert upstream.requests[2].json["toolConfig"] == {
        "tools": [
            {
                "toolSpec": {
                    "name": "get_weather",
                    "inputSchema": {"json": {"type": "object", "properties": {}}},
                }
            }
        ]
    }


async def test_url_image_is_refused_before_any_call(upstream: BedrockUpstream, http: HttpClient) -> None:
    request = chat_request(Message(role="user", content=[ImagePart(url="https://example.com/cat.png")]))
    with pytest.raises(ProviderError) as info:
        await provider(upstream, http).chat(request, MODEL)
    assert info.value.status == 400
    assert "inline images" in info.value.message
    assert upstream.requests == []


async def test_nova_top_k_goes_in_its_own_field(upstream: BedrockUpstream, http: HttpClient) -> None:
    await provider(upstream, http).chat(chat_request(user("hi"), top_k=5), "amazon.nova-pro-v1:0")
    assert upstream.requests[0].json["additionalModelRequestFields"] == {"inferenceConfig": {"topK": 5}}
    assert upstream.requests[0].raw_path == "/model/amazon.nova-pro-v1%3A0/converse"


async def test_arn_model_id_is_encoded_and_signed(upstream: BedrockUpstream, http: HttpClient) -> None:
    arn = "arn:aws:bedrock:us-east-1:123456789012:inference-profile/us.anthropic.claude-3-5-sonnet-v2:0"
    await provider(upstream, http).chat(chat_request(user("hi")), arn)
    [sent] = upstream.requests
    assert sent.model == arn
    assert "%2F" in sent.raw_path and "%3A" in sent.raw_path


# --- Converse: response translation -------------------------------------------------------------


async def test_chat_response_with_tool_calls_and_reasoning(
    upstream: BedrockUpstream, http: HttpClient
) -> None:
    upstream.queue(
        JsonResponse(
            converse_answer(
                [
                    {"reasoningContent": {"reasoningText": {"text": "think", "signature": "s1"}}},
                    {"reasoningContent": {"redactedContent": "b64blob"}},
                    {"text": "Checking."},
                    {"toolUse": {"toolUseId": "tu_9", "name": "get_weather", "input": {"city": "Oslo"}}},
                ],
                stop_reason="tool_use",
            )
        )
    )
    response = await provider(upstream, http).chat(chat_request(user("hi"), tools=[WEATHER]), MODEL)
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == [
        ThinkingPart(text="think", signature="s1"),
        ThinkingPart(text="", signature="b64blob", redacted=True),
        TextPart("Checking."),
    ]
    assert choice.message.tool_calls == [ToolCall(id="tu_9", name="get_weather", arguments='{"city":"Oslo"}')]


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("guardrail_intervened", "content_filter"),
        ("content_filtered", "content_filter"),
    ],
)
async def test_stop_reasons(
    upstream: BedrockUpstream, http: HttpClient, stop_reason: str, finish: str
) -> None:
    upstream.queue(JsonResponse(converse_answer([{"text": "x"}], stop_reason=stop_reason)))
    response = await provider(upstream, http).chat(chat_request(user("hi"), stop=["###"]), MODEL)
    assert response.choices[0].finish_reason == finish
    assert response.choices[0].stop_sequence == ("###" if stop_reason == "stop_sequence" else None)


async def test_json_schema_is_emulated_with_a_forced_tool(
    upstream: BedrockUpstream, http: HttpClient
) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    upstream.queue(
        JsonResponse(
            converse_answer(
                [{"toolUse": {"toolUseId": "tu_j", "name": "json_response", "input": {"answer": "42"}}}],
                stop_reason="tool_use",
            )
        )
    )
    request = chat_request(
        user("answer?"), response_format=ResponseFormat(type="json_schema", name="a", schema=schema)
    )
    response = await provider(upstream, http).chat(request, MODEL)
    config = upstream.requests[0].json["toolConfig"]
    assert config["toolChoice"] == {"tool": {"name": "json_response"}}
    assert config["tools"][0]["toolSpec"]["name"] == "json_response"
    assert config["tools"][0]["toolSpec"]["inputSchema"] == {"json": schema}
    [choice] = response.choices
    assert choice.message.text() == '{"answer":"42"}'
    assert choice.message.tool_calls == []
    assert choice.finish_reason == "stop"


async def test_json_schema_beside_real_tools_lets_the_model_pick(
    upstream: BedrockUpstream, http: HttpClient
) -> None:
    request = chat_request(user("hi"), tools=[WEATHER], response_format=ResponseFormat(type="json_object"))
    await provider(upstream, http).chat(request, MODEL)
    config = upstream.requests[0].json["toolConfig"]
    assert config["toolChoice"] == {"any": {}}
    assert [t["toolSpec"]["name"] for t in config["tools"]] == ["get_weather", "json_response"]


# --- Errors and signing -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scripted", "status", "retryable", "retry_after"),
    [
        (error(429, "ThrottlingException", "Too many requests, please wait."), 429, True, None),
        (error(429, "ThrottlingException", "Too many requests.", retry_after="3"), 429, True, 3.0),
        (error(500, "InternalServerException", "boom"), 502, True, None),
        (error(503, "ServiceUnavailableException", "busy"), 502, True, None),
        (error(400, "ValidationException", "messages: field required"), 400, False, None),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_http_errors_are_classified(
    upstream: BedrockUpstream,
    http: HttpClient,
    scripted: JsonResponse,
    status: int,
    retryable: bool,
    retry_after: float | None,
    streaming: bool,
) -> None:
    upstream.queue(scripted)
    prov = provider(upstream, http)
    with pytest.raises(ProviderError) as info:
        if streaming:
            await prov.stream_chat(chat_request(user("hi")), MODEL)  # raises before returning
        else:
            await prov.chat(chat_request(user("hi")), MODEL)
    assert info.value.status == status
    assert info.value.retryable is retryable
    assert info.value.retry_after == retry_after
    assert scripted.body["message"] in info.value.message


async def test_wrong_secret_is_refused_by_signature_check(
    upstream: BedrockUpstream, http: HttpClient
) -> None:
    wrong = "not-the-secret-" + "x" * 25
    prov = provider(upstream, http, aws_secret_access_key=wrong)
    with pytest.raises(ProviderError) as info:
        await prov.chat(chat_request(user("hi")), MODEL)
    assert info.value.kind == "upstream_auth"
    assert info.value.status == 502
    assert not info.value.retryable
    assert "signature" in info.value.message
    assert wrong not in info.value.message and wrong not in repr(info.value)
    assert upstream.rejected and upstream.requests == []


async def test_session_token_is_sent_and_signed(http: HttpClient) -> None:
    async with BedrockUpstream(session_token="FwoGZXIvYXdzEXAMPLETOKEN") as up:
        await provider(up, http, aws_session_token="FwoGZXIvYXdzEXAMPLETOKEN").chat(
            chat_request(user("hi")), MODEL
        )
        [sent] = up.requests
        assert "x-amz-security-token" in sent.headers["Authorization"]
        assert not up.rejected


async def test_default_credential_chain(
    upstream: BedrockUpstream, http: HttpClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    prov = provider(upstream, http, aws_access_key_id=None, aws_secret_access_key=None)
    response = await prov.chat(chat_request(user("hi")), MODEL)
    assert response.choices[0].message.text() == upstream.default_text
    assert not upstream.rejected


async def test_refreshable_credentials_are_refreshed(
    upstream: BedrockUpstream, http: HttpClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """credential_process gives botocore RefreshableCredentials; expiring ones are fetched again."""
    counter = tmp_path / "calls"
    script = tmp_path / "creds.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import datetime, json, pathlib
            p = pathlib.Path({str(counter)!r})
            p.write_text(str(int(p.read_text() or 0) + 1) if p.exists() else "1")
            soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=12)
            print(json.dumps({{"Version": 1, "AccessKeyId": {ACCESS_KEY!r}, "SecretAccessKey": {SECRET_KEY!r},
                              "Expiration": soon.strftime("%Y-%m-%dT%H:%M:%SZ")}}))
            """
        )
    )
    config = tmp_path / "config"
    config.write_text(f"[default]\ncredential_process = {sys.executable} {script}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    prov = provider(upstream, http, aws_access_key_id=None, aws_secret_access_key=None)
    await prov.chat(chat_request(user("hi")), MODEL)
    await prov.chat(chat_request(user("hi")), MODEL)
    assert len(upstream.requests) == 2 and not upstream.rejected
    # Expiring within botocore's 15-minute advisory window: each request refreshed them.
    assert int(counter.read_text()) >= 2


@pytest.mark.parametrize("streaming", [False, True])
async def test_signature_error_does_not_leak_the_session_token(http: HttpClient, streaming: bool) -> None:
    token = "FwoGZXIvYXdzSESSIONTOKENVALUE"
    async with BedrockUpstream(session_token=token) as up:
        prov = provider(up, http, aws_session_token=token, aws_secret_access_key="wrong-secret-value")
        with pytest.raises(ProviderError) as info:
            if streaming:
                await prov.stream_chat(chat_request(user("hi")), MODEL)
            else:
                await prov.chat(chat_request(user("hi")), MODEL)
        assert token in up.rejected[0]  # the upstream did quote it, as AWS does
        assert token not in info.value.message and token not in str(info.value)
        assert "wrong-secret-value" not in str(info.value)
        assert "signature we calculated does not match" in info.value.message


async def test_bedrock_api_key_is_sent_as_bearer(http: HttpClient) -> None:
    async with BedrockUpstream(api_key="bedrock-api-key-123") as up:
        prov = provider(
            up, http, aws_access_key_id=None, aws_secret_access_key=None, api_key="bedrock-api-key-123"
        )
        await prov.chat(chat_request(user("hi")), MODEL)
        assert up.requests[0].headers["Authorization"] == "Bearer bedrock-api-key-123"


async def test_extra_headers_are_signed(upstream: BedrockUpstream, http: HttpClient) -> None:
    prov = provider(upstream, http, headers={"X-Amzn-Bedrock-GuardrailIdentifier": "gr-1"})
    await prov.chat(chat_request(user("hi")), MODEL)
    [sent] = upstream.requests
    assert sent.headers["X-Amzn-Bedrock-GuardrailIdentifier"] == "gr-1"
    assert "x-amzn-bedrock-guardrailidentifier" in sent.headers["Authorization"]


async def test_connection_refused_is_retryable(http: HttpClient) -> None:
    up = await BedrockUpstream().start()
    prov = provider(up, http)
    await up.close()
    with pytest.raises(ProviderError) as info:
        await prov.chat(chat_request(user("hi")), MODEL)
    assert info.value.retryable
    with pytest.raises(ProviderError) as info:
        await prov.stream_chat(chat_request(user("hi")), MODEL)
    assert info.value.retryable


def test_region_is_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(ValueError, match="region"):
        BedrockProvider(DeploymentConfig(provider="bedrock", model=MODEL), HttpClient(), name="d")


# --- ConverseStream -----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
async def test_stream_text(upstream: BedrockUpstream, http: HttpClient, chunk_size: int | None) -> None:
    upstream.queue(
        StreamResponse(
            text_stream(["Hel", "lo", "!"], token_usage=usage(9, 4, cacheReadInputTokens=50)),
            chunk_size=chunk_size,
        )
    )
    stream = await provider(upstream, http).stream_chat(chat_request(user("hi")), MODEL)
    assert upstream.requests[0].operation == "converse-stream"
    assert upstream.requests[0].headers["Accept"] == "application/vnd.amazon.eventstream"
    events = await collect(stream.events)
    assert events[:3] == [TextDelta("Hel"), TextDelta("lo"), TextDelta("!")]
    assert events[3] == FinishEvent("stop")
    assert isinstance(events[4], UsageEvent)
    assert events[4].usage.input_tokens == 59
    assert events[4].usage.cached_input_tokens == 50
    assert events[4].usage.output_tokens == 4
    assert len(events) == 5
    assert stream.model == MODEL


async def test_stream_tool_use_with_partial_json(upstream: BedrockUpstream, http: HttpClient) -> None:
    frames = [
        event("messageStart", {"role": "assistant"}),
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Looking."}}),
        event("contentBlockStop", {"contentBlockIndex": 0}),
        event(
            "contentBlockStart",
            {"contentBlockIndex": 1, "start": {"toolUse": {"toolUseId": "tu_a", "name": "get_weather"}}},
        ),
        event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": '{"ci'}}}),
        event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"toolUse": {"input": 'ty": "Rome"}'}}}),
        event("contentBlockStop", {"contentBlockIndex": 1}),
        event(
            "contentBlockStart",
            {"contentBlockIndex": 2, "start": {"toolUse": {"toolUseId": "tu_b", "name": "get_weather"}}},
        ),
        event(
            "contentBlockDelta", {"contentBlockIndex": 2, "delta": {"toolUse": {"input": '{"city": "Oslo"}'}}}
        ),
        event("contentBlockStop", {"contentBlockIndex": 2}),
        event("messageStop", {"stopReason": "tool_use"}),
        event("metadata", {"usage": usage(20, 30)}),
    ]
    upstream.queue(StreamResponse(frames, chunk_size=11))
    stream = await provider(upstream, http).stream_chat(chat_request(user("hi"), tools=[WEATHER]), MODEL)
    events = await collect(stream.events)
    assert events[:-1] == [
        TextDelta("Looking."),
        ToolCallDelta(tool_index=0, id="tu_a", name="get_weather"),
        ToolCallDelta(tool_index=0, arguments='{"ci'),
        ToolCallDelta(tool_index=0, arguments='ty": "Rome"}'),
        ToolCallDelta(tool_index=1, id="tu_b", name="get_weather"),
        ToolCallDelta(tool_index=1, arguments='{"city": "Oslo"}'),
        FinishEvent("tool_calls"),
    ]
    final = events[-1]
    assert isinstance(final, UsageEvent) and (final.usage.input_tokens, final.usage.output_tokens) == (20, 30)


async def test_stream_reasoning(upstream: BedrockUpstream, http: HttpClient) -> None:
    frames = [
        event("messageStart", {"role": "assistant"}),
        event(
            "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "Let me "}}}
        ),
        event(
            "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "think."}}}
        ),
        event(
            "contentBlockDelta",
            {"contentBlockIndex": 0, "delta": {"reasoningContent": {"signature": "sig-xyz"}}},
        ),
        event("contentBlockStop", {"contentBlockIndex": 0}),
        event("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "42"}}),
        event("contentBlockStop", {"contentBlockIndex": 1}),
        event("messageStop", {"stopReason": "max_tokens"}),
        event("metadata", {"usage": usage(5, 6)}),
    ]
    upstream.queue(StreamResponse(frames))
    request = chat_request(user("q"), thinking={"type": "enabled", "budget_tokens": 1024})
    events = await collect((await provider(upstream, http).stream_chat(request, MODEL)).events)
    assert events[:5] == [
        ThinkingDelta(text="Let me "),
        ThinkingDelta(text="think."),
        ThinkingDelta(text="", signature="sig-xyz"),
        TextDelta("42"),
        FinishEvent("length"),
    ]


async def test_stream_json_tool_becomes_text(upstream: BedrockUpstream, http: HttpClient) -> None:
    frames = [
        event("messageStart", {"role": "assistant"}),
        event(
            "contentBlockStart",
            {"contentBlockIndex": 0, "start": {"toolUse": {"toolUseId": "t", "name": "json_response"}}},
        ),
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": '{"a":'}}}),
        event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": " 1}"}}}),
        event("messageStop", {"stopReason": "tool_use"}),
        event("metadata", {"usage": usage(5, 6)}),
    ]
    upstream.queue(StreamResponse(frames))
    request = chat_request(user("q"), response_format=ResponseFormat(type="json_object"))
    events = await collect((await provider(upstream, http).stream_chat(request, MODEL)).events)
    assert events[:3] == [TextDelta('{"a":'), TextDelta(" 1}"), FinishEvent("stop")]


@pytest.mark.parametrize(
    ("exception_type", "status", "retryable"),
    [
        ("throttlingException", 429, True),
        ("modelStreamErrorException", 502, True),
        ("internalServerException", 502, True),
        ("validationException", 400, False),
    ],
)
async def test_stream_exception_event(
    upstream: BedrockUpstream, http: HttpClient, exception_type: str, status: int, retryable: bool
) -> None:
    frames = [*text_stream(["partial"])[:2], exception(exception_type, "Too many tokens, please wait.")]
    upstream.queue(StreamResponse(frames))
    stream = await provider(upstream, http).stream_chat(chat_request(user("hi")), MODEL)
    seen: list[StreamEvent] = []
    with pytest.raises(ProviderError) as info:
        async for e in stream.events:
            seen.append(e)
    assert seen == [TextDelta("partial")]
    assert info.value.status == status
    assert info.value.retryable is retryable
    assert exception_type in info.value.message and "please wait" in info.value.message


async def test_stream_corrupt_crc(upstream: BedrockUpstream, http: HttpClient) -> None:
    upstream.queue(StreamResponse(text_stream(["a"]), corrupt_crc=True))
    stream = await provider(upstream, http).stream_chat(chat_request(user("hi")), MODEL)
    with pytest.raises(ProviderError, match="corrupt"):
        await collect(stream.events)


async def test_stream_cut_short(upstream: BedrockUpstream, http: HttpClient) -> None:
    frames = text_stream(["a", "b"])
    upstream.queue(StreamResponse([*frames[:3], frames[3][:10]]))  # ends inside a frame, no messageStop
    stream = await provider(upstream, http).stream_chat(chat_request(user("hi")), MODEL)
    with pytest.raises(ProviderError) as info:
        await collect(stream.events)
    assert info.value.retryable


async def test_stream_without_metadata_estimates_usage(upstream: BedrockUpstream, http: HttpClient) -> None:
    upstream.queue(StreamResponse(text_stream(["some answer text"])[:-1]))
    stream = await provider(upstream, http).stream_chat(chat_request(user("a question here")), MODEL)
    events = await collect(stream.events)
    final = events[-1]
    assert isinstance(final, UsageEvent)
    assert final.usage.estimated and final.usage.output_tokens > 0 and final.usage.input_tokens > 0
    assert sum(isinstance(e, FinishEvent) for e in events) == 1


async def test_stream_closed_early_releases_connection(upstream: BedrockUpstream, http: HttpClient) -> None:
    upstream.queue(StreamResponse(text_stream(["a"] * 50), delay_s=0.001))
    stream = await provider(upstream, http).stream_chat(chat_request(user("hi")), MODEL)
    first = await anext(stream.events)
    assert first == TextDelta("a")
    await stream.aclose()
    # The client keeps working afterwards.
    response = await provider(upstream, http).chat(chat_request(user("hi")), MODEL)
    assert response.choices[0].message.text() == upstream.default_text


async def test_stream_closed_before_iterating_releases_connection(upstream: BedrockUpstream) -> None:
    client = HttpClient()
    try:
        prov = provider(upstream, client)
        # A 5-second stream: unless aclose releases it, its response stays open until it ends.
        upstream.queue(StreamResponse(text_stream(["a"] * 100), delay_s=0.05))
        stream = await prov.stream_chat(chat_request(user("hi")), MODEL)
        assert client.open_responses() == 1
        await stream.aclose()
        assert client.open_responses() == 0
        response = await asyncio.wait_for(prov.chat(chat_request(user("hi")), MODEL), timeout=2)
        assert response.choices[0].message.text() == upstream.default_text
    finally:
        await client.aclose()


# --- Embeddings ---------------------------------------------------------------------------------


async def test_titan_embeddings(upstream: BedrockUpstream, http: HttpClient) -> None:
    prov = provider(upstream, http)
    request = EmbeddingRequest(model="emb", inputs=["one two", "three"], dimensions=4)
    response = await prov.embed(request, "amazon.titan-embed-text-v2:0")
    bodies = sorted((r.json for r in upstream.requests), key=lambda b: b["inputText"])
    assert bodies == [
        {"inputText": "one two", "normalize": True, "dimensions": 4},
        {"inputText": "three", "normalize": True, "dimensions": 4},
    ]
    assert all(r.operation == "invoke" for r in upstream.requests)
    assert response.vectors == [fake_vector("one two", 4), fake_vector("three", 4)]
    assert response.usage.input_tokens == 3


async def test_cohere_embeddings(upstream: BedrockUpstream, http: HttpClient) -> None:
    texts = [f"text {i}" for i in range(100)]
    response = await provider(upstream, http).embed(
        EmbeddingRequest(model="e", inputs=texts), "cohere.embed-english-v3"
    )
    assert [r.json for r in upstream.requests] == [
        {"texts": texts[:96], "input_type": "search_document"},
        {"texts": texts[96:], "input_type": "search_document"},
    ]
    assert response.vectors == [fake_vector(t) for t in texts]
    assert response.usage.input_tokens == 200 and not response.usage.estimated


async def test_embeddings_of_other_models_are_unsupported(
    upstream: BedrockUpstream, http: HttpClient
) -> None:
    with pytest.raises(UnsupportedOperation):
        await provider(upstream, http).embed(EmbeddingRequest(model="e", inputs=["x"]), "meta.llama3-8b")
    assert upstream.requests == []
