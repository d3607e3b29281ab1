"""OpenAI Chat Completions upstreams: OpenAI itself, Azure OpenAI and OpenAI-compatible servers.

vLLM, Ollama, llama.cpp and TGI all speak this protocol; they differ from OpenAI in base URL, auth
and whether they report usage in streams, which the deployment config says.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson

from plinth.providers.base import ChatStream, Provider, ProviderError
from plinth.providers.http import iter_sse
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
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageEvent,
)

_FINISH: dict[str, FinishReason] = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


# --- canonical -> OpenAI ---------------------------------------------------------------------


def _content_to_openai(message: Message) -> str | list[dict[str, Any]] | None:
    parts = [p for p in message.content if not isinstance(p, ThinkingPart)]
    if not parts:
        return None if message.tool_calls else ""
    if len(parts) == 1 and isinstance(parts[0], TextPart) and parts[0].cache_control is None:
        return parts[0].text
    out: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, TextPart):
            out.append({"type": "text", "text": part.text})
        elif isinstance(part, ImagePart):
            image: dict[str, Any] = {"url": part.as_url()}
            if part.detail:
                image["detail"] = part.detail
            out.append({"type": "image_url", "image_url": image})
    return out


def message_to_openai(message: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": message.role, "content": _content_to_openai(message)}
    if message.role == "tool":
        out["tool_call_id"] = message.tool_call_id
        if isinstance(out["content"], list):  # OpenAI tool messages take text parts only
            out["content"] = message.text()
    if message.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in message.tool_calls
        ]
    if message.name:
        out["name"] = message.name
    return out


def request_to_openai(
    request: ChatRequest,
    upstream_model: str,
    *,
    stream_usage: bool,
    max_tokens_field: str = "max_completion_tokens",
    send_top_k: bool = True,
) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if request.protocol == "openai":
        body.update(request.extra)  # same protocol family: unknown fields pass through untouched
    body["model"] = upstream_model
    body["messages"] = [message_to_openai(m) for m in request.messages]
    if request.max_tokens is not None:
        body[max_tokens_field] = request.max_tokens
    for name in ("temperature", "top_p", "seed", "user", "parallel_tool_calls", "reasoning_effort"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if send_top_k and request.top_k is not None and request.protocol != "openai":
        body["top_k"] = request.top_k  # vLLM and Ollama accept it; OpenAI and Azure refuse it (400)
    if request.stop:
        body["stop"] = request.stop
    if request.n != 1:
        body["n"] = request.n
    if request.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    k: v
                    for k, v in (
                        ("name", t.name),
                        ("description", t.description),
                        ("parameters", t.parameters),
                        ("strict", t.strict),
                    )
                    if v is not None
                },
            }
            for t in request.tools
        ]
    if request.tool_choice is not None:
        tc = request.tool_choice
        body["tool_choice"] = (
            {"type": "function", "function": {"name": tc.name}} if tc.mode == "tool" else tc.mode
        )
    if request.response_format is not None:
        rf = request.response_format
        if rf.type == "json_schema":
            schema: dict[str, Any] = {"name": rf.name or "response", "schema": rf.schema or {}}
            if rf.strict is not None:
                schema["strict"] = rf.strict
            body["response_format"] = {"type": "json_schema", "json_schema": schema}
        else:
            body["response_format"] = {"type": rf.type}
    if request.stream:
        body["stream"] = True
        if stream_usage:
            # Always meter: ask for usage even when the client did not (the gateway strips it).
            body["stream_options"] = {**body.get("stream_options", {}), "include_usage": True}
    else:
        body.pop("stream_options", None)
    return body


# --- OpenAI -> canonical ---------------------------------------------------------------------


def usage_from_openai(data: dict[str, Any] | None) -> Usage | None:
    if not data:
        return None
    prompt_details = data.get("prompt_tokens_details") or {}
    completion_details = data.get("completion_tokens_details") or {}
    return Usage(
        input_tokens=int(data.get("prompt_tokens") or 0),
        output_tokens=int(data.get("completion_tokens") or 0),
        cached_input_tokens=int(prompt_details.get("cached_tokens") or 0),
        reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
    )


def message_from_openai(data: dict[str, Any]) -> Message:
    content: list[Any] = []
    reasoning = data.get("reasoning_content") or data.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append(ThinkingPart(text=reasoning))  # vLLM / DeepSeek-style reasoning field
    text = data.get("content")
    if isinstance(text, str):
        content.append(TextPart(text))
    elif isinstance(text, list):
        content.extend(TextPart(p.get("text", "")) for p in text if isinstance(p, dict))
    calls = [
        ToolCall(
            id=c.get("id") or f"call_{i}",
            name=(c.get("function") or {}).get("name", ""),
            arguments=(c.get("function") or {}).get("arguments") or "{}",
        )
        for i, c in enumerate(data.get("tool_calls") or [])
    ]
    return Message(role="assistant", content=content, tool_calls=calls, refusal=data.get("refusal"))


def response_from_openai(data: Any, request: ChatRequest) -> ChatResponse:
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise ProviderError("upstream response has no 'choices'", kind="bad_upstream_response")
    choices = [
        ChatChoice(
            index=int(c.get("index", i)),
            message=message_from_openai(c.get("message") or {}),
            finish_reason=_FINISH.get(c.get("finish_reason") or "stop", "stop"),
            logprobs=c.get("logprobs"),
        )
        for i, c in enumerate(data["choices"])
    ]
    usage = usage_from_openai(data.get("usage"))
    if usage is None:
        usage = Usage(
            input_tokens=estimate_prompt_tokens(request),
            output_tokens=sum(estimate_text_tokens(c.message.text()) for c in choices),
            estimated=True,
        )
    return ChatResponse(
        id=str(data.get("id") or ""),
        model=str(data.get("model") or request.model),
        created=int(data.get("created") or time.time()),
        choices=choices,
        usage=usage,
        system_fingerprint=data.get("system_fingerprint"),
    )


class _StreamState:
    """Tracks what an OpenAI stream has said so the end can be completed if the upstream did not."""

    __slots__ = ("finished", "output_chars", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finished: set[int] = set()
        self.output_chars = 0


def events_from_chunk(chunk: dict[str, Any], state: _StreamState) -> list[StreamEvent]:
    events: list[StreamEvent] = []
    for choice in chunk.get("choices") or ():
        index = int(choice.get("index", 0))
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if reasoning:
            events.append(ThinkingDelta(text=reasoning, index=index))
        text = delta.get("content")
        if text:
            state.output_chars += len(text)
            events.append(TextDelta(text, index))
        for call in delta.get("tool_calls") or ():
            fn = call.get("function") or {}
            arguments = fn.get("arguments") or ""
            state.output_chars += len(arguments)
            events.append(
                ToolCallDelta(
                    tool_index=int(call.get("index", 0)),
                    arguments=arguments,
                    id=call.get("id"),
                    name=fn.get("name"),
                    index=index,
                )
            )
        reason = choice.get("finish_reason")
        if reason:
            state.finished.add(index)
            events.append(FinishEvent(_FINISH.get(reason, "stop"), index=index))
    usage = usage_from_openai(chunk.get("usage"))
    if usage is not None:
        state.usage = usage
    return events


class OpenAIProvider(Provider):
    type_name = "openai"
    default_base_url = "https://api.openai.com/v1"
    # OpenAI deprecated max_tokens; many OpenAI-compatible servers know only max_tokens.
    max_tokens_field = "max_completion_tokens"
    # OpenAI and Azure answer 400 to top_k; vLLM, Ollama and llama.cpp take it.
    sends_top_k = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        base = (self.deployment.base_url or self.default_base_url).rstrip("/")
        self._chat_url = base + "/chat/completions"
        self._embeddings_url = base + "/embeddings"
        self._headers = self._build_headers()

    def _build_headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.deployment.api_key is not None:
            headers["authorization"] = "Bearer " + self.deployment.api_key.get_secret_value()
        for name, value in self.deployment.headers.items():
            headers[name.lower()] = value.get_secret_value()
        return headers

    async def chat(self, request: ChatRequest, upstream_model: str) -> ChatResponse:
        body = request_to_openai(
            request,
            upstream_model,
            stream_usage=False,
            max_tokens_field=self.max_tokens_field,
            send_top_k=self.sends_top_k,
        )
        resp = await self.http.post(
            self._chat_url,
            orjson.dumps(body),
            self._headers,
            timeout_s=self.deployment.timeout_s,
            connect_timeout_s=self.deployment.connect_timeout_s,
        )
        return response_from_openai(resp.json(), request)

    async def stream_chat(self, request: ChatRequest, upstream_model: str) -> ChatStream:
        body = request_to_openai(
            request,
            upstream_model,
            stream_usage=self.deployment.stream_usage,
            max_tokens_field=self.max_tokens_field,
            send_top_k=self.sends_top_k,
        )
        resp = await self.http.open_stream(
            self._chat_url,
            orjson.dumps(body),
            self._headers,
            connect_timeout_s=self.deployment.connect_timeout_s,
            read_timeout_s=self.deployment.read_timeout_s,
        )
        stream = ChatStream(events=self._events(resp, request), model=upstream_model)
        return stream

    async def _events(self, resp: Any, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        state = _StreamState()
        async for _event, data in iter_sse(resp):
            if data == b"[DONE]":
                break
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise ProviderError(
                    "upstream sent an invalid stream chunk", kind="bad_upstream_response"
                ) from None
            if "error" in chunk and not chunk.get("choices"):
                err = chunk["error"]
                message = err.get("message", "upstream error") if isinstance(err, dict) else str(err)
                raise ProviderError(f"upstream stream error: {message}", kind="upstream_error")
            for event in events_from_chunk(chunk, state):
                yield event
        for index in range(request.n):
            if index not in state.finished:
                yield FinishEvent("stop", index=index)
        usage = state.usage or Usage(
            input_tokens=estimate_prompt_tokens(request),
            output_tokens=(state.output_chars + 3) // 4,
            estimated=True,
        )
        yield UsageEvent(usage)

    async def embed(self, request: EmbeddingRequest, upstream_model: str) -> EmbeddingResponse:
        body: dict[str, Any] = {"model": upstream_model, "input": request.inputs, "encoding_format": "float"}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        if request.user is not None:
            body["user"] = request.user
        resp = await self.http.post(
            self._embeddings_url,
            orjson.dumps(body),
            self._headers,
            timeout_s=self.deployment.timeout_s,
            connect_timeout_s=self.deployment.connect_timeout_s,
        )
        data = resp.json()
        try:
            rows = sorted(data["data"], key=lambda r: r.get("index", 0))
            vectors = [list(r["embedding"]) for r in rows]
        except (KeyError, TypeError):
            raise ProviderError(
                "upstream embeddings response is malformed", kind="bad_upstream_response"
            ) from None
        usage_data = data.get("usage") or {}
        usage = Usage(input_tokens=int(usage_data.get("prompt_tokens") or 0))
        if not usage_data:
            usage = Usage(input_tokens=sum(estimate_text_tokens(t) for t in request.inputs), estimated=True)
        return EmbeddingResponse(model=str(data.get("model") or upstream_model), vectors=vectors, usage=usage)


class OpenAICompatibleProvider(OpenAIProvider):
    """vLLM, Ollama (`/v1`), llama.cpp server, TGI (Messages API) and friends: base_url is required."""

    type_name = "openai_compatible"
    default_base_url = "http://127.0.0.1:8000/v1"
    max_tokens_field = "max_tokens"
    sends_top_k = True


class AzureOpenAIProvider(OpenAIProvider):
    """Azure OpenAI: `api-key` auth; the v1 API (`/openai/v1`) or a dated api-version per deployment."""

    type_name = "azure"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        Provider.__init__(self, *args, **kwargs)
        if not self.deployment.base_url:
            raise ValueError("an azure deployment needs base_url (https://<resource>.openai.azure.com)")
        endpoint = self.deployment.base_url.rstrip("/")
        if endpoint.endswith("/openai/v1") or endpoint.endswith("/openai"):
            endpoint = endpoint.rsplit("/openai", 1)[0]
        self._endpoint = endpoint
        self._headers = self._build_headers()
        self._chat_url = self._url("chat/completions")
        self._embeddings_url = self._url("embeddings")

    def _url(self, operation: str, upstream_model: str | None = None) -> str:
        version = self.deployment.api_version
        if version is None or version in ("v1", "latest", "preview"):
            return f"{self._endpoint}/openai/v1/{operation}"
        deployment = upstream_model or self.deployment.model
        return f"{self._endpoint}/openai/deployments/{deployment}/{operation}?api-version={version}"

    def _build_headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json"}
        if self.deployment.api_key is not None:
            headers["api-key"] = self.deployment.api_key.get_secret_value()
        for name, value in self.deployment.headers.items():
            headers[name.lower()] = value.get_secret_value()
        return headers
