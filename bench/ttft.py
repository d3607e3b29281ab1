"""Time to first token of streamed chat completions, measured from the client side.

Why a hand-written client: an HTTP library's own per-request overhead and jitter would blur the
sub-millisecond differences we look for. This client uses one blocking keep-alive socket, sends the
pre-built request bytes, and stops the clock at the `recv` that delivers the first SSE event with a
non-empty ``choices[0].delta.content``. It then reads the stream to its end (checking for
``data: [DONE]``) so that the next request reuses the connection. Requests run one at a time.

Measure against the mock directly and through a gateway; the difference is the gateway's *added*
time to first token.

Usage: ``python bench/ttft.py http://127.0.0.1:4100 --key KEY -n 1000``
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "Say hello in five words."}],
    "max_tokens": 16,
    "stream": True,
}


class StreamError(Exception):
    """The response was not the expected 200 SSE stream."""


@dataclass
class TtftResult:
    samples_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None

    def percentile(self, q: float) -> float:
        return percentile(self.samples_ms, q)


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no samples."""
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


class _Conn:
    """A keep-alive HTTP/1.1 connection that reads one (possibly chunked) response at a time."""

    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout_s)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise StreamError("connection closed by server")
        self.buf += data

    def request_ttft(self, request: bytes) -> tuple[float, bool]:
        """Send one request; return (seconds to first content delta, connection reusable)."""
        t0 = time.perf_counter()
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = lines[0].split(b" ", 2)
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"")
        length = int(headers[b"content-length"]) if b"content-length" in headers else None
        keep_alive = headers.get(b"connection") != b"close" and (chunked or length is not None)
        if len(status) < 2 or status[1] != b"200":
            body = self._read_body(chunked, length)
            raise StreamError(f"HTTP {status[1:2]!r}: {body[:200]!r}")

        events = b""  # decoded SSE bytes not yet split into events
        first: float | None = None
        done = False
        for piece in self._iter_body(chunked, length):
            events += piece
            while b"\n\n" in events:
                event, _, events = events.partition(b"\n\n")
                event = event.replace(b"\r", b"").strip()
                if not event.startswith(b"data:"):
                    continue
                data = event[5:].strip()
                if data == b"[DONE]":
                    done = True
                    continue
                if first is None and _has_content(data):
                    first = time.perf_counter() - t0
        if first is None:
            raise StreamError("stream ended without a content delta")
        if not done:
            raise StreamError("stream ended without data: [DONE]")
        return first, keep_alive

    def _iter_body(self, chunked: bool, length: int | None) -> list[bytes] | _ChunkIter:
        if not chunked:
            return [self._read_body(False, length)]
        return _ChunkIter(self)

    def _read_body(self, chunked: bool, length: int | None) -> bytes:
        if chunked:
            return b"".join(_ChunkIter(self))
        if length is None:  # read until close
            try:
                while True:
                    self._fill()
            except StreamError:
                pass
            body, self.buf = self.buf, b""
            return body
        while len(self.buf) < length:
            self._fill()
        body, self.buf = self.buf[:length], self.buf[length:]
        return body


class _ChunkIter:
    """Yields the payload of each HTTP chunk as soon as it is complete, so TTFT is not delayed."""

    def __init__(self, conn: _Conn) -> None:
        self.conn = conn
        self.finished = False

    def __iter__(self) -> _ChunkIter:
        return self

    def __next__(self) -> bytes:
        conn = self.conn
        if self.finished:
            raise StopIteration
        while b"\r\n" not in conn.buf:
            conn._fill()
        size_line, _, rest = conn.buf.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(rest) < size + 2:
            conn._fill()
            size_line, _, rest = conn.buf.partition(b"\r\n")
        if size == 0:  # last chunk: an empty line ends the body (trailers, if any, are skipped)
            while not rest.startswith(b"\r\n") and b"\r\n\r\n" not in rest:
                conn._fill()
                _, _, rest = conn.buf.partition(b"\r\n")
            end = 2 if rest.startswith(b"\r\n") else rest.index(b"\r\n\r\n") + 4
            conn.buf = rest[end:]
            self.finished = True
            raise StopIteration
        payload, conn.buf = rest[:size], rest[size + 2 :]
        return payload


def _has_content(data: bytes) -> bool:
    if b'"content"' not in data:
        return False
    try:
        obj = json.loads(data)
        return bool(obj["choices"][0]["delta"].get("content"))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return False


def build_request(url: str, key: str | None, body: dict[str, object] | None = None) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    payload = json.dumps(body or DEFAULT_BODY, separators=(",", ":")).encode()
    path = (parts.path.rstrip("/") or "") + "/v1/chat/completions"
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(payload)}",
    ]
    if key:
        head.append(f"Authorization: Bearer {key}")
    return host, port, ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def measure(
    url: str,
    key: str | None,
    n: int,
    *,
    warmup: int = 20,
    max_seconds: float = 60.0,
    timeout_s: float = 10.0,
) -> TtftResult:
    """Run `warmup` + `n` sequential streamed requests, stopping early after `max_seconds`."""
    host, port, request = build_request(url, key)
    result = TtftResult()
    conn: _Conn | None = None
    deadline = time.monotonic() + max_seconds
    try:
        for i in range(warmup + n):
            if time.monotonic() > deadline:
                break
            try:
                if conn is None:
                    conn = _Conn(host, port, timeout_s)
                seconds, reusable = conn.request_ttft(request)
            except (OSError, StreamError, ValueError) as exc:
                result.errors += 1
                result.first_error = result.first_error or f"{type(exc).__name__}: {exc}"
                if conn is not None:
                    conn.close()
                conn = None
                if result.errors > max(10, n // 10):
                    break
                continue
            if not reusable:
                conn.close()
                conn = None
            if i >= warmup:
                result.samples_ms.append(seconds * 1000)
    finally:
        if conn is not None:
            conn.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Measure streaming time to first token (sequential).")
    parser.add_argument("url", help="base URL, e.g. http://127.0.0.1:18000")
    parser.add_argument("--key", default=None, help="Bearer key")
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    args = parser.parse_args()
    res = measure(args.url, args.key, args.n, warmup=args.warmup, max_seconds=args.max_seconds)
    if res.samples_ms:
        print(
            f"n={len(res.samples_ms)} errors={res.errors} "
            f"p50={res.percentile(50):.3f}ms p90={res.percentile(90):.3f}ms p99={res.percentile(99):.3f}ms "
            f"mean={statistics.fmean(res.samples_ms):.3f}ms"
        )
    else:
        print(f"no samples; errors={res.errors} first_error={res.first_error}")
    if res.first_error:
        print(f"first error: {res.first_error}")


if __name__ == "__main__":
    main()
