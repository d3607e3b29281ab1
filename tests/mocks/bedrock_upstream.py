"""A loopback AWS Bedrock runtime: Converse, ConverseStream and InvokeModel, with real SigV4 checks.

The signature is recomputed here from the request as received (raw path, signed headers, body bytes)
with an implementation independent of botocore, so a client that signs other bytes than it sends,
or encodes the model id differently from the AWS SDKs, gets AWS's 403. Streams are encoded as real
AWS event-stream frames (prelude, headers, payload and both CRC32s).

Use: `up = BedrockUpstream(); await up.start(); up.queue(...)`; `up.url` is the base_url for a
deployment; `up.requests` records what arrived; with nothing queued it answers with defaults, so
gateway end-to-end tests can use it as is.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

import orjson
from aiohttp import web

from mocks.server import LoopbackServer

ACCESS_KEY = "AKIDPLINTHTEST000001"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYPLINTHTEST"
REGION = "us-east-1"
SERVICE = "bedrock"
EVENTSTREAM = "application/vnd.amazon.eventstream"
MAX_CLOCK_SKEW = dt.timedelta(minutes=15)


# --- Event-stream encoding ------------------------------------------------------------------


def _encode_header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    # name length (1 byte), name, type 7 (string), value length (2 bytes), value
    return (
        struct.pack(">B", len(raw_name)) + raw_name + b"\x07" + struct.pack(">H", len(raw_value)) + raw_value
    )


def encode_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude (total, headers length, CRC), headers, payload, CRC."""
    header_bytes = b"".join(_encode_header(k, v) for k, v in headers.items())
    total = 12 + len(header_bytes) + len(payload) + 4
    prelude = struct.pack(">II", total, len(header_bytes))
    prelude += struct.pack(">I", zlib.crc32(prelude) & 0xFFFFFFFF)
    message = prelude + header_bytes + payload
    return message + struct.pack(">I", zlib.crc32(message) & 0xFFFFFFFF)


def event(event_type: str, payload: dict[str, Any]) -> bytes:
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    # AWS pads events with a "p" field so lengths do not leak content; clients must ignore it.
    return encode_frame(headers, orjson.dumps({**payload, "p": "abcdefgh"}))


def exception(exception_type: str, message: str, **extra: Any) -> bytes:
    headers = {
        ":exception-type": exception_type,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return encode_frame(headers, orjson.dumps({"message": message, **extra}))


def usage(input_tokens: int = 10, output_tokens: int = 5, **cache: int) -> dict[str, int]:
    total = input_tokens + output_tokens + sum(cache.values())
    return {"inputTokens": input_tokens, "outputTokens": output_tokens, "totalTokens": total, **cache}


def text_stream(
    chunks: list[str], stop_reason: str = "end_turn", token_usage: dict[str, int] | None = None
) -> list[bytes]:
    """The frames of a plain text answer."""
    frames = [event("messageStart", {"role": "assistant"})]
    frames += [event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": c}}) for c in chunks]
    frames += [
        event("contentBlockStop", {"contentBlockIndex": 0}),
        event("messageStop", {"stopReason": stop_reason}),
        event("metadata", {"usage": token_usage or usage(), "metrics": {"latencyMs": 42}}),
    ]
    return frames


def converse_answer(
    content: list[dict[str, Any]], stop_reason: str = "end_turn", token_usage: dict[str, int] | None = None
) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": stop_reason,
        "usage": token_usage or usage(),
        "metrics": {"latencyMs": 42},
    }


# --- Scripted responses ---------------------------------------------------------------------


@dataclass
class JsonResponse:
    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class StreamResponse:
    frames: list[bytes]
    chunk_size: int | None = None  # split the bytes at arbitrary points, not frame boundaries
    delay_s: float = 0.0
    corrupt_crc: bool = False  # flip a bit in the last frame's message CRC


def error(status: int, error_type: str, message: str, retry_after: str | None = None) -> JsonResponse:
    """An AWS JSON error: {"message"} body and the x-amzn-ErrorType header."""
    headers = {"x-amzn-ErrorType": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
    if retry_after is not None:
        headers["retry-after"] = retry_after
    return JsonResponse({"message": message}, status=status, headers=headers)


@dataclass
class RecordedRequest:
    method: str
    raw_path: str
    model: str  # decoded model id
    operation: str  # converse | converse-stream | invoke
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


# --- SigV4 verification (independent of botocore) ------------------------------------------


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _canonical_uri(raw_path: str) -> str:
    """Non-S3 services encode each segment of the path *as received* once more.

    So "%3A" on the wire signs as "%253A", and a raw ":" as "%3A": a client that signs the encoded
    form but lets its HTTP library send ":" is refused, as by AWS (see higress-group/higress#2396
    and aws-amplify/amplify-flutter#5541 for AWS's canonical strings in that case).
    """
    return "/".join(quote(segment, safe="-_.~") for segment in raw_path.split("/"))


def expected_signature(
    request: web.Request, body: bytes, signed_headers: list[str], amz_date: str, secret: str, region: str
) -> tuple[str, str, str]:
    """(signature, canonical request, string to sign) as AWS computes them for this request."""
    canonical_headers = "".join(
        f"{name}:{','.join(' '.join(v.split()) for v in request.headers.getall(name, []))}\n"
        for name in signed_headers
    )
    canonical_request = "\n".join(
        [
            request.method,
            _canonical_uri(request.raw_path.split("?", 1)[0]),
            "",  # no query string on Bedrock runtime calls
            canonical_headers,
            ";".join(signed_headers),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{amz_date[:8]}/{region}/{SERVICE}/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret}".encode(), amz_date[:8]), region), SERVICE), "aws4_request")
    return (
        hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest(),
        canonical_request,
        string_to_sign,
    )


class SignatureRejected(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


# --- The server -----------------------------------------------------------------------------


class BedrockUpstream(LoopbackServer):
    def __init__(
        self,
        *,
        access_key: str = ACCESS_KEY,
        secret_key: str = SECRET_KEY,
        session_token: str | None = None,
        region: str = REGION,
        api_key: str | None = None,
    ) -> None:
        super().__init__()
        self.access_key = access_key
        self.secret_key = secret_key
        self.session_token = session_token
        self.region = region
        self.api_key = api_key  # accept "Authorization: Bearer <api_key>" (Bedrock API keys) too
        self.requests: list[RecordedRequest] = []
        self.rejected: list[str] = []  # why each refused signature was refused
        self._queue: list[JsonResponse | StreamResponse] = []
        self.default_text = "Hello from Bedrock"

    def queue(self, *responses: JsonResponse | StreamResponse) -> None:
        self._queue.extend(responses)

    def reset(self) -> None:
        self._queue.clear()
        self.requests.clear()
        self.rejected.clear()

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    # -- request handling --

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        parts = request.raw_path.split("?", 1)[0].split("/")
        if request.method != "POST" or len(parts) != 4 or parts[1] != "model":
            return web.json_response({"message": "Unknown operation"}, status=404)
        operation = parts[3]
        if operation not in ("converse", "converse-stream", "invoke"):
            return web.json_response({"message": "Unknown operation"}, status=404)
        try:
            self._authenticate(request, body)
        except SignatureRejected as exc:
            self.rejected.append(exc.message)
            return web.json_response(
                {"message": exc.message}, status=403, headers={"x-amzn-ErrorType": exc.error_type}
            )
        recorded = RecordedRequest(
            request.method, request.raw_path, unquote(parts[2]), operation, dict(request.headers), body
        )
        self.requests.append(recorded)
        scripted = self._queue.pop(0) if self._queue else self._default(recorded)
        if isinstance(scripted, StreamResponse):
            return await self._stream(request, scripted)
        return web.Response(
            body=orjson.dumps(scripted.body),
            status=scripted.status,
            content_type="application/json",
            headers={"x-amzn-RequestId": "11111111-2222-3333-4444-555555555555", **scripted.headers},
        )

    def _authenticate(self, request: web.Request, body: bytes) -> None:
        auth = request.headers.get("Authorization", "")
        if self.api_key is not None and auth == f"Bearer {self.api_key}":
            return
        if not auth:
            raise SignatureRejected("MissingAuthenticationTokenException", "Missing Authentication Token")
        algorithm, _, rest = auth.partition(" ")
        fields = dict(p.strip().partition("=")[::2] for p in rest.split(","))
        if algorithm != "AWS4-HMAC-SHA256" or set(fields) != {"Credential", "SignedHeaders", "Signature"}:
            raise SignatureRejected("IncompleteSignatureException", "Authorization header is malformed")
        key_id, date, region, service, terminator = (fields["Credential"].split("/") + [""] * 5)[:5]
        if key_id != self.access_key:
            raise SignatureRejected(
                "UnrecognizedClientException", "The security token included in the request is invalid."
            )
        amz_date = request.headers.get("X-Amz-Date", "")
        signed = fields["SignedHeaders"].split(";")
        self._check_scope(amz_date, date, region, service, terminator, signed)
        if (
            self.session_token is not None
            and request.headers.get("X-Amz-Security-Token") != self.session_token
        ):
            raise SignatureRejected(
                "UnrecognizedClientException", "The security token included in the request is invalid."
            )
        want, canonical, string_to_sign = expected_signature(
            request, body, signed, amz_date, self.secret_key, self.region
        )
        if not hmac.compare_digest(want, fields["Signature"]):
            # Like AWS, the message carries the canonical request, signed header values included
            # (so a session token): clients must not pass it on verbatim.
            raise SignatureRejected(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided. "
                "Check your AWS Secret Access Key and signing method. Consult the service documentation "
                f"for details.\n\nThe Canonical String for this request should have been\n'{canonical}'\n\n"
                f"The String-to-Sign should have been\n'{string_to_sign}'\n",
            )

    def _check_scope(
        self, amz_date: str, date: str, region: str, service: str, terminator: str, signed: list[str]
    ) -> None:
        try:
            when = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        except ValueError:
            raise SignatureRejected(
                "IncompleteSignatureException", "X-Amz-Date is missing or malformed"
            ) from None
        if abs(dt.datetime.now(dt.UTC) - when) > MAX_CLOCK_SKEW:
            raise SignatureRejected("InvalidSignatureException", "Signature expired")
        if (
            date != amz_date[:8]
            or region != self.region
            or service != SERVICE
            or terminator != "aws4_request"
        ):
            raise SignatureRejected("InvalidSignatureException", "Credential should be scoped correctly")
        required = {"host", "x-amz-date"} | ({"x-amz-security-token"} if self.session_token else set())
        if signed != sorted(signed) or not required <= set(signed):
            raise SignatureRejected(
                "InvalidSignatureException", "SignedHeaders must include host and x-amz-date"
            )

    async def _stream(self, request: web.Request, scripted: StreamResponse) -> web.StreamResponse:
        response = web.StreamResponse(
            status=200, headers={"Content-Type": EVENTSTREAM, "x-amzn-RequestId": "stream-request"}
        )
        await response.prepare(request)
        frames = list(scripted.frames)
        if scripted.corrupt_crc and frames:
            last = bytearray(frames[-1])
            last[-1] ^= 0x01
            frames[-1] = bytes(last)
        data = b"".join(frames)
        step = scripted.chunk_size or 0
        pieces = [data[i : i + step] for i in range(0, len(data), step)] if step else frames
        try:
            for piece in pieces:
                await response.write(piece)
                if scripted.delay_s:
                    await asyncio.sleep(scripted.delay_s)
            await response.write_eof()
        except ConnectionError:  # the client went away mid-stream (aiohttp's reset error is one)
            pass
        return response

    def _default(self, recorded: RecordedRequest) -> JsonResponse | StreamResponse:
        """Plausible answers when nothing is queued (for end-to-end tests)."""
        if recorded.operation == "converse":
            return JsonResponse(converse_answer([{"text": self.default_text}]))
        if recorded.operation == "converse-stream":
            words = self.default_text.split(" ")
            return StreamResponse(text_stream([w if i == 0 else " " + w for i, w in enumerate(words)]))
        payload = recorded.json
        if recorded.model.startswith("cohere.embed"):
            texts = payload.get("texts", [])
            return JsonResponse(
                {"id": "e1", "embeddings": [fake_vector(t) for t in texts], "texts": texts},
                headers={"X-Amzn-Bedrock-Input-Token-Count": str(sum(len(t.split()) for t in texts))},
            )
        text = payload.get("inputText", "")
        dims = payload.get("dimensions", 8)
        return JsonResponse({"embedding": fake_vector(text, dims), "inputTextTokenCount": len(text.split())})


def fake_vector(text: str, dims: int = 8) -> list[float]:
    """A deterministic vector per text, so tests can tell which input produced which output."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(digest[i % len(digest)] / 255, 4) for i in range(dims)]
