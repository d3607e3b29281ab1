"""The HTTP client every provider shares: one aiohttp session per process, with errors classified.

aiohttp rather than httpx: on this hot path httpx's async stack costs several hundred microseconds
more per request (measured in bench/, see docs/benchmarks.md), which is most of our latency budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from plinth.providers.base import ProviderError, classify_status


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
    """Owns the aiohttp session. Created lazily inside the running event loop."""

    def __init__(self, *, limit: int = 0) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._limit = limit

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._limit, ttl_dns_cache=300, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                json_serialize=lambda o: orjson.dumps(o).decode(),
                auto_decompress=True,
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

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
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        try:
            async with self.session().post(url, data=body, headers=headers, timeout=timeout) as resp:
                data = await resp.read()
                raise_for_upstream_status(resp.status, resp.headers, data)
                return UpstreamResponse(resp.status, resp.headers, data)
        except ProviderError:
            raise
        except Exception as exc:
            raise transport_error(exc) from None

    async def open_stream(
        self,
        url: str | URL,
        body: bytes,
        headers: Mapping[str, str],
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
    ) -> aiohttp.ClientResponse:
        """POST and return the response once its headers arrive; the caller reads and releases it."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)
        try:
            resp = await self.session().post(url, data=body, headers=headers, timeout=timeout)
        except Exception as exc:
            raise transport_error(exc) from None
        if resp.status >= 400:
            try:
                data = await resp.read()
            except Exception:
                data = b""
            finally:
                resp.release()
            raise_for_upstream_status(resp.status, resp.headers, data)
        return resp


def transport_error(exc: BaseException) -> ProviderError:
    """Classify a transport-level exception; all of them are retryable."""
    if isinstance(exc, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return ProviderError("upstream timed out", status=504, retryable=True, kind="timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ProviderError(
            f"cannot connect to upstream {exc.host}:{exc.port}", retryable=True, kind="connect_error"
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | ConnectionError):
        return ProviderError("upstream closed the connection", retryable=True, kind="connection_lost")
    if isinstance(exc, aiohttp.ClientError):
        return ProviderError(
            f"upstream request failed: {type(exc).__name__}", retryable=True, kind="connection_lost"
        )
    return ProviderError(f"upstream request failed: {type(exc).__name__}", kind="upstream_error")


async def iter_sse(resp: aiohttp.ClientResponse) -> AsyncGenerator[tuple[str, bytes], None]:
    """Yield (event, data) pairs from a Server-Sent Events body; transport faults become ProviderError."""
    event = ""
    data: list[bytes] = []
    try:
        async for raw in resp.content:
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
