"""The inbound OpenAI protocol: request validation and decoding, response and stream encoding.

Validation is hand-written rather than pydantic: it runs on every request, and naming the offending
parameter exactly as OpenAI does (`messages[2].content`) is simpler here than mapping pydantic's
locations. Pure functions, no I/O.
"""

from __future__ import annotations

import base64
import time
from array import array
from typing import Any

import orjson

from plinth.gateway.errors import GatewayError
from plinth.providers.types import (
    ChatRequest,
    ChatResponse,
    ContentPart,
    EmbeddingRequest,
    EmbeddingResponse,
    FinishEvent,
    ImagePart,
    Message,
    ResponseFormat,
    Role,
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

_JSON_TYPES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    list: "an array",
    dict: "an object",
    type(None): "null",
}

_ROLES: dict[str, Role] = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",  # the legacy functions API
}

# Parameters with a canonical meaning; everything else is passed through in ChatRequest.extra.
_KNOWN_CHAT_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
        "stop", "seed", "stream", "stream_options", "tools", "tool_choice", "parallel_tool_calls",
        "response_format", "user", "reasoning_effort", "functions", "function_call",
    }
)  # fmt: skip


def _type_name(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _invalid_type(param: str, expected: str, value: Any) -> GatewayError:
    return GatewayError(
        400,
        f"Invalid type for '{param}': expected {expected}, but got {_type_name(value)} instead.",
        param=param,
        code="invalid_type",
    )


def _invalid_value(param: str, message: str) -> GatewayError:
    return GatewayError(400, f"Invalid value for '{param}': {message}", param=param, code="invalid_value")


def _missing(param: str) -> GatewayError:
    return GatewayError(
        400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _invalid_type(name, "a number", value)
    if not low <= value <= high:
        raise _invalid_value(name, f"must be between {low:g} and {high:g}, got {value:g}.")
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid_type(name, "an integer", value)
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise _invalid_value(name, f"must be {bound}, got {value}.")
    return value


def _string(container: dict[str, Any], name: str, param: str, *, required: bool = False) -> str | None:
    value = container.get(name)
    if value is None:
        if required:
            raise _missing(param)
        return None
    if not isinstance(value, str):
        raise _invalid_type(param, "a string", value)
    return value


# --- decoding ---------------------------------------------------------------------------------


def _content_parts(value: Any, param: str, role: str) -> list[ContentPart]:
    if value is None:
        return []
    if isinstance(value, str):
        return [TextPart(value)]
    if not isinstance(value, list):
        raise _invalid_type(param, "a string or an array of content parts", value)
    parts: list[ContentPart] = []
    for i, part in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(part, dict):
            raise _invalid_type(where, "an object", part)
        kind = part.get("type")
        if kind == "text":
            text = _string(part, "text", f"{where}.text", required=True)
            parts.append(TextPart(text or ""))
        elif kind == "image_url":
            if role not in ("user", "system"):
                raise _invalid_value(
                    f"{where}.type", f"image content is only allowed in user messages, not {role}."
                )
            image = part.get("image_url")
            if isinstance(image, str):
                image = {"url": image}
            if not isinstance(image, dict):
                raise _invalid_type(f"{where}.image_url", "an object", image)
            url = _string(image, "url", f"{where}.image_url.url", required=True) or ""
            if not url.startswith(("http://", "https://", "data:")):
                raise _invalid_value(f"{where}.image_url.url", "must be an http(s) URL or a data: URL.")
            parts.append(ImagePart.from_url(url, _string(image, "detail", f"{where}.image_url.detail")))
        elif kind == "refusal":
            parts.append(TextPart(_string(part, "refusal", f"{where}.refusal") or ""))
        elif kind is None:
            raise _missing(f"{where}.type")
        else:
            raise _invalid_value(
                f"{where}.type",
                f"'{kind}' is not a supported content part type (supported: 'text', 'image_url').",
            )
    return parts


def _tool_calls(value: Any, param: str) -> list[ToolCall]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _invalid_type(param, "an array", value)
    calls: list[ToolCall] = []
    for i, call in enumerate(value):
        where = f"{param}[{i}]"
        if not isinstance(call, dict):
            raise _invalid_type(where, "an object", call)
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise _invalid_type(f"{where}.function", "an object", fn)
        arguments = fn.get("arguments", "")
        if not isinstance(arguments, str):
            raise _invalid_type(f"{where}.function.arguments", "a string", arguments)
        calls.append(
            ToolCall(
                id=_string(call, "id", f"{where}.id", required=True) or "",
                name=_string(fn, "name", f"{where}.function.name", required=True) or "",
                arguments=arguments,
            )
        )
    return calls


def _message(value: Any, index: int) -> Message:
    param = f"messages[{index}]"
    if not isinstance(value, dict):
        raise _invalid_type(param, "an object", value)
    role = value.get("role")
    if role is None:
        raise _missing(f"{param}.role")
    canonical_role = _ROLES.get(role) if isinstance(role, str) else None
    if canonical_role is None:
        raise _invalid_value(
            f"{param}.role",
            f"'{role}' is not one of 'system', 'developer', 'user', 'assistant', 'tool'.",
        )
    content = value.get("content")
    if content is None and role in ("system", "user"):
        raise _missing(f"{param}.content")
    message = Message(role=canonical_role, content=_content_parts(content, f"{param}.content", role))
    message.name = _string(value, "name", f"{param}.name")
    if role == "assistant":
        message.tool_calls = _tool_calls(value.get("tool_calls"), f"{param}.tool_calls")
        message.refusal = _string(value, "refusal", f"{param}.refusal")
        if value.get("function_call") is not None:  # legacy functions API
            fc = value["function_call"]
            message.tool_calls.append(
                ToolCall(id=f"call_{index}", name=fc.get("name", ""), arguments=fc.get("arguments", ""))
            )
    elif role == "tool":
        message.tool_call_id = _string(value, "tool_call_id", f"{param}.tool_call_id", required=True)
    elif role == "function":
        message.tool_call_id = f"call_{index}"
    return message


def _tools(value: Any) -> list[Tool]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _invalid_type("tools", "an array", value)
    tools: list[Tool] = []
    for i, tool in enumerate(value):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise _invalid_type(where, "an object", tool)
        if tool.get("type", "function") != "function":
            raise _invalid_value(f"{where}.type", f"'{tool.get('type')}' is not supported; use 'function'.")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise _invalid_type(f"{where}.function", "an object", fn)
        name = _string(fn, "name", f"{where}.function.name", required=True) or ""
        parameters = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise _invalid_type(f"{where}.function.parameters", "an object", parameters)
        strict = fn.get("strict")
        tools.append(
            Tool(
                name=name,
                description=_string(fn, "description", f"{where}.function.description"),
                parameters=parameters,
                strict=strict if isinstance(strict, bool) else None,
            )
        )
    return tools


def _tool_choice(value: Any) -> ToolChoice | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in ("auto", "none", "required"):
            raise _invalid_value("tool_choice", f"'{value}' is not one of 'auto', 'none', 'required'.")
        return ToolChoice(mode=value)  # type: ignore[arg-type]
    if isinstance(value, dict):
        fn = value.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return ToolChoice(mode="tool", name=fn["name"])
        raise _missing("tool_choice.function.name")
    raise _invalid_type("tool_choice", "a string or an object", value)


def _response_format(value: Any) -> ResponseFormat | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _invalid_type("response_format", "an object", value)
    kind = value.get("type")
    if kind in ("text", "json_object"):
        return ResponseFormat(type=kind)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise _missing("response_format.json_schema")
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            raise _invalid_type("response_format.json_schema.schema", "an object", schema)
        return ResponseFormat(
            type="json_schema",
            name=_string(spec, "name", "response_format.json_schema.name", required=True),
            schema=schema,
            strict=spec.get("strict") if isinstance(spec.get("strict"), bool) else None,
        )
    raise _invalid_value(
        "response_format.type", f"'{kind}' is not one of 'text', 'json_object', 'json_schema'."
    )


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > 4:
            raise _invalid_value("stop", "at most 4 stop sequences are allowed.")
        return value
    raise _invalid_type("stop", "a string or an array of strings", value)


def decode_chat_request(body: Any) -> ChatRequest:
    """Validate an OpenAI chat completion body and build the canonical request."""
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    model = _string(body, "model", "model", required=True) or ""
    messages = body.get("messages")
    if messages is None:
        raise _missing("messages")
    if not isinstance(messages, list):
        raise _invalid_type("messages", "an array", messages)
    if not messages:
        raise _invalid_value("messages", "must contain at least one message.")
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _invalid_type("stream", "a boolean", stream)
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            raise _invalid_type("stream_options", "an object", stream_options)
        include_usage = bool(stream_options.get("include_usage", False))
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _invalid_type("parallel_tool_calls", "a boolean", parallel)
    tools = _tools(body.get("tools"))
    if body.get("functions") is not None:  # legacy functions API
        tools += _tools([{"type": "function", "function": f} for f in body["functions"]])
    request = ChatRequest(
        model=model,
        messages=[_message(m, i) for i, m in enumerate(messages)],
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0, 2),
        top_p=_number(body, "top_p", 0, 1),
        stop=_stop(body.get("stop")),
        n=_integer(body, "n", 1, 128) or 1,
        seed=_integer(body, "seed", -(2**63)),
        tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice")),
        parallel_tool_calls=parallel,
        response_format=_response_format(body.get("response_format")),
        stream=stream,
        include_usage=include_usage,
        user=_string(body, "user", "user"),
        reasoning_effort=_string(body, "reasoning_effort", "reasoning_effort"),
        extra={k: v for k, v in body.items() if k not in _KNOWN_CHAT_FIELDS},
        protocol="openai",
    )
    return request


def decode_embedding_request(body: Any) -> EmbeddingRequest:
    if not isinstance(body, dict):
        raise GatewayError(400, "The request body must be a JSON object.", code="invalid_json")
    model = _string(body, "model", "model", required=True) or ""
    value = body.get("input")
    if value is None:
        raise _missing("input")
    if isinstance(value, str):
        inputs = [value]
    elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        inputs = value
    elif isinstance(value, list) and value and all(isinstance(v, int | list) for v in value):
        raise _invalid_value("input", "token-array input is not supported; send the text instead.")
    elif isinstance(value, list) and not value:
        raise _invalid_value("input", "must not be empty.")
    else:
        raise _invalid_type("input", "a string or an array of strings", value)
    if len(inputs) > 2048:
        raise _invalid_value("input", f"at most 2048 inputs per request, got {len(inputs)}.")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _invalid_value("encoding_format", f"'{encoding}' is not one of 'float', 'base64'.")
    return EmbeddingRequest(
        model=model,
        inputs=inputs,
        dimensions=_integer(body, "dimensions", 1),
        encoding_format=encoding,
        user=_string(body, "user", "user"),
    )


# --- encoding ---------------------------------------------------------------------------------


def usage_to_openai(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def _message_to_openai(message: Message) -> dict[str, Any]:
    text = message.text()
    out: dict[str, Any] = {
        "role": "assistant",
        "content": text if text or not message.tool_calls else None,
        "refusal": message.refusal,
    }
    thinking = "".join(p.text for p in message.content if isinstance(p, ThinkingPart))
    if thinking:
        out["reasoning_content"] = thinking
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    return out


def encode_chat_response(response: ChatResponse) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": response.id,
        "object": "chat.completion",
        "created": response.created,
        "model": response.model,
        "choices": [
            {
                "index": c.index,
                "message": _message_to_openai(c.message),
                "logprobs": c.logprobs,
                "finish_reason": c.finish_reason,
            }
            for c in response.choices
        ],
        "usage": usage_to_openai(response.usage),
    }
    if response.system_fingerprint:
        body["system_fingerprint"] = response.system_fingerprint
    return body


def encode_embedding_response(response: EmbeddingResponse, encoding_format: str) -> dict[str, Any]:
    def vector(values: list[float]) -> list[float] | str:
        if encoding_format == "base64":
            return base64.b64encode(array("f", values).tobytes()).decode("ascii")
        return values

    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": vector(v)}
            for i, v in enumerate(response.vectors)
        ],
        "model": response.model,
        "usage": {"prompt_tokens": response.usage.input_tokens, "total_tokens": response.usage.input_tokens},
    }


def error_body(err: GatewayError) -> dict[str, Any]:
    return err.openai_body()


class StreamEncoder:
    """Turns canonical stream events into `chat.completion.chunk` SSE frames."""

    def __init__(self, stream_id: str, model: str, *, n: int = 1, include_usage: bool = False) -> None:
        self._n = n
        self._include_usage = include_usage
        self._created = int(time.time())
        self._head = {
            "id": stream_id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": model,
        }
        self._usage: Usage | None = None

    def _chunk(self, index: int, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        chunk: dict[str, Any] = {
            **self._head,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if self._include_usage:
            chunk["usage"] = None
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def start(self) -> bytes:
        return b"".join(
            self._chunk(i, {"role": "assistant", "content": "", "refusal": None}) for i in range(self._n)
        )

    def encode(self, event: StreamEvent) -> bytes:
        if isinstance(event, TextDelta):
            return self._chunk(event.index, {"content": event.text})
        if isinstance(event, ToolCallDelta):
            call: dict[str, Any] = {"index": event.tool_index}
            if event.id is not None:
                call["id"] = event.id
                call["type"] = "function"
                call["function"] = {"name": event.name or "", "arguments": event.arguments}
            else:
                call["function"] = {"arguments": event.arguments}
            return self._chunk(event.index, {"tool_calls": [call]})
        if isinstance(event, ThinkingDelta):
            return self._chunk(event.index, {"reasoning_content": event.text}) if event.text else b""
        if isinstance(event, FinishEvent):
            return self._chunk(event.index, {}, event.finish_reason)
        if isinstance(event, UsageEvent):
            self._usage = event.usage
            return b""
        return b""

    def finish(self) -> bytes:
        out = b""
        if self._include_usage and self._usage is not None:
            chunk = {**self._head, "choices": [], "usage": usage_to_openai(self._usage)}
            out = b"data: " + orjson.dumps(chunk) + b"\n\n"
        return out + b"data: [DONE]\n\n"

    @staticmethod
    def error(err: GatewayError) -> bytes:
        return b"data: " + orjson.dumps(err.openai_body()) + b"\n\n"
