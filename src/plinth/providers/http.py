"""The HTTP client every provider shares: one connection pool per process, with errors classified.

The wire work is in `plinth.providers.http1` (a lean HTTP/1.1 client: aiohttp's cost about 200
microseconds more CPU per upstream call, `bench/upstream_client.py`; httpx's more still). This module
is what providers see: `post` for a whole answer, `open_stream` for a streamed one, SSE parsing, and
the mapping of HTTP errors and transport faults to `ProviderError`.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from yarl import URL

from plinth.providers import http1
from plinth.providers.base import ProviderError, classify_status
from plinth.providers.http1 import Response as UpstreamStream

__all__ = [
    "HttpClient",
    "UpstreamResponse",
    "UpstreamStream",
    "error_message_from_body",
    "iter_sse",
    "raise_for_upstream_status",
    "transport_error",
]


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    headers: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise ProviderError(
                f"upstream sent invalid JSON (HTTP {self.status})", kind="bad_upstream_response"
            ) from None


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after-ms")
    if value:
        try:
            return float(value) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value:
        try:
            return float(value)
        except ValueError:
            return None
    return None


def error_message_from_body(body: bytes) -> str:
    """Pull the human message out of any provider's error JSON, else a short excerpt."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:300].decode("utf-8", "replace").strip() or "(empty body)"
    if isinstance(data, list) and data:  # Gemini sometimes wraps errors in a list
        data = data[0]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("Message")
            if isinstance(msg, str):
                return msg
        if isinstance(err, str):
            return err
        msg = data.get("message") or data.get("Message")
        if isinstance(msg, str):
            return msg
    return body[:300].decode("utf-8", "replace")


def raise_for_upstream_status(status: int, headers: Mapping[str, str], body: bytes) -> None:
    if status < 400:
        return
    message = f"upstream returned HTTP {status}: {error_message_from_body(body)}"
    raise classify_status(status, message, _retry_after(headers))


class HttpClient:
    """Owns the upstream connection pool (one per worker process, shared by every provider)."""

    def __init__(self, *, keepalive_s: float = http1.KEEPALIVE_S, tls: ssl.SSLContext | None = None) -> None:
        self._pool = http1.Pool(keepalive_s=keepalive_s, tls=tls)

    async def aclose(self) -> None:
        self._pool.close()

    def open_responses(self) -> int:
        """Upstream responses sent and not yet released (read in full, or abandoned and closed)."""
        return self._pool.open_responses

    async def post(
        self,
        url: str | URL,
        body: bytes,
        headers: Mapping[str, str],
        *,
        timeout_s: float,
        connect_timeout_s: float,
    ) -> UpstreamResponse:
        """POST and read the whole answer. Raises ProviderError for HTTP errors and transport faults."""
        try:
            resp = await http1.send(
                self._pool, url, body, headers, connect_timeout_s=connect_timeout_s, total_timeout_s=timeout_s
            )
            data = await resp.read()
        except Exception as exc:
            raise transport_error(exc) from None
        raise_for_upstream_status(resp.status, resp.headers, data)
        return UpstreamResponse(resp.status, resp.headers, data)

    async def open_stream(
        self,
        url: str | URL,
        body: bytes,
        headers: Mapping[str, str],
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
    ) -> UpstreamStream:
        """POST and return the response once its headers arrive; the caller reads and releases it.

        `read_timeout_s` bounds each wait for the next bytes, not the whole stream."""
        try:
            resp = await http1.send(
                self._pool,
                url,
                body,
                headers,
                connect_timeout_s=connect_timeout_s,
                read_timeout_s=read_timeout_s,
            )
        except Exception as exc:
            raise transport_error(exc) from None
        if resp.status >= 400:
            try:
                data = await resp.read()  # releases the response, whatever happens
            except Exception:
                data = b""
            raise_for_upstream_status(resp.status, resp.headers, data)
        return resp


def transport_error(exc: BaseException) -> ProviderError:
    """Classify a transport-level exception; all but a bad URL are retryable."""
    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, TimeoutError | http1.ReadTimeout):
        return ProviderError("upstream timed out", status=504, retryable=True, kind="timeout")
    if isinstance(exc, http1.ConnectFailed):
        return ProviderError(str(exc), retryable=True, kind="connect_error")
    if isinstance(exc, http1.MalformedResponse):
        return ProviderError(str(exc), retryable=True, kind="bad_upstream_response")
    if isinstance(exc, http1.ConnectionLost | ConnectionError):
        return ProviderError("upstream closed the connection", retryable=True, kind="connection_lost")
    if isinstance(exc, ValueError):  # a URL or header the configuration got wrong
        return ProviderError(f"cannot send the upstream request: {exc}", kind="upstream_error")
    return ProviderError(f"upstream request failed: {type(exc).__name__}", kind="upstream_error")


async def iter_sse(resp: UpstreamStream) -> AsyncGenerator[tuple[str, bytes], None]:
    """Yield (event, data) pairs from a Server-Sent Events body; transport faults become ProviderError."""
    event = ""
    data: list[bytes] = []
    try:
        async for raw in resp.iter_lines():
            line = raw.rstrip(b"\r\n")
            if not line:
                if data:
                    yield event, b"\n".join(data)
                event, data = "", []
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.partition(b":")
            if value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name == b"event":
                event = value.decode()
        if data:
            yield event, b"\n".join(data)
    except ProviderError:
        raise
    except Exception as exc:
        raise transport_error(exc) from None
    finally:
        resp.release()
