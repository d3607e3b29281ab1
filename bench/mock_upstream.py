"""A very fast OpenAI-compatible mock upstream for the gateway benchmark.

Why not a framework: the mock must stay far faster than any gateway in front of it (the target is
well over 20,000 requests/s on one core), so that a benchmark measures the gateway and not the mock.
A raw asyncio `Protocol` on uvloop with a minimal HTTP/1.1 keep-alive parser and pre-built response
bytes does that.

Routes:
- ``POST /v1/chat/completions``: a short fixed chat completion with ``usage``; with ``"stream": true``
  an SSE stream (role chunk, a few content deltas, finish chunk, a usage chunk when
  ``stream_options.include_usage`` is set, then ``data: [DONE]``), optionally with a delay between
  chunks (``--stream-delay-ms``).
- ``POST /v1/embeddings``: one small fixed vector per input.
- ``GET /v1/models``: the model list.

Usage: ``python bench/mock_upstream.py [PORT] [--stream-delay-ms MS]`` (port 18000 by default, as in
``../shared/bench/litellm_config.yaml``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import time
from typing import Any

try:  # orjson is much faster, but the mock must also run without it
    import orjson

    def _loads(data: bytes) -> Any:
        return orjson.loads(data)

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - fallback

    def _loads(data: bytes) -> Any:
        return json.loads(data)

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


MODEL = "gpt-4o-mini"
CREATED = int(time.time())
CONTENT_PIECES = ["Hello", "!", " How", " can", " I", " help", "?"]
CONTENT = "".join(CONTENT_PIECES)
USAGE = {
    "prompt_tokens": 12,
    "completion_tokens": len(CONTENT_PIECES),
    "total_tokens": 12 + len(CONTENT_PIECES),
}
MAX_HEADER_BYTES = 64 * 1024


def _response(status: str, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status.encode() + b"\r\n"
        b"content-type: " + content_type + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n"
        b"\r\n" + body
    )


CHAT_BODY = _dumps(
    {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_mock",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": CONTENT, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
)
CHAT_RESPONSE = _response("200 OK", CHAT_BODY)
MODELS_RESPONSE = _response(
    "200 OK",
    _dumps(
        {
            "object": "list",
            "data": [
                {"id": MODEL, "object": "model", "created": CREATED, "owned_by": "mock"},
                {"id": "text-embedding-3-small", "object": "model", "created": CREATED, "owned_by": "mock"},
            ],
        }
    ),
)
NOT_FOUND = _response(
    "404 Not Found",
    _dumps(
        {"error": {"message": "no such route", "type": "invalid_request_error", "param": None, "code": None}}
    ),
)
BAD_REQUEST = _response(
    "400 Bad Request",
    _dumps(
        {
            "error": {
                "message": "malformed request",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        }
    ),
)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"content-type: text/event-stream\r\n"
    b"cache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)


def _chunk(obj: dict[str, Any] | None) -> bytes:
    """One SSE event framed as one HTTP chunk (``None`` is the ``[DONE]`` sentinel)."""
    data = b"data: [DONE]\n\n" if obj is None else b"data: " + _dumps(obj) + b"\n\n"
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _stream_event(delta: dict[str, Any], finish: str | None, with_usage: bool) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": MODEL,
        "system_fingerprint": "fp_mock",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if with_usage:
        event["usage"] = None
    return event


def _stream_chunks(with_usage: bool) -> list[bytes]:
    chunks = [_chunk(_stream_event({"role": "assistant", "content": "", "refusal": None}, None, with_usage))]
    chunks += [_chunk(_stream_event({"content": piece}, None, with_usage)) for piece in CONTENT_PIECES]
    chunks.append(_chunk(_stream_event({}, "stop", with_usage)))
    if with_usage:
        usage_event = _stream_event({}, None, False)
        usage_event["choices"] = []
        usage_event["usage"] = USAGE
        chunks.append(_chunk(usage_event))
    chunks.append(_chunk(None))
    chunks.append(b"0\r\n\r\n")
    return chunks


STREAM_CHUNKS = {False: _stream_chunks(False), True: _stream_chunks(True)}
STREAM_WHOLE = {k: STREAM_HEAD + b"".join(v) for k, v in STREAM_CHUNKS.items()}


def _embeddings(body: bytes) -> bytes:
    try:
        req = _loads(body)
        inputs = req.get("input", "")
    except (ValueError, AttributeError):
        return BAD_REQUEST
    items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
    data = [
        {"object": "embedding", "index": i, "embedding": [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8]}
        for i in range(len(items))
    ]
    n_tokens = 4 * len(items)
    return _response(
        "200 OK",
        _dumps(
            {
                "object": "list",
                "data": data,
                "model": req.get("model", "text-embedding-3-small"),
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
            }
        ),
    )


class MockProtocol(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; handles pipelined requests in order."""

    __slots__ = ("_buf", "_busy", "_closing", "_delay", "_transport")

    def __init__(self, delay_s: float) -> None:
        self._buf = b""
        self._busy = False  # a delayed stream is being written; later requests wait in the buffer
        self._closing = False
        self._delay = delay_s
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._busy:
            self._process()

    def _process(self) -> None:
        transport = self._transport
        while transport is not None and not self._busy and not self._closing:
            buf = self._buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEADER_BYTES:
                    self._close()
                return
            head = buf[:end]
            line_end = head.find(b"\r\n")
            request_line = head if line_end < 0 else head[:line_end]
            parts = request_line.split(b" ")
            if len(parts) != 3:
                transport.write(BAD_REQUEST)
                self._close()
                return
            method, target = parts[0], parts[1]
            length = 0
            keep_alive = parts[2] == b"HTTP/1.1"
            if line_end >= 0:
                for line in head[line_end + 2 :].split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    lname = name.strip().lower()
                    if lname == b"content-length":
                        try:
                            length = int(value.strip())
                        except ValueError:
                            transport.write(BAD_REQUEST)
                            self._close()
                            return
                    elif lname == b"connection":
                        v = value.strip().lower()
                        if v == b"close":
                            keep_alive = False
                        elif v == b"keep-alive":
                            keep_alive = True
                    elif lname == b"transfer-encoding":
                        transport.write(BAD_REQUEST)  # chunked request bodies are not needed here
                        self._close()
                        return
            total = end + 4 + length
            if len(buf) < total:
                return
            body = buf[end + 4 : total]
            self._buf = buf[total:]
            self._handle(method, target.split(b"?", 1)[0], body)
            if not keep_alive:
                self._close()

    def _handle(self, method: bytes, path: bytes, body: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if path == b"/v1/chat/completions" and method == b"POST":
            if b'"stream"' not in body:
                transport.write(CHAT_RESPONSE)
                return
            try:
                req = _loads(body)
                stream = bool(req.get("stream"))
                opts = req.get("stream_options") or {}
                with_usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
            except (ValueError, AttributeError):
                transport.write(BAD_REQUEST)
                return
            if not stream:
                transport.write(CHAT_RESPONSE)
            elif self._delay <= 0:
                transport.write(STREAM_WHOLE[with_usage])
            else:
                self._busy = True
                transport.write(STREAM_HEAD)
                asyncio.get_running_loop().create_task(self._slow_stream(STREAM_CHUNKS[with_usage]))
        elif path == b"/v1/embeddings" and method == b"POST":
            transport.write(_embeddings(body))
        elif path == b"/v1/models" and method == b"GET":
            transport.write(MODELS_RESPONSE)
        else:
            transport.write(NOT_FOUND)

    async def _slow_stream(self, chunks: list[bytes]) -> None:
        """Write one chunk, then wait `delay` before the next (as a model generating tokens would)."""
        try:
            for i, chunk in enumerate(chunks):
                if self._transport is None:
                    return
                self._transport.write(chunk)
                if i < len(chunks) - 2:  # no delay around the final [DONE] / terminator
                    await asyncio.sleep(self._delay)
        finally:
            self._busy = False
        if self._buf:
            self._process()

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()


async def serve(host: str, port: int, delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: MockProtocol(delay_s), host, port, reuse_address=True, backlog=4096
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"mock upstream listening on http://{host}:{port}", flush=True)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", nargs="?", type=int, default=18000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--stream-delay-ms", type=float, default=0.0, help="delay between SSE chunks")
    args = parser.parse_args()
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - plain asyncio still works, only slower
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(args.host, args.port, args.stream_delay_ms / 1000))


if __name__ == "__main__":
    main()
