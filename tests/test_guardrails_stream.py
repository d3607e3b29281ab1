"""Windowed output checks on canonical stream events: hold-back bounds, chunk splits, tool calls."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from typing import Any

from plinth.guardrails.config import GuardrailsConfig
from plinth.guardrails.engine import Guard, Guardrails
from plinth.providers.base import ChatStream
from plinth.providers.types import (
    ChatRequest,
    FinishEvent,
    Message,
    StreamEvent,
    TextDelta,
    TextPart,
    ToolCallDelta,
    Usage,
    UsageEvent,
)

CARD = "5555 5555 5555 4444"


def guard_for(user_text: str = "hi", **config: Any) -> tuple[Guard, str]:
    g = Guardrails(GuardrailsConfig.model_validate({"default_profile": "standard", **config}))
    chat = ChatRequest(model="m", messages=[Message("user", [TextPart(user_text)])])
    guard = g.check_input(chat, None, "m", "r", "s")
    assert guard is not None
    return guard, chat.messages[0].text()


async def run(guard: Guard, events: list[StreamEvent]) -> list[StreamEvent]:
    async def source() -> AsyncIterator[StreamEvent]:
        for e in events[1:]:
            yield e

    stream = ChatStream(events=source())
    first = guard.stream_guard().wrap(stream, events[0])
    return [first] + [e async for e in stream.events]


def chunks(text: str, seed: int, most: int = 9) -> list[StreamEvent]:
    rng = random.Random(seed)
    out: list[StreamEvent] = []
    while text:
        n = rng.randint(1, most)
        out.append(TextDelta(text[:n]))
        text = text[n:]
    return [*out, FinishEvent("stop"), UsageEvent(Usage(1, 2))]


def joined(events: list[StreamEvent], index: int = 0) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta) and e.index == index)


async def test_clean_text_passes_unchanged_whatever_the_chunking() -> None:
    guard, _ = guard_for()
    text = "The quarterly report is ready; totals rose 4% in Q3, see section 2.1 for details. " * 5
    for seed in range(10):
        out = await run(guard, chunks(text, seed))
        assert joined(out) == text
        assert isinstance(out[-1], UsageEvent) and isinstance(out[-2], FinishEvent)


async def test_card_masked_at_any_split_point() -> None:
    guard, _ = guard_for()
    text = f"Your card {CARD} was charged. " + "More text follows here. " * 6
    for seed in range(20):
        assert joined(await run(guard, chunks(text, seed, most=4))) == text.replace(CARD, "[CREDIT_CARD]")


async def test_hold_back_is_bounded() -> None:
    guard, _ = guard_for(stream={"window_chars": 64, "holdback_chars": 16, "max_holdback_chars": 128})
    blob = "x" * 1000  # one endless identifier-like run: released once 128 characters wait
    events: list[StreamEvent] = [TextDelta(blob[i : i + 10]) for i in range(0, 1000, 10)]
    released_before_end = 0
    out: list[StreamEvent] = []
    source = [*events, FinishEvent("stop")]
    async for e in _each(guard, source):
        out.append(e)
        if isinstance(e, TextDelta) and not any(isinstance(x, FinishEvent) for x in out):
            released_before_end += len(e.text)
    assert released_before_end >= 1000 - 128 - 10
    assert joined(out) == blob


async def _each(guard: Guard, events: list[StreamEvent]) -> AsyncIterator[StreamEvent]:
    async def source() -> AsyncIterator[StreamEvent]:
        for e in events[1:]:
            yield e

    stream = ChatStream(events=source())
    yield guard.stream_guard().wrap(stream, events[0])
    async for e in stream.events:
        yield e


async def test_tool_call_arguments_are_restored_and_masked() -> None:
    email = "ops@example.net"
    guard, sent = guard_for(f"notify {email}")
    placeholder = sent.removeprefix("notify ")
    args = f'{{"to": "{placeholder}", "card": "{CARD}"}}'
    events: list[StreamEvent] = [
        TextDelta("Sending now."),
        ToolCallDelta(0, "", id="call_1", name="send_mail"),
        *[ToolCallDelta(0, args[i : i + 5]) for i in range(0, len(args), 5)],
        FinishEvent("tool_calls"),
        UsageEvent(Usage()),
    ]
    out = await run(guard, events)
    assert joined(out) == "Sending now."
    calls = [e for e in out if isinstance(e, ToolCallDelta)]
    assert calls[0].id == "call_1" and calls[0].name == "send_mail"
    assert "".join(c.arguments for c in calls) == f'{{"to": "{email}", "card": "[CREDIT_CARD]"}}'
    # Text before the tool call is released before it.
    kinds = [type(e).__name__ for e in out if not (isinstance(e, TextDelta) and not e.text)]
    assert kinds.index("TextDelta") < kinds.index("ToolCallDelta")


async def test_a_block_withholds_the_rest_of_that_choice_only() -> None:
    guard, _ = guard_for(profiles={"standard": {"output": {"actions": {"secrets.*": "block"}}}})
    key = "AKIA" + "J7QW3RTY5UIO2PLM"
    events: list[StreamEvent] = [
        TextDelta("ok: ", index=0),
        TextDelta("second choice is fine", index=1),
        TextDelta(key[:9], index=0),
        TextDelta(key[9:] + " and more", index=0),
        FinishEvent("stop", index=0),
        FinishEvent("stop", index=1),
        UsageEvent(Usage()),
    ]
    out = await run(guard, events)
    first = joined(out, 0)
    assert key[:4] not in first and "secrets.aws_access_key" in first
    assert joined(out, 1) == "second choice is fine"
    finishes = {e.index: e.finish_reason for e in out if isinstance(e, FinishEvent)}
    assert finishes == {0: "content_filter", 1: "stop"}
    assert [h.finding.type for h in guard.output.hits] == ["AWS_ACCESS_KEY"]


async def test_a_private_key_streamed_line_by_line_is_masked_whole() -> None:
    guard, _ = guard_for()
    lines = ["MIIEowIBAAKCAQEA" + f"{i:02d}" + "q" * 46 for i in range(30)]  # about 2 KB of key
    key = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END RSA PRIVATE KEY-----"
    text = f"Here is the key:\n{key}\nKeep it safe."
    out = await run(guard, chunks(text, 3, most=16))
    assert joined(out) == "Here is the key:\n[PRIVATE_KEY]\nKeep it safe."
