"""The inbound Anthropic protocol: decoding, encoding and streaming, checked with the official SDK.

Output is fed to the `anthropic` SDK through an httpx MockTransport (httpx2, the SDK's HTTP stack; in memory, no sockets), so the
SDK's own parsing and stream accumulation judge whether Plinth speaks the protocol exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx2 as httpx
import orjson
import pytest
from anthropic.types import Message as SdkMessage
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from plinth.gateway.anthropic_protocol import StreamEncoder, decode_request, encode_response, error_body
from plinth.gateway.errors import GatewayError
from plinth.providers.types import (
    ChatChoice,
    ChatResponse,
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
    Usage,
    UsageEvent,
)

EVENT = TypeAdapter(RawMessageStreamEvent)
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}


def sdk_client(handler: Callable[[httpx.Request], httpx.Response]) -> anthropic.AsyncAnthropic:
    transport = httpx.MockTransport(handler)
    return anthropic.AsyncAnthropic(
        api_key="sk-test",
        base_url="http://plinth.test",
        http_client=httpx.AsyncClient(transport=transport),
        max_retries=0,
    )


def minimal(**fields: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}], **fields}


# --- decode_request --------------------------------------------------------------------------


async def test_decodes_what_the_sdk_sends() -> None:
    sent: list[Any] = []

    def capture(request: httpx.Request) -> httpx.Response:
        sent.append(orjson.loads(request.content))
        return httpx.Response(200, json=encode_response(_response(), "claude-x"))

    params: dict[str, Any] = dict(
        model="claude-x",
        max_tokens=512,
        system=[{"type": "text", "text": "Be terse.", "cache_control": {"type": "ephemeral"}}],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"},
                    {"type": "text", "text": "And tomorrow?"},
                ],
            },
        ],
        tools=[{"name": "get_weather", "description": "Weather", "input_schema": WEATHER_SCHEMA}],
        tool_choice={"type": "any", "disable_parallel_tool_use": True},
        metadata={"user_id": "u-1"},
        stop_sequences=["STOP"],
        thinking={"type": "enabled", "budget_tokens": 1024},
        service_tier="auto",
        extra_body={"temperature": 0.5, "top_k": 5},  # sampling knobs left this SDK's signature
    )
    await sdk_client(capture).messages.create(**params)
    request = decode_request(sent[0])
    assert request.protocol == "anthropic"
    assert (request.model, request.max_tokens, request.stream) == ("claude-x", 512, False)
    assert [m.role for m in request.messages] == ["system", "user", "assistant", "tool", "user"]
    assert request.messages[0].content == [TextPart("Be terse.", cache_control={"type": "ephemeral"})]
    assert request.messages[2].tool_calls == [ToolCall("toolu_1", "get_weather", '{"city":"Paris"}')]
    assert request.messages[3].tool_call_id == "toolu_1"
    assert request.messages[3].content == [TextPart("18C")]
    assert request.messages[4].content == [TextPart("And tomorrow?")]
    assert request.tools[0].name == "get_weather" and request.tools[0].parameters == WEATHER_SCHEMA
    assert request.tool_choice == ToolChoice(mode="required")
    assert request.parallel_tool_calls is False
    assert request.user == "u-1"
    assert request.stop == ["STOP"]
    assert (request.temperature, request.top_k) == (0.5, 5)
    assert request.thinking == {"type": "enabled", "budget_tokens": 1024}
    assert request.extra == {"service_tier": "auto"}


def test_tool_results_become_tool_messages_in_order() -> None:
    request = decode_request(
        minimal(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "a",
                            "content": [{"type": "text", "text": "one"}],
                        },
                        {
                            "type": "tool_result",
                            "tool_use_id": "b",
                            "is_error": True,
                            "content": [
                                {"type": "text", "text": "failed"},
                                {"type": "image", "source": {"type": "url", "url": "https://x.test/e.png"}},
                            ],
                        },
                    ],
                }
            ]
        )
    )
    assert [(m.role, m.tool_call_id, m.is_error) for m in request.messages] == [
        ("tool", "a", False),
        ("tool", "b", True),
    ]
    assert request.messages[1].content == [TextPart("failed"), ImagePart(url="https://x.test/e.png")]


def test_assistant_blocks_and_images() -> None:
    request = decode_request(
        minimal(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"},
                        },
                        {"type": "text", "text": "Describe."},
                    ],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                        {"type": "redacted_thinking", "data": "enc"},
                        {"type": "text", "text": "A cat"},
                    ],
                },
            ]
        )
    )
    assert request.messages[0].content == [
        ImagePart(data="/9j/", media_type="image/jpeg"),
        TextPart("Describe."),
    ]
    assert request.messages[1].content == [
        ThinkingPart("hmm", signature="sig"),
        ThinkingPart("", signature="enc", redacted=True),
        TextPart("A cat"),
    ]


@pytest.mark.parametrize(
    ("choice", "expected", "parallel"),
    [
        ({"type": "auto"}, ToolChoice("auto"), None),
        ({"type": "none"}, ToolChoice("none"), None),
        ({"type": "tool", "name": "f", "disable_parallel_tool_use": False}, ToolChoice("tool", "f"), True),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: ToolChoice, parallel: bool | None) -> None:
    request = decode_request(minimal(tool_choice=choice))
    assert (request.tool_choice, request.parallel_tool_calls) == (expected, parallel)


def test_output_config_format_and_stream() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    body = minimal(
        stream=True, output_config={"format": {"type": "json_schema", "schema": schema}, "effort": "low"}
    )
    request = decode_request(body)
    assert request.stream is True
    assert request.response_format == ResponseFormat(type="json_schema", schema=schema)
    assert request.extra == {"output_config": {"effort": "low"}}


def test_system_turn_inside_messages() -> None:
    body = minimal(
        system="Top.",
        messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "Now be formal."}],
    )
    messages = decode_request(body).messages
    assert [(m.role, m.text()) for m in messages] == [
        ("system", "Top."),
        ("user", "a"),
        ("system", "Now be formal."),
    ]


def test_disabled_thinking_is_none() -> None:
    assert decode_request(minimal(thinking={"type": "disabled"})).thinking is None


def _user(*blocks: Any) -> dict[str, Any]:
    return minimal(messages=[{"role": "user", "content": list(blocks)}])


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ({"model": "m", "max_tokens": 1}, "messages", "field required"),
        (minimal(model=None), "model", "field required"),
        (minimal(model=7), "model", "expected string, got integer"),
        (minimal(model=""), "model", "must not be empty"),
        (minimal(max_tokens=None), "max_tokens", "field required"),
        (minimal(max_tokens="10"), "max_tokens", "expected integer, got string"),
        (minimal(max_tokens=True), "max_tokens", "expected integer, got boolean"),
        (minimal(max_tokens=0), "max_tokens", "at least 1"),
        (minimal(messages=[]), "messages", "at least one message"),
        (minimal(messages={"role": "user"}), "messages", "expected array, got object"),
        (minimal(messages=["hi"]), "messages.0", "expected object"),
        (
            minimal(messages=[{"role": "system", "content": [{"type": "image"}]}]),
            "messages.0.content.0.type",
            "expected 'text'",
        ),
        (minimal(messages=[{"role": "robot", "content": "x"}]), "messages.0.role", "unknown role 'robot'"),
        (minimal(messages=[{"role": "user"}]), "messages.0.content", "field required"),
        (minimal(messages=[{"role": "user", "content": 5}]), "messages.0.content", "expected array"),
        (_user({"text": "no type"}), "messages.0.content.0.type", "field required"),
        (_user({"type": "video"}), "messages.0.content.0.type", "'video' is not supported"),
        (_user({"type": "text", "text": 3}), "messages.0.content.0.text", "expected string"),
        (
            _user({"type": "tool_use", "id": "a", "name": "f", "input": {}}),
            "messages.0.content.0.type",
            "tool_use",
        ),
        (
            _user({"type": "image", "source": {"type": "file", "file_id": "f"}}),
            "messages.0.content.0.source.type",
            "file",
        ),
        (
            _user({"type": "image", "source": {"type": "base64", "data": "x"}}),
            "messages.0.content.0.source.media_type",
            "field required",
        ),
        (
            _user({"type": "tool_result", "tool_use_id": "a", "content": [{"type": "video"}]}),
            "messages.0.content.0.content.0.type",
            "not supported",
        ),
        (
            _user({"type": "tool_result", "content": "x"}),
            "messages.0.content.0.tool_use_id",
            "field required",
        ),
        (
            minimal(
                messages=[
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "a", "name": "f", "input": "{}"}],
                    }
                ]
            ),
            "messages.0.content.0.input",
            "expected object, got string",
        ),
        (minimal(system=[{"type": "image"}]), "system.0.type", "not supported"),
        (minimal(system=5), "system", "expected array"),
        (minimal(tools=[{"name": "f"}]), "tools.0.input_schema", "field required"),
        (
            minimal(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
            "tools.0.type",
            "not supported",
        ),
        (minimal(tool_choice={"type": "maybe"}), "tool_choice.type", "unknown tool_choice type"),
        (minimal(tool_choice={"type": "tool"}), "tool_choice.name", "field required"),
        (minimal(tool_choice="auto"), "tool_choice", "expected object"),
        (minimal(temperature="hot"), "temperature", "expected number"),
        (minimal(stop_sequences=["a", 1]), "stop_sequences.1", "expected string"),
        (minimal(stream="yes"), "stream", "expected boolean"),
        (minimal(metadata={"user_id": 1}), "metadata.user_id", "expected string"),
        (minimal(thinking={"type": "enabled"}), "thinking.budget_tokens", "field required"),
        (minimal(output_config={"format": {"type": "xml"}}), "output_config.format.type", "json_schema"),
    ],
)
def test_bad_input_names_the_field(body: Any, param: str, fragment: str) -> None:
    with pytest.raises(GatewayError) as info:
        decode_request(body)
    err = info.value
    assert err.status == 400
    assert err.param == param
    assert err.message.startswith(f"{param}: ") and fragment in err.message
    assert error_body(err)["error"]["type"] == "invalid_request_error"


def test_body_must_be_an_object() -> None:
    with pytest.raises(GatewayError, match="must be a JSON object, got array"):
        decode_request([1, 2])


# --- encode_response -------------------------------------------------------------------------


def _response(**choice: Any) -> ChatResponse:
    message = Message(
        role="assistant",
        content=[ThinkingPart("reason", signature="sig"), TextPart("Calling."), TextPart("")],
        tool_calls=[ToolCall("toolu_9", "get_weather", '{"city": "Oslo"}')],
    )
    return ChatResponse(
        id="chatcmpl-abc123",
        model="gpt-4o",
        created=0,
        choices=[ChatChoice(index=0, message=message, finish_reason="tool_calls", **choice)],
        usage=Usage(
            input_tokens=150, output_tokens=20, cached_input_tokens=100, cache_creation_input_tokens=30
        ),
    )


def test_encode_response_is_a_valid_message() -> None:
    body = encode_response(_response(), "claude-alias")
    message = SdkMessage.model_validate(body)
    assert message.id == "msg_abc123"
    assert message.model == "claude-alias"
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use"]
    assert message.content[2].input == {"city": "Oslo"}  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    assert message.usage.input_tokens == 20
    assert message.usage.cache_read_input_tokens == 100
    assert message.usage.cache_creation_input_tokens == 30
    assert message.usage.output_tokens == 20


@pytest.mark.parametrize(
    ("finish", "sequence", "stop_reason"),
    [
        ("stop", None, "end_turn"),
        ("stop", "##", "stop_sequence"),
        ("length", None, "max_tokens"),
        ("content_filter", None, "refusal"),
    ],
)
def test_stop_reasons(finish: Any, sequence: str | None, stop_reason: str) -> None:
    resp = _response(stop_sequence=sequence)
    resp.choices[0].finish_reason = finish
    body = encode_response(resp, "m")
    assert (body["stop_reason"], body["stop_sequence"]) == (stop_reason, sequence)


def test_refusal_and_invalid_tool_arguments() -> None:
    resp = _response()
    resp.choices[0].message = Message(role="assistant", refusal="I can't help with that.")
    assert encode_response(resp, "m")["content"] == [{"type": "text", "text": "I can't help with that."}]
    resp.choices[0].message = Message(role="assistant", tool_calls=[ToolCall("call_1", "f", "{oops")])
    with pytest.raises(GatewayError, match="call_1") as info:
        encode_response(resp, "m")
    assert info.value.status == 502


async def test_sdk_reads_encoded_response() -> None:
    client = sdk_client(lambda _: httpx.Response(200, json=encode_response(_response(), "claude-alias")))
    message = await client.messages.create(
        model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}]
    )
    assert message.content[1].text == "Calling."  # type: ignore[union-attr]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "sdk_error"),
    [
        (400, "invalid_request_error", anthropic.BadRequestError),
        (401, "authentication_error", anthropic.AuthenticationError),
        (403, "permission_error", anthropic.PermissionDeniedError),
        (404, "not_found_error", anthropic.NotFoundError),
        (413, "request_too_large", anthropic.APIStatusError),
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (502, "api_error", anthropic.InternalServerError),
        (503, "overloaded_error", anthropic.InternalServerError),
        (504, "timeout_error", anthropic.InternalServerError),
    ],
)
async def test_error_body(status: int, kind: str, sdk_error: type[Exception]) -> None:
    body = error_body(GatewayError(status, "something went wrong"))
    assert body == {"type": "error", "error": {"type": kind, "message": "something went wrong"}}
    client = sdk_client(lambda _: httpx.Response(status, json=body))
    with pytest.raises(sdk_error) as info:
        await client.messages.create(model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert "something went wrong" in str(info.value)


# --- StreamEncoder ---------------------------------------------------------------------------


def parse_sse(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    """Split SSE bytes into (event, payload), insisting on Anthropic's exact framing."""
    assert data.endswith(b"\n\n")
    events = []
    for frame in data[:-2].split(b"\n\n"):
        event_line, data_line = frame.split(b"\n")
        assert event_line.startswith(b"event: ") and data_line.startswith(b"data: ")
        events.append((event_line[7:].decode(), orjson.loads(data_line[6:])))
    return events


def encode_all(events: list[StreamEvent]) -> bytes:
    encoder = StreamEncoder("msg_stream1", "claude-alias")
    return encoder.start() + b"".join(encoder.encode(e) for e in events) + encoder.finish()


STREAM: list[StreamEvent] = [
    ThinkingDelta("Let me "),
    ThinkingDelta("think."),
    ThinkingDelta(signature="sig-abc"),
    TextDelta("I'll check "),
    TextDelta("two cities."),
    ToolCallDelta(0, id="toolu_a", name="get_weather"),
    ToolCallDelta(0, arguments='{"city": '),
    ToolCallDelta(0, arguments='"Paris"}'),
    ToolCallDelta(1, id="toolu_b", name="get_weather", arguments='{"city": "Lima"}'),
    TextDelta("Done."),
    FinishEvent("tool_calls"),
    UsageEvent(Usage(input_tokens=500, output_tokens=42, cached_input_tokens=400)),
]


def test_stream_events_validate_and_frame_exactly() -> None:
    events = parse_sse(encode_all(STREAM))
    for name, payload in events:
        assert payload["type"] == name
        if name != "ping":  # ping is not part of the SDK's event union
            EVENT.validate_python(payload)
    names = [name for name, _ in events]
    assert names[:2] == ["message_start", "ping"]
    assert names[-2:] == ["message_delta", "message_stop"]
    starts = [p["content_block"]["type"] for n, p in events if n == "content_block_start"]
    assert starts == ["thinking", "text", "tool_use", "tool_use", "text"]
    indexes = [p["index"] for n, p in events if n == "content_block_start"]
    assert indexes == [0, 1, 2, 3, 4]
    assert names.count("content_block_stop") == 5
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert delta["usage"] == {
        "input_tokens": 100,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 400,
        "output_tokens": 42,
    }


def test_start_bytes_are_anthropics() -> None:
    start = StreamEncoder("msg_1", "claude").start()
    assert start.startswith(b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1"')
    assert start.endswith(b'event: ping\ndata: {"type":"ping"}\n\n')


def test_finish_and_usage_are_held_until_finish() -> None:
    encoder = StreamEncoder("msg_1", "claude")
    encoder.start()
    assert encoder.encode(TextDelta("")) == b""
    assert encoder.encode(FinishEvent("stop", stop_sequence="END")) == b""
    assert encoder.encode(UsageEvent(Usage(input_tokens=3, output_tokens=1))) == b""
    events = parse_sse(encoder.finish())
    assert [n for n, _ in events] == ["message_delta", "message_stop"]  # no block was opened
    assert events[0][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "END"}


async def test_sdk_accumulates_the_stream() -> None:
    body = encode_all(STREAM)
    client = sdk_client(
        lambda _: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
    )
    async with client.messages.stream(
        model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        message = await stream.get_final_message()
    assert text == "I'll check two cities.Done."
    assert message.id == "msg_stream1"
    assert [b.type for b in message.content] == ["thinking", "text", "tool_use", "tool_use", "text"]
    thinking, _, first, second, _ = message.content
    assert (thinking.thinking, thinking.signature) == ("Let me think.", "sig-abc")  # type: ignore[union-attr]
    assert (first.id, first.input) == ("toolu_a", {"city": "Paris"})  # type: ignore[union-attr]
    assert (second.id, second.input) == ("toolu_b", {"city": "Lima"})  # type: ignore[union-attr]
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (100, 42)
    assert message.usage.cache_read_input_tokens == 400


async def test_mid_stream_error_reaches_the_sdk() -> None:
    encoder = StreamEncoder("msg_1", "claude")
    err = GatewayError(503, "upstream overloaded")
    body = encoder.start() + encoder.encode(TextDelta("partial")) + encoder.error(err)
    assert parse_sse(encoder.error(err)) == [("error", error_body(err))]
    client = sdk_client(
        lambda _: httpx.Response(200, content=body, headers={"content-type": "text/event-stream"})
    )
    with pytest.raises(anthropic.APIStatusError, match="upstream overloaded"):
        async with client.messages.stream(
            model="m", max_tokens=10, messages=[{"role": "user", "content": "x"}]
        ) as s:
            await s.get_final_message()


def test_thinking_after_a_signature_opens_a_new_block() -> None:
    events = parse_sse(
        encode_all(
            [
                ThinkingDelta("a"),
                ThinkingDelta(signature="s1"),
                ThinkingDelta("b"),
                ThinkingDelta(signature="s2"),
            ]
        )
    )
    starts = [p["index"] for n, p in events if n == "content_block_start"]
    assert starts == [0, 1]
