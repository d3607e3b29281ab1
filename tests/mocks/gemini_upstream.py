"""A real HTTP server on loopback that speaks the Gemini API (v1beta), for provider and end-to-end tests.

It records every request and answers from a queue of scripted responses; with an empty queue it
gives a sensible default (a short text answer, a two-chunk stream, deterministic embeddings), so
gateway tests that only need "a working Gemini" can start it and go.

    upstream = await GeminiUpstream().start()
    upstream.queue_json(text_response("hello"))
    upstream.queue_stream([text_chunk("he"), text_chunk("llo", finish="STOP", usage=usage(3, 2))])
    upstream.queue_error(429, "Resource has been exhausted", "RESOURCE_EXHAUSTED", retry_after=1)
    ... base_url=upstream.url ...
    await upstream.close()
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from mocks.server import LoopbackServer

# --- response builders -----------------------------------------------------------------------


def usage(
    prompt: int, candidates: int, *, cached: int = 0, thoughts: int = 0, tool_use: int = 0
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": candidates,
        "totalTokenCount": prompt + candidates + thoughts + tool_use,
    }
    if cached:
        meta["cachedContentTokenCount"] = cached
    if thoughts:
        meta["thoughtsTokenCount"] = thoughts
    if tool_use:
        meta["toolUsePromptTokenCount"] = tool_use
    return meta


def candidate(parts: list[dict[str, Any]], *, finish: str | None = "STOP", index: int = 0) -> dict[str, Any]:
    out: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": index}
    if finish:
        out["finishReason"] = finish
    return out


def response(
    candidates: list[dict[str, Any]],
    *,
    usage_metadata: dict[str, Any] | None = None,
    model_version: str = "gemini-2.5-flash",
    response_id: str = "resp-1",
    prompt_feedback: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {"candidates": candidates, "modelVersion": model_version, "responseId": response_id}
    if usage_metadata is not None:
        out["usageMetadata"] = usage_metadata
    if prompt_feedback is not None:
        out["promptFeedback"] = prompt_feedback
    return out


def text_response(
    text: str, *, finish: str = "STOP", usage_metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    meta = usage_metadata if usage_metadata is not None else usage(5, max(1, len(text) // 4))
    return response([candidate([{"text": text}], finish=finish)], usage_metadata=meta)


def text_chunk(
    text: str, *, finish: str | None = None, index: int = 0, usage_metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    return response([candidate([{"text": text}], finish=finish, index=index)], usage_metadata=usage_metadata)


def error_body(code: int, message: str, status: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


# --- the server ------------------------------------------------------------------------------


@dataclass(slots=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON (None if the body was not JSON)

    @property
    def operation(self) -> str:
        """`generateContent`, `streamGenerateContent` or `batchEmbedContents`."""
        return self.path.rsplit(":", 1)[-1]


@dataclass(slots=True)
class Scripted:
    status: int = 200
    json: Any = None
    chunks: list[Any] | None = None  # SSE: each item is a JSON object, or raw bytes sent as-is
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # before the response headers
    chunk_delay_s: float = 0.0
    disconnect: bool = False  # drop the connection after the chunks, without ending the stream


class GeminiUpstream(LoopbackServer):
    def __init__(self, *, embedding_dimensions: int = 8) -> None:
        super().__init__()
        self.requests: list[RecordedRequest] = []
        self.embedding_dimensions = embedding_dimensions
        self._queue: deque[Scripted] = deque()

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    @property
    def last(self) -> RecordedRequest:
        return self.requests[-1]

    def reset(self) -> None:
        self.requests.clear()
        self._queue.clear()

    # scripting
    def queue(self, scripted: Scripted) -> None:
        self._queue.append(scripted)

    def queue_json(self, body: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.queue(Scripted(status=status, json=body, headers=headers or {}))

    def queue_stream(
        self,
        chunks: list[Any],
        *,
        chunk_delay_s: float = 0.0,
        disconnect: bool = False,
        error: dict[str, Any] | None = None,
    ) -> None:
        """Queue an SSE answer; `error` is appended as a final `data: {"error": ...}` event."""
        items = list(chunks)
        if error is not None:
            items.append({"error": error})
        self.queue(Scripted(chunks=items, chunk_delay_s=chunk_delay_s, disconnect=disconnect))

    def queue_error(
        self, status: int, message: str, status_name: str, *, retry_after: float | None = None
    ) -> None:
        headers = {"retry-after": str(retry_after)} if retry_after is not None else {}
        self.queue(Scripted(status=status, json=error_body(status, message, status_name), headers=headers))

    def queue_embeddings(self, vectors: list[list[float]]) -> None:
        self.queue_json({"embeddings": [{"values": v} for v in vectors]})

    # serving
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            body = None
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        self.requests.append(recorded)
        scripted = self._queue.popleft() if self._queue else self._default(recorded)
        if scripted.delay_s:
            await asyncio.sleep(scripted.delay_s)
        if scripted.chunks is not None and scripted.status < 400:
            return await self._stream(request, scripted)
        return web.Response(
            status=scripted.status,
            body=orjson.dumps(scripted.json),
            content_type="application/json",
            headers=scripted.headers,
        )

    async def _stream(self, request: web.Request, scripted: Scripted) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200, headers={"content-type": "text/event-stream", **scripted.headers}
        )
        await resp.prepare(request)
        for chunk in scripted.chunks or []:
            if scripted.chunk_delay_s:
                await asyncio.sleep(scripted.chunk_delay_s)
            data = chunk if isinstance(chunk, bytes) else b"data: " + orjson.dumps(chunk) + b"\r\n\r\n"
            await resp.write(data)
        if scripted.disconnect:
            transport = request.transport
            if transport is not None:
                transport.abort()
            return resp
        await resp.write_eof()
        return resp

    def _default(self, recorded: RecordedRequest) -> Scripted:
        op = recorded.operation
        if op == "batchEmbedContents":
            items = (recorded.body or {}).get("requests") or []
            return Scripted(json={"embeddings": [{"values": self._vector(item)} for item in items]})
        if op == "streamGenerateContent":
            return Scripted(
                chunks=[
                    text_chunk("Hello"),
                    text_chunk(" from Gemini", finish="STOP", usage_metadata=usage(5, 3)),
                ]
            )
        if op == "generateContent":
            return Scripted(json=text_response("Hello from Gemini", usage_metadata=usage(5, 3)))
        return Scripted(status=404, json=error_body(404, f"unknown method {recorded.path}", "NOT_FOUND"))

    def _vector(self, item: dict[str, Any]) -> list[float]:
        """A deterministic unit vector per text, sized by outputDimensionality."""
        text = "".join(p.get("text", "") for p in (item.get("content") or {}).get("parts") or [])
        dims = int(item.get("outputDimensionality") or self.embedding_dimensions)
        digest = hashlib.sha256(text.encode()).digest()
        values = [(digest[i % len(digest)] - 127.5) / 127.5 for i in range(dims)]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]
