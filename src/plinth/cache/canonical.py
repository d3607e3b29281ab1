"""What a cache entry is keyed by and what it holds: canonical requests, serialized answers, replay.

Keys hash the canonical request (Plinth's protocol-neutral model), so the same question asked over
the OpenAI or the Anthropic front door shares an entry, and the cached canonical answer is encoded
in the caller's protocol like any upstream answer. Only fields that change the answer are hashed:
`stream`, `include_usage`, `user` and prompt-caching markers are not.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import orjson

from plinth.providers.base import ChatStream
from plinth.providers.types import (
    ChatChoice,
    ChatRequest,
    ChatResponse,
    ContentPart,
    FinishEvent,
    FinishReason,
    ImagePart,
    Message,
    Role,
    StreamEvent,
    TextDelta,
    TextPart,
    ThinkingDelta,
    ThinkingPart,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageEvent,
)

CACHEABLE_FINISH: frozenset[str] = frozenset({"stop", "length", "tool_calls"})
_SORT = orjson.OPT_SORT_KEYS
_GEMINI_SIGNATURE = "gemini:"  # as in plinth.gateway.anthropic_protocol


def _part(part: ContentPart) -> list[Any]:
    if isinstance(part, TextPart):
        return ["t", part.text]
    if isinstance(part, ImagePart):
        return ["i", part.url, part.data, part.media_type, part.detail]
    return ["k", part.text, part.signature, part.redacted]


def _message(m: Message) -> list[Any]:
    return [
        m.role,
        [_part(p) for p in m.content],
        [[c.id, c.name, c.arguments] for c in m.tool_calls],
        m.tool_call_id,
        m.is_error,
        m.name,
        m.refusal,
    ]


def _params(chat: ChatRequest) -> dict[str, Any]:
    """Everything but the messages that changes the answer."""
    return {
        "max_tokens": chat.max_tokens,
        "temperature": chat.temperature,
        "top_p": chat.top_p,
        "top_k": chat.top_k,
        "stop": chat.stop,
        "n": chat.n,
        "seed": chat.seed,
        "tools": [[t.name, t.description, t.parameters, t.strict] for t in chat.tools],
        "tool_choice": [chat.tool_choice.mode, chat.tool_choice.name] if chat.tool_choice else None,
        "parallel_tool_calls": chat.parallel_tool_calls,
        "response_format": (
            [rf.type, rf.name, rf.schema, rf.strict] if (rf := chat.response_format) is not None else None
        ),
        "thinking": chat.thinking,
        "reasoning_effort": chat.reasoning_effort,
        "extra": chat.extra,
    }


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))  # length-prefixed: no ambiguity between fields
        h.update(part)
    return h.hexdigest()


def exact_key(partition: str, model: str, chat: ChatRequest) -> str:
    """sha256 of (partition, model alias, canonical request)."""
    body = orjson.dumps([[_message(m) for m in chat.messages], _params(chat)], option=_SORT)
    return _digest(b"exact", partition.encode(), model.encode(), body)


def semantic_text(chat: ChatRequest, max_chars: int) -> str | None:
    """The text matched by similarity: the last message when it is a short, text-only user turn."""
    if not chat.messages:
        return None
    last = chat.messages[-1]
    if last.role != "user" or last.tool_calls or any(not isinstance(p, TextPart) for p in last.content):
        return None
    text = last.text().strip()
    return text if text and len(text) <= max_chars else None


def semantic_bucket(partition: str, model: str, chat: ChatRequest) -> str:
    """Everything that must be identical for two requests to match by similarity: partition, model,
    parameters and every message before the last (system prompt and earlier turns)."""
    body = orjson.dumps([[_message(m) for m in chat.messages[:-1]], _params(chat)], option=_SORT)
    return _digest(b"semantic", partition.encode(), model.encode(), body)


# --- serialized answers -----------------------------------------------------------------------


def cacheable(response: ChatResponse) -> bool:
    """Only complete, successful answers: every choice finished normally, nothing redacted."""
    return bool(response.choices) and all(
        c.finish_reason in CACHEABLE_FINISH
        and not any(isinstance(p, ThinkingPart) and p.redacted for p in c.message.content)
        for c in response.choices
    )


def _usage_list(u: Usage) -> list[Any]:
    return [
        u.input_tokens,
        u.output_tokens,
        u.cached_input_tokens,
        u.cache_creation_input_tokens,
        u.reasoning_tokens,
        u.estimated,
    ]


def dumps(response: ChatResponse) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "id": response.id,
            "model": response.model,
            "created": response.created,
            "fp": response.system_fingerprint,
            "usage": _usage_list(response.usage),
            "choices": [
                [c.index, _message(c.message), c.finish_reason, c.stop_sequence, c.logprobs]
                for c in response.choices
            ],
        }
    )


def _load_part(raw: list[Any]) -> ContentPart:
    if raw[0] == "t":
        return TextPart(raw[1])
    if raw[0] == "i":
        return ImagePart(url=raw[1], data=raw[2], media_type=raw[3], detail=raw[4])
    return ThinkingPart(raw[1], raw[2], raw[3])


def _load_message(raw: list[Any]) -> Message:
    role: Role = raw[0]
    return Message(
        role=role,
        content=[_load_part(p) for p in raw[1]],
        tool_calls=[ToolCall(*c) for c in raw[2]],
        tool_call_id=raw[3],
        is_error=raw[4],
        name=raw[5],
        refusal=raw[6],
    )


def loads(data: bytes) -> ChatResponse:
    raw = orjson.loads(data)
    if raw.get("v") != 1:
        raise ValueError("unknown cache entry version")
    return ChatResponse(
        id=raw["id"],
        model=raw["model"],
        created=raw["created"],
        choices=[
            ChatChoice(
                index=c[0], message=_load_message(c[1]), finish_reason=c[2], stop_sequence=c[3], logprobs=c[4]
            )
            for c in raw["choices"]
        ],
        usage=Usage(*raw["usage"]),
        system_fingerprint=raw["fp"],
    )


# --- streams: replaying a cached answer, assembling a streamed one ---------------------------


def replay_events(response: ChatResponse) -> list[StreamEvent]:
    """The canonical stream events that a provider would have produced for this answer."""
    events: list[StreamEvent] = []
    for choice in response.choices:
        i = choice.index
        for part in choice.message.content:
            if isinstance(part, TextPart) and part.text:
                events.append(TextDelta(part.text, i))
            elif isinstance(part, ThinkingPart) and not part.redacted:
                events.append(ThinkingDelta(part.text, part.signature, i))
        for n, call in enumerate(choice.message.tool_calls):
            events.append(ToolCallDelta(n, call.arguments, call.id, call.name, i))
        events.append(FinishEvent(choice.finish_reason, choice.stop_sequence, i))
    events.append(UsageEvent(response.usage))
    return events


async def _none() -> AsyncIterator[StreamEvent]:
    return
    yield  # pragma: no cover - makes this an async generator


def replay_stream(response: ChatResponse) -> ChatStream:
    """A stream header for the protocol encoders; the events come from `replay_events`."""
    return ChatStream(events=_none(), id=response.id, model=response.model, created=response.created)


class _Choice:
    __slots__ = ("finish", "parts", "stop_sequence", "tools")

    def __init__(self) -> None:
        self.parts: list[ContentPart] = []
        self.tools: dict[int, ToolCall] = {}
        self.finish: FinishReason | None = None
        self.stop_sequence: str | None = None


class StreamAssembler:
    """Rebuilds the complete answer from a stream's events, to cache it once the stream finished."""

    __slots__ = ("_choices", "_usage")

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}
        self._usage: Usage | None = None

    def add(self, event: StreamEvent) -> None:
        if isinstance(event, UsageEvent):
            self._usage = event.usage
            return
        choice = self._choices.get(event.index)
        if choice is None:
            choice = self._choices[event.index] = _Choice()
        parts = choice.parts
        if isinstance(event, TextDelta):
            if parts and isinstance(parts[-1], TextPart):
                parts[-1].text += event.text
            else:
                parts.append(TextPart(event.text))
        elif isinstance(event, ThinkingDelta):
            last = parts[-1] if parts else None
            # A lone Gemini signature belongs to what follows it: it starts its own (empty) part.
            standalone = not event.text and (event.signature or "").startswith(_GEMINI_SIGNATURE)
            if isinstance(last, ThinkingPart) and last.signature is None and not standalone:
                last.text += event.text
                last.signature = event.signature
            else:
                parts.append(ThinkingPart(event.text, event.signature))
        elif isinstance(event, ToolCallDelta):
            call = choice.tools.get(event.tool_index)
            if call is None:
                choice.tools[event.tool_index] = ToolCall(event.id or "", event.name or "", event.arguments)
            else:
                call.arguments += event.arguments
        else:
            choice.finish = event.finish_reason
            choice.stop_sequence = event.stop_sequence

    def response(self, stream: ChatStream) -> ChatResponse | None:
        """The answer, or None unless every choice finished and usage was reported."""
        if self._usage is None or not self._choices:
            return None
        choices: list[ChatChoice] = []
        for index in sorted(self._choices):
            c = self._choices[index]
            if c.finish is None:
                return None
            message = Message("assistant", c.parts, [c.tools[k] for k in sorted(c.tools)])
            choices.append(ChatChoice(index, message, c.finish, c.stop_sequence))
        return ChatResponse(stream.id, stream.model, stream.created, choices, self._usage)
