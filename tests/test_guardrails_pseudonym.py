"""Pseudonymization: exact round trips, consistency within a session, isolation between sessions,
under real concurrency (threads and streams)."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from plinth.guardrails.config import GuardrailsConfig
from plinth.guardrails.engine import Guardrails
from plinth.guardrails.pseudonym import PLACEHOLDER, Pseudonymizer
from plinth.providers.base import ChatStream
from plinth.providers.types import (
    ChatChoice,
    ChatRequest,
    ChatResponse,
    FinishEvent,
    Message,
    StreamEvent,
    TextDelta,
    TextPart,
    Usage,
    UsageEvent,
)

SESSIONS = 64


def luhn_complete(prefix: str) -> str:
    """`prefix` plus the Luhn check digit."""
    for d in "0123456789":
        digits = [int(c) for c in prefix + d][::-1]
        total = sum(x if i % 2 == 0 else (x * 2 - 9 if x * 2 > 9 else x * 2) for i, x in enumerate(digits))
        if total % 10 == 0:
            return prefix + d
    raise AssertionError("unreachable")


def session_text(i: int) -> tuple[str, list[str]]:
    email = f"member{i}@branch{i}.example.org"
    card = luhn_complete(f"4{i:03d}12345678901")
    phone = f"+44 20 7946 {i:04d}"
    shared = "helpdesk@example.com"
    text = f"Refund card {card} for {email}; call {phone} or {shared}. Again: {email}."
    return text, [email, card, phone, shared]


def engine() -> Guardrails:
    g = Guardrails.from_config(GuardrailsConfig(default_profile="standard"))
    assert g is not None
    return g


def chat(text: str) -> ChatRequest:
    return ChatRequest(model="m", messages=[Message("user", [TextPart(text)])])


def answer(text: str) -> ChatResponse:
    return ChatResponse("r", "m", 0, [ChatChoice(0, Message("assistant", [TextPart(text)]))], Usage())


def test_round_trip_is_exact_under_64_concurrent_sessions() -> None:
    g = engine()
    barrier = threading.Barrier(SESSIONS)

    def run(i: int) -> tuple[str, str]:
        text, values = session_text(i)
        barrier.wait()  # all sessions scan at the same moment
        sent: list[str] = []
        for turn in range(3):
            request = chat(text)
            guard = g.check_input(request, None, "m", f"req-{i}-{turn}", f"session-{i}")
            assert guard is not None
            upstream = request.messages[0].text()
            assert not any(v in upstream for v in values)
            sent.append(upstream)
            reply = guard.check_response(answer(f"Done: {upstream}"))
            assert reply.choices[0].message.text() == f"Done: {text}"  # exact, every value restored
        assert sent[0] == sent[1] == sent[2]  # same session: same placeholders every turn
        return sent[0], PLACEHOLDER.findall(sent[0])[-1][1]

    with ThreadPoolExecutor(SESSIONS) as pool:
        results = list(pool.map(run, range(SESSIONS)))
    # The shared address gets a different placeholder in every session (no cross-session linking).
    shared_tags = {tag for _upstream, tag in results}
    assert len(shared_tags) == SESSIONS
    # The same value twice in one message: one placeholder.
    upstream = results[0][0]
    assert len(set(PLACEHOLDER.findall(upstream))) == 4 and len(PLACEHOLDER.findall(upstream)) == 5


async def test_streamed_round_trip_under_64_concurrent_sessions() -> None:
    g = engine()

    async def one(i: int) -> None:
        text, values = session_text(i)
        request = chat(text)
        guard = g.check_input(request, None, "m", f"req-{i}", f"session-{i}")
        assert guard is not None
        upstream = request.messages[0].text()
        rng = random.Random(i)
        pieces: list[str] = []
        rest = f"Done: {upstream}"
        while rest:  # random chunk sizes split placeholders anywhere
            n = rng.randint(1, 7)
            pieces, rest = [*pieces, rest[:n]], rest[n:]

        async def events() -> AsyncIterator[StreamEvent]:
            for p in pieces[1:]:
                await asyncio.sleep(0)  # interleave the 64 streams
                yield TextDelta(p)
            yield FinishEvent("stop")
            yield UsageEvent(Usage())

        stream = ChatStream(events=events())
        first = guard.stream_guard().wrap(stream, TextDelta(pieces[0]))
        out = [first] + [e async for e in stream.events]
        text_out = "".join(e.text for e in out if isinstance(e, TextDelta))
        assert text_out == f"Done: {text}"
        assert not any(v in upstream for v in values)

    await asyncio.gather(*(one(i) for i in range(SESSIONS)))


def test_same_value_normalized_and_collisions_lengthened() -> None:
    p = Pseudonymizer(b"k" * 32, "s")
    a = p.placeholder("PHONE_NUMBER", "+44 20 7946 0018")
    assert p.placeholder("PHONE_NUMBER", "+44-20-7946-0018") == a  # separators do not matter
    assert p.placeholder("EMAIL_ADDRESS", "Jo@Example.com") == p.placeholder(
        "EMAIL_ADDRESS", "jo@example.com"
    )
    # Find two values sharing a 6-character tag (a birthday collision: a few thousand tries).
    seen: dict[str, str] = {}
    for n in range(200_000):
        value = f"id-{n}"
        tag = p.tag("X", value)
        if tag in seen:
            first, second = seen[tag], value
            break
        seen[tag] = value
    else:
        raise AssertionError("no collision found")
    q = Pseudonymizer(b"k" * 32, "s")
    one, two = q.placeholder("X", first), q.placeholder("X", second)
    assert one != two and len(two) > len(one)
    assert q.restore(f"{two} / {one} / <X_000000>") == f"{second} / {first} / <X_000000>"
