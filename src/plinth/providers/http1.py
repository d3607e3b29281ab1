"""HTTP/1.1 to upstreams: keep-alive connections on asyncio protocols, parsed by httptools.

Hand-written on purpose. aiohttp's client cost about 290 microseconds of CPU per upstream call on
this project's benchmark machine, against about 80 for `HttpClient` on this module doing the same
POST over the same keep-alive connection (`bench/upstream_client.py`, docs/benchmarks.md): a third
of the gateway's whole added latency. What this module does is exactly what providers need and no more:

- one pool of idle keep-alive connections per origin (scheme, host, port), newest first, closed
  after `keepalive_s` idle; no connection limit (the providers' own limits sit above);
- TLS through the standard library (`ssl.create_default_context`, the system's CAs);
- the request written in one `write`; the response parsed by httptools (llhttp, the parser Node.js
  uses): Content-Length, chunked and read-until-close bodies, gzip and deflate decoded;
- a request sent on a reused connection that the server closed without a byte of answer is sent
  again once on a fresh connection, as urllib3 does (servers close idle connections unread; one that
  acted on the request and then dropped it without answering would see it twice);
- back-pressure on streamed bodies: reading pauses past `HIGH_WATER` unread bytes.

Errors are `UpstreamFault` subclasses; `plinth.providers.http` turns them into `ProviderError`s.
No request or response content ever appears in their messages, only the host and port.
"""

from __future__ import annotations

import asyncio
import math
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import cast

import httptools
from yarl import URL

HIGH_WATER = 256 * 1024  # unread body bytes at which reading pauses
LOW_WATER = 64 * 1024  # ... and resumes
KEEPALIVE_S = 30.0
WATCHDOG_S = 0.05  # how often waiting responses' deadlines are checked
_TARGET_CACHE_SIZE = 1024


class UpstreamFault(Exception):
    """A transport-level failure talking to an upstream (never an HTTP error status)."""


class ConnectFailed(UpstreamFault):
    """No connection could be opened (refused, unreachable, DNS, TLS handshake)."""


class ConnectionLost(UpstreamFault):
    """The connection closed before the response was complete."""


class MalformedResponse(UpstreamFault):
    """The upstream's bytes are not valid HTTP/1.1."""


class ReadTimeout(UpstreamFault):
    """No response (or no more of it) within the time allowed."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL sends a request: the pool key, the Host header and the request target."""

    scheme: str
    host: str
    port: int
    host_header: bytes
    path: bytes

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


_targets: dict[str, Target] = {}


def target_of(url: str | URL) -> Target:
    """Parse `url` (a yarl URL is sent exactly as encoded: signed paths must not be re-encoded)."""
    if isinstance(url, str):
        cached = _targets.get(url)
        if cached is not None:
            return cached
        parsed = URL(url)
    else:
        parsed = url
    scheme = parsed.scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"upstream URL must be http or https, not {scheme or 'schemeless'}")
    host = parsed.raw_host
    if not host:
        raise ValueError("upstream URL has no host")
    port = parsed.explicit_port or (443 if scheme == "https" else 80)
    name = f"[{host}]" if ":" in host else host
    host_header = name if parsed.explicit_port is None else f"{name}:{port}"
    target = Target(scheme, host, port, host_header.encode("ascii"), parsed.raw_path_qs.encode("ascii"))
    if isinstance(url, str):
        if len(_targets) >= _TARGET_CACHE_SIZE:
            _targets.clear()
        _targets[url] = target
    return target


def encode_request(target: Target, headers: Mapping[str, str], body: bytes) -> bytes:
    """The request's bytes: request line, headers, body. Header values with CR or LF are refused.

    Host, Accept-Encoding and Content-Length are added unless the caller set them (a signed request
    such as Bedrock's carries its own Host)."""
    lines = [b"POST ", target.path, b" HTTP/1.1\r\n"]
    given = set()
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} contains a line break or colon")
        given.add(name.lower())
        try:
            lines += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
        except UnicodeEncodeError:  # the message names the header, never its value (a key, often)
            raise ValueError(f"header {name!r} has characters outside Latin-1") from None
    if "host" not in given:
        lines += (b"Host: ", target.host_header, b"\r\n")
    if "accept-encoding" not in given:
        lines.append(b"Accept-Encoding: gzip, deflate\r\n")
    if "content-length" not in given:
        lines += (b"Content-Length: ", str(len(body)).encode(), b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines) + body


class Response:
    """One response, filled by its connection: status and headers first, then the body as it comes."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_complete",
        "_conn",
        "_decoder",
        "_error",
        "_pool",
        "_read_timeout_s",
        "_released",
        "_waiter",
        "_whole",
        "deadline",
        "headers",
        "status",
    )

    def __init__(
        self, conn: Connection, pool: Pool, read_timeout_s: float | None, deadline: float = math.inf
    ) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._conn = conn
        self._pool = pool
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._error: UpstreamFault | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._decoder: zlib._Decompress | None = None
        self._released = False
        self._whole = False  # `read` takes the whole body: no back-pressure, it would never end
        self._read_timeout_s = read_timeout_s  # per wait (streams); None: `deadline` is absolute
        self.deadline = deadline  # loop time past which a wait fails (the pool's watchdog checks)

    # --- filled by the connection -------------------------------------------------------------

    def _headers_done(self) -> None:
        encoding = self.headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            self._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, detected
        elif encoding not in ("", "identity"):
            self._fail(MalformedResponse(f"upstream used content-encoding {encoding[:40]!r}"))
            return
        self._wake()

    def _feed(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data)
            except zlib.error:
                self._fail(MalformedResponse("upstream sent a corrupt compressed body"))
                return
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > HIGH_WATER and not self._whole:
                self._conn.pause()
            self._wake()

    def _finish(self) -> None:
        if self._decoder is not None:
            tail = self._decoder.flush()
            if tail:
                self._chunks.append(tail)
                self._buffered += len(tail)
        self._complete = True
        self._wake()

    def _fail(self, error: UpstreamFault) -> None:
        if not self._complete and self._error is None:
            self._error = error
            self._conn.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self._pool.unwatch(self)
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        """Until the connection has something new: headers, data, the end or an error."""
        loop = asyncio.get_running_loop()
        if self._read_timeout_s is not None:
            self.deadline = loop.time() + self._read_timeout_s
        self._waiter = waiter = loop.create_future()
        self._pool.watch(self)
        try:
            await waiter
        except BaseException:
            self._waiter = None
            self._pool.unwatch(self)
            raise

    def _expire(self) -> None:
        """Called by the pool's watchdog: the wait in progress ran past `deadline`."""
        self._fail(ReadTimeout("upstream timed out"))

    # --- read by the caller ---------------------------------------------------------------------

    async def _headers(self) -> None:
        while not self.status and self._error is None:
            await self._wait()
        if self._error is not None:
            raise self._error

    def _take(self) -> bytes:
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._buffered < LOW_WATER:
            self._conn.resume()
        return data

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive (decoded), then the response is released."""
        try:
            while True:
                if self._chunks:
                    yield self._take()
                elif self._error is not None:
                    raise self._error
                elif self._complete:
                    return
                else:
                    await self._wait()
        finally:
            self.release()

    async def iter_lines(self) -> AsyncIterator[bytes]:
        """The body split after each b"\\n" (the last line may lack one), then the response is released."""
        pending = b""
        async for chunk in self.iter_chunks():
            data = pending + chunk if pending else chunk
            start = 0
            end = data.find(b"\n")
            while end != -1:
                yield data[start : end + 1]
                start = end + 1
                end = data.find(b"\n", start)
            pending = data[start:]
        if pending:
            yield pending

    async def read(self) -> bytes:
        """The whole body; the connection goes back to the pool."""
        self._whole = True
        self._conn.resume()  # paused if much arrived before this call
        try:
            while not self._complete:
                if self._error is not None:
                    raise self._error
                await self._wait()
            if self._error is not None:
                raise self._error
            body = b"".join(self._chunks)
            self._chunks.clear()
            self._buffered = 0
            return body
        finally:
            self.release()

    def release(self) -> None:
        """Done with the response: a fully read one returns its connection to the pool, else it closes."""
        if self._released:
            return
        self._released = True
        self._pool.open_responses -= 1
        conn = self._conn
        conn.response = None
        if self._complete and self._error is None and conn.reusable():
            self._pool.put(conn)
        else:
            conn.close()


class Connection(asyncio.Protocol):
    """One keep-alive connection to an origin; carries one response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self.origin: tuple[str, str, int] = ("", "", 0)  # set by Pool.connect
        self.bytes_received = 0  # of the current response: a stale reused connection has none
        self._parser = httptools.HttpResponseParser(self)
        self._length_known = False  # Content-Length or chunked; otherwise the body runs to EOF
        self._keep_alive = False
        self._paused = False
        self._interim = False  # a 1xx response before the real one

    # --- asyncio.Protocol -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self.response is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(MalformedResponse("upstream tried to upgrade the connection"))
        except httptools.HttpParserError:
            self._fail(MalformedResponse("upstream sent a malformed HTTP response"))

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost settles the response

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is None or response._complete:
            return
        if response.status and not self._length_known and not self._interim:
            response._finish()  # a body delimited by the end of the connection
        else:
            response._fail(ConnectionLost("upstream closed the connection"))

    # --- httptools callbacks ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._length_known = False
        self._interim = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.response is None:
            return
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        if key == "content-length" or (key == "transfer-encoding" and "chunked" in text.lower()):
            self._length_known = True
        headers = self.response.headers
        headers[key] = f"{headers[key]}, {text}" if key in headers else text

    def on_headers_complete(self) -> None:
        response = self.response
        if response is None:
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # 100 Continue and friends: the real response follows
            self._interim = True
            response.headers.clear()
            return
        self._keep_alive = self._parser.should_keep_alive()
        response.status = status
        response._headers_done()

    def on_body(self, body: bytes) -> None:
        if self.response is not None and not self._interim:
            self.response._feed(body)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        if self.response is not None:
            self.response._finish()

    # --- used by Response and Pool ----------------------------------------------------------------

    def _fail(self, error: UpstreamFault) -> None:
        if self.response is not None:
            self.response._fail(error)
        self.close()

    def reusable(self) -> bool:
        return self._keep_alive and not self.closed and self.transport is not None

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def start(self, response: Response, request: bytes) -> None:
        assert self.transport is not None
        self.response = response
        self.bytes_received = 0
        self._keep_alive = False
        self.transport.write(request)


class Pool:
    """Idle keep-alive connections per origin, and the opening of new ones."""

    def __init__(self, *, keepalive_s: float = KEEPALIVE_S, tls: ssl.SSLContext | None = None) -> None:
        self.keepalive_s = keepalive_s
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self.open_responses = 0  # sent and not yet released: a leak shows here
        self._tls = tls  # None: the standard library's default (system CAs, SSL_CERT_FILE), made on first use
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._watched: set[Response] = set()  # responses waiting, with a deadline
        self._watchdog: asyncio.TimerHandle | None = None

    def tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def take_idle(self, origin: tuple[str, str, int], loop: asyncio.AbstractEventLoop) -> Connection | None:
        if loop is not self._loop:  # connections and timers belong to the loop that made them
            self._idle.clear()
            self._watched.clear()
            self._watchdog = None
            self._loop = loop
        now = loop.time()
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.closed or now - conn.idle_since > self.keepalive_s:
                conn.close()
                continue
            return conn
        return None

    async def connect(self, target: Target, timeout_s: float) -> Connection:
        loop = asyncio.get_running_loop()
        tls = self.tls_context() if target.scheme == "https" else None
        try:
            async with asyncio.timeout(timeout_s):
                _, conn = await loop.create_connection(
                    Connection,
                    target.host,
                    target.port,
                    ssl=tls,
                    server_hostname=target.host if tls is not None else None,
                )
        except TimeoutError:
            raise ConnectFailed(
                f"connecting to upstream {target.host}:{target.port} timed out after {timeout_s:g} s"
            ) from None
        except ssl.SSLError as exc:
            reason = exc.reason or type(exc).__name__
            raise ConnectFailed(f"TLS with upstream {target.host}:{target.port} failed: {reason}") from None
        except OSError:
            raise ConnectFailed(f"cannot connect to upstream {target.host}:{target.port}") from None
        conn.origin = target.origin
        return conn

    # Timeouts: one watchdog per pool checks every waiting response's deadline each WATCHDOG_S,
    # instead of a timer per request (asyncio.timeout cost 11 microseconds a request on uvloop,
    # measured; a set add and discard cost well under one). Deadlines fire up to WATCHDOG_S late.

    def watch(self, response: Response) -> None:
        self._watched.add(response)
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().call_later(WATCHDOG_S, self._check_deadlines)

    def unwatch(self, response: Response) -> None:
        self._watched.discard(response)

    def _check_deadlines(self) -> None:
        self._watchdog = None
        if not self._watched:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for response in [r for r in self._watched if r.deadline <= now]:
            self._watched.discard(response)
            response._expire()
        if self._watched:
            self._watchdog = loop.call_later(WATCHDOG_S, self._check_deadlines)

    def put(self, conn: Connection) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(conn.origin, []).append(conn)

    def close(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


async def send(
    pool: Pool,
    url: str | URL,
    body: bytes,
    headers: Mapping[str, str],
    *,
    connect_timeout_s: float,
    read_timeout_s: float | None = None,
    total_timeout_s: float | None = None,
) -> Response:
    """POST `body` to `url` and return once the response's status and headers are in.

    `read_timeout_s` bounds each wait for more of the response (streams); `total_timeout_s` the
    whole exchange, body included (whole answers). The caller reads the body (`read`,
    `iter_chunks`, `iter_lines`) or calls `release`.
    """
    target = target_of(url)
    request = encode_request(target, headers, body)
    loop = asyncio.get_running_loop()
    deadline = math.inf if total_timeout_s is None else loop.time() + total_timeout_s
    conn = pool.take_idle(target.origin, loop)
    reused = conn is not None
    while True:
        if conn is None:
            conn = await pool.connect(target, connect_timeout_s)
        response = Response(conn, pool, read_timeout_s, deadline)
        pool.open_responses += 1
        conn.start(response, request)
        try:
            await response._headers()
        except ConnectionLost:
            response.release()
            if reused and conn.bytes_received == 0:  # the server had closed it while idle
                conn, reused = None, False
                continue
            raise
        except BaseException:  # timeouts, cancellation, bad bytes: the connection cannot be reused
            response.release()
            raise
        return response
