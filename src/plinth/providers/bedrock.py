"""AWS Bedrock: Converse / ConverseStream for chat, InvokeModel for Titan and Cohere embeddings.

Requests are signed with SigV4 by botocore's own signer (no boto3 client: its per-call machinery costs
milliseconds, and we already own the HTTP client). Streams are AWS event-stream binary frames, decoded
by botocore's `EventStreamBuffer`, which checks both CRC32s of every frame.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import quote

import orjson
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials, RefreshableCredentials
from botocore.eventstream import EventStreamBuffer, ParserError
from yarl import URL

from plinth.providers.base import (
    ChatStream,
    Provider,
    ProviderError,
    UnsupportedOperation,
    classify_status,
)
from plinth.providers.http import UpstreamResponse, transport_error
from plinth.providers.tokens import estimate_prompt_tokens, estimate_text_tokens
from plinth.providers.types import (
    ChatChoice,
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    FinishEvent,
    FinishReason,
    ImagePart,
    Message,
    StreamEvent,
    TextDelta,
    TextPart,
    ThinkingDelta,
    ThinkingPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageEvent,
)

if TYPE_CHECKING:
    from plinth.config.schema import DeploymentConfig
    from plinth.providers.http import HttpClient, UpstreamStream

JSON = dict[str, Any]

# botocore logs the canonical request at DEBUG, and it contains the X-Amz-Security-Token header:
# drop those records so a debug log level never writes a session token.
logging.getLogger("botocore.auth").addFilter(lambda record: record.levelno > logging.DEBUG)

SERVICE = "bedrock"
EVENTSTREAM_TYPE = "application/vnd.amazon.eventstream"
# Name of the tool that emulates response_format (Bedrock has no JSON mode).
JSON_TOOL = "json_response"
# Signatures other vendors issued (Gemini's thought signatures are carried as "gemini:<signature>").
FOREIGN_SIGNATURE_PREFIXES = ("gemini:",)
IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
# ConverseStream exception events → the HTTP status AWS uses for the same error on a plain call.
STREAM_EXCEPTION_STATUS = {
    "throttlingException": 429,
    "serviceUnavailableException": 503,
    "internalServerException": 500,
    "modelStreamErrorException": 500,
    "modelTimeoutException": 408,
    "validationException": 400,
    "accessDeniedException": 403,
    "resourceNotFoundException": 404,
}
COHERE_BATCH = 96  # Cohere embed accepts at most 96 texts per call
TITAN_CONCURRENCY = 8  # Titan embeds one text per call; bound the fan-out


# --- Signing ----------------------------------------------------------------------------------


class _Signer:
    """Produces the auth headers for one request.

    SigV4 with credentials from the deployment, else botocore's default chain (environment, profile,
    SSO, container and instance roles), resolved once. Refreshable credentials (roles, SSO,
    credential_process) are refreshed in a worker thread when botocore says they are due, so the
    blocking refresh never stalls the event loop. A deployment `api_key` (a Bedrock API key) is sent
    as a bearer token instead of signing.

    Signing cost (AWSRequest + SigV4Auth.add_auth, measured here with timeit, 1 KB body): 115 µs
    per request when botocore derives the Host header from the URL, 66 µs when we pass it (done
    below; 100 KB bodies add about 60 µs of SHA-256). Most of the rest is botocore's header
    bookkeeping; the four HMACs of the signing key are about 15 µs. Small beside Bedrock's own
    latency, so we keep botocore's audited signer rather than a faster one of our own.
    """

    def __init__(self, deployment: DeploymentConfig, region: str) -> None:
        self.region = region
        self._bearer = deployment.api_key.get_secret_value() if deployment.api_key else None
        self._static: Any = None
        self._resolved: Any = None
        self._lock = asyncio.Lock()
        key_id, secret = deployment.aws_access_key_id, deployment.aws_secret_access_key
        if (key_id is None) != (secret is None):
            raise ValueError(
                "Bedrock deployment needs both aws_access_key_id and aws_secret_access_key, or neither"
            )
        if key_id is not None and secret is not None:
            token = deployment.aws_session_token
            self._static = Credentials(
                key_id.get_secret_value(),
                secret.get_secret_value(),
                token.get_secret_value() if token else None,
            ).get_frozen_credentials()

    def scrub(self, error: ProviderError) -> ProviderError:
        """AWS signature errors quote the canonical request, session token included: cut it off."""
        message = error.message.split("\n\nThe Canonical String", 1)[0]
        for secret in (self._bearer, getattr(self._static, "token", None)):
            if secret:
                message = message.replace(secret, "***")
        if message == error.message:
            return error
        return ProviderError(
            message,
            status=error.status,
            retryable=error.retryable,
            retry_after=error.retry_after,
            kind=error.kind,
            param=error.param,
        )

    async def headers(self, url: str, body: bytes, headers: dict[str, str]) -> dict[str, str]:
        if self._bearer is not None and self._static is None:
            return {**headers, "Authorization": f"Bearer {self._bearer}"}
        creds = await self._credentials()
        request = AWSRequest(method="POST", url=url, data=body, headers=headers)
        SigV4Auth(creds, SERVICE, self.region).add_auth(request)
        return {str(k): str(v) for k, v in request.headers.items()}

    async def _credentials(self) -> Any:
        if self._static is not None:
            return self._static
        if self._resolved is None:
            async with self._lock:
                if self._resolved is None:
                    # Resolving the chain may read files or call the instance metadata service.
                    self._resolved = await asyncio.to_thread(_default_credentials)
        creds = self._resolved
        if isinstance(creds, RefreshableCredentials) and creds.refresh_needed():
            async with self._lock:
                return await asyncio.to_thread(creds.get_frozen_credentials)
        return creds.get_frozen_credentials()


def _default_credentials() -> Any:
    import botocore.session

    creds = botocore.session.get_session().get_credentials()
    if creds is None:
        raise ProviderError(
            "no AWS credentials: set aws_access_key_id/aws_secret_access_key on the deployment "
            "or configure the AWS default credential chain",
            kind="upstream_auth",
        )
    return creds


# --- Request translation ----------------------------------------------------------------------


def build_converse_body(request: ChatRequest, upstream_model: str) -> tuple[JSON, str | None]:
    """The Converse request body, and the name of the response_format tool if one is emulated."""
    system, messages = _translate_messages(request.messages)
    body: JSON = {"messages": messages}
    if system:
        body["system"] = system
    inference = _inference_config(request)
    if inference:
        body["inferenceConfig"] = inference
    tool_config, json_tool = _tool_config(request, messages)
    if tool_config is not None:
        body["toolConfig"] = tool_config
    extra = _additional_fields(request, upstream_model)
    if extra:
        body["additionalModelRequestFields"] = extra
    return body, json_tool


def _translate_messages(messages: Iterable[Message]) -> tuple[list[JSON], list[JSON]]:
    """System text goes top-level; consecutive same-role turns merge (Bedrock wants alternation)."""
    system: list[JSON] = []
    turns: list[JSON] = []
    for message in messages:
        if message.role == "system":
            system.extend(_text_blocks(message))
            continue
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _message_blocks(message)
        if not blocks:
            continue  # Bedrock rejects empty content
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    return system, turns


def _text_blocks(message: Message) -> list[JSON]:
    blocks: list[JSON] = []
    for part in message.content:
        if isinstance(part, TextPart) and part.text:
            blocks.append({"text": part.text})
            if part.cache_control is not None:
                blocks.append({"cachePoint": {"type": "default"}})
    return blocks


def _message_blocks(message: Message) -> list[JSON]:
    if message.role == "tool":
        return [_tool_result(message)]
    blocks: list[JSON] = []
    for part in message.content:
        if isinstance(part, TextPart):
            if part.text:  # Bedrock rejects blank text blocks
                blocks.append({"text": part.text})
                if part.cache_control is not None:
                    blocks.append({"cachePoint": {"type": "default"}})
        elif isinstance(part, ImagePart):
            blocks.append(_image_block(part))
        elif isinstance(part, ThinkingPart) and _replayable(part):
            blocks.append(_reasoning_block(part))
    blocks.extend(_tool_use_block(call) for call in message.tool_calls)
    return blocks


def _image_block(part: ImagePart) -> JSON:
    if part.data is None:
        raise ProviderError(
            "Bedrock needs inline images (base64 data: URLs); image URLs are not supported",
            status=400,
            kind="invalid_request",
        )
    media_type = (part.media_type or "").lower()
    fmt = IMAGE_FORMATS.get(media_type)
    if fmt is None:
        raise ProviderError(
            f"Bedrock accepts png, jpeg, gif or webp images, not '{media_type}'",
            status=400,
            kind="invalid_request",
        )
    # The JSON wire form of a Bedrock blob is base64: the data goes through as it came.
    return {"image": {"format": fmt, "source": {"bytes": part.data}}}


def _replayable(part: ThinkingPart) -> bool:
    """Only reasoning that Bedrock itself signed (or redacted) goes back.

    Claude on Bedrock refuses reasoning without a valid signature, another vendor's signatures
    (Gemini's travel as `gemini:...`) fail that check, and models with unsigned reasoning
    (DeepSeek-R1) want it left out of the history.
    """
    return bool(part.signature) and not (part.signature or "").startswith(FOREIGN_SIGNATURE_PREFIXES)


def _reasoning_block(part: ThinkingPart) -> JSON:
    if part.redacted:
        # Plinth keeps redacted reasoning's opaque data in `signature` (as the Anthropic codecs do).
        return {"reasoningContent": {"redactedContent": part.signature or part.text}}
    text: JSON = {"text": part.text}
    if part.signature is not None:
        text["signature"] = part.signature
    return {"reasoningContent": {"reasoningText": text}}


def _tool_use_block(call: ToolCall) -> JSON:
    try:
        arguments = orjson.loads(call.arguments) if call.arguments.strip() else {}
    except orjson.JSONDecodeError:
        raise ProviderError(
            f"arguments of tool call '{call.id}' are not valid JSON", status=400, kind="invalid_request"
        ) from None
    return {"toolUse": {"toolUseId": call.id, "name": call.name, "input": arguments}}


def _tool_result(message: Message) -> JSON:
    content: list[JSON] = []
    for part in message.content:
        if isinstance(part, TextPart):
            content.append({"text": part.text})
        elif isinstance(part, ImagePart):
            content.append(_image_block(part))
    result: JSON = {"toolUseId": message.tool_call_id or "", "content": content or [{"text": ""}]}
    # `status` is only accepted by Anthropic models, and success is the default: send it only for errors.
    if message.is_error:
        result["status"] = "error"
    return {"toolResult": result}


def _inference_config(request: ChatRequest) -> JSON:
    config: JSON = {}
    if request.max_tokens is not None:
        config["maxTokens"] = request.max_tokens
    if request.temperature is not None:
        config["temperature"] = request.temperature
    if request.top_p is not None:
        config["topP"] = request.top_p
    if request.stop:
        config["stopSequences"] = list(request.stop)
    return config


def _tool_spec(tool: Tool) -> JSON:
    spec: JSON = {"name": tool.name, "inputSchema": {"json": tool.parameters}}
    if tool.description:
        spec["description"] = tool.description
    return {"toolSpec": spec}


def _json_tool(request: ChatRequest) -> JSON | None:
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.schema if fmt.type == "json_schema" and fmt.schema else {"type": "object"}
    return {
        "toolSpec": {
            "name": JSON_TOOL,
            "description": "Give the final answer as this tool's input, matching its schema exactly.",
            "inputSchema": {"json": schema},
        }
    }


def _history_tool_names(messages: list[JSON]) -> list[str]:
    names: dict[str, None] = {}
    for turn in messages:
        for block in turn["content"]:
            if "toolUse" in block:
                names[block["toolUse"]["name"]] = None
    return list(names)


def _history_uses_tools(messages: list[JSON]) -> bool:
    return any("toolUse" in b or "toolResult" in b for turn in messages for b in turn["content"])


def _tool_config(request: ChatRequest, messages: list[JSON]) -> tuple[JSON | None, str | None]:
    """toolConfig: declared tools, the response_format tool, and a tool choice Bedrock accepts.

    Bedrock knows auto / any / tool but not none; and it refuses toolUse/toolResult blocks in the
    history unless toolConfig is present. So `none` drops the tools when the history has no tool
    blocks, and otherwise keeps them without a choice (the model is not forced, but may call).
    """
    mode = request.tool_choice.mode if request.tool_choice else None
    tools = [] if mode == "none" else [_tool_spec(t) for t in request.tools]
    json_spec = _json_tool(request)
    choice: JSON | None = None
    if json_spec is not None:
        if not tools:
            choice = {"tool": {"name": JSON_TOOL}}
        elif mode == "tool" and request.tool_choice and request.tool_choice.name:
            choice = {"tool": {"name": request.tool_choice.name}}
        else:
            choice = {"any": {}}  # a real tool call, or the answer through the JSON tool
        tools.append(json_spec)
    elif tools:
        choice = _tool_choice(request)
    if not tools and _history_uses_tools(messages):
        declared = request.tools or [Tool(name=n) for n in _history_tool_names(messages)]
        tools = [_tool_spec(t) for t in declared]
        choice = None
    if not tools:
        return None, None
    config: JSON = {"tools": tools}
    if choice is not None:
        config["toolChoice"] = choice
    return config, JSON_TOOL if json_spec is not None else None


def _tool_choice(request: ChatRequest) -> JSON | None:
    choice = request.tool_choice
    if choice is None:
        return None
    if choice.mode == "required":
        return {"any": {}}
    if choice.mode == "tool" and choice.name:
        return {"tool": {"name": choice.name}}
    return {"auto": {}}


def _additional_fields(request: ChatRequest, upstream_model: str) -> JSON:
    fields: JSON = {}
    if request.top_k is not None:
        if "amazon.nova" in upstream_model:
            fields["inferenceConfig"] = {"topK": request.top_k}
        else:  # Anthropic, Mistral, Cohere
            fields["top_k"] = request.top_k
    if request.thinking is not None:
        fields["thinking"] = request.thinking
    return fields


# --- Response translation ---------------------------------------------------------------------


def parse_usage(raw: Any) -> Usage:
    """Bedrock usage → canonical.

    Bedrock's `inputTokens` counts only the uncached input; cache reads and writes are reported
    beside it (totalTokens = inputTokens + cacheRead + cacheWrite + outputTokens). Sources: the AWS
    prompt-caching guide (docs.aws.amazon.com/bedrock/latest/userguide/prompt-caching.html), as
    applied by opencode PR #38427 "normalize Bedrock cache usage". The canonical `input_tokens`
    counts every prompt token, so the cache figures are added back in.
    """
    if not isinstance(raw, dict):
        return Usage()
    read = int(raw.get("cacheReadInputTokens") or 0)
    write = int(raw.get("cacheWriteInputTokens") or 0)
    return Usage(
        input_tokens=int(raw.get("inputTokens") or 0) + read + write,
        output_tokens=int(raw.get("outputTokens") or 0),
        cached_input_tokens=read,
        cache_creation_input_tokens=write,
    )


def _finish(stop_reason: str | None, only_json_tool: bool) -> FinishReason:
    reason = STOP_REASONS.get(stop_reason or "", "stop")
    if reason == "tool_calls" and only_json_tool:
        return "stop"  # the emulated response_format tool is the answer, not a tool call
    return reason


def _stop_sequence(stop_reason: str | None, extra: Any, request: ChatRequest) -> str | None:
    if stop_reason != "stop_sequence":
        return None
    if isinstance(extra, dict) and isinstance(extra.get("stop_sequence"), str):
        return cast(str, extra["stop_sequence"])
    return request.stop[0] if len(request.stop) == 1 else None


def parse_converse_response(
    data: Any, request: ChatRequest, upstream_model: str, json_tool: str | None
) -> ChatResponse:
    if not isinstance(data, dict):
        raise ProviderError("upstream sent an unexpected Converse response", kind="bad_upstream_response")
    message_data = (data.get("output") or {}).get("message") or {}
    message = Message(role="assistant")
    for block in message_data.get("content") or []:
        _add_block(message, block, json_tool)
    stop_reason = data.get("stopReason")
    usage = parse_usage(data["usage"]) if "usage" in data else _estimate(request, message.text())
    choice = ChatChoice(
        index=0,
        message=message,
        finish_reason=_finish(stop_reason, not message.tool_calls),
        stop_sequence=_stop_sequence(stop_reason, data.get("additionalModelResponseFields"), request),
    )
    return ChatResponse(
        id=f"chatcmpl-{uuid.uuid4().hex[:24]}",
        model=upstream_model,
        created=int(time.time()),
        choices=[choice],
        usage=usage,
    )


def _add_block(message: Message, block: Any, json_tool: str | None) -> None:
    if not isinstance(block, dict):
        return
    if "text" in block:
        message.content.append(TextPart(block["text"]))
    elif "toolUse" in block:
        use = block["toolUse"]
        arguments = orjson.dumps(use.get("input", {})).decode()
        if json_tool is not None and use.get("name") == json_tool:
            message.content.append(TextPart(arguments))
        else:
            message.tool_calls.append(
                ToolCall(id=use.get("toolUseId", ""), name=use.get("name", ""), arguments=arguments)
            )
    elif "reasoningContent" in block:
        reasoning = block["reasoningContent"]
        if "redactedContent" in reasoning:
            data = reasoning["redactedContent"]
            message.content.append(ThinkingPart(text="", signature=data, redacted=True))
        else:
            text = reasoning.get("reasoningText") or {}
            message.content.append(ThinkingPart(text=text.get("text", ""), signature=text.get("signature")))


def _estimate(request: ChatRequest, output_text: str) -> Usage:
    return Usage(
        input_tokens=estimate_prompt_tokens(request),
        output_tokens=estimate_text_tokens(output_text),
        estimated=True,
    )


# --- Streaming --------------------------------------------------------------------------------


class _StreamTranslator:
    """Turns ConverseStream events into canonical events; keeps what the final events need."""

    def __init__(self, request: ChatRequest, json_tool: str | None) -> None:
        self.request = request
        self.json_tool = json_tool
        self.tool_index: dict[int, int] = {}  # contentBlockIndex → canonical tool_index
        self.json_blocks: set[int] = set()
        self.stop_reason: str | None = None
        self.extra: Any = None
        self.usage: Usage | None = None
        self.output: list[str] = []  # for an estimate when no metadata event arrives

    def handle(self, event_type: str, data: JSON) -> list[StreamEvent]:
        block = int(data.get("contentBlockIndex") or 0)
        if event_type == "contentBlockStart":
            return self._start(block, data.get("start") or {})
        if event_type == "contentBlockDelta":
            return self._delta(block, data.get("delta") or {})
        if event_type == "messageStop":
            self.stop_reason = data.get("stopReason")
            self.extra = data.get("additionalModelResponseFields")
        elif event_type == "metadata" and "usage" in data:
            self.usage = parse_usage(data["usage"])
        return []

    def _start(self, block: int, start: JSON) -> list[StreamEvent]:
        tool = start.get("toolUse")
        if not isinstance(tool, dict):
            return []
        if self.json_tool is not None and tool.get("name") == self.json_tool:
            self.json_blocks.add(block)
            return []
        index = self.tool_index.setdefault(block, len(self.tool_index))
        return [ToolCallDelta(tool_index=index, id=tool.get("toolUseId"), name=tool.get("name"))]

    def _delta(self, block: int, delta: JSON) -> list[StreamEvent]:
        if "text" in delta:
            return self._text(delta["text"])
        if "toolUse" in delta:
            piece = str((delta["toolUse"] or {}).get("input") or "")
            if block in self.json_blocks:
                return self._text(piece)
            self.output.append(piece)
            index = self.tool_index.setdefault(block, len(self.tool_index))
            return [ToolCallDelta(tool_index=index, arguments=piece)] if piece else []
        reasoning = delta.get("reasoningContent")
        if isinstance(reasoning, dict):
            # redactedContent has no canonical stream form; it is dropped from streams.
            text, signature = reasoning.get("text") or "", reasoning.get("signature")
            if text or signature:
                self.output.append(text)
                return [ThinkingDelta(text=text, signature=signature)]
        return []

    def _text(self, text: str) -> list[StreamEvent]:
        if not text:
            return []
        self.output.append(text)
        return [TextDelta(text)]

    def final_events(self) -> list[StreamEvent]:
        if self.stop_reason is None:
            raise ProviderError(
                "upstream stream ended before messageStop", retryable=True, kind="connection_lost"
            )
        finish = FinishEvent(
            _finish(self.stop_reason, not self.tool_index),
            _stop_sequence(self.stop_reason, self.extra, self.request),
        )
        usage = self.usage or _estimate(self.request, "".join(self.output))
        return [finish, UsageEvent(usage)]


async def iter_event_stream(resp: UpstreamStream) -> AsyncIterator[tuple[str, JSON]]:
    """Yield (event type, payload) per frame; exception frames and transport faults raise."""
    buffer = EventStreamBuffer()
    try:
        async for chunk in resp.iter_chunks():
            buffer.add_data(chunk)
            for frame in buffer:
                yield _decode_frame(frame.headers, frame.payload)
    except ProviderError:
        raise
    except ParserError as exc:  # includes ChecksumMismatch on either CRC
        raise ProviderError(
            f"upstream sent a corrupt event-stream frame ({type(exc).__name__})",
            retryable=True,
            kind="bad_upstream_response",
        ) from None
    except Exception as exc:
        raise transport_error(exc) from None
    finally:
        resp.release()


def _decode_frame(headers: dict[str, Any], payload: bytes) -> tuple[str, JSON]:
    message_type = headers.get(":message-type")
    data = _loads_object(payload)
    if message_type == "event":
        return str(headers.get(":event-type", "")), data
    if message_type == "exception":
        name = str(headers.get(":exception-type", "exception"))
        text = f"upstream stream failed ({name}): {data.get('message') or data.get('Message') or ''}"
        raise classify_status(STREAM_EXCEPTION_STATUS.get(name, 500), text.rstrip(": "))
    code, text = headers.get(":error-code", "error"), headers.get(":error-message", "")
    raise classify_status(500, f"upstream stream failed ({code}): {text}")


def _loads_object(payload: bytes) -> JSON:
    if not payload:
        return {}
    try:
        data = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise ProviderError("upstream sent an invalid event payload", kind="bad_upstream_response") from None
    return data if isinstance(data, dict) else {}


async def _stream_events(
    resp: UpstreamStream, translator: _StreamTranslator
) -> AsyncGenerator[StreamEvent, None]:
    async for event_type, data in iter_event_stream(resp):
        for event in translator.handle(event_type, data):
            yield event
    for event in translator.final_events():
        yield event


class _Events:
    """The stream's iterator. Closing it releases the response even if it was never iterated
    (an async generator that has not started skips its `finally` on aclose)."""

    def __init__(self, resp: UpstreamStream, translator: _StreamTranslator) -> None:
        self._resp = resp
        self._events = _stream_events(resp, translator)

    def __aiter__(self) -> _Events:
        return self

    async def __anext__(self) -> StreamEvent:
        return await anext(self._events)

    async def aclose(self) -> None:
        await self._events.aclose()
        self._resp.release()


# --- Embeddings -------------------------------------------------------------------------------


def _vectors_from_cohere(data: Any) -> list[list[float]]:
    embeddings = data.get("embeddings") if isinstance(data, dict) else None
    if isinstance(embeddings, dict):  # embedding_types requested: {"float": [...]}
        embeddings = embeddings.get("float")
    if not isinstance(embeddings, list):
        raise ProviderError("upstream sent no Cohere embeddings", kind="bad_upstream_response")
    return cast(list[list[float]], embeddings)


def _header_tokens(response: UpstreamResponse) -> int | None:
    value = response.headers.get("x-amzn-bedrock-input-token-count")
    return int(value) if value and value.isdigit() else None


def _host_header(endpoint: str) -> str:
    """The Host header the HTTP client would send; passing it also halves botocore's signing time."""
    url = URL(endpoint)
    host = url.raw_host or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    return host if url.is_default_port() else f"{host}:{url.port}"


# --- Provider ---------------------------------------------------------------------------------


class BedrockProvider(Provider):
    type_name = "bedrock"
    supports_n = False

    def __init__(self, deployment: DeploymentConfig, http: HttpClient, *, name: str) -> None:
        super().__init__(deployment, http, name=name)
        region = deployment.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region:
            raise ValueError(f"deployment '{name}': Bedrock needs a region (set 'region')")
        self.endpoint = (deployment.base_url or f"https://bedrock-runtime.{region}.amazonaws.com").rstrip("/")
        self.host = _host_header(self.endpoint)
        self.signer = _Signer(deployment, region)
        self.extra_headers = {k: v.get_secret_value() for k, v in deployment.headers.items()}

    def _url(self, model: str, operation: str) -> str:
        # The model id is percent-encoded once (":" of versions, "/" of ARNs), as the AWS SDKs do;
        # SigV4 then encodes the path a second time.
        return f"{self.endpoint}/model/{quote(model, safe='')}/{operation}"

    async def _signed(self, url: str, body: bytes, accept: str) -> tuple[URL, dict[str, str]]:
        headers = {
            **self.extra_headers,
            "Host": self.host,
            "Content-Type": "application/json",
            "Accept": accept,
        }
        signed = await self.signer.headers(url, body, headers)
        # Send the path exactly as signed: a plain str would let yarl decode "%3A" back to ":".
        return URL(url, encoded=True), signed

    async def _post(self, model: str, operation: str, payload: JSON) -> UpstreamResponse:
        url = self._url(model, operation)
        body = orjson.dumps(payload)
        target, headers = await self._signed(url, body, "application/json")
        try:
            return await self.http.post(
                target,
                body,
                headers,
                timeout_s=self.deployment.timeout_s,
                connect_timeout_s=self.deployment.connect_timeout_s,
            )
        except ProviderError as exc:
            raise self.signer.scrub(exc) from None

    async def chat(self, request: ChatRequest, upstream_model: str) -> ChatResponse:
        payload, json_tool = build_converse_body(request, upstream_model)
        response = await self._post(upstream_model, "converse", payload)
        return parse_converse_response(response.json(), request, upstream_model, json_tool)

    async def stream_chat(self, request: ChatRequest, upstream_model: str) -> ChatStream:
        payload, json_tool = build_converse_body(request, upstream_model)
        url = self._url(upstream_model, "converse-stream")
        body = orjson.dumps(payload)
        target, headers = await self._signed(url, body, EVENTSTREAM_TYPE)
        try:
            resp = await self.http.open_stream(
                target,
                body,
                headers,
                connect_timeout_s=self.deployment.connect_timeout_s,
                read_timeout_s=self.deployment.read_timeout_s,
            )
        except ProviderError as exc:
            raise self.signer.scrub(exc) from None
        if not resp.headers.get("content-type", "").startswith(EVENTSTREAM_TYPE):
            resp.release()
            raise ProviderError(
                f"upstream answered ConverseStream with '{resp.headers.get('content-type', '')}'",
                retryable=True,
                kind="bad_upstream_response",
            )
        return ChatStream(events=_Events(resp, _StreamTranslator(request, json_tool)), model=upstream_model)

    async def embed(self, request: EmbeddingRequest, upstream_model: str) -> EmbeddingResponse:
        if "amazon.titan-embed" in upstream_model:
            vectors, usage = await self._embed_titan(request, upstream_model)
        elif "cohere.embed" in upstream_model:
            vectors, usage = await self._embed_cohere(request, upstream_model)
        else:
            raise UnsupportedOperation(
                f"deployment '{self.name}': Bedrock embeddings support Amazon Titan and Cohere models, "
                f"not '{upstream_model}'"
            )
        return EmbeddingResponse(model=upstream_model, vectors=vectors, usage=usage)

    async def _embed_titan(self, request: EmbeddingRequest, model: str) -> tuple[list[list[float]], Usage]:
        """Titan embeds one text per call: fan out, bounded."""
        dimensions = request.dimensions or self.deployment.embedding_dimensions
        v1 = "titan-embed-text-v1" in model  # v1 takes neither dimensions nor normalize
        gate = asyncio.Semaphore(TITAN_CONCURRENCY)

        async def one(text: str) -> tuple[list[float], int]:
            payload: JSON = {"inputText": text}
            if not v1:
                payload["normalize"] = True
                if dimensions is not None:
                    payload["dimensions"] = dimensions
            async with gate:
                data = (await self._post(model, "invoke", payload)).json()
            if not isinstance(data, dict) or not isinstance(data.get("embedding"), list):
                raise ProviderError("upstream sent no Titan embedding", kind="bad_upstream_response")
            return data["embedding"], int(data.get("inputTextTokenCount") or 0)

        results = await asyncio.gather(*(one(text) for text in request.inputs))
        return [vector for vector, _ in results], Usage(input_tokens=sum(tokens for _, tokens in results))

    async def _embed_cohere(self, request: EmbeddingRequest, model: str) -> tuple[list[list[float]], Usage]:
        input_type = str(request.extra.get("input_type") or "search_document")
        dimensions = request.dimensions or self.deployment.embedding_dimensions
        if dimensions is not None and "embed-v4" not in model:
            raise ProviderError(
                f"'{model}' has a fixed embedding size; 'dimensions' needs Cohere Embed v4",
                status=400,
                kind="invalid_request",
                param="dimensions",
            )
        vectors: list[list[float]] = []
        usage = Usage()
        for start in range(0, len(request.inputs), COHERE_BATCH):
            texts = request.inputs[start : start + COHERE_BATCH]
            payload: JSON = {"texts": texts, "input_type": input_type}
            if dimensions is not None:
                payload["output_dimension"] = dimensions
            response = await self._post(model, "invoke", payload)
            vectors.extend(_vectors_from_cohere(response.json()))
            # Cohere's body has no token count; Bedrock's response header does.
            counted = _header_tokens(response)
            if counted is None:
                counted = sum(estimate_text_tokens(t) for t in texts)
                usage.estimated = True
            usage.input_tokens += counted
        return vectors, usage
