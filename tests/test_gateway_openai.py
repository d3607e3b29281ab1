"""End-to-end: the official OpenAI SDK → Plinth → a real OpenAI-protocol upstream on loopback."""

from __future__ import annotations

import base64
import json
from array import array
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ADMIN_KEY, USER_KEY, GatewayServer
from mocks.openai_upstream import OpenAIUpstream, Reply, chunk, completion, text_stream


def metric(server: GatewayServer, name: str, **labels: str) -> float:
    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def client(server: GatewayServer, key: str = USER_KEY, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, **kwargs)


async def test_chat_completion_round_trip(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(basic_config)
    raw = await client(server).chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_completion_tokens=50,
        temperature=0.2,
        stop=["\n\n"],
        seed=7,
        user="alice",
    )
    answer = raw.parse()
    assert answer.choices[0].message.content == "echo: hi"
    assert answer.usage is not None and answer.usage.total_tokens == 13
    assert raw.headers["x-request-id"].startswith("req_")
    assert float(raw.headers["x-plinth-overhead-ms"]) >= 0
    sent = openai_upstream.requests[-1]
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    assert sent["max_completion_tokens"] == 50 and sent["stop"] == ["\n\n"] and sent["seed"] == 7
    assert sent["user"] == "alice" and sent["temperature"] == 0.2
    # The caller's key never reaches the upstream; the deployment's key does.
    assert openai_upstream.headers[-1]["authorization"] == "Bearer sk-upstream-secret"


async def test_tools_images_response_format_and_n_pass_through(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(basic_config)
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    openai_upstream.queue(Reply(body=completion("", tool_calls=[call])))
    answer = await client(server).chat.completions.create(
        model="gpt-4o-mini",
        n=2,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather where this photo was taken?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
                    },
                ],
            },
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True},
        },
        logit_bias={"50256": -100},
    )
    message = answer.choices[0].message
    assert answer.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None and message.tool_calls[0].function.name == "get_weather"
    sent = openai_upstream.requests[-1]
    assert sent["n"] == 2
    assert sent["messages"][0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
    }
    assert sent["messages"][1]["tool_calls"] == [call]
    assert sent["messages"][2] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1"}
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["response_format"]["json_schema"] == {
        "name": "w",
        "schema": {"type": "object"},
        "strict": True,
    }
    assert sent["logit_bias"] == {"50256": -100}  # unknown OpenAI fields pass through to OpenAI upstreams


async def test_streaming_always_metered_but_usage_chunk_only_when_asked(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(basic_config)
    tokens_before = metric(server, "plinth_tokens_total", kind="input", model="gpt-4o-mini")
    stream = await client(server).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: ok"
    assert all(c.usage is None for c in chunks)
    assert openai_upstream.requests[-1]["stream_options"] == {"include_usage": True}

    stream = await client(server).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 5 and chunks[-1].usage.completion_tokens == 2

    # Both streams were metered, the one whose caller did not ask for usage too.
    assert metric(server, "plinth_tokens_total", kind="input", model="gpt-4o-mini") == tokens_before + 10


async def test_streamed_tool_call_reassembles(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(basic_config)
    first = {"index": 0, "id": "call_9", "type": "function", "function": {"name": "lookup", "arguments": ""}}
    openai_upstream.queue(
        Reply(
            stream=[
                chunk({"role": "assistant", "content": None}),
                chunk({"tool_calls": [first]}),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q":'}}]}),
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"x"}'}}]}),
                chunk(finish="tool_calls"),
                chunk(usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
            ]
        )
    )
    async with client(server).chat.completions.stream(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "find x"}],
        tools=[{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
    ) as stream:
        final = await stream.get_final_completion()
    call = final.choices[0].message.tool_calls
    assert (
        call is not None and call[0].id == "call_9" and json.loads(call[0].function.arguments) == {"q": "x"}
    )
    assert final.choices[0].finish_reason == "tool_calls"


async def test_embeddings_float_and_base64(gateway_factory: Any, basic_config: dict[str, Any]) -> None:
    server = gateway_factory(basic_config)
    admin = client(server, ADMIN_KEY)
    result = await admin.embeddings.create(
        model="text-embedding-3-small", input=["abc", "hello"]
    )  # SDK asks base64
    assert [d.embedding for d in result.data] == [[3.0, 0.5, -0.25], [5.0, 0.5, -0.25]]
    async with httpx.AsyncClient() as http:  # async: the mock upstream runs on this test's loop
        reply = await http.post(
            server.url + "/v1/embeddings",
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
            json={"model": "text-embedding-3-small", "input": "abc", "encoding_format": "base64"},
        )
    raw = reply.json()
    assert list(array("f", base64.b64decode(raw["data"][0]["embedding"]))) == [3.0, 0.5, -0.25]


async def test_models_lists_only_what_the_key_may_use(
    gateway_factory: Any, basic_config: dict[str, Any]
) -> None:
    server = gateway_factory(basic_config)
    assert [m.id async for m in client(server).models.list()] == ["gpt-4o-mini"]
    assert sorted([m.id async for m in client(server, ADMIN_KEY).models.list()]) == [
        "gpt-4o-mini",
        "text-embedding-3-small",
    ]


@pytest.mark.parametrize(
    ("body", "status", "param", "fragment"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, 400, "model", "Missing required parameter"),
        ({"model": "gpt-4o-mini", "messages": "hi"}, 400, "messages", "expected an array"),
        (
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": 5}]},
            400,
            "messages[0].content",
            "but got an integer",
        ),
        (
            {"model": "gpt-4o-mini", "messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages[0].role",
            "'robot'",
        ),
        (
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "temperature": 9},
            400,
            "temperature",
            "between 0 and 2",
        ),
        (
            {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}], "n": "2"},
            400,
            "n",
            "expected an integer",
        ),
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "does not exist"),
        (
            {"model": "text-embedding-3-small", "messages": [{"role": "user", "content": "x"}]},
            403,
            "model",
            "not allowed",
        ),
    ],
)
def test_bad_requests_get_openai_errors(
    gateway_factory: Any,
    basic_config: dict[str, Any],
    body: dict[str, Any],
    status: int,
    param: str,
    fragment: str,
) -> None:
    server = gateway_factory(basic_config)
    reply = httpx.post(
        server.url + "/v1/chat/completions", headers={"authorization": f"Bearer {USER_KEY}"}, json=body
    )
    assert reply.status_code == status
    error = reply.json()["error"]
    assert error["param"] == param and fragment in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    assert reply.headers["x-request-id"]


def test_malformed_json_oversized_body_and_auth_errors(
    gateway_factory: Any, basic_config: dict[str, Any]
) -> None:
    basic_config["server"] = {"max_body_bytes": 2048}
    server = gateway_factory(basic_config)
    url = server.url + "/v1/chat/completions"
    auth = {"authorization": f"Bearer {USER_KEY}", "content-type": "application/json"}
    bad = httpx.post(url, headers=auth, content=b'{"model": "gpt-4o-mini", "messages": [')
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    big = httpx.post(url, headers=auth, content=b'{"x": "' + b"a" * 5000 + b'"}')
    assert big.status_code == 413 and "2048" in big.json()["error"]["message"]
    missing = httpx.post(url, json={})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    wrong = httpx.post(url, headers={"authorization": "Bearer sk-wrong-key-123456"}, json={})
    assert wrong.status_code == 401 and "sk-wrong-key" not in wrong.text
    unknown = httpx.get(server.url + "/v1/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_url"


async def test_upstream_errors_map_to_openai_errors(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    basic_config["models"][0]["routing"] = {"retries": 0}
    server = gateway_factory(basic_config)
    openai_upstream.queue(
        Reply(status=400, body={"error": {"message": "context too long", "type": "invalid_request_error"}})
    )
    with pytest.raises(openai.BadRequestError, match="context too long"):
        await client(server).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    openai_upstream.queue(
        Reply(status=429, body={"error": {"message": "slow down"}}, headers={"retry-after": "7"})
    )
    with pytest.raises(openai.RateLimitError) as info:
        await client(server).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.response.headers["retry-after"] == "7"
    openai_upstream.queue(Reply(status=401, body={"error": {"message": "bad key sk-upstream-secret"}}))
    with pytest.raises(openai.APIStatusError) as info2:
        await client(server).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}]
        )
    assert info2.value.status_code == 502


async def test_mid_stream_failure_is_reported_in_band(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(basic_config)
    openai_upstream.queue(Reply(stream=text_stream("a", "b", "c"), error_after=2))
    stream = await client(server).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}], stream=True
    )
    seen = []
    with pytest.raises(openai.APIError, match="upstream closed the connection"):
        async for c in stream:
            seen.append(c)
    assert seen  # the first bytes had already reached the client: no fallback, an in-band error


def test_model_type_is_enforced_and_errors_are_labelled_by_endpoint(
    gateway_factory: Any, basic_config: dict[str, Any]
) -> None:
    server = gateway_factory(basic_config)
    auth = {"authorization": f"Bearer {ADMIN_KEY}"}
    chat_on_embedder = httpx.post(
        server.url + "/v1/chat/completions", headers=auth,
        json={"model": "text-embedding-3-small", "messages": [{"role": "user", "content": "x"}]},
    )  # fmt: skip
    assert chat_on_embedder.status_code == 400
    assert chat_on_embedder.json()["error"]["code"] == "wrong_model_type"
    embed_on_chat = httpx.post(
        server.url + "/v1/embeddings", headers=auth, json={"model": "gpt-4o-mini", "input": "x"}
    )
    assert (
        embed_on_chat.status_code == 400 and "/v1/embeddings" not in embed_on_chat.json()["error"]["message"]
    )
    before = metric(server, "plinth_requests_total", route="models", status="401")
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert metric(server, "plinth_requests_total", route="models", status="401") == before + 1
