"""Guardrails through the real gateway: the official SDKs → Plinth → a loopback OpenAI upstream."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai
import pytest
import sqlalchemy

from conftest import USER_KEY, GatewayServer, wait_for
from mocks.openai_upstream import OpenAIUpstream, Reply, completion, text_stream

CARD = "4111 1111 1111 1111"  # the classic Visa test number (Luhn-valid)
AWS_KEY = (
    "AKIA" + "Z7QW3RTY5UIO2PLM"
)  # shaped like an AWS access key id; assembled so scanners of this repo stay quiet


def guarded(config: dict[str, Any], profile: str = "standard", **extra: Any) -> dict[str, Any]:
    return {**config, "guardrails": {"default_profile": profile, **extra}}


def client(server: GatewayServer, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=USER_KEY, max_retries=0, **kwargs)


async def test_blocked_request_names_the_rule_without_the_value(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(guarded(basic_config))
    with pytest.raises(openai.BadRequestError) as caught:
        await client(server).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"deploy with key {AWS_KEY} please"}]
        )
    err = caught.value
    body = err.body
    assert isinstance(body, dict)
    assert body["code"] == "guardrail_blocked"
    assert "secrets.aws_access_key" in body["message"] and "messages[0].content" in body["message"]
    assert AWS_KEY not in json.dumps(body) and AWS_KEY not in str(err.response.headers)
    assert openai_upstream.requests == []  # never sent upstream

    # Anthropic's front door answers in Anthropic's error shape, naming the same rule.
    anth = anthropic.AsyncAnthropic(base_url=server.url, api_key=USER_KEY, max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught_a:
        await anth.messages.create(
            model="gpt-4o-mini", max_tokens=10, messages=[{"role": "user", "content": f"key: {AWS_KEY}"}]
        )
    assert caught_a.value.body["type"] == "error"  # type: ignore[index]
    message = caught_a.value.body["error"]["message"]  # type: ignore[index]
    assert "secrets.aws_access_key" in message and AWS_KEY not in message


async def test_pseudonyms_go_upstream_and_come_back_restored(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(guarded(basic_config))
    email = "jane.doe@example.org"
    answer = await client(server).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"Write to {email} about card {CARD}"}],
        extra_headers={"x-plinth-session-id": "s-1"},
    )
    sent = openai_upstream.requests[-1]["messages"][0]["content"]
    assert email not in sent and CARD not in sent
    assert "<EMAIL_ADDRESS_" in sent and "<CREDIT_CARD_" in sent
    # The mock echoes what it received: the caller gets the real values back.
    assert answer.choices[0].message.content == f"echo: Write to {email} about card {CARD}"

    # Same session, same value: same placeholder (on the wire) in the next turn.
    await client(server).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"again {email}"}],
        extra_headers={"x-plinth-session-id": "s-1"},
    )
    first = sent.split("<EMAIL_ADDRESS_")[1].split(">")[0]
    again = openai_upstream.requests[-1]["messages"][0]["content"]
    assert again == f"again <EMAIL_ADDRESS_{first}>"


async def test_streamed_card_number_is_masked_even_split_across_chunks(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(guarded(basic_config))
    pieces = ["Sure. The card ", "on file is 4111 11", "11 1111 11", "11, expiring soon. ", "Anything else?"]
    openai_upstream.queue(Reply(stream=text_stream(*pieces)))
    stream = await client(server).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "which card?"}], stream=True
    )
    text = ""
    finish = None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert text == "Sure. The card on file is [CREDIT_CARD], expiring soon. Anything else?"
    assert finish == "stop"


async def test_stream_restores_a_placeholder_split_across_chunks(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(guarded(basic_config))
    email = "ops-team@example.com"
    await client(server).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"mail {email}"}],
        extra_headers={"x-plinth-session-id": "sess-9"},
    )
    placeholder = openai_upstream.requests[-1]["messages"][0]["content"].removeprefix("mail ")
    assert placeholder.startswith("<EMAIL_ADDRESS_")
    cut = len(placeholder) // 2
    openai_upstream.queue(
        Reply(stream=text_stream("I will write to ", placeholder[:cut], placeholder[cut:], " now."))
    )
    stream = await client(server).chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": f"mail {email} again"}],
        stream=True,
        extra_headers={"x-plinth-session-id": "sess-9"},
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == f"I will write to {email} now."


async def test_non_streamed_answer_is_masked_and_secret_leaks_are_withheld(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(guarded(basic_config))
    openai_upstream.queue(Reply(body=completion(f"Card {CARD} and key {AWS_KEY}.")))
    answer = await client(server).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content == "Card [CREDIT_CARD] and key [AWS_ACCESS_KEY]."

    config = guarded(
        basic_config,
        "mine",
        profiles={"mine": {"extends": "standard", "output": {"actions": {"secrets.*": "block"}}}},
    )
    server2 = gateway_factory(config)
    openai_upstream.queue(Reply(stream=text_stream("Here: ", AWS_KEY[:10], AWS_KEY[10:], " done")))
    stream = await client(server2).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text, finish = "", None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    assert AWS_KEY[:4] not in text and "secrets.aws_access_key" in text
    assert finish == "content_filter"


async def test_without_a_profile_nothing_is_scanned(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(basic_config)
    assert server.app.state.guardrails is None
    answer = await client(server).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"card {CARD}"}]
    )
    assert answer.choices[0].message.content == f"echo: card {CARD}"


async def test_profile_selection_by_key_and_events_without_values(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    config = {
        **basic_config,
        "guardrails": {"select": [{"keys": ["team-a"], "profile": "strict"}]},
    }
    server = gateway_factory(config)
    email = "someone@example.net"
    await client(server).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"contact {email}"}]
    )
    assert email not in openai_upstream.requests[-1]["messages"][0]["content"]
    # The admin key matches no rule and there is no default profile: not scanned.
    admin = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=server_admin_key(), max_retries=0)
    await admin.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": email}])
    assert openai_upstream.requests[-1]["messages"][0]["content"] == email

    recorder = server.app.state.guardrail_events
    await wait_for(lambda: recorder.written >= 1)
    url = str(server.app.state.gateway.usage.database.engine.url)
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.exec_driver_sql("SELECT * FROM guardrail_events")]
    engine.dispose()
    assert any(
        r["type"] == "EMAIL_ADDRESS" and r["action"] == "pseudonymize" and r["profile"] == "strict"
        for r in rows
    )
    assert all(r["key_id"] == "team-a" and r["stage"] in ("input", "output") for r in rows)
    assert email not in json.dumps(rows, default=str)


def server_admin_key() -> str:
    from conftest import ADMIN_KEY

    return ADMIN_KEY


async def test_bad_session_header_is_ignored_not_echoed(
    gateway_factory: Any, basic_config: dict[str, Any]
) -> None:
    server = gateway_factory(guarded(basic_config))
    async with httpx.AsyncClient() as http:
        resp = await http.post(
            server.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {USER_KEY}", "x-plinth-session-id": "x" * 500},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]},
        )
    assert resp.status_code == 200


async def test_anthropic_stream_is_masked_too(
    gateway_factory: Any, basic_config: dict[str, Any], openai_upstream: OpenAIUpstream
) -> None:
    server = gateway_factory(guarded(basic_config))
    openai_upstream.queue(Reply(stream=text_stream("Card: 5555 55", "55 5555 4444", " ends here.")))
    anth = anthropic.AsyncAnthropic(base_url=server.url, api_key=USER_KEY, max_retries=0)
    async with anth.messages.stream(
        model="gpt-4o-mini", max_tokens=50, messages=[{"role": "user", "content": "card?"}]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Card: [CREDIT_CARD] ends here."
    assert final.stop_reason == "end_turn"
