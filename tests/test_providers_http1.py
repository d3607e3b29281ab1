"""The upstream HTTP/1.1 client (plinth.providers.http1) against raw loopback servers.

Each server here reads real requests off a socket and answers with exactly the bytes a test scripts,
so the client's parsing, keep-alive, retry and error paths meet the wire as it is, including the
malformed and truncated answers a real upstream or proxy can send.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from plinth.providers.base import ProviderError
from plinth.providers.http import HttpClient, iter_sse
from plinth.providers.http1 import HIGH_WATER, encode_request, target_of

Reply = Callable[["Exchange"], Awaitable[None]]


class Exchange:
    """One request as the server read it, and the writer to answer on."""

    def __init__(self, head: bytes, body: bytes, writer: asyncio.StreamWriter, connection: int) -> None:
        self.head = head
        self.body = body
        self.writer = writer
        self.connection = connection

    @property
    def headers(self) -> list[tuple[str, str]]:
        return parse_headers(self.head)

    async def send(self, data: bytes, *, close: bool = False) -> None:
        self.writer.write(data)
        await self.writer.drain()
        if close:
            self.writer.close()


def parse_headers(head: bytes) -> list[tuple[str, str]]:
    lines = head.decode("latin-1").split("\r\n")[1:]
    return [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines if line)]


def response(body: bytes, *, status: str = "200 OK", headers: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


class ScriptedServer:
    """A loopback HTTP/1.1 server answering request N with `replies[N]` (the last one repeats)."""

    def __init__(self, *replies: Reply, tls: ssl.SSLContext | None = None) -> None:
        self.replies = list(replies)
        self.exchanges: list[Exchange] = []
        self.connections = 0
        self.tls = tls
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/v1/chat"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(v) for k, v in parse_headers(head) if k == "content-length"), 0)
                body = await reader.readexactly(length)
                exchange = Exchange(head, body, writer, connection)
                self.exchanges.append(exchange)
                reply = self.replies[min(len(self.exchanges), len(self.replies)) - 1]
                await reply(exchange)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
        except asyncio.CancelledError:  # the test ended with this handler still waiting
            writer.close()


def answer(data: bytes, *, close: bool = False) -> Reply:
    async def reply(exchange: Exchange) -> None:
        await exchange.send(data, close=close)

    return reply


async def post(client: HttpClient, url: str, body: bytes = b'{"q":1}', **headers: str) -> tuple[int, bytes]:
    resp = await client.post(url, body, headers, timeout_s=5, connect_timeout_s=2)
    return resp.status, resp.body


@pytest.fixture
async def client() -> object:
    http = HttpClient()
    yield http
    await http.aclose()


# --- requests on the wire -------------------------------------------------------------------------


def test_request_bytes_carry_host_length_and_the_callers_headers() -> None:
    target = target_of("http://api.example.com:8080/v1/chat?x=1")
    wire = encode_request(target, {"Authorization": "Bearer k"}, b"{}")
    head, _, body = wire.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"POST /v1/chat?x=1 HTTP/1.1"
    assert b"Host: api.example.com:8080" in head
    assert b"Authorization: Bearer k" in head
    assert b"Content-Length: 2" in head
    assert body == b"{}"


def test_a_host_the_caller_signed_is_not_sent_twice() -> None:
    wire = encode_request(target_of("https://bedrock.example.com/model/x"), {"host": "signed.example"}, b"")
    assert wire.lower().count(b"host:") == 1
    assert b"host: signed.example" in wire


def test_default_ports_are_left_out_of_host_and_ipv6_is_bracketed() -> None:
    assert target_of("https://api.example.com/v1").host_header == b"api.example.com"
    assert target_of("http://[::1]:9000/v1").host_header == b"[::1]:9000"
    assert target_of("http://[::1]:9000/v1").host == "::1"


def test_header_values_with_line_breaks_are_refused() -> None:
    with pytest.raises(ValueError, match="line break"):
        encode_request(target_of("http://h/x"), {"X-Evil": "a\r\nInjected: 1"}, b"")


def test_header_values_outside_latin1_are_refused_without_echoing_them() -> None:
    with pytest.raises(ValueError, match="outside Latin-1") as info:
        encode_request(target_of("http://h/x"), {"Authorization": "Bearer s\u00e9cr\u20acte"}, b"")
    assert str(info.value) == "header 'Authorization' has characters outside Latin-1"


async def test_header_injection_surfaces_as_a_provider_error(client: HttpClient) -> None:
    with pytest.raises(ProviderError, match="line break") as info:
        await client.post("http://127.0.0.1:9/x", b"", {"X": "a\nb"}, timeout_s=1, connect_timeout_s=1)
    assert info.value.kind == "upstream_error"


async def test_non_http_urls_are_refused(client: HttpClient) -> None:
    with pytest.raises(ProviderError, match="http or https"):
        await client.post("ftp://127.0.0.1/x", b"", {}, timeout_s=1, connect_timeout_s=1)


# --- responses ------------------------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(client: HttpClient) -> None:
    async with ScriptedServer(answer(response(b'{"ok":true}'))) as server:
        for _ in range(5):
            assert await post(client, server.url) == (200, b'{"ok":true}')
        assert server.connections == 1
        assert [e.body for e in server.exchanges] == [b'{"q":1}'] * 5
        assert client.open_responses() == 0


async def test_concurrent_requests_each_get_a_connection_then_share_the_pool(client: HttpClient) -> None:
    async def slow(exchange: Exchange) -> None:
        await asyncio.sleep(0.05)
        await exchange.send(response(exchange.body))

    async with ScriptedServer(slow) as server:
        bodies = [f'{{"n":{i}}}'.encode() for i in range(8)]
        results = await asyncio.gather(*(post(client, server.url, b) for b in bodies))
        assert [body for _, body in results] == bodies  # each answer went to its own request
        assert server.connections == 8
        await asyncio.gather(*(post(client, server.url, b) for b in bodies))
        assert server.connections == 8  # the second round reused them


async def test_chunked_body(client: HttpClient) -> None:
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    async with ScriptedServer(answer(chunked)) as server:
        assert await post(client, server.url) == (200, b"hello world")
        assert await post(client, server.url) == (200, b"hello world")
        assert server.connections == 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_compressed_bodies_are_decoded(client: HttpClient, encoding: str) -> None:
    payload = b'{"text":"' + b"abc" * 1000 + b'"}'
    packed = gzip.compress(payload) if encoding == "gzip" else zlib.compress(payload)
    async with ScriptedServer(
        answer(response(packed, headers=f"Content-Encoding: {encoding}\r\n"))
    ) as server:
        assert await post(client, server.url) == (200, payload)
        assert ("accept-encoding", "gzip, deflate") in server.exchanges[0].headers


async def test_unknown_content_encoding_is_a_bad_upstream_response(client: HttpClient) -> None:
    async with ScriptedServer(answer(response(b"xx", headers="Content-Encoding: br\r\n"))) as server:
        with pytest.raises(ProviderError, match="content-encoding") as info:
            await post(client, server.url)
        assert info.value.kind == "bad_upstream_response"


async def test_body_delimited_by_the_end_of_the_connection(client: HttpClient) -> None:
    raw = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"
    async with ScriptedServer(answer(raw, close=True)) as server:
        assert await post(client, server.url) == (200, b"until the end")
        assert await post(client, server.url) == (200, b"until the end")
        assert server.connections == 2  # Connection: close is honoured


async def test_repeated_headers_are_joined(client: HttpClient) -> None:
    raw = b"HTTP/1.1 200 OK\r\nX-A: 1\r\nX-A: 2\r\nContent-Length: 0\r\n\r\n"
    async with ScriptedServer(answer(raw)) as server:
        resp = await client.post(server.url, b"", {}, timeout_s=5, connect_timeout_s=2)
        assert resp.headers["x-a"] == "1, 2"


async def test_interim_100_continue_is_skipped(client: HttpClient) -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\n" + response(b"done")
    async with ScriptedServer(answer(raw)) as server:
        assert await post(client, server.url) == (200, b"done")
        assert await post(client, server.url) == (200, b"done")


async def test_error_status_becomes_a_classified_provider_error(client: HttpClient) -> None:
    body = b'{"error":{"message":"slow down"}}'
    async with ScriptedServer(
        answer(response(body, status="429 Too Many", headers="Retry-After: 3\r\n"))
    ) as s:
        with pytest.raises(ProviderError, match="slow down") as info:
            await post(client, s.url)
        assert info.value.status == 429
        assert info.value.retry_after == 3.0
        assert info.value.retryable


# --- connections that go wrong --------------------------------------------------------------------


async def test_a_connection_the_server_closed_while_idle_is_not_reused(client: HttpClient) -> None:
    async with ScriptedServer(answer(response(b"one"))) as server:
        assert await post(client, server.url) == (200, b"one")
        server.exchanges[0].writer.close()
        await asyncio.sleep(0.05)  # the client's loop sees the close
        assert await post(client, server.url) == (200, b"one")
        assert server.connections == 2
        assert len(server.exchanges) == 2


async def hang_up(exchange: Exchange) -> None:
    exchange.writer.transport.abort()  # no answer at all


async def test_a_reused_connection_closed_without_an_answer_is_retried_once_on_a_new_one(
    client: HttpClient,
) -> None:
    # The race every keep-alive client meets: the server times the idle connection out just as a
    # request goes out on it. Nothing came back, so the request is sent again on a fresh connection.
    async with ScriptedServer(answer(response(b"one")), hang_up, answer(response(b"two"))) as server:
        assert await post(client, server.url) == (200, b"one")
        assert await post(client, server.url) == (200, b"two")
        assert server.connections == 2
        assert [e.connection for e in server.exchanges] == [1, 1, 2]


async def test_a_fresh_connection_closed_without_an_answer_is_not_retried(client: HttpClient) -> None:
    async with ScriptedServer(hang_up, answer(response(b"never"))) as server:
        with pytest.raises(ProviderError, match="closed the connection") as info:
            await post(client, server.url)
        assert info.value.kind == "connection_lost"
        assert len(server.exchanges) == 1


async def test_server_closing_mid_body_is_connection_lost(client: HttpClient) -> None:
    truncated = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"
    async with ScriptedServer(answer(truncated, close=True)) as server:
        with pytest.raises(ProviderError, match="closed the connection") as info:
            await post(client, server.url)
        assert info.value.kind == "connection_lost"
        assert info.value.retryable
        assert len(server.exchanges) == 1  # a fresh connection is not retried: it may have run
        assert client.open_responses() == 0


async def test_garbage_is_a_bad_upstream_response(client: HttpClient) -> None:
    async with ScriptedServer(answer(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")) as server:
        with pytest.raises(ProviderError, match="malformed HTTP") as info:
            await post(client, server.url)
        assert info.value.kind == "bad_upstream_response"


async def test_refused_connection_names_only_host_and_port(client: HttpClient) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ProviderError) as info:
        await client.post(
            f"http://127.0.0.1:{port}/v1", b"secret-body", {"Authorization": "Bearer sk-secret"},
            timeout_s=2, connect_timeout_s=1,
        )  # fmt: skip
    assert info.value.kind == "connect_error"
    assert str(info.value) == f"cannot connect to upstream 127.0.0.1:{port}"


async def test_total_timeout_on_a_whole_answer(client: HttpClient) -> None:
    async def never(exchange: Exchange) -> None:
        await asyncio.sleep(10)

    async with ScriptedServer(never) as server:
        with pytest.raises(ProviderError, match="timed out") as info:
            await client.post(server.url, b"", {}, timeout_s=0.2, connect_timeout_s=1)
        assert info.value.kind == "timeout"
        assert info.value.status == 504
        assert client.open_responses() == 0


async def test_read_timeout_bounds_each_wait_of_a_stream(client: HttpClient) -> None:
    async def stalls(exchange: Exchange) -> None:
        await exchange.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):  # three events 0.1 s apart: slower in all than the read timeout
            await exchange.send(b"c\r\ndata: tick\n\n\r\n")
            await asyncio.sleep(0.1)
        await asyncio.sleep(10)

    async with ScriptedServer(stalls) as server:
        resp = await client.open_stream(server.url, b"", {}, connect_timeout_s=1, read_timeout_s=0.25)
        events = []
        with pytest.raises(ProviderError, match="timed out") as info:
            async for event in iter_sse(resp):
                events.append(event)
        assert events == [("", b"tick")] * 3  # each wait was under the limit, the fourth was not
        assert info.value.kind == "timeout"
        assert client.open_responses() == 0


async def test_cancelling_a_request_closes_its_connection(client: HttpClient) -> None:
    started = asyncio.Event()

    async def slow(exchange: Exchange) -> None:
        started.set()
        await asyncio.sleep(10)

    async with ScriptedServer(slow, answer(response(b"fresh"))) as server:
        task = asyncio.create_task(post(client, server.url))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.open_responses() == 0
        assert await post(client, server.url) == (200, b"fresh")
        assert server.connections == 2  # the cancelled one was not reused


async def test_tls_failure_is_a_connect_error(client: HttpClient, tmp_path: Path) -> None:
    async with ScriptedServer(answer(response(b"x")), tls=self_signed(tmp_path)) as server:
        with pytest.raises(ProviderError, match=r"TLS with upstream 127\.0\.0\.1") as info:
            await post(client, server.url)
        assert info.value.kind == "connect_error"


async def test_tls_round_trips_and_keeps_the_connection(tmp_path: Path) -> None:
    server_tls, cert_file = self_signed(tmp_path), tmp_path / "cert.pem"
    trusting = ssl.create_default_context(cafile=str(cert_file))
    client = HttpClient(tls=trusting)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    try:
        async with ScriptedServer(answer(response(b"secure")), answer(chunked), tls=server_tls) as server:
            assert await post(client, server.url) == (200, b"secure")
            assert await post(client, server.url) == (200, b"abc")
            assert server.connections == 1
    finally:
        await client.aclose()


# --- streams --------------------------------------------------------------------------------------


async def test_sse_lines_split_across_packets(client: HttpClient) -> None:
    async def trickle(exchange: Exchange) -> None:
        await exchange.send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        payload = b'data: {"a":1}\n\nevent: done\ndata: {"b"\ndata: :2}\n\n: comment\n\ndata: [DONE]\n\n'
        for i in range(0, len(payload), 3):  # three bytes per chunk: every line is cut somewhere
            piece = payload[i : i + 3]
            await exchange.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await asyncio.sleep(0)
        await exchange.send(b"0\r\n\r\n")

    async with ScriptedServer(trickle) as server:
        resp = await client.open_stream(server.url, b"", {}, connect_timeout_s=1, read_timeout_s=2)
        events = [e async for e in iter_sse(resp)]
        assert events == [("", b'{"a":1}'), ("done", b'{"b"\n:2}'), ("", b"[DONE]")]
        assert client.open_responses() == 0
        resp = await client.open_stream(server.url, b"", {}, connect_timeout_s=1, read_timeout_s=2)
        assert len([e async for e in iter_sse(resp)]) == 3
        assert server.connections == 1  # a stream read to its end returns the connection


async def test_large_stream_with_a_slow_reader_arrives_whole(client: HttpClient) -> None:
    blob = bytes(range(256)) * (4 * HIGH_WATER // 256)  # four times the pause threshold

    async def big(exchange: Exchange) -> None:
        await exchange.send(response(blob))

    async with ScriptedServer(big) as server:
        resp = await client.open_stream(server.url, b"", {}, connect_timeout_s=1, read_timeout_s=2)
        received = bytearray()
        async for chunk in resp.iter_chunks():
            received += chunk
            await asyncio.sleep(0.001)
        assert bytes(received) == blob


async def test_a_large_whole_answer_leaves_its_connection_reading(client: HttpClient) -> None:
    blob = b"x" * (3 * HIGH_WATER)  # past the back-pressure mark: `read` must not pause and wait

    async def big(exchange: Exchange) -> None:
        await exchange.send(response(blob if len(exchange.body) > 1 else b"small"))

    async with ScriptedServer(big) as server:
        assert await post(client, server.url, b"big") == (200, blob)
        assert await post(client, server.url, b"x") == (200, b"small")  # same connection, not stuck
        assert server.connections == 1


async def test_abandoned_stream_closes_its_connection(client: HttpClient) -> None:
    async def endless(exchange: Exchange) -> None:
        await exchange.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        while True:
            await exchange.send(b"6\r\ndata:\n\r\n")
            await asyncio.sleep(0.01)

    async with ScriptedServer(endless, answer(response(b"next"))) as server:
        resp = await client.open_stream(server.url, b"", {}, connect_timeout_s=1, read_timeout_s=2)
        assert client.open_responses() == 1
        resp.release()
        assert client.open_responses() == 0
        assert await post(client, server.url) == (200, b"next")
        assert server.connections == 2


async def test_stream_error_status_reads_the_message(client: HttpClient) -> None:
    body = b'{"error":{"message":"no such model"}}'
    async with ScriptedServer(answer(response(body, status="404 Not Found"))) as server:
        with pytest.raises(ProviderError, match="no such model") as info:
            await client.open_stream(server.url, b"", {}, connect_timeout_s=1, read_timeout_s=1)
        assert info.value.kind == "upstream_not_found"
        assert client.open_responses() == 0


# --- helpers --------------------------------------------------------------------------------------


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate (no CA the client trusts)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    address = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(address, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context
