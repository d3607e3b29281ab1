"""End-to-end across protocols and providers: either inbound protocol reaches any provider.

The official `openai` SDK talks to aliases on the Gemini, Bedrock and Anthropic mocks, the official
`anthropic` SDK to aliases on Gemini and Bedrock, and `/v1/embeddings` reaches the local model,
Gemini and Bedrock. Every test checks both what the client got and what reached the upstream.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import USER_KEY, GatewayServer, wait_for
from mocks import anthropic_upstream as am
from mocks import bedrock_upstream as bm
from mocks import gemini_upstream as gm
from mocks.anthropic_upstream import AnthropicUpstream
from mocks.bedrock_upstream import BedrockUpstream
from mocks.gemini_upstream import GeminiUpstream

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
BEDROCK_MODEL = "anthropic.claude-3-5-haiku-20241022-v1:0"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@dataclass
class Upstreams:
    gemini: GeminiUpstream
    bedrock: BedrockUpstream
    anthropic: AnthropicUpstream


@pytest.fixture
async def upstreams() -> AsyncIterator[Upstreams]:
    ups = Upstreams(
        await GeminiUpstream().start(), await BedrockUpstream().start(), await AnthropicUpstream().start()
    )
    yield ups
    await ups.gemini.close()
    await ups.bedrock.close()
    await ups.anthropic.close()


def _bedrock(ups: Upstreams, model: str) -> dict[str, Any]:
    return {
        "provider": "bedrock",
        "model": model,
        "base_url": ups.bedrock.url,
        "region": bm.REGION,
        "aws_access_key_id": bm.ACCESS_KEY,
        "aws_secret_access_key": bm.SECRET_KEY,
    }


def _gemini(ups: Upstreams, model: str) -> dict[str, Any]:
    return {"provider": "gemini", "model": model, "base_url": ups.gemini.url, "api_key": "gm-upstream-key"}


@pytest.fixture
def config(upstreams: Upstreams) -> dict[str, Any]:
    no_retry = {"retries": 0}
    models: list[dict[str, Any]] = [
        {"name": "gemini", "deployments": [_gemini(upstreams, "gemini-2.5-flash")], "routing": no_retry},
        {"name": "bedrock", "deployments": [_bedrock(upstreams, BEDROCK_MODEL)], "routing": no_retry},
        {
            "name": "anthropic",
            "deployments": [
                {
                    "provider": "anthropic",
                    "model": "claude-sonnet-4-5",
                    "base_url": upstreams.anthropic.url,
                    "api_key": "sk-ant-upstream",
                }
            ],
            "routing": no_retry,
        },
        {
            "name": "gemini-embed",
            "type": "embedding",
            "deployments": [_gemini(upstreams, "gemini-embedding-001")],
        },
        {
            "name": "titan-embed",
            "type": "embedding",
            "deployments": [_bedrock(upstreams, "amazon.titan-embed-text-v2:0")],
        },
    ]
    names = [m["name"] for m in models] + ["minilm"]
    return {"models": models, "keys": [{"name": "team-a", "key": USER_KEY, "models": names}]}


def oai(server: GatewayServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=USER_KEY, max_retries=0)


def claude(server: GatewayServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key=USER_KEY, max_retries=0)


def metric(server: GatewayServer, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


# --- scripting each upstream the same way ------------------------------------------------------


def queue_text(ups: Upstreams, alias: str, text: str, *, fresh: int, output: int, cached: int) -> None:
    """An answer whose prompt had `fresh` uncached and `cached` cached tokens."""
    if alias == "gemini":
        ups.gemini.queue_json(
            gm.text_response(text, usage_metadata=gm.usage(fresh + cached, output, cached=cached))
        )
    elif alias == "bedrock":
        usage = bm.usage(fresh, output, cacheReadInputTokens=cached)
        ups.bedrock.queue(bm.JsonResponse(bm.converse_answer([{"text": text}], token_usage=usage)))
    else:
        ups.anthropic.queue(am.text_reply(text, usage_=am.usage(fresh, output, cache_read=cached)))


def queue_tool_call(ups: Upstreams, alias: str, call_id: str, args: dict[str, Any], *, stream: bool) -> None:
    if alias == "gemini":
        part = {"functionCall": {"id": call_id, "name": "get_weather", "args": args}}
        body = gm.response([gm.candidate([part])], usage_metadata=gm.usage(10, 5))
        if stream:
            ups.gemini.queue_stream([body])
        else:
            ups.gemini.queue_json(body)
    elif alias == "bedrock":
        if stream:
            arguments = json.dumps(args)
            frames = [
                bm.event("messageStart", {"role": "assistant"}),
                bm.event(
                    "contentBlockStart",
                    {
                        "contentBlockIndex": 0,
                        "start": {"toolUse": {"toolUseId": call_id, "name": "get_weather"}},
                    },
                ),
                *(
                    bm.event(
                        "contentBlockDelta", {"contentBlockIndex": 0, "delta": {"toolUse": {"input": piece}}}
                    )
                    for piece in (arguments[:5], arguments[5:])
                ),
                bm.event("contentBlockStop", {"contentBlockIndex": 0}),
                bm.event("messageStop", {"stopReason": "tool_use"}),
                bm.event("metadata", {"usage": bm.usage(10, 5), "metrics": {"latencyMs": 1}}),
            ]
            ups.bedrock.queue(bm.StreamResponse(frames))
        else:
            use = {"toolUse": {"toolUseId": call_id, "name": "get_weather", "input": args}}
            ups.bedrock.queue(bm.JsonResponse(bm.converse_answer([use], stop_reason="tool_use")))
    else:
        ups.anthropic.queue(am.tool_reply("get_weather", args, id=call_id))


def last_body(ups: Upstreams, alias: str) -> dict[str, Any]:
    if alias == "gemini":
        return ups.gemini.last.body
    if alias == "bedrock":
        return ups.bedrock.requests[-1].json
    return ups.anthropic.last.body


PROVIDERS = ["gemini", "bedrock", "anthropic"]


# --- the OpenAI SDK against each provider ------------------------------------------------------


@pytest.mark.parametrize("alias", PROVIDERS)
async def test_openai_sdk_chat(
    gateway_factory: Any, config: dict[str, Any], upstreams: Upstreams, alias: str
) -> None:
    server = gateway_factory(config)
    queue_text(upstreams, alias, "Hi there", fresh=12, output=4, cached=8)
    raw = await oai(server).chat.completions.with_raw_response.create(
        model=alias,
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_completion_tokens=64,
        temperature=0.5,
        stop=["END"],
    )
    answer = raw.parse()
    assert raw.headers["x-request-id"]
    assert answer.choices[0].message.content == "Hi there" and answer.choices[0].finish_reason == "stop"
    usage = answer.usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (20, 4)
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 8

    body = last_body(upstreams, alias)
    if alias == "gemini":
        assert upstreams.gemini.last.operation == "generateContent"
        assert upstreams.gemini.last.path == "/v1beta/models/gemini-2.5-flash:generateContent"
        assert upstreams.gemini.last.headers["x-goog-api-key"] == "gm-upstream-key"
        assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
        assert body["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]
        assert body["generationConfig"] == {
            "temperature": 0.5,
            "maxOutputTokens": 64,
            "stopSequences": ["END"],
        }
    elif alias == "bedrock":
        assert upstreams.bedrock.requests[-1].operation == "converse"
        assert upstreams.bedrock.requests[-1].model == BEDROCK_MODEL
        assert body["system"] == [{"text": "Be brief."}]
        assert body["messages"] == [{"role": "user", "content": [{"text": "hi"}]}]
        assert body["inferenceConfig"] == {"maxTokens": 64, "temperature": 0.5, "stopSequences": ["END"]}
    else:
        assert body["system"] == [{"type": "text", "text": "Be brief."}]
        assert body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        assert body["max_tokens"] == 64 and body["temperature"] == 0.5 and body["stop_sequences"] == ["END"]


@pytest.mark.parametrize("alias", PROVIDERS)
async def test_openai_sdk_stream_usage_chunk_only_when_asked(
    gateway_factory: Any, config: dict[str, Any], alias: str
) -> None:
    server = gateway_factory(config)
    expected = {
        "gemini": "Hello from Gemini",
        "bedrock": "Hello from Bedrock",
        "anthropic": "Hello from the mock.",
    }
    prompt_tokens = {"gemini": 5, "bedrock": 10, "anthropic": 10}[alias]
    before = metric(server, "plinth_tokens_total", kind="input", model=alias)

    stream = await oai(server).chat.completions.create(
        model=alias, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[alias]
    assert all(c.usage is None and c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"

    stream = await oai(server).chat.completions.create(
        model=alias,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[alias]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    # Both streams were metered, including the one whose client did not ask for usage.
    assert metric(server, "plinth_tokens_total", kind="input", model=alias) == before + 2 * prompt_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("alias", PROVIDERS)
async def test_openai_sdk_tool_call_round_trip(
    gateway_factory: Any, config: dict[str, Any], upstreams: Upstreams, alias: str, stream: bool
) -> None:
    server = gateway_factory(config)
    queue_tool_call(upstreams, alias, "toolu_abc", {"city": "Oslo"}, stream=stream)
    messages: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    if stream:
        async with oai(server).chat.completions.stream(model=alias, messages=messages, tools=[WEATHER]) as s:
            first = await s.get_final_completion()
    else:
        first = await oai(server).chat.completions.create(
            model=alias, messages=messages, tools=[WEATHER], tool_choice="required"
        )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].id == "toolu_abc" and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Oslo"}
    body = last_body(upstreams, alias)
    if alias == "gemini":
        declaration = body["tools"][0]["functionDeclarations"][0]
        assert declaration == {
            "name": "get_weather",
            "description": "Weather for a city",
            "parametersJsonSchema": WEATHER["function"]["parameters"],
        }
        if not stream:
            assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    elif alias == "bedrock":
        assert body["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"] == {
            "json": WEATHER["function"]["parameters"]
        }
        if not stream:
            assert body["toolConfig"]["toolChoice"] == {"any": {}}
    else:
        assert body["tools"][0]["input_schema"] == WEATHER["function"]["parameters"]
        if not stream:
            assert body["tool_choice"] == {"type": "any"}

    # Second turn: the caller sends the call and its result back.
    queue_text(upstreams, alias, "It is sunny.", fresh=30, output=4, cached=0)
    messages += [
        first.choices[0].message.model_dump(exclude_none=True, exclude={"parsed"}),
        {"role": "tool", "tool_call_id": "toolu_abc", "content": "sunny"},
    ]
    second = await oai(server).chat.completions.create(model=alias, messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == "It is sunny."
    body = last_body(upstreams, alias)
    if alias == "gemini":
        assert body["contents"][1]["role"] == "model"
        assert body["contents"][1]["parts"][0]["functionCall"] == {
            "name": "get_weather",
            "args": {"city": "Oslo"},
            "id": "toolu_abc",
        }
        assert body["contents"][2] == {
            "role": "user",
            "parts": [
                {
                    "functionResponse": {
                        "name": "get_weather",
                        "response": {"output": "sunny"},
                        "id": "toolu_abc",
                    }
                }
            ],
        }
    elif alias == "bedrock":
        assert body["messages"][1] == {
            "role": "assistant",
            "content": [
                {"toolUse": {"toolUseId": "toolu_abc", "name": "get_weather", "input": {"city": "Oslo"}}}
            ],
        }
        assert body["messages"][2] == {
            "role": "user",
            "content": [{"toolResult": {"toolUseId": "toolu_abc", "content": [{"text": "sunny"}]}}],
        }
    else:
        assert body["messages"][1] == {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_abc", "name": "get_weather", "input": {"city": "Oslo"}}
            ],
        }
        assert body["messages"][2] == {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_abc",
                    "content": [{"type": "text", "text": "sunny"}],
                }
            ],
        }


@pytest.mark.parametrize("alias", PROVIDERS)
async def test_openai_sdk_image_parts(
    gateway_factory: Any, config: dict[str, Any], upstreams: Upstreams, alias: str
) -> None:
    server = gateway_factory(config)
    content: list[Any] = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
    ]
    answer = await oai(server).chat.completions.create(
        model=alias, messages=[{"role": "user", "content": content}]
    )
    assert answer.choices[0].message.content
    parts = last_body(upstreams, alias)
    if alias == "gemini":
        assert parts["contents"][0]["parts"] == [
            {"text": "What is this?"},
            {"inlineData": {"mimeType": "image/png", "data": PNG}},
        ]
    elif alias == "bedrock":
        assert parts["messages"][0]["content"] == [
            {"text": "What is this?"},
            {"image": {"format": "png", "source": {"bytes": PNG}}},
        ]
    else:
        assert parts["messages"][0]["content"] == [
            {"type": "text", "text": "What is this?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        ]

    by_url: list[Any] = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]
    if alias == "bedrock":  # Converse takes inline bytes only: a clear 400, not a 500
        with pytest.raises(openai.BadRequestError, match="inline images"):
            await oai(server).chat.completions.create(
                model=alias, messages=[{"role": "user", "content": by_url}]
            )
        return
    await oai(server).chat.completions.create(model=alias, messages=[{"role": "user", "content": by_url}])
    parts = last_body(upstreams, alias)
    if alias == "gemini":
        assert parts["contents"][0]["parts"] == [
            {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.jpg"}}
        ]
    else:
        assert parts["messages"][0]["content"] == [
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}
        ]


@pytest.mark.parametrize("alias", PROVIDERS)
async def test_openai_sdk_response_format_json_schema(
    gateway_factory: Any, config: dict[str, Any], upstreams: Upstreams, alias: str
) -> None:
    server = gateway_factory(config)
    if alias == "gemini":
        upstreams.gemini.queue_json(gm.text_response('{"city": "Oslo"}'))
    elif alias == "bedrock":
        use = {"toolUse": {"toolUseId": "t1", "name": "json_response", "input": {"city": "Oslo"}}}
        upstreams.bedrock.queue(bm.JsonResponse(bm.converse_answer([use], stop_reason="tool_use")))
    else:
        upstreams.anthropic.queue(am.tool_reply("json_response", {"city": "Oslo"}))
    answer = await oai(server).chat.completions.create(
        model=alias,
        messages=[{"role": "user", "content": "Pick a city."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": SCHEMA, "strict": True},
        },
    )
    choice = answer.choices[0]
    assert json.loads(choice.message.content or "") == {"city": "Oslo"}
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    body = last_body(upstreams, alias)
    if alias == "gemini":
        assert body["generationConfig"] == {
            "responseMimeType": "application/json",
            "responseJsonSchema": SCHEMA,
        }
    elif alias == "bedrock":
        assert body["toolConfig"]["tools"][0]["toolSpec"]["name"] == "json_response"
        assert body["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"] == {"json": SCHEMA}
        assert body["toolConfig"]["toolChoice"] == {"tool": {"name": "json_response"}}
    else:
        assert body["tools"][0]["name"] == "json_response" and body["tools"][0]["input_schema"] == SCHEMA
        assert body["tool_choice"] == {"type": "tool", "name": "json_response"}


async def test_n_fans_out_on_anthropic_and_uses_candidate_count_on_gemini(
    gateway_factory: Any, config: dict[str, Any], upstreams: Upstreams
) -> None:
    server = gateway_factory(config)
    upstreams.anthropic.queue(am.text_reply("one"), am.text_reply("two"))
    before = len(upstreams.anthropic.requests)
    answer = await oai(server).chat.completions.create(
        model="anthropic", n=2, messages=[{"role": "user", "content": "say a number"}]
    )
    assert len(upstreams.anthropic.requests) == before + 2
    assert all("n" not in r.body for r in upstreams.anthropic.requests[before:])
    assert [c.index for c in answer.choices] == [0, 1]
    assert sorted(c.message.content or "" for c in answer.choices) == ["one", "two"]
    assert answer.usage is not None and answer.usage.prompt_tokens == 20  # each call billed the prompt

    stream = await oai(server).chat.completions.create(
        model="anthropic", n=2, stream=True, messages=[{"role": "user", "content": "hi"}]
    )
    texts = {0: "", 1: ""}
    async for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == {0: "Hello from the mock.", 1: "Hello from the mock."}

    upstreams.gemini.queue_json(
        gm.response(
            [gm.candidate([{"text": "uno"}], index=0), gm.candidate([{"text": "dos"}], index=1)],
            usage_metadata=gm.usage(5, 2),
        )
    )
    answer = await oai(server).chat.completions.create(
        model="gemini", n=2, messages=[{"role": "user", "content": "say a number"}]
    )
    assert upstreams.gemini.last.body["generationConfig"]["candidateCount"] == 2
    assert [(c.index, c.message.content) for c in answer.choices] == [(0, "uno"), (1, "dos")]

    upstreams.gemini.queue_stream(
        [
            gm.response([gm.candidate([{"text": "u"}], index=0, finish=None)]),
            gm.response([gm.candidate([{"text": "d"}], index=1, finish=None)]),
            gm.response(
                [gm.candidate([{"text": "no"}], index=0), gm.candidate([{"text": "os"}], index=1)],
                usage_metadata=gm.usage(5, 4),
            ),
        ]
    )
    stream = await oai(server).chat.completions.create(
        model="gemini",
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "x"}],
    )
    texts = {0: "", 1: ""}
    finishes: dict[int, str | None] = {}
    usage = None
    async for c in stream:
        usage = c.usage or usage
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            finishes[ch.index] = ch.finish_reason or finishes.get(ch.index)
    assert texts == {0: "uno", 1: "dos"} and finishes == {0: "stop", 1: "stop"}
    assert usage is not None and usage.completion_tokens == 4
    assert upstreams.gemini.last.body["generationConfig"]["candidateCount"] == 2


# --- the Anthropic SDK against Gemini and Bedrock ----------------------------------------------


@pytest.mark.parametrize("alias", ["gemini", "bedrock"])
async def test_anthropic_sdk_chat_tools_and_stream(
    gateway_factory: Any, config: dict[str, Any], upstreams: Upstreams, alias: str
) -> None:
    server = gateway_factory(config)
    queue_text(upstreams, alias, "Rainy.", fresh=12, output=3, cached=8)
    tool = {"name": "get_weather", "input_schema": SCHEMA}
    raw = await claude(server).messages.with_raw_response.create(
        model=alias,
        max_tokens=100,
        system="Be brief.",
        tools=[tool],
        messages=[
            {"role": "user", "content": "Weather in Oslo?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_1", "content": "rain", "is_error": True}
                ],
            },
        ],
    )
    answer = await raw.parse()
    assert raw.headers["request-id"] and raw.headers["x-request-id"] == raw.headers["request-id"]
    assert answer.content[0].type == "text" and answer.content[0].text == "Rainy."
    assert answer.stop_reason == "end_turn" and answer.model == alias
    assert answer.usage.input_tokens == 12 and answer.usage.cache_read_input_tokens == 8
    assert answer.usage.output_tokens == 3
    body = last_body(upstreams, alias)
    if alias == "gemini":
        assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
        assert body["contents"][2] == {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"error": "rain"}, "id": "toolu_1"}}
            ],
        }
        assert body["generationConfig"]["maxOutputTokens"] == 100
    else:
        assert body["system"] == [{"text": "Be brief."}]
        assert body["messages"][2]["content"] == [
            {"toolResult": {"toolUseId": "toolu_1", "content": [{"text": "rain"}], "status": "error"}}
        ]
        assert body["inferenceConfig"]["maxTokens"] == 100

    # Streaming tool use reaches the Anthropic client as input_json_delta events.
    queue_tool_call(upstreams, alias, "toolu_2", {"city": "Bergen"}, stream=True)
    kinds: list[str] = []
    async with claude(server).messages.stream(
        model=alias, max_tokens=100, tools=[tool], messages=[{"role": "user", "content": "Bergen?"}]
    ) as stream:
        async for event in stream:
            if event.type == "content_block_delta":
                kinds.append(event.delta.type)
        final = await stream.get_final_message()
    assert "input_json_delta" in kinds
    assert final.stop_reason == "tool_use"
    use = final.content[-1]
    assert use.type == "tool_use" and use.id == "toolu_2" and use.input == {"city": "Bergen"}
    assert final.usage.output_tokens == 5

    # And plain streamed text.
    async with claude(server).messages.stream(
        model=alias, max_tokens=100, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert text == {"gemini": "Hello from Gemini", "bedrock": "Hello from Bedrock"}[alias]


async def test_gemini_thought_signatures_survive_the_anthropic_protocol(
    gateway_factory: Any, config: dict[str, Any], upstreams: Upstreams
) -> None:
    """Gemini signs text and function-call parts; Anthropic clients must get (and give back) those signatures."""
    server = gateway_factory(config)
    call = {
        "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
        "thoughtSignature": "c2lnLWNhbGw=",
    }
    upstreams.gemini.queue_stream(
        [
            gm.response([gm.candidate([{"text": "Let me think.", "thought": True}], finish=None)]),
            gm.response(
                [gm.candidate([{"text": "Checking.", "thoughtSignature": "c2lnLXRleHQ="}], finish=None)]
            ),
            gm.response([gm.candidate([call])], usage_metadata=gm.usage(10, 5, thoughts=3)),
        ]
    )
    async with claude(server).messages.stream(
        model="gemini",
        max_tokens=500,
        thinking={"type": "enabled", "budget_tokens": 256},
        tools=[{"name": "get_weather", "input_schema": SCHEMA}],
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
    ) as stream:
        final = await stream.get_final_message()
    blocks = [b.model_dump() for b in final.content]
    assert [b["type"] for b in blocks] == ["thinking", "thinking", "text", "thinking", "tool_use"]
    assert blocks[0]["thinking"] == "Let me think."
    assert blocks[1]["signature"] == "gemini:c2lnLXRleHQ=" and blocks[1]["thinking"] == ""
    assert blocks[2]["text"] == "Checking."
    assert blocks[3]["signature"] == "gemini:c2lnLWNhbGw=" and blocks[3]["thinking"] == ""
    assert final.stop_reason == "tool_use"
    assert upstreams.gemini.last.body["generationConfig"]["thinkingConfig"] == {
        "includeThoughts": True,
        "thinkingBudget": 256,
    }

    # The same reply, not streamed, has the same blocks.
    upstreams.gemini.queue_json(
        gm.response(
            [gm.candidate([{"text": "Checking.", "thoughtSignature": "c2lnLXRleHQ="}, call])],
            usage_metadata=gm.usage(10, 5),
        )
    )
    answer = await claude(server).messages.create(
        model="gemini",
        max_tokens=500,
        tools=[{"name": "get_weather", "input_schema": SCHEMA}],
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
    )
    plain = [b.model_dump() for b in answer.content]
    assert [b["type"] for b in plain] == ["thinking", "text", "thinking", "tool_use"]
    assert plain[0]["signature"] == "gemini:c2lnLXRleHQ=" and plain[2]["signature"] == "gemini:c2lnLWNhbGw="

    # Replayed to Gemini, each signature goes back on the part it belongs to.
    history: list[Any] = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": blocks},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": blocks[4]["id"], "content": "sunny"}],
        },
    ]
    await claude(server).messages.create(
        model="gemini",
        max_tokens=100,
        tools=[{"name": "get_weather", "input_schema": SCHEMA}],
        messages=history,
    )
    model_turn = upstreams.gemini.last.body["contents"][1]
    assert model_turn["role"] == "model"
    assert model_turn["parts"] == [
        {"text": "Checking.", "thoughtSignature": "c2lnLXRleHQ="},
        {
            "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}},
            "thoughtSignature": "c2lnLWNhbGw=",
        },
    ]

    # Replayed to Anthropic, Gemini's signatures (meaningless there, and refused) are dropped.
    await claude(server).messages.create(
        model="anthropic",
        max_tokens=100,
        tools=[{"name": "get_weather", "input_schema": SCHEMA}],
        messages=history,
    )
    assistant = upstreams.anthropic.last.body["messages"][1]
    assert [b["type"] for b in assistant["content"]] == ["text", "tool_use"]
    assert "gemini:" not in json.dumps(upstreams.anthropic.last.body)

    # And to Bedrock too.
    await claude(server).messages.create(
        model="bedrock",
        max_tokens=100,
        tools=[{"name": "get_weather", "input_schema": SCHEMA}],
        messages=history,
    )
    sent = upstreams.bedrock.requests[-1].json
    assert [next(iter(b)) for b in sent["messages"][1]["content"]] == ["text", "toolUse"]
    assert "gemini:" not in json.dumps(sent)


async def test_bedrock_reasoning_reaches_the_anthropic_client(
    gateway_factory: Any, config: dict[str, Any], upstreams: Upstreams
) -> None:
    server = gateway_factory(config)
    reasoning = {"reasoningContent": {"reasoningText": {"text": "Think.", "signature": "bedrock-sig"}}}
    upstreams.bedrock.queue(bm.JsonResponse(bm.converse_answer([reasoning, {"text": "Done."}])))
    answer = await claude(server).messages.create(
        model="bedrock",
        max_tokens=2000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[{"role": "user", "content": "hi"}],
    )
    blocks = [b.model_dump() for b in answer.content]
    assert blocks == [
        {"type": "thinking", "thinking": "Think.", "signature": "bedrock-sig"},
        {"type": "text", "text": "Done.", "citations": None},
    ]
    sent = upstreams.bedrock.requests[-1].json
    assert sent["additionalModelRequestFields"] == {"thinking": {"type": "enabled", "budget_tokens": 1024}}

    # The signed reasoning goes back to Bedrock unchanged on the next turn.
    await claude(server).messages.create(
        model="bedrock",
        max_tokens=2000,
        thinking={"type": "enabled", "budget_tokens": 1024},
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": blocks},
            {"role": "user", "content": "again"},
        ],
    )
    assert upstreams.bedrock.requests[-1].json["messages"][1]["content"] == [reasoning, {"text": "Done."}]


# --- embeddings --------------------------------------------------------------------------------


async def test_embeddings_through_gemini_and_bedrock(
    gateway_factory: Any, config: dict[str, Any], upstreams: Upstreams
) -> None:
    server = gateway_factory(config)
    result = await oai(server).embeddings.create(
        model="gemini-embed", input=["alpha", "beta"], dimensions=4, encoding_format="float"
    )
    assert [len(d.embedding) for d in result.data] == [4, 4]
    assert result.usage.prompt_tokens > 0
    sent = upstreams.gemini.last
    assert sent.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert sent.body["requests"] == [
        {
            "model": "models/gemini-embedding-001",
            "content": {"parts": [{"text": t}]},
            "outputDimensionality": 4,
        }
        for t in ("alpha", "beta")
    ]

    result = await oai(server).embeddings.create(
        model="titan-embed", input=["one two", "three"], dimensions=8
    )
    assert [d.embedding for d in result.data] == [
        pytest.approx(bm.fake_vector("one two", 8)),
        pytest.approx(bm.fake_vector("three", 8)),
    ]
    assert result.usage.prompt_tokens == 3
    titan = upstreams.bedrock.requests[-2:]
    assert {r.operation for r in titan} == {"invoke"} and {r.model for r in titan} == {
        "amazon.titan-embed-text-v2:0"
    }
    assert sorted(r.json["inputText"] for r in titan) == ["one two", "three"]
    assert all(r.json["dimensions"] == 8 and r.json["normalize"] is True for r in titan)


async def test_embeddings_with_the_local_model(gateway_factory: Any, config: dict[str, Any]) -> None:
    pytest.importorskip("torch")
    from plinth.providers.local import SHARED

    config["models"].append(
        {
            "name": "minilm",
            "type": "embedding",
            "deployments": [{"provider": "local", "model": "all-MiniLM-L6-v2"}],
        }
    )
    SHARED.unload()
    loads = SHARED.loads
    server = gateway_factory(config)
    # Serving does not wait for the model; the warm-up loads it in the background.
    assert httpx.get(server.url + "/readyz").status_code == 200
    await wait_for(lambda: SHARED.loads > loads, timeout=60)

    result = await oai(server).embeddings.create(
        model="minilm",
        input=["The cat sat on the mat.", "A cat is sitting on a rug.", "Quarterly revenue grew 4%."],
        encoding_format="float",
    )
    vectors = [d.embedding for d in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-4) for v in vectors)

    def cos(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vectors[0], vectors[1]) > cos(vectors[0], vectors[2]) + 0.3
    assert result.usage.prompt_tokens > 15  # WordPiece tokens, [CLS] and [SEP] included
    assert SHARED.loads == loads + 1  # the request used the warmed model

    # The SDK default (base64) decodes to the same vectors; dimensions truncates and renormalizes.
    b64 = await oai(server).embeddings.create(model="minilm", input="The cat sat on the mat.")
    assert b64.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    short = await oai(server).embeddings.create(
        model="minilm", input="x", dimensions=64, encoding_format="float"
    )
    assert len(short.data[0].embedding) == 64
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        await oai(server).embeddings.create(model="minilm", input="x", dimensions=999)


# --- upstream errors, before and after the first byte ------------------------------------------


async def test_upstream_errors_in_each_protocols_shape(
    gateway_factory: Any, config: dict[str, Any], upstreams: Upstreams
) -> None:
    server = gateway_factory(config)
    upstreams.gemini.queue_error(429, "Resource has been exhausted", "RESOURCE_EXHAUSTED", retry_after=4)
    with pytest.raises(openai.RateLimitError, match="exhausted") as limited:
        await oai(server).chat.completions.create(
            model="gemini", messages=[{"role": "user", "content": "hi"}]
        )
    assert limited.value.response.headers["retry-after"] == "4"
    assert limited.value.response.headers["x-request-id"]

    upstreams.bedrock.queue(bm.error(400, "ValidationException", "The model returned a validation error"))
    with pytest.raises(anthropic.BadRequestError, match="validation error") as bad:
        await claude(server).messages.create(
            model="bedrock", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert bad.value.body["type"] == "error"
    assert bad.value.response.headers["request-id"]

    # Bedrock throttles after the first text frame: an in-band OpenAI error chunk.
    frames = [*bm.text_stream(["Hel", "lo"])[:2], bm.exception("throttlingException", "Too many tokens")]
    upstreams.bedrock.queue(bm.StreamResponse(frames))
    stream = await oai(server).chat.completions.create(
        model="bedrock", messages=[{"role": "user", "content": "x"}], stream=True
    )
    seen: list[str] = []
    with pytest.raises(openai.APIError, match="Too many tokens"):
        async for c in stream:
            seen.extend(ch.delta.content or "" for ch in c.choices)
    assert "".join(seen) == "Hel"

    # Gemini drops the connection mid-stream: an `event: error` for the Anthropic client.
    upstreams.gemini.queue_stream([gm.text_chunk("Hel")], disconnect=True)
    with pytest.raises(anthropic.APIStatusError) as failed:
        async with claude(server).messages.stream(
            model="gemini", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        ) as s:
            async for _ in s:
                pass
    assert failed.value.body["type"] == "error"
    assert failed.value.body["error"]["type"] == "api_error"
