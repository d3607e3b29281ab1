"""A real HTTP server on loopback that speaks the OpenAI Chat Completions and Embeddings protocol.

Tests queue scripted replies; with nothing queued it answers with a short echo. Every request is
recorded (body and headers) so tests can check exactly what Plinth sent upstream.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from mocks.server import LoopbackServer


@dataclass
class Reply:
    """One scripted answer. `stream` is a list of chunk dicts (or raw bytes) sent as SSE."""

    status: int = 200
    body: Any = None
    stream: list[Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before the response starts
    chunk_delay_s: float = 0.0
    error_after: int | None = None  # drop the connection after this many stream chunks


def completion(
    text: str = "Hello!", *, model: str = "gpt-4o-mini", usage: dict[str, Any] | None = None, **message: Any
) -> dict[str, Any]:
    return {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, **message},
                "logprobs": None,
                "finish_reason": "tool_calls" if message.get("tool_calls") else "stop",
            }
        ],
        "usage": usage or {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13},
    }


def chunk(
    delta: dict[str, Any] | None = None,
    finish: str | None = None,
    *,
    index: int = 0,
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": []
        if delta is None and finish is None
        else [{"index": index, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
    }
    if usage is not None:
        out["usage"] = usage
    return out


def text_stream(*pieces: str, usage: dict[str, Any] | None = None) -> list[Any]:
    chunks: list[Any] = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": p}) for p in pieces]
    chunks.append(chunk(finish="stop"))
    chunks.append(
        chunk(
            usage=usage
            or {"prompt_tokens": 7, "completion_tokens": len(pieces), "total_tokens": 7 + len(pieces)}
        )
    )
    return chunks


class OpenAIUpstream(LoopbackServer):
    def __init__(self) -> None:
        super().__init__()
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []

    @property
    def url(self) -> str:
        return f"{super().url}/v1"

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/openai/v1/chat/completions", self._chat)
        app.router.add_post("/openai/deployments/{name}/chat/completions", self._chat)
        return app

    def _record(self, request: web.Request, body: Any) -> None:
        self.requests.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        self.paths.append(request.path_qs)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self._record(request, body)
        reply = self.replies.pop(0) if self.replies else None
        if reply is None:
            last = body["messages"][-1].get("content")
            text = f"echo: {last}" if isinstance(last, str) else "echo"
            if body.get("stream"):
                usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
                chunks = text_stream("echo", ": ok", usage=usage)
                if not (body.get("stream_options") or {}).get("include_usage"):
                    chunks = chunks[:-1]
                reply = Reply(stream=chunks)
            else:
                reply = Reply(body=completion(text))
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.stream is None:
            return web.Response(
                status=reply.status,
                body=orjson.dumps(reply.body),
                headers={"content-type": "application/json", **reply.headers},
            )
        resp = web.StreamResponse(
            status=reply.status, headers={"content-type": "text/event-stream", **reply.headers}
        )
        await resp.prepare(request)
        for i, item in enumerate(reply.stream):
            if reply.error_after is not None and i >= reply.error_after:
                assert request.transport is not None
                request.transport.close()
                return resp
            if reply.chunk_delay_s:
                await asyncio.sleep(reply.chunk_delay_s)
            data = item if isinstance(item, bytes) else b"data: " + orjson.dumps(item) + b"\n\n"
            await resp.write(data)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._record(request, body)
        reply = self.replies.pop(0) if self.replies else None
        if reply is not None:
            return web.Response(
                status=reply.status,
                body=orjson.dumps(reply.body),
                headers={"content-type": "application/json"},
            )
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(t)), 0.5, -0.25]}
            for i, t in enumerate(inputs)
        ]
        usage = {"prompt_tokens": sum(len(t.split()) for t in inputs), "total_tokens": 0}
        return web.json_response({"object": "list", "data": data, "model": body["model"], "usage": usage})
