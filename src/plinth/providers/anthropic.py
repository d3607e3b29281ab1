"""Anthropic Messages API upstream, spoken natively.

Anthropic differs from the canonical model in ways that need real translation, not renaming: the
system prompt is top-level, roles must alternate, tool results live inside user messages, max_tokens
is required, and there is no JSON mode, so `response_format` is emulated with a forced tool whose
input is the answer.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import orjson

from plinth.providers.base import ChatStream, Provider, ProviderError, classify_status
from plinth.providers.http import iter_sse
from plinth.providers.tokens import CHARS_PER_TOKEN, estimate_prompt_tokens
from plinth.providers.types import (
    ChatChoice,
    ChatRequest,
    ChatResponse,
    ContentPart,
    FinishEvent,
    FinishReason,
    ImagePart,
    Message,
    StreamEvent,
    TextDelta,
    TextPart,
    ThinkingDelta,
    ThinkingPart,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
    UsageEvent,
)

if TYPE_CHECKING:
    from plinth.config.schema import DeploymentConfig
    from plinth.providers.http import HttpClient

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_BASE_URL = "https://api.anthropic.com"
# Anthropic requires max_tokens; this is what a request that did not say gets.
DEFAULT_MAX_TOKENS = 4096
# The tool that carries a JSON answer when the request asked for response_format.
JSON_TOOL = "json_response"
# Signatures other vendors issued (Gemini's thought signatures are carried as "gemini:<signature>").
FOREIGN_SIGNATURE_PREFIXES = ("gemini:",)

_FINISH: dict[str, FinishReason] = {
    "end_turn": "stop",
    "max_tokens": "length",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
    "model_context_window_exceeded": "length",
}

# The HTTP status each Anthropic error type stands for, to classify `event: error` in a 200 stream.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


# --- canonical -> Anthropic ------------------------------------------------------------------


def _text_block(part: TextPart) -> dict[str, Any]:
    block: dict[str, Any] = {"type": "text", "text": part.text}
    if part.cache_control is not None:
        block["cache_control"] = part.cache_control
    return block


def _image_block(part: ImagePart) -> dict[str, Any]:
    if part.data is not None:
        source = {"type": "base64", "media_type": part.media_type or "image/png", "data": part.data}
    else:
        source = {"type": "url", "url": part.url or ""}
    return {"type": "image", "source": source}


def _thinking_block(part: ThinkingPart) -> dict[str, Any]:
    """Redacted thinking keeps its opaque data in `signature` (Plinth's convention)."""
    if part.redacted:
        return {"type": "redacted_thinking", "data": part.signature}
    return {"type": "thinking", "thinking": part.text, "signature": part.signature}


def _anthropic_signature(part: ThinkingPart) -> bool:
    """Anthropic verifies thinking signatures: unsigned thinking and another vendor's signatures
    (Gemini's travel as `gemini:...`) would be refused, so only Anthropic's own go back."""
    return bool(part.signature) and not (part.signature or "").startswith(FOREIGN_SIGNATURE_PREFIXES)


def _content_blocks(parts: list[ContentPart]) -> list[dict[str, Any]]:
    """Anthropic rejects empty text blocks and thinking it did not sign, so both are left out."""
    blocks: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            if part.text:
                blocks.append(_text_block(part))
        elif isinstance(part, ImagePart):
            blocks.append(_image_block(part))
        elif _anthropic_signature(part):
            blocks.append(_thinking_block(part))
    return blocks


def _invalid(message: str, param: str) -> ProviderError:
    return ProviderError(message, status=400, kind="invalid_request", param=param)


def _tool_input(call: ToolCall, param: str) -> dict[str, Any]:
    if not call.arguments.strip():
        return {}
    try:
        value = orjson.loads(call.arguments)
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise _invalid(f"tool call '{call.id}' ({call.name}) has arguments that are not a JSON object", param)
    return value


def _tool_result_block(message: Message, index: int) -> dict[str, Any]:
    if not message.tool_call_id:
        raise _invalid(f"tool message at messages[{index}] has no tool_call_id", f"messages[{index}]")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
    content = [b for b in _content_blocks(message.content) if b["type"] in ("text", "image")]
    if content:
        block["content"] = content
    if message.is_error:
        block["is_error"] = True
    return block


def _assistant_blocks(message: Message, index: int) -> list[dict[str, Any]]:
    blocks = _content_blocks(message.content)
    if message.refusal and not message.text():
        blocks.append({"type": "text", "text": message.refusal})
    for j, call in enumerate(message.tool_calls):
        param = f"messages[{index}].tool_calls[{j}].function.arguments"
        blocks.append(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": _tool_input(call, param)}
        )
    return blocks


def _message_blocks(message: Message, index: int) -> tuple[str, list[dict[str, Any]]]:
    if message.role == "tool":
        return "user", [_tool_result_block(message, index)]
    if message.role == "assistant":
        return "assistant", _assistant_blocks(message, index)
    return "user", _content_blocks(message.content)


def messages_to_anthropic(messages: list[Message]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return (system blocks, messages): system hoisted, same-role turns merged, tool results first."""
    system: list[dict[str, Any]] = []
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        if message.role == "system":
            system.extend(_text_block(p) for p in message.content if isinstance(p, TextPart) and p.text)
            continue
        role, blocks = _message_blocks(message, i)
        if not blocks:
            continue  # an empty turn carries nothing and Anthropic rejects it
        if out and out[-1]["role"] == role:
            out[-1]["content"].extend(blocks)
        else:
            out.append({"role": role, "content": blocks})
    for turn in out:
        if turn["role"] == "user":
            # Anthropic wants tool_result blocks before any other block of the user turn.
            turn["content"].sort(key=lambda b: b["type"] != "tool_result")
    return system, out


def _json_mode(request: ChatRequest) -> bool:
    return request.response_format is not None and request.response_format.type != "text"


def _thinking_on(request: ChatRequest) -> bool:
    return (request.thinking or {}).get("type") in ("enabled", "adaptive")


def _json_tool(request: ChatRequest) -> dict[str, Any]:
    rf = request.response_format
    schema = rf.schema if rf is not None and rf.type == "json_schema" and rf.schema else None
    name = f" '{rf.name}'" if rf is not None and rf.name else ""
    return {
        "name": JSON_TOOL,
        "description": f"Give the final answer by calling this tool; its input is the{name} JSON response.",
        "input_schema": schema or {"type": "object"},
    }


def _tool_choice(request: ChatRequest) -> dict[str, Any] | None:
    tc = request.tool_choice
    if tc is None:
        return None
    if tc.mode == "required":
        return {"type": "any"}
    if tc.mode == "tool":
        return {"type": "tool", "name": tc.name}
    return {"type": tc.mode}


def _json_tool_choice(request: ChatRequest) -> dict[str, Any]:
    """Force the JSON tool, leaving room for the request's own tools when it has some.

    Anthropic refuses forced tool use while thinking, so then the model is only offered it.
    """
    tc = request.tool_choice or ToolChoice()
    if _thinking_on(request):
        return {"type": "auto"}
    if not request.tools or tc.mode == "none":
        return {"type": "tool", "name": JSON_TOOL}
    if tc.mode == "tool":
        return {"type": "tool", "name": tc.name}
    return {"type": "any"}


def _add_tools(body: dict[str, Any], request: ChatRequest) -> None:
    tools: list[dict[str, Any]] = []
    for tool in request.tools:
        spec: dict[str, Any] = {"name": tool.name, "input_schema": tool.parameters}
        if tool.description:
            spec["description"] = tool.description
        tools.append(spec)
    choice = _tool_choice(request)
    if _json_mode(request):
        tools.append(_json_tool(request))
        choice = _json_tool_choice(request)
    if not tools:
        return
    body["tools"] = tools
    if request.parallel_tool_calls is False and (choice is None or choice["type"] != "none"):
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None:
        body["tool_choice"] = choice


def _max_tokens(request: ChatRequest) -> int:
    if request.max_tokens is not None:
        return request.max_tokens
    budget = (request.thinking or {}).get("budget_tokens")
    # max_tokens must exceed the thinking budget, so leave the default room for the answer.
    return DEFAULT_MAX_TOKENS + budget if isinstance(budget, int) else DEFAULT_MAX_TOKENS


def request_to_anthropic(request: ChatRequest, upstream_model: str, *, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if request.protocol == "anthropic":
        body.update(request.extra)  # same protocol: fields Plinth does not model pass through
    system, messages = messages_to_anthropic(request.messages)
    body["model"] = upstream_model
    body["messages"] = messages
    body["max_tokens"] = _max_tokens(request)
    if system:
        body["system"] = system
    if request.stop:
        body["stop_sequences"] = list(request.stop)
    for name in ("temperature", "top_p", "top_k", "thinking"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.user:
        body["metadata"] = {"user_id": request.user}
    _add_tools(body, request)
    if stream:
        body["stream"] = True
    return body


# --- Anthropic -> canonical ------------------------------------------------------------------


def usage_from_anthropic(data: dict[str, Any]) -> Usage:
    """Canonical input_tokens counts every prompt token; Anthropic's excludes cache reads and writes."""
    read = int(data.get("cache_read_input_tokens") or 0)
    created = int(data.get("cache_creation_input_tokens") or 0)
    return Usage(
        input_tokens=int(data.get("input_tokens") or 0) + read + created,
        output_tokens=int(data.get("output_tokens") or 0),
        cached_input_tokens=read,
        cache_creation_input_tokens=created,
    )


def _finish_reason(stop_reason: Any, has_tool_calls: bool) -> FinishReason:
    reason = _FINISH.get(stop_reason if isinstance(stop_reason, str) else "end_turn", "stop")
    if reason == "tool_calls" and not has_tool_calls:
        return "stop"  # only the JSON tool was called: to the caller that is a plain answer
    return reason


def _json_text(value: Any) -> str:
    return orjson.dumps(value if value is not None else {}).decode()


def message_from_anthropic(blocks: list[Any], *, json_mode: bool) -> Message:
    content: list[ContentPart] = []
    calls: list[ToolCall] = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            content.append(TextPart(block.get("text") or ""))
        elif kind == "thinking":
            content.append(ThinkingPart(block.get("thinking") or "", signature=block.get("signature")))
        elif kind == "redacted_thinking":
            content.append(ThinkingPart("", signature=block.get("data"), redacted=True))
        elif kind == "tool_use" and json_mode and block.get("name") == JSON_TOOL:
            content.append(TextPart(_json_text(block.get("input"))))
        elif kind == "tool_use":
            calls.append(
                ToolCall(block.get("id") or "", block.get("name") or "", _json_text(block.get("input")))
            )
    return Message(role="assistant", content=content, tool_calls=calls)


def response_from_anthropic(data: Any, *, json_mode: bool) -> ChatResponse:
    if not isinstance(data, dict) or not isinstance(data.get("content"), list):
        raise ProviderError("upstream response has no 'content' list", kind="bad_upstream_response")
    message = message_from_anthropic(data["content"], json_mode=json_mode)
    stop_sequence = data.get("stop_sequence")
    choice = ChatChoice(
        index=0,
        message=message,
        finish_reason=_finish_reason(data.get("stop_reason"), bool(message.tool_calls)),
        stop_sequence=stop_sequence if isinstance(stop_sequence, str) else None,
    )
    usage = data.get("usage")
    return ChatResponse(
        id=str(data.get("id") or ""),
        model=str(data.get("model") or ""),
        created=int(time.time()),
        choices=[choice],
        usage=usage_from_anthropic(usage if isinstance(usage, dict) else {}),
    )


def stream_error(data: dict[str, Any]) -> ProviderError:
    """An `event: error` inside a 200 stream, classified as its HTTP twin would be."""
    error = data.get("error")
    error = error if isinstance(error, dict) else {}
    kind = str(error.get("type") or "api_error")
    message = f"upstream stream error ({kind}): {error.get('message') or 'no message'}"
    return classify_status(_ERROR_STATUS.get(kind, 500), message)


def _decode_event(raw: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise ProviderError("upstream sent an invalid stream event", kind="bad_upstream_response")
    return data


class _StreamTranslator:
    """Turns Anthropic stream events into canonical ones; one instance per stream."""

    def __init__(self, request: ChatRequest) -> None:
        self.request = request
        self.json_mode = _json_mode(request)
        # Anthropic block index -> ("text" | "thinking" | "tool" | "json" | "skip", tool_index)
        self.blocks: dict[int, tuple[str, int]] = {}
        self.tool_count = 0
        self.usage: dict[str, Any] = {}
        self.stop_reason: Any = None
        self.stop_sequence: Any = None
        self.output_chars = 0
        self.done = False

    def feed(self, data: dict[str, Any]) -> list[StreamEvent]:
        kind = data.get("type")
        if kind == "content_block_delta":
            return self._delta(data)
        if kind == "content_block_start":
            return self._block_start(data)
        if kind == "message_start":
            message = data.get("message")
            self._take_usage(message.get("usage") if isinstance(message, dict) else None)
        elif kind == "message_delta":
            self._message_delta(data)
        elif kind == "message_stop":
            self.done = True
            return self._end()
        elif kind == "error":
            raise stream_error(data)
        return []  # ping, content_block_stop and event types added after this code was written

    def _take_usage(self, usage: Any) -> None:
        """Stream usage figures are cumulative: later ones replace earlier ones."""
        if isinstance(usage, dict):
            self.usage.update({k: v for k, v in usage.items() if isinstance(v, int)})

    def _message_delta(self, data: dict[str, Any]) -> None:
        delta = data.get("delta")
        if isinstance(delta, dict):
            self.stop_reason = delta.get("stop_reason")
            self.stop_sequence = delta.get("stop_sequence")
        self._take_usage(data.get("usage"))

    def _block_start(self, data: dict[str, Any]) -> list[StreamEvent]:
        block = data.get("content_block")
        block = block if isinstance(block, dict) else {}
        index = int(data.get("index") or 0)
        kind = block.get("type")
        if kind == "tool_use" and self.json_mode and block.get("name") == JSON_TOOL:
            self.blocks[index] = ("json", -1)
        elif kind == "tool_use":
            self.blocks[index] = ("tool", self.tool_count)
            self.tool_count += 1
            return [ToolCallDelta(self.tool_count - 1, id=block.get("id"), name=block.get("name"))]
        elif kind == "text":
            self.blocks[index] = ("text", -1)
            return self._text(block.get("text") or "")
        elif kind == "thinking":
            self.blocks[index] = ("thinking", -1)
            text = block.get("thinking") or ""
            return [ThinkingDelta(text)] if text else []
        else:
            # redacted_thinking cannot be expressed as a ThinkingDelta; server tool blocks have no
            # canonical form.
            self.blocks[index] = ("skip", -1)
        return []

    def _text(self, text: str) -> list[StreamEvent]:
        self.output_chars += len(text)
        return [TextDelta(text)] if text else []

    def _delta(self, data: dict[str, Any]) -> list[StreamEvent]:
        delta = data.get("delta")
        delta = delta if isinstance(delta, dict) else {}
        block, tool_index = self.blocks.get(int(data.get("index") or 0), ("skip", -1))
        kind = delta.get("type")
        if kind == "text_delta":
            return self._text(delta.get("text") or "")
        if kind == "input_json_delta":
            piece = delta.get("partial_json") or ""
            if block == "json":
                return self._text(piece)
            self.output_chars += len(piece)
            return [ToolCallDelta(tool_index, arguments=piece)] if piece and block == "tool" else []
        if kind == "thinking_delta":
            text = delta.get("thinking") or ""
            self.output_chars += len(text)
            return [ThinkingDelta(text)] if text else []
        if kind == "signature_delta":
            return [ThinkingDelta(signature=delta.get("signature") or "")]
        return []

    def _end(self) -> list[StreamEvent]:
        stop_sequence = self.stop_sequence if isinstance(self.stop_sequence, str) else None
        finish = FinishEvent(_finish_reason(self.stop_reason, self.tool_count > 0), stop_sequence)
        if self.usage:
            usage = usage_from_anthropic(self.usage)
        else:
            usage = Usage(
                input_tokens=estimate_prompt_tokens(self.request),
                output_tokens=-(-self.output_chars // CHARS_PER_TOKEN),
                estimated=True,
            )
        return [finish, UsageEvent(usage)]


class _EventStream(AsyncIterator[StreamEvent]):
    """Canonical events from an open Anthropic stream; closing it releases the connection.

    A class rather than an async generator so that `aclose()` frees the connection even when the
    caller never started iterating (an async generator's cleanup only runs once it has started).
    """

    def __init__(self, sse: AsyncIterator[tuple[str, bytes]], translator: _StreamTranslator) -> None:
        self._sse = sse
        self._translator = translator
        self._pending: deque[StreamEvent] = deque()

    async def __anext__(self) -> StreamEvent:
        while not self._pending:
            if self._translator.done:
                await self.aclose()
                raise StopAsyncIteration
            try:
                await self._pull()
            except BaseException:
                await self.aclose()
                raise
        return self._pending.popleft()

    async def _pull(self) -> None:
        try:
            _, raw = await anext(self._sse)
        except StopAsyncIteration:
            raise ProviderError(
                "upstream stream ended before message_stop", retryable=True, kind="connection_lost"
            ) from None
        self._pending.extend(self._translator.feed(_decode_event(raw)))

    async def open(self) -> dict[str, Any]:
        """Read up to message_start, so that an upstream that fails at once can still be fallen back from."""
        try:
            async for _, raw in self._sse:
                data = _decode_event(raw)
                self._pending.extend(self._translator.feed(data))
                if data.get("type") == "message_start":
                    message = data.get("message")
                    return message if isinstance(message, dict) else {}
        except BaseException:
            await self.aclose()
            raise
        await self.aclose()
        raise ProviderError(
            "upstream stream ended before message_start", retryable=True, kind="connection_lost"
        )

    async def aclose(self) -> None:
        aclose = getattr(self._sse, "aclose", None)  # iter_sse is an async generator
        if aclose is not None:
            await aclose()


class AnthropicProvider(Provider):
    """One deployment on the Anthropic Messages API (or anything that speaks it)."""

    type_name = "anthropic"
    supports_n = False

    def __init__(self, deployment: DeploymentConfig, http: HttpClient, *, name: str) -> None:
        super().__init__(deployment, http, name=name)
        base = (deployment.base_url or DEFAULT_BASE_URL).rstrip("/")
        self._url = f"{base}/messages" if base.endswith("/v1") else f"{base}/v1/messages"
        headers = {"anthropic-version": ANTHROPIC_VERSION, "content-type": "application/json"}
        if deployment.api_key is not None:
            headers["x-api-key"] = deployment.api_key.get_secret_value()
        headers.update({k: v.get_secret_value() for k, v in deployment.headers.items()})
        self._headers = headers

    async def chat(self, request: ChatRequest, upstream_model: str) -> ChatResponse:
        body = orjson.dumps(request_to_anthropic(request, upstream_model, stream=False))
        resp = await self.http.post(
            self._url,
            body,
            self._headers,
            timeout_s=self.deployment.timeout_s,
            connect_timeout_s=self.deployment.connect_timeout_s,
        )
        return response_from_anthropic(resp.json(), json_mode=_json_mode(request))

    async def stream_chat(self, request: ChatRequest, upstream_model: str) -> ChatStream:
        body = orjson.dumps(request_to_anthropic(request, upstream_model, stream=True))
        resp = await self.http.open_stream(
            self._url,
            body,
            self._headers,
            connect_timeout_s=self.deployment.connect_timeout_s,
            read_timeout_s=self.deployment.read_timeout_s,
        )
        events = _EventStream(iter_sse(resp), _StreamTranslator(request))
        message = await events.open()
        stream = ChatStream(events=events, model=str(message.get("model") or upstream_model))
        if message.get("id"):
            stream.id = str(message["id"])
        return stream
