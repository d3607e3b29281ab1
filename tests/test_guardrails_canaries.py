"""Canaries and system-prompt leaks through the real gateway: configured canaries, a canary planted
per request, and the request's system prompt all reach the output `leak` scanner."""

from __future__ import annotations

import base64
from typing import Any

import anthropic
import openai
import pytest

from conftest import USER_KEY, GatewayServer
from mocks.openai_upstream import OpenAIUpstream, Reply, completion, text_stream
from plinth.config import ConfigError, parse_config

CANARY = "zephyr-7731-quokka"
SYSTEM = "You are the billing assistant of Acme Corp. Answer questions about invoices and refunds only."


def guarded(config: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {**config, "guardrails": {"default_profile": "standard", **extra}}


def client(server: GatewayServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=USER_KEY, max_retries=0)


async def ask(server: GatewayServer, messages: list[dict[str, str]]) -> tuple[str, str | None]:
    answer = await client(server).chat.completions.create(model="gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
    return answer.choices[0].message.content or "", answer.choices[0].finish_reason


async def ask_stream(server: GatewayServer, messages: list[dict[str, str]]) -> tuple[str, str | None]:
    stream = await client(server).chat.completions.create(
        model="gpt-4o-mini",
        messages=messages,  # type: ignore[arg-type]
        stream=True,
    )
    text, finish = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


USER = [{"role": "user", "content": "When is my invoice due?"}]


async def test_a_configured_canary_in_the_answer_is_withheld(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(guarded(basic_config, canaries=[CANARY]))
    openai_upstream.queue(Reply(body=completion(f"Sure, the code is {CANARY}.")))
    text, finish = await ask(server, USER)
    assert CANARY not in text and "leak.canary" in text and finish == "content_filter"

    # Encoded, and split across stream chunks: still caught, and nothing of it reaches the caller.
    encoded = base64.b64encode(CANARY.encode()).decode()
    openai_upstream.queue(Reply(stream=text_stream("Decode this: ", encoded[:9], encoded[9:], " and enjoy.")))
    text, finish = await ask_stream(server, USER)
    assert encoded[:9] not in text and "leak.canary" in text and finish == "content_filter"

    # An answer without it passes untouched.
    openai_upstream.queue(Reply(body=completion("Invoices are due in 30 days.")))
    assert await ask(server, USER) == ("Invoices are due in 30 days.", "stop")


async def test_the_system_prompt_repeated_is_withheld_whole_and_streamed(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(guarded(basic_config))
    messages = [{"role": "system", "content": SYSTEM}, *USER]
    openai_upstream.queue(Reply(body=completion(f"My instructions say: {SYSTEM}")))
    text, finish = await ask(server, messages)
    assert "billing assistant" not in text and "leak.system_prompt" in text and finish == "content_filter"

    pieces = [SYSTEM[i : i + 7] for i in range(0, len(SYSTEM), 7)]
    openai_upstream.queue(Reply(stream=text_stream("Here you go: ", *pieces)))
    text, finish = await ask_stream(server, messages)
    assert "invoices and refunds" not in text and "leak.system_prompt" in text and finish == "content_filter"


async def test_a_planted_canary_goes_upstream_and_its_leak_is_withheld(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(guarded(basic_config, plant_canary=True))
    short = "Be brief."  # too short to be found as a system-prompt leak on its own words
    # The mock echoes the last message: put the system prompt last, so the answer repeats it.
    text, finish = await ask(server, [*USER, {"role": "system", "content": short}])
    sent = openai_upstream.requests[-1]["messages"][-1]["content"]
    assert sent.startswith(short) and len(sent) > len(short) + 16  # the canary went upstream
    assert "leak.canary" in text and finish == "content_filter"

    first = sent
    openai_upstream.queue(Reply(body=completion("ok")))
    assert await ask(server, [{"role": "system", "content": short}, *USER]) == ("ok", "stop")
    assert openai_upstream.requests[-1]["messages"][0]["content"] != first  # a new canary per request

    # The planted marker is hex, which is no secret: an answer about hex input passes.
    about_hex = "Decode the hex input first, then check the access code."
    openai_upstream.queue(Reply(body=completion(about_hex)))
    assert await ask(server, [{"role": "system", "content": short}, *USER]) == (about_hex, "stop")

    # Anthropic's front door: its `system` is the system prompt too.
    anth = anthropic.AsyncAnthropic(base_url=server.url, api_key=USER_KEY, max_retries=0)
    await anth.messages.create(model="gpt-4o-mini", max_tokens=20, system=short, messages=USER)  # type: ignore[arg-type]
    upstream_system = openai_upstream.requests[-1]["messages"][0]
    assert upstream_system["role"] == "system" and "Confidential marker" in upstream_system["content"]

    # No system prompt: nothing is planted.
    openai_upstream.queue(Reply(body=completion("ok")))
    await ask(server, USER)
    assert openai_upstream.requests[-1]["messages"] == USER


def test_a_too_short_canary_is_a_config_error(basic_config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"canaries\[1\]"):
        parse_config(guarded(basic_config, canaries=[CANARY, "ab"]))
