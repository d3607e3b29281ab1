"""The inbound Anthropic Messages protocol (`POST /v1/messages`): decode requests, encode answers.

Pure functions, no I/O, so the route stays thin and every translation rule is testable alone.
Validation is hand-written rather than a pydantic model: it runs on every request, and walking the
body once lets each error name the exact field the way Anthropic does (`messages.1.content.0.type`).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import orjson

from plinth.gateway.errors import GatewayError
from plinth.providers.types import (
    ChatRequest,
    ChatResponse,
    ContentPart,
    FinishEvent,
    FinishReason,
    ImagePart,
    Message,
    ResponseFormat,
    StreamEvent,
    TextDelta,
    TextPart,
    ThinkingDelta,
    ThinkingPart,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
    UsageEvent,
)

_KNOWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "stop_sequences",
        "tools",
        "tool_choice",
        "metadata",
        "thinking",
        "output_config",
    }
)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# Gemini's thought signatures travel with this prefix (see plinth.providers.gemini).
GEMINI_SIGNATURE_PREFIX = "gemini:"

_STOP_REASONS: dict[FinishReason, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "content_filter": "refusal",
}

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


# --- request validation helpers --------------------------------------------------------------


def _fail(param: str, message: str) -> GatewayError:
    return GatewayError(400, f"{param}: {message}", param=param, code="invalid_value")


def _json_type(value: Any) -> str:
    for name, check in _JSON_TYPES.items():
        if check(value):
            return name
    return "null" if value is None else type(value).__name__


def _check(value: Any, kind: str, param: str) -> Any:
    if not _JSON_TYPES[kind](value):
        raise _fail(param, f"expected {kind}, got {_json_type(value)}")
    return value


def _field(obj: dict[str, Any], key: str, path: str, kind: str, *, required: bool = False) -> Any:
    """obj[key] checked against a JSON type; None when absent (null counts as absent)."""
    value = obj.get(key)
    if value is None:
        if required:
            raise _fail(f"{path}.{key}" if path else key, "field required")
        return None
    if not _JSON_TYPES[kind](value):
        raise _fail(f"{path}.{key}" if path else key, f"expected {kind}, got {_json_type(value)}")
    return value


def _blocks(content: Any, path: str) -> list[dict[str, Any]]:
    """Message content as a list of blocks; a string is one text block."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    _check(content, "array", path)
    for j, block in enumerate(content):
        _check(block, "object", f"{path}.{j}")
        _field(block, "type", f"{path}.{j}", "string", required=True)
    return list(content)


def _unsupported(block: dict[str, Any], path: str, allowed: str) -> GatewayError:
    return _fail(f"{path}.type", f"block type '{block['type']}' is not supported here (expected {allowed})")


# --- request decoding ------------------------------------------------------------------------


def _text(block: dict[str, Any], path: str) -> TextPart:
    text = _field(block, "text", path, "string", required=True)
    return TextPart(text, cache_control=_field(block, "cache_control", path, "object"))


def _image(block: dict[str, Any], path: str) -> ImagePart:
    source = _field(block, "source", path, "object", required=True)
    spath = f"{path}.source"
    kind = _field(source, "type", spath, "string", required=True)
    if kind == "base64":
        return ImagePart(
            data=_field(source, "data", spath, "string", required=True),
            media_type=_field(source, "media_type", spath, "string", required=True),
        )
    if kind == "url":
        return ImagePart(url=_field(source, "url", spath, "string", required=True))
    raise _fail(f"{spath}.type", f"image source type '{kind}' is not supported (expected 'base64' or 'url')")


def _tool_result(block: dict[str, Any], path: str) -> Message:
    call_id = _field(block, "tool_use_id", path, "string", required=True)
    content = block.get("content")
    parts: list[ContentPart] = []
    if content is not None:
        cpath = f"{path}.content"
        for j, item in enumerate(_blocks(content, cpath)):
            if item["type"] == "text":
                parts.append(_text(item, f"{cpath}.{j}"))
            elif item["type"] == "image":
                parts.append(_image(item, f"{cpath}.{j}"))
            else:
                raise _unsupported(item, f"{cpath}.{j}", "'text' or 'image'")
    is_error = bool(_field(block, "is_error", path, "boolean"))
    return Message(role="tool", content=parts, tool_call_id=call_id, is_error=is_error)


def _user_messages(blocks: list[dict[str, Any]], path: str) -> list[Message]:
    """tool_result blocks become canonical tool messages, then the rest is one user message."""
    results: list[Message] = []
    parts: list[ContentPart] = []
    for j, block in enumerate(blocks):
        bpath = f"{path}.content.{j}"
        kind = block["type"]
        if kind == "tool_result":
            results.append(_tool_result(block, bpath))
        elif kind == "text":
            parts.append(_text(block, bpath))
        elif kind == "image":
            parts.append(_image(block, bpath))
        else:
            raise _unsupported(block, bpath, "'text', 'image' or 'tool_result'")
    if parts or not results:
        results.append(Message(role="user", content=parts))
    return results


def _tool_use(block: dict[str, Any], path: str) -> ToolCall:
    return ToolCall(
        id=_field(block, "id", path, "string", required=True),
        name=_field(block, "name", path, "string", required=True),
        arguments=orjson.dumps(_field(block, "input", path, "object", required=True)).decode(),
    )


def _assistant_message(blocks: list[dict[str, Any]], path: str) -> Message:
    message = Message(role="assistant")
    for j, block in enumerate(blocks):
        bpath = f"{path}.content.{j}"
        kind = block["type"]
        if kind == "text":
            message.content.append(_text(block, bpath))
        elif kind == "thinking":
            text = _field(block, "thinking", bpath, "string", required=True)
            message.content.append(ThinkingPart(text, signature=_field(block, "signature", bpath, "string")))
        elif kind == "redacted_thinking":
            data = _field(block, "data", bpath, "string", required=True)
            message.content.append(ThinkingPart("", signature=data, redacted=True))
        elif kind == "tool_use":
            message.tool_calls.append(_tool_use(block, bpath))
        else:
            raise _unsupported(block, bpath, "'text', 'thinking', 'redacted_thinking' or 'tool_use'")
    return message


def _messages(body: dict[str, Any]) -> list[Message]:
    raw = _field(body, "messages", "", "array", required=True)
    if not raw:
        raise _fail("messages", "at least one message is required")
    out: list[Message] = []
    for i, item in enumerate(raw):
        path = f"messages.{i}"
        _check(item, "object", path)
        role = _field(item, "role", path, "string", required=True)
        if "content" not in item:
            raise _fail(f"{path}.content", "field required")
        blocks = _blocks(item["content"], f"{path}.content")
        if role == "user":
            out.extend(_user_messages(blocks, path))
        elif role == "assistant":
            out.append(_assistant_message(blocks, path))
        elif role == "system":  # newer API versions accept system turns inside messages
            out.append(_system_message(blocks, f"{path}.content"))
        else:
            raise _fail(f"{path}.role", f"unknown role '{role}', expected 'user', 'assistant' or 'system'")
    return out


def _system_message(blocks: list[dict[str, Any]], path: str) -> Message:
    parts: list[ContentPart] = []
    for j, block in enumerate(blocks):
        if block["type"] != "text":
            raise _unsupported(block, f"{path}.{j}", "'text'")
        parts.append(_text(block, f"{path}.{j}"))
    return Message(role="system", content=parts)


def _system(body: dict[str, Any]) -> list[Message]:
    system = body.get("system")
    if system is None or system == "":
        return []
    return [_system_message(_blocks(system, "system"), "system")]


def _tools(body: dict[str, Any]) -> list[Tool]:
    tools: list[Tool] = []
    for i, item in enumerate(_field(body, "tools", "", "array") or []):
        path = f"tools.{i}"
        _check(item, "object", path)
        kind = _field(item, "type", path, "string")
        if kind not in (None, "custom"):
            raise _fail(f"{path}.type", f"tool type '{kind}' is not supported (only client tools)")
        tools.append(
            Tool(
                name=_field(item, "name", path, "string", required=True),
                description=_field(item, "description", path, "string"),
                parameters=_field(item, "input_schema", path, "object", required=True),
            )
        )
    return tools


def _tool_choice(body: dict[str, Any]) -> tuple[ToolChoice | None, bool | None]:
    """Return (tool choice, parallel_tool_calls)."""
    raw = _field(body, "tool_choice", "", "object")
    if raw is None:
        return None, None
    kind = _field(raw, "type", "tool_choice", "string", required=True)
    disable = _field(raw, "disable_parallel_tool_use", "tool_choice", "boolean")
    parallel = None if disable is None else not disable
    if kind in ("auto", "none"):
        return ToolChoice(mode=kind), parallel
    if kind == "any":
        return ToolChoice(mode="required"), parallel
    if kind == "tool":
        return ToolChoice(
            mode="tool", name=_field(raw, "name", "tool_choice", "string", required=True)
        ), parallel
    raise _fail("tool_choice.type", f"unknown tool_choice type '{kind}', expected auto, any, tool or none")


def _thinking(body: dict[str, Any]) -> dict[str, Any] | None:
    raw = _field(body, "thinking", "", "object")
    if raw is None:
        return None
    kind = _field(raw, "type", "thinking", "string", required=True)
    if kind == "disabled":
        return None
    if kind == "enabled":
        _field(raw, "budget_tokens", "thinking", "integer", required=True)
    return dict(raw)


def _output_config(body: dict[str, Any], extra: dict[str, Any]) -> ResponseFormat | None:
    """output_config.format is canonical (JSON output); its other keys pass through as extra."""
    raw = _field(body, "output_config", "", "object")
    if raw is None:
        return None
    rest = {k: v for k, v in raw.items() if k != "format"}
    if rest:
        extra["output_config"] = rest
    fmt = _field(raw, "format", "output_config", "object")
    if fmt is None:
        return None
    kind = _field(fmt, "type", "output_config.format", "string", required=True)
    if kind != "json_schema":
        raise _fail("output_config.format.type", f"unknown format type '{kind}', expected 'json_schema'")
    return ResponseFormat(
        type="json_schema", schema=_field(fmt, "schema", "output_config.format", "object", required=True)
    )


def _positive_int(body: dict[str, Any], key: str, *, required: bool = False) -> int | None:
    value: int | None = _field(body, key, "", "integer", required=required)
    if value is not None and value < 1:
        raise _fail(key, "must be at least 1")
    return value


def _user_id(body: dict[str, Any]) -> str | None:
    metadata = _field(body, "metadata", "", "object")
    return None if metadata is None else _field(metadata, "user_id", "metadata", "string")


def decode_request(body: object) -> ChatRequest:
    """Validate an Anthropic Messages request and translate it into the canonical model."""
    if not isinstance(body, dict):
        raise GatewayError(
            400, f"request body must be a JSON object, got {_json_type(body)}", code="invalid_body"
        )
    model = _field(body, "model", "", "string", required=True)
    if not model:
        raise _fail("model", "must not be empty")
    extra = {k: v for k, v in body.items() if k not in _KNOWN_FIELDS}
    tool_choice, parallel = _tool_choice(body)
    stop = _field(body, "stop_sequences", "", "array") or []
    for i, item in enumerate(stop):
        _check(item, "string", f"stop_sequences.{i}")
    return ChatRequest(
        model=model,
        messages=_system(body) + _messages(body),
        max_tokens=_positive_int(body, "max_tokens", required=True),
        temperature=_field(body, "temperature", "", "number"),
        top_p=_field(body, "top_p", "", "number"),
        top_k=_positive_int(body, "top_k"),
        stop=list(stop),
        tools=_tools(body),
        tool_choice=tool_choice,
        parallel_tool_calls=parallel,
        response_format=_output_config(body, extra),
        stream=bool(_field(body, "stream", "", "boolean")),
        user=_user_id(body),
        thinking=_thinking(body),
        extra=extra,
        protocol="anthropic",
    )


# --- response encoding -----------------------------------------------------------------------


def _message_id(response_id: str) -> str:
    if response_id.startswith("msg_"):
        return response_id
    return f"msg_{response_id.removeprefix('chatcmpl-') or uuid.uuid4().hex}"


def _stop_reason(finish_reason: FinishReason, stop_sequence: str | None) -> str:
    if finish_reason == "stop" and stop_sequence is not None:
        return "stop_sequence"
    return _STOP_REASONS.get(finish_reason, "end_turn")


def usage_body(usage: Usage) -> dict[str, int]:
    """Anthropic's input_tokens excludes cache reads and writes; the canonical one includes them."""
    fresh = usage.input_tokens - usage.cached_input_tokens - usage.cache_creation_input_tokens
    return {
        "input_tokens": max(fresh, 0),
        "cache_creation_input_tokens": usage.cache_creation_input_tokens,
        "cache_read_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
    }


def _thinking_block(part: ThinkingPart) -> dict[str, Any]:
    if part.redacted:
        return {"type": "redacted_thinking", "data": part.signature or ""}
    return {"type": "thinking", "thinking": part.text, "signature": part.signature or ""}


def _tool_input(call: ToolCall) -> dict[str, Any]:
    try:
        value = orjson.loads(call.arguments or "{}")
    except orjson.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise GatewayError(
            502,
            f"the model produced tool call '{call.id}' ({call.name}) with arguments that are not a JSON object",
            code="bad_upstream_response",
        )
    return value


def _content(message: Message) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, ThinkingPart):
            if part.text or part.signature:  # an empty, unsigned thought carries nothing
                blocks.append(_thinking_block(part))
        elif isinstance(part, TextPart) and part.text:
            blocks.append({"type": "text", "text": part.text})
    if message.refusal and not message.text():
        blocks.append({"type": "text", "text": message.refusal})
    for call in message.tool_calls:
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name, "input": _tool_input(call)})
    return blocks


def encode_response(resp: ChatResponse, model: str) -> dict[str, Any]:
    """An Anthropic Message from choice 0 (the Messages API has no n)."""
    choice = resp.choices[0] if resp.choices else None
    return {
        "id": _message_id(resp.id),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _content(choice.message) if choice else [],
        "stop_reason": _stop_reason(choice.finish_reason, choice.stop_sequence) if choice else "end_turn",
        "stop_sequence": choice.stop_sequence if choice else None,
        "usage": usage_body(resp.usage),
    }


def error_type(status: int) -> str:
    return _ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_body(err: GatewayError) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(err.status), "message": err.message}}


# --- streaming -------------------------------------------------------------------------------


def _sse(event: bytes, payload: dict[str, Any]) -> bytes:
    return b"event: " + event + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


_PING = _sse(b"ping", {"type": "ping"})


class StreamEncoder:
    """Canonical stream events -> Anthropic's SSE event sequence, for choice 0.

    Anthropic streams content as numbered blocks, each opened, filled and closed; canonical events
    are a flat sequence, so the encoder opens a new block whenever the kind of content changes.
    Finish and usage are held back until `finish()`, where Anthropic reports them.
    """

    __slots__ = ("_finish", "_index", "_message_id", "_model", "_open", "_signed", "_tool_index", "_usage")

    def __init__(self, message_id: str, model: str) -> None:
        self._message_id = message_id
        self._model = model
        self._index = -1  # index of the last block opened
        self._open: str | None = None  # kind of the open block: "text", "thinking" or "tool"
        self._tool_index = -1  # canonical tool_index of the last tool block
        self._signed = False  # the open thinking block already has its signature
        self._finish: FinishEvent | None = None
        self._usage = Usage()

    def start(self) -> bytes:
        message: dict[str, Any] = {
            "id": self._message_id,
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return _sse(b"message_start", {"type": "message_start", "message": message}) + _PING

    def encode(self, event: StreamEvent) -> bytes:
        if isinstance(event, UsageEvent):
            self._usage = event.usage
            return b""
        if event.index != 0:
            return b""
        if isinstance(event, TextDelta):
            return self._text(event)
        if isinstance(event, ToolCallDelta):
            return self._tool(event)
        if isinstance(event, ThinkingDelta):
            return self._thinking(event)
        self._finish = event
        return b""

    def finish(self) -> bytes:
        finish = self._finish or FinishEvent("stop")
        delta = {
            "stop_reason": _stop_reason(finish.finish_reason, finish.stop_sequence),
            "stop_sequence": finish.stop_sequence,
        }
        message_delta = {"type": "message_delta", "delta": delta, "usage": usage_body(self._usage)}
        return (
            self._close()
            + _sse(b"message_delta", message_delta)
            + _sse(b"message_stop", {"type": "message_stop"})
        )

    def error(self, err: GatewayError) -> bytes:
        return _sse(b"error", error_body(err))

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        self._open = None
        return _sse(b"content_block_stop", {"type": "content_block_stop", "index": self._index})

    def _start_block(self, kind: str, block: dict[str, Any]) -> bytes:
        out = self._close()
        self._index += 1
        self._open = kind
        start = {"type": "content_block_start", "index": self._index, "content_block": block}
        return out + _sse(b"content_block_start", start)

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return _sse(
            b"content_block_delta", {"type": "content_block_delta", "index": self._index, "delta": delta}
        )

    def _text(self, event: TextDelta) -> bytes:
        if not event.text:
            return b""
        out = b"" if self._open == "text" else self._start_block("text", {"type": "text", "text": ""})
        return out + self._delta({"type": "text_delta", "text": event.text})

    def _tool(self, event: ToolCallDelta) -> bytes:
        out = b""
        if self._open != "tool" or event.tool_index != self._tool_index:
            self._tool_index = event.tool_index
            block = {
                "type": "tool_use",
                "id": event.id or f"toolu_{uuid.uuid4().hex[:24]}",
                "name": event.name or "",
                "input": {},
            }
            out = self._start_block("tool", block)
        if event.arguments:
            out += self._delta({"type": "input_json_delta", "partial_json": event.arguments})
        return out

    def _thinking(self, event: ThinkingDelta) -> bytes:
        if not event.text and not event.signature:
            return b""
        # A signed block is complete: whatever follows starts a new one. A Gemini signature that
        # comes alone belongs to the part after it (a text or tool call), never to the thought
        # before it, so it gets its own (empty, signed) block, as in the non-streamed answer.
        standalone = not event.text and (event.signature or "").startswith(GEMINI_SIGNATURE_PREFIX)
        out = b""
        if self._open != "thinking" or self._signed or standalone:
            out = self._start_block("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            self._signed = False
        if event.text:
            out += self._delta({"type": "thinking_delta", "thinking": event.text})
        if event.signature:
            out += self._delta({"type": "signature_delta", "signature": event.signature})
            self._signed = True
        return out
