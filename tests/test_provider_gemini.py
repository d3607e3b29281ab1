"""GeminiProvider against a real HTTP Gemini mock on loopback: exact wire JSON both ways."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from mocks import fixtures
from mocks.fixtures import user
from mocks.gemini_upstream import (
    GeminiUpstream,
    candidate,
    response,
    text_chunk,
    text_response,
    usage,
)
from plinth.config.schema import DeploymentConfig
from plinth.providers.base import ProviderError
from plinth.providers.gemini import SKIP_SIGNATURE, GeminiProvider
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
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
    UsageEvent,
)

API_KEY = "AIza-test-secret-key"
http = fixtures.http  # the shared HttpClient fixture


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[GeminiUpstream]:
    async with GeminiUpstream() as server:
        yield server


@pytest.fixture
def provider(upstream: GeminiUpstream, http: HttpClient) -> GeminiProvider:
    upstream.reset()
    deployment = DeploymentConfig(
        provider="gemini", model="gemini-2.5-flash", base_url=upstream.url, api_key=API_KEY
    )
    return GeminiProvider(deployment, http, name="gemini-test")


async def collect(provider: GeminiProvider, request: ChatRequest) -> list[StreamEvent]:
    stream = await provider.stream_chat(request, "gemini-2.5-flash")
    return [event async for event in stream.events]


# --- request translation ---------------------------------------------------------------------


async def test_request_translation_is_exact(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    weather = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"anyOf": [{"const": "c"}, {"const": "f"}]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    request = ChatRequest(
        model="alias",
        messages=[
            Message(role="system", content=[TextPart("Be brief.")]),
            Message(role="system", content=[TextPart("Use metric.")]),
            Message(
                role="user",
                content=[
                    TextPart("What is in these?"),
                    ImagePart.from_url("data:image/jpeg;base64,AAAA"),
                    ImagePart.from_url("gs://bucket/cat.png"),
                    ImagePart.from_url("https://example.com/img/dog.webp?x=1"),
                ],
            ),
            user("And the weather in Paris?"),  # merged into the previous user turn
            Message(
                role="assistant",
                content=[TextPart("Checking.")],
                tool_calls=[ToolCall(id="call_abc", name="get_weather", arguments='{"city": "Paris"}')],
            ),
            Message(role="tool", tool_call_id="call_abc", content=[TextPart('{"temp": 21}')]),
            user("Thanks"),
        ],
        max_tokens=256,
        temperature=0.2,
        top_p=0.9,
        top_k=40,
        stop=["END"],
        seed=7,
        tools=[Tool(name="get_weather", description="Current weather", parameters=weather)],
        tool_choice=ToolChoice(mode="tool", name="get_weather"),
        response_format=ResponseFormat(type="json_schema", name="w", schema={"type": "object"}),
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    upstream.queue_json(text_response("{}"))
    await provider.chat(request, "gemini-2.5-flash")

    sent = upstream.last
    assert sent.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert sent.query == {}
    assert sent.headers["x-goog-api-key"] == API_KEY
    assert sent.body == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "What is in these?"},
                    {"inlineData": {"mimeType": "image/jpeg", "data": "AAAA"}},
                    {"fileData": {"mimeType": "image/png", "fileUri": "gs://bucket/cat.png"}},
                    {
                        "fileData": {
                            "mimeType": "image/webp",
                            "fileUri": "https://example.com/img/dog.webp?x=1",
                        }
                    },
                    {"text": "And the weather in Paris?"},
                ],
            },
            {
                "role": "model",
                "parts": [
                    {"text": "Checking."},
                    # OpenAI-style ids are not Gemini's: not echoed; unsigned history gets the sentinel.
                    {
                        "functionCall": {"name": "get_weather", "args": {"city": "Paris"}},
                        "thoughtSignature": SKIP_SIGNATURE,
                    },
                ],
            },
            {
                "role": "user",
                "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"output": '{"temp": 21}'}}},
                    {"text": "Thanks"},
                ],
            },
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "Use metric."}]},
        "tools": [
            {
                "functionDeclarations": [
                    {"name": "get_weather", "parametersJsonSchema": weather, "description": "Current weather"}
                ]
            }
        ],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
        "generationConfig": {
            "temperature": 0.2,
            "topP": 0.9,
            "topK": 40,
            "maxOutputTokens": 256,
            "seed": 7,
            "stopSequences": ["END"],
            "responseMimeType": "application/json",
            "responseJsonSchema": {"type": "object"},
            "thinkingConfig": {"includeThoughts": True, "thinkingBudget": 1024},
        },
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (ToolChoice(mode="auto"), {"mode": "AUTO"}),
        (ToolChoice(mode="none"), {"mode": "NONE"}),
        (ToolChoice(mode="required"), {"mode": "ANY"}),
    ],
)
async def test_tool_choice_modes(
    provider: GeminiProvider, upstream: GeminiUpstream, choice: ToolChoice, expected: dict[str, Any]
) -> None:
    await provider.chat(
        ChatRequest(model="m", messages=[user("hi")], tools=[Tool(name="f")], tool_choice=choice),
        "gemini-2.5-flash",
    )
    assert upstream.last.body["toolConfig"] == {"functionCallingConfig": expected}


async def test_json_object_and_minimal_request(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    await provider.chat(
        ChatRequest(model="m", messages=[user("hi")], response_format=ResponseFormat(type="json_object")),
        "gemini-2.5-flash",
    )
    assert upstream.last.body == {
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generationConfig": {"responseMimeType": "application/json"},
    }
    await provider.chat(ChatRequest(model="m", messages=[user("hi")]), "gemini-2.5-flash")
    assert upstream.last.body == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


async def test_tool_result_for_unknown_call_is_a_clear_400(provider: GeminiProvider) -> None:
    request = ChatRequest(
        model="m",
        messages=[user("hi"), Message(role="tool", tool_call_id="call_zz", content=[TextPart("x")])],
    )
    with pytest.raises(ProviderError) as info:
        await provider.chat(request, "gemini-2.5-flash")
    assert info.value.status == 400 and info.value.param == "messages" and "call_zz" in info.value.message


async def test_failed_tool_result_uses_error_key(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    request = ChatRequest(
        model="m",
        messages=[
            user("hi"),
            Message(role="assistant", tool_calls=[ToolCall(id="toolu_1", name="f", arguments="{}")]),
            Message(role="tool", tool_call_id="toolu_1", content=[TextPart("boom")], is_error=True),
        ],
    )
    await provider.chat(request, "gemini-2.5-flash")
    contents = upstream.last.body["contents"]
    # A non-OpenAI id is echoed on both sides so Gemini can pair them.
    assert contents[1]["parts"][0]["functionCall"] == {"name": "f", "args": {}, "id": "toolu_1"}
    assert contents[2] == {
        "role": "user",
        "parts": [{"functionResponse": {"name": "f", "response": {"error": "boom"}, "id": "toolu_1"}}],
    }


# --- response translation --------------------------------------------------------------------


async def test_response_with_tool_calls_and_usage(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    upstream.queue_json(
        response(
            [
                candidate(
                    [
                        {"text": "Let me check", "thought": True},
                        {"text": "On it. "},
                        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                        {"functionCall": {"name": "get_time", "args": {}}},
                    ]
                )
            ],
            usage_metadata=usage(100, 20, cached=60, thoughts=30),
            response_id="abc123",
        )
    )
    result = await provider.chat(ChatRequest(model="m", messages=[user("hi")]), "gemini-2.5-flash")
    assert result.id == "chatcmpl-abc123"
    assert result.model == "gemini-2.5-flash"
    (choice,) = result.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == [ThinkingPart("Let me check"), TextPart("On it. ")]
    calls = choice.message.tool_calls
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", '{"city":"Paris"}'), ("get_time", "{}")]
    assert calls[0].id.startswith("call_") and calls[1].id.startswith("call_")
    assert calls[0].id != calls[1].id
    assert result.usage == Usage(
        input_tokens=100, output_tokens=50, cached_input_tokens=60, reasoning_tokens=30
    )


async def test_function_call_ids_and_signatures_round_trip(
    provider: GeminiProvider, upstream: GeminiUpstream
) -> None:
    upstream.queue_json(
        response(
            [
                candidate(
                    [
                        {"text": "Plan", "thought": True, "thoughtSignature": "U0lHMQ=="},
                        {
                            "functionCall": {"id": "fc-9", "name": "lookup", "args": {"q": 1}},
                            "thoughtSignature": "U0lHMg==",
                        },
                    ]
                )
            ]
        )
    )
    first = await provider.chat(ChatRequest(model="m", messages=[user("hi")]), "gemini-2.5-flash")
    message = first.choices[0].message
    assert message.tool_calls == [ToolCall(id="fc-9", name="lookup", arguments='{"q":1}')]
    assert message.content == [
        ThinkingPart("Plan", signature="gemini:U0lHMQ=="),
        ThinkingPart("", signature="gemini:U0lHMg=="),
    ]

    follow_up = ChatRequest(
        model="m",
        messages=[user("hi"), message, Message(role="tool", tool_call_id="fc-9", content=[TextPart("42")])],
    )
    await provider.chat(follow_up, "gemini-2.5-flash")
    assert upstream.last.body["contents"][1:] == [
        {
            "role": "model",
            "parts": [
                {"text": "Plan", "thought": True, "thoughtSignature": "U0lHMQ=="},
                {
                    "functionCall": {"name": "lookup", "args": {"q": 1}, "id": "fc-9"},
                    "thoughtSignature": "U0lHMg==",
                },
            ],
        },
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "lookup", "response": {"output": "42"}, "id": "fc-9"}}],
        },
    ]


async def test_foreign_thinking_is_not_sent_to_gemini(
    provider: GeminiProvider, upstream: GeminiUpstream
) -> None:
    anthropic_turn = Message(
        role="assistant", content=[ThinkingPart("hmm", signature="anthropic-sig"), TextPart("Hello")]
    )
    await provider.chat(ChatRequest(model="m", messages=[user("hi"), anthropic_turn, user("again")]), "g")
    assert upstream.last.body["contents"][1] == {"role": "model", "parts": [{"text": "Hello"}]}


async def test_n_candidates(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    upstream.queue_json(
        response(
            [
                candidate([{"text": "B"}], index=1, finish="MAX_TOKENS"),
                candidate([{"text": "A"}], index=0),
            ],
            usage_metadata=usage(10, 4),
        )
    )
    result = await provider.chat(ChatRequest(model="m", messages=[user("hi")], n=2), "gemini-2.5-flash")
    assert upstream.last.body["generationConfig"] == {"candidateCount": 2}
    assert [(c.index, c.message.text(), c.finish_reason) for c in result.choices] == [
        (0, "A", "stop"),
        (1, "B", "length"),
    ]


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("STOP", "stop"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
        ("RECITATION", "content_filter"),
        ("BLOCKLIST", "content_filter"),
        ("PROHIBITED_CONTENT", "content_filter"),
        ("SPII", "content_filter"),
        ("OTHER", "stop"),
        ("MALFORMED_FUNCTION_CALL", "stop"),
    ],
)
async def test_finish_reasons(
    provider: GeminiProvider, upstream: GeminiUpstream, reason: str, expected: str
) -> None:
    upstream.queue_json(text_response("x", finish=reason))
    result = await provider.chat(ChatRequest(model="m", messages=[user("hi")]), "gemini-2.5-flash")
    assert result.choices[0].finish_reason == expected


async def test_blocked_prompt(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    upstream.queue_json(
        {
            "promptFeedback": {"blockReason": "SAFETY"},
            "usageMetadata": usage(7, 0),
            "modelVersion": "gemini-2.5-flash",
        }
    )
    result = await provider.chat(ChatRequest(model="m", messages=[user("bad")]), "gemini-2.5-flash")
    (choice,) = result.choices
    assert choice.finish_reason == "content_filter" and choice.message.content == []
    assert result.usage.input_tokens == 7


# --- streaming -------------------------------------------------------------------------------


async def test_stream_text_tools_thoughts_and_usage(
    provider: GeminiProvider, upstream: GeminiUpstream
) -> None:
    upstream.queue_stream(
        [
            response(
                [candidate([{"text": "Thinking...", "thought": True}], finish=None)],
                usage_metadata=usage(9, 0),
            ),
            response([candidate([{"text": "Hel"}], finish=None)], usage_metadata=usage(9, 1)),
            response([candidate([{"text": "lo"}], finish=None)]),
            response(
                [
                    candidate(
                        [
                            {
                                "functionCall": {"name": "f", "args": {"a": [1, 2]}},
                                "thoughtSignature": "c2ln",
                            },
                            {"functionCall": {"name": "g", "args": {}}},
                        ],
                        finish="STOP",
                    )
                ],
                usage_metadata=usage(9, 12, cached=4, thoughts=5),
            ),
        ]
    )
    events = await collect(provider, ChatRequest(model="m", messages=[user("hi")], stream=True))
    assert upstream.last.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert upstream.last.query == {"alt": "sse"}
    assert events[:4] == [
        ThinkingDelta(text="Thinking..."),
        TextDelta("Hel"),
        TextDelta("lo"),
        ThinkingDelta(signature="gemini:c2ln"),
    ]
    first, second = events[4], events[5]
    assert isinstance(first, ToolCallDelta) and isinstance(second, ToolCallDelta)
    assert (first.tool_index, first.name, first.arguments) == (0, "f", '{"a":[1,2]}')
    assert (second.tool_index, second.name, second.arguments) == (1, "g", "{}")
    assert first.id and second.id and first.id != second.id
    assert events[6:] == [
        FinishEvent("tool_calls"),
        UsageEvent(Usage(input_tokens=9, output_tokens=17, cached_input_tokens=4, reasoning_tokens=5)),
    ]


async def test_stream_n_candidates(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    upstream.queue_stream(
        [
            response(
                [
                    candidate([{"text": "a"}], finish=None, index=0),
                    candidate([{"text": "b"}], finish=None, index=1),
                ]
            ),
            response([candidate([{"text": "!"}], finish="STOP", index=1)]),
            response([candidate([], finish="MAX_TOKENS", index=0)], usage_metadata=usage(3, 4)),
        ]
    )
    events = await collect(provider, ChatRequest(model="m", messages=[user("hi")], n=2, stream=True))
    assert upstream.last.body["generationConfig"] == {"candidateCount": 2}
    assert events == [
        TextDelta("a", index=0),
        TextDelta("b", index=1),
        TextDelta("!", index=1),
        FinishEvent("stop", index=1),
        FinishEvent("length", index=0),
        UsageEvent(Usage(input_tokens=3, output_tokens=4)),
    ]


async def test_stream_without_usage_is_estimated_and_finished(
    provider: GeminiProvider, upstream: GeminiUpstream
) -> None:
    upstream.queue_stream([text_chunk("abcdefgh")])  # no finishReason, no usageMetadata
    events = await collect(provider, ChatRequest(model="m", messages=[user("hi")], stream=True))
    assert events[:2] == [TextDelta("abcdefgh"), FinishEvent("stop")]
    final = events[2]
    assert isinstance(final, UsageEvent) and final.usage.estimated and final.usage.output_tokens == 2


async def test_stream_blocked_prompt(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    upstream.queue_stream(
        [{"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": usage(4, 0)}]
    )
    events = await collect(provider, ChatRequest(model="m", messages=[user("hi")], stream=True))
    assert events == [FinishEvent("content_filter"), UsageEvent(Usage(input_tokens=4))]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "name", "caller_status", "retryable"),
    [
        (429, "RESOURCE_EXHAUSTED", 429, True),
        (500, "INTERNAL", 502, True),
        (503, "UNAVAILABLE", 502, True),
        (400, "INVALID_ARGUMENT", 400, False),
        (403, "PERMISSION_DENIED", 502, False),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_http_errors_are_classified(
    provider: GeminiProvider,
    upstream: GeminiUpstream,
    status: int,
    name: str,
    caller_status: int,
    retryable: bool,
    streaming: bool,
) -> None:
    upstream.queue_error(status, f"upstream says {name}", name, retry_after=2 if status == 429 else None)
    request = ChatRequest(model="m", messages=[user("hi")], stream=streaming)
    with pytest.raises(ProviderError) as info:
        if streaming:
            await provider.stream_chat(request, "gemini-2.5-flash")  # raises before returning
        else:
            await provider.chat(request, "gemini-2.5-flash")
    error = info.value
    assert (error.status, error.retryable) == (caller_status, retryable)
    assert f"upstream says {name}" in error.message
    assert API_KEY not in str(error)
    if status == 429:
        assert error.retry_after == 2


async def test_bad_api_key_is_an_upstream_auth_fault(
    provider: GeminiProvider, upstream: GeminiUpstream
) -> None:
    upstream.queue_error(400, "API key not valid. Please pass a valid API key.", "INVALID_ARGUMENT")
    with pytest.raises(ProviderError) as info:
        await provider.chat(ChatRequest(model="m", messages=[user("hi")]), "gemini-2.5-flash")
    assert (info.value.status, info.value.kind, info.value.retryable) == (502, "upstream_auth", False)


async def test_mid_stream_error_event(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    upstream.queue_stream(
        [text_chunk("partial")], error={"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}
    )
    stream = await provider.stream_chat(ChatRequest(model="m", messages=[user("hi")], stream=True), "g")
    seen: list[StreamEvent] = []
    with pytest.raises(ProviderError) as info:
        async for event in stream.events:
            seen.append(event)
    assert seen == [TextDelta("partial")]
    assert info.value.retryable and "overloaded" in info.value.message


async def test_mid_stream_disconnect(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    upstream.queue_stream([text_chunk("partial")], disconnect=True)
    stream = await provider.stream_chat(ChatRequest(model="m", messages=[user("hi")], stream=True), "g")
    with pytest.raises(ProviderError) as info:
        async for _event in stream.events:
            pass
    assert info.value.retryable


async def test_connect_error_is_retryable(http: HttpClient) -> None:
    deployment = DeploymentConfig(
        provider="gemini", model="g", base_url="http://127.0.0.1:1", connect_timeout_s=1
    )
    provider = GeminiProvider(deployment, http, name="down")
    with pytest.raises(ProviderError) as info:
        await provider.chat(ChatRequest(model="m", messages=[user("hi")]), "g")
    assert info.value.retryable


async def test_base_url_with_version_and_model_prefix(upstream: GeminiUpstream, http: HttpClient) -> None:
    upstream.reset()
    deployment = DeploymentConfig(provider="gemini", model="g", base_url=upstream.url + "/v1beta/")
    provider = GeminiProvider(deployment, http, name="v")
    await provider.chat(ChatRequest(model="m", messages=[user("hi")]), "models/gemini-2.0-flash")
    assert upstream.last.path == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert "x-goog-api-key" not in upstream.last.headers


# --- embeddings ------------------------------------------------------------------------------


async def test_embeddings(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    upstream.queue_embeddings([[0.1, 0.2], [0.3, 0.4]])
    result = await provider.embed(
        EmbeddingRequest(model="e", inputs=["hello world", "bye"], dimensions=2), "gemini-embedding-001"
    )
    sent = upstream.last
    assert sent.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert sent.headers["x-goog-api-key"] == API_KEY
    assert sent.body == {
        "requests": [
            {
                "model": "models/gemini-embedding-001",
                "content": {"parts": [{"text": "hello world"}]},
                "outputDimensionality": 2,
            },
            {
                "model": "models/gemini-embedding-001",
                "content": {"parts": [{"text": "bye"}]},
                "outputDimensionality": 2,
            },
        ]
    }
    assert result.vectors == [[0.1, 0.2], [0.3, 0.4]]
    assert result.usage == Usage(input_tokens=4, estimated=True)  # 11 chars -> 3, 3 chars -> 1


async def test_embeddings_are_batched_by_100(provider: GeminiProvider, upstream: GeminiUpstream) -> None:
    inputs = [f"text {i}" for i in range(150)]
    result = await provider.embed(EmbeddingRequest(model="e", inputs=inputs), "gemini-embedding-001")
    assert [len(r.body["requests"]) for r in upstream.requests] == [100, 50]
    assert "outputDimensionality" not in upstream.requests[0].body["requests"][0]
    assert len(result.vectors) == 150 and len(result.vectors[0]) == upstream.embedding_dimensions


async def test_embedding_count_mismatch_is_an_upstream_fault(
    provider: GeminiProvider, upstream: GeminiUpstream
) -> None:
    upstream.queue_embeddings([[0.1]])
    with pytest.raises(ProviderError) as info:
        await provider.embed(EmbeddingRequest(model="e", inputs=["a", "b"]), "gemini-embedding-001")
    assert info.value.kind == "bad_upstream_response"
