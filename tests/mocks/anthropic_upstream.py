"""A real Anthropic Messages API server on loopback, scripted by the test.

Queue replies with `queue()`; each request takes the next one (a plain text answer when the queue
is empty). A JSON message reply is streamed automatically, as Anthropic would, when the request
asks for `stream: true`, so one script serves streaming and non-streaming tests alike.

    upstream = await AnthropicUpstream().start()  # or: async with AnthropicUpstream() as upstream
    upstream.queue(text_reply("Hi"), error_reply(429, "rate_limit_error", "slow down"))
    ... point a deployment at upstream.url ...
    assert upstream.last.body["max_tokens"] == 4096
    await upstream.close()
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import orjson
from aiohttp import web

from mocks.server import LoopbackServer

Event = tuple[str, dict[str, Any]]


@dataclass
class Reply:
    status: int = 200
    body: Any = None  # a Message, an error object, or anything to send as JSON
    events: list[Event] | None = None  # an explicit SSE sequence, sent as given
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before the response starts
    event_delay_s: float = 0.0  # between stream events
    cut_after: int | None = None  # end the stream after this many events (no message_stop)
    raw: bytes | None = None  # a body sent as it is (invalid JSON and the like)


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any


def usage(
    input_tokens: int = 10, output_tokens: int = 5, cache_read: int = 0, cache_creation: int = 0
) -> dict[str, int]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_creation,
    }


def message(
    content: list[dict[str, Any]],
    *,
    stop_reason: str = "end_turn",
    stop_sequence: str | None = None,
    model: str = "claude-mock-1",
    usage_: dict[str, int] | None = None,
    id: str = "msg_mock0001",
) -> dict[str, Any]:
    return {
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage_ or usage(),
    }


def text_reply(text: str = "Hello from the mock.", **kwargs: Any) -> Reply:
    return Reply(body=message([{"type": "text", "text": text}], **kwargs))


def tool_reply(
    name: str, input: dict[str, Any], *, id: str = "toolu_mock01", text: str | None = None, **kwargs: Any
) -> Reply:
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    blocks.append({"type": "tool_use", "id": id, "name": name, "input": input})
    return Reply(body=message(blocks, stop_reason="tool_use", **kwargs))


def thinking_reply(thinking: str, signature: str, text: str, **kwargs: Any) -> Reply:
    blocks = [
        {"type": "thinking", "thinking": thinking, "signature": signature},
        {"type": "text", "text": text},
    ]
    return Reply(body=message(blocks, **kwargs))


def error_body(kind: str, text: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": text}}


def error_reply(status: int, kind: str, text: str, *, retry_after: float | None = None) -> Reply:
    headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
    return Reply(status=status, body=error_body(kind, text), headers=headers)


def _chunks(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def _block_events(index: int, block: dict[str, Any], size: int) -> list[Event]:
    kind = block["type"]
    start: dict[str, Any] = block
    deltas: list[dict[str, Any]] = []
    if kind == "text":
        start = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": c} for c in _chunks(block["text"], size)]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [{"type": "thinking_delta", "thinking": c} for c in _chunks(block["thinking"], size)]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    elif kind == "tool_use":
        start = {**block, "input": {}}
        arguments = orjson.dumps(block["input"]).decode()
        deltas = [{"type": "input_json_delta", "partial_json": c} for c in ["", *_chunks(arguments, size)]]
    events: list[Event] = [
        ("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
    ]
    events += [
        ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d}) for d in deltas
    ]
    events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def stream_events(msg: dict[str, Any], *, chunk: int = 4) -> list[Event]:
    """The event sequence Anthropic sends for `msg`, text and tool input split in `chunk`-sized pieces."""
    final_usage = msg["usage"]
    start_usage = {**final_usage, "output_tokens": 1}
    start = {**msg, "content": [], "stop_reason": None, "stop_sequence": None, "usage": start_usage}
    events: list[Event] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("ping", {"type": "ping"}),
    ]
    for index, block in enumerate(msg["content"]):
        events += _block_events(index, block, chunk)
    delta = {"stop_reason": msg["stop_reason"], "stop_sequence": msg["stop_sequence"]}
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": delta,
                "usage": {"output_tokens": final_usage["output_tokens"]},
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


def _protocol_error(body: Any, headers: dict[str, str]) -> Reply | None:
    """The few checks the real API makes that catch translation bugs: auth, version, required fields, alternation."""
    if "x-api-key" not in headers:
        return error_reply(401, "authentication_error", "x-api-key header is required")
    if "anthropic-version" not in headers:
        return error_reply(400, "invalid_request_error", "anthropic-version header is required")
    if not isinstance(body, dict):
        return error_reply(400, "invalid_request_error", "body must be a JSON object")
    for key in ("model", "messages", "max_tokens"):
        if key not in body:
            return error_reply(400, "invalid_request_error", f"{key}: Field required")
    roles = [m.get("role") for m in body["messages"]]
    if any(r not in ("user", "assistant") for r in roles):
        return error_reply(400, "invalid_request_error", "messages: roles must be 'user' or 'assistant'")
    if any(a == b for a, b in pairwise(roles)):
        return error_reply(
            400, "invalid_request_error", "messages: roles must alternate between 'user' and 'assistant'"
        )
    return None


class AnthropicUpstream(LoopbackServer):
    """The mock server. `requests` records every request; `last` is the latest."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Recorded] = []
        self._replies: deque[Reply] = deque()

    def queue(self, *replies: Reply) -> None:
        self._replies.extend(replies)

    @property
    def last(self) -> Recorded:
        return self.requests[-1]

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/messages", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(Recorded(request.path, headers, body))
        reply = _protocol_error(body, headers) or (self._replies.popleft() if self._replies else text_reply())
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.raw is not None:
            return web.Response(status=reply.status, body=reply.raw, headers=reply.headers)
        wants_stream = isinstance(body, dict) and body.get("stream") is True
        if reply.events is not None or (wants_stream and reply.status < 400):
            return await self._stream(request, reply)
        return web.Response(
            status=reply.status,
            body=orjson.dumps(reply.body),
            headers=reply.headers,
            content_type="application/json",
        )

    async def _stream(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        events = reply.events if reply.events is not None else stream_events(reply.body)
        if reply.cut_after is not None:
            events = events[: reply.cut_after]
        resp = web.StreamResponse(
            status=reply.status, headers={"content-type": "text/event-stream", **reply.headers}
        )
        await resp.prepare(request)
        for name, data in events:
            if reply.event_delay_s:
                await asyncio.sleep(reply.event_delay_s)
            await resp.write(f"event: {name}\ndata: ".encode() + orjson.dumps(data) + b"\n\n")
        await resp.write_eof()
        return resp
