"""Google Gemini (Generative Language API, v1beta): generateContent, streaming and embeddings.

Translation notes that are not obvious from the field names:

- Tool results. Canonical tool messages carry only `tool_call_id`; Gemini's `functionResponse` needs
  the function *name*, so it is recovered from the earlier assistant call with that id. Results go
  out as `{"output": text}` (or `{"error": text}` when the tool failed), the keys Google documents.
- Tool call ids. Gemini returns an `id` on function calls only in newer API versions; when it does,
  that id is the canonical one and is echoed back. Otherwise Plinth makes one up
  (`call_<token>_<n>`, unique per response so ids never collide across turns). Ids starting with
  `call_` (Plinth's and OpenAI's) are not sent to Gemini, which then pairs calls and results by name
  and order as it always has.
- Thought signatures. Gemini signs thoughts and function calls (`thoughtSignature`) and Gemini 3
  rejects a tool-call turn whose signature is missing. Signatures travel in `ThinkingPart.signature`
  prefixed with `gemini:` so they are never sent to (or accepted from) another vendor. A thought
  with text keeps its own signature; a signature of a text or function-call part becomes an empty
  `ThinkingPart` placed just before the part it belongs to (function calls come after the content,
  so theirs is the last content part). Replaying a call without a signature uses the sentinel that
  Google documents for histories Gemini did not produce.
- Image URLs. `data:` URLs become `inlineData`. Any other URL becomes `fileData` (Gemini reads
  `gs://` URIs, Files API URIs and, on models that support it, public http(s) URLs; otherwise Gemini
  answers 400 and the caller sees why). Plinth never fetches the URL itself: that would turn the
  gateway into an SSRF proxy and add latency to the hot path.
"""

from __future__ import annotations

import mimetypes
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from plinth.providers.base import ChatStream, Provider, ProviderError, classify_status
from plinth.providers.http import UpstreamResponse, UpstreamStream, iter_sse
from plinth.providers.tokens import estimate_prompt_tokens, estimate_text_tokens
from plinth.providers.types import (
    ChatChoice,
    ChatRequest,
    ChatResponse,
    ContentPart,
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
    ToolChoice,
    Usage,
    UsageEvent,
)

if TYPE_CHECKING:
    from plinth.config.schema import DeploymentConfig
    from plinth.providers.http import HttpClient

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
API_VERSION = "v1beta"
SIGNATURE_PREFIX = "gemini:"
# Google's documented placeholder for function calls in a history that Gemini did not sign.
SKIP_SIGNATURE = "skip_thought_signature_validator"
SYNTHETIC_ID_PREFIX = "call_"
EMBED_BATCH = 100  # batchEmbedContents accepts at most 100 requests

_CONTENT_FILTER = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)
# OpenAI reasoning_effort -> thinking budget (the table Google's OpenAI-compatible endpoint uses).
_EFFORT_BUDGET = {"low": 1024, "medium": 8192, "high": 24576}


# --- canonical -> Gemini ---------------------------------------------------------------------


def _wrap_signature(signature: str | None) -> str | None:
    return SIGNATURE_PREFIX + signature if signature else None


def _unwrap_signature(signature: str | None) -> str | None:
    """Only signatures that Gemini issued go back to Gemini; others are meaningless to it."""
    if signature and signature.startswith(SIGNATURE_PREFIX):
        return signature[len(SIGNATURE_PREFIX) :] or None
    return None


def _echo_id(call_id: str | None) -> bool:
    return bool(call_id) and not str(call_id).startswith(SYNTHETIC_ID_PREFIX)


def _guess_mime(url: str, declared: str | None) -> str:
    if declared:
        return declared
    guessed, _ = mimetypes.guess_type(urlsplit(url).path)
    return guessed or "image/jpeg"


def image_to_gemini(part: ImagePart) -> dict[str, Any]:
    if part.url is None:
        return {"inlineData": {"mimeType": part.media_type or "image/png", "data": part.data or ""}}
    return {"fileData": {"mimeType": _guess_mime(part.url, part.media_type), "fileUri": part.url}}


def _parse_args(arguments: str) -> dict[str, Any]:
    """Gemini wants args as an object; the canonical form is the JSON text the model produced."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        raise ProviderError(
            "tool call arguments are not valid JSON", status=400, kind="invalid_request", param="messages"
        ) from None
    return value if isinstance(value, dict) else {"value": value}


def _user_parts(message: Message) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for part in message.content:
        if isinstance(part, TextPart) and part.text:
            parts.append({"text": part.text})
        elif isinstance(part, ImagePart):
            parts.append(image_to_gemini(part))
    return parts


def _model_parts(message: Message) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    pending: str | None = None  # a signature waiting for the part it belongs to
    for part in message.content:
        if isinstance(part, ThinkingPart):
            signature = _unwrap_signature(part.signature)
            if not part.text:
                pending = signature or pending
                continue
            if part.redacted or signature is None:
                continue  # another vendor's reasoning: Gemini reads nothing from unsigned thoughts
            parts.append({"text": part.text, "thought": True, "thoughtSignature": signature})
            continue
        if isinstance(part, TextPart):
            if not part.text:
                continue
            out: dict[str, Any] = {"text": part.text}
        else:
            out = image_to_gemini(part)
        if pending:
            out["thoughtSignature"], pending = pending, None
        parts.append(out)
    for i, call in enumerate(message.tool_calls):
        fc: dict[str, Any] = {"name": call.name, "args": _parse_args(call.arguments)}
        if _echo_id(call.id):
            fc["id"] = call.id
        out = {"functionCall": fc}
        if pending:
            out["thoughtSignature"], pending = pending, None
        elif i == 0:
            out["thoughtSignature"] = SKIP_SIGNATURE
        parts.append(out)
    return parts


def _tool_result_parts(message: Message, call_names: dict[str, str]) -> list[dict[str, Any]]:
    call_id = message.tool_call_id or ""
    name = call_names.get(call_id)
    if name is None:
        raise ProviderError(
            f"tool message answers tool_call_id '{call_id}', but no earlier assistant message made that call",
            status=400,
            kind="invalid_request",
            param="messages",
        )
    key = "error" if message.is_error else "output"
    response: dict[str, Any] = {"name": name, "response": {key: message.text()}}
    if _echo_id(call_id):
        response["id"] = call_id
    images = [image_to_gemini(p) for p in message.content if isinstance(p, ImagePart)]
    return [{"functionResponse": response}, *images]


def messages_to_gemini(
    messages: list[Message],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Return (systemInstruction parts, contents); consecutive same-role turns are merged."""
    system: list[dict[str, Any]] = []
    contents: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for message in messages:
        if message.role == "system":
            system.extend({"text": p.text} for p in message.content if isinstance(p, TextPart) and p.text)
            continue
        if message.role == "assistant":
            role, parts = "model", _model_parts(message)
            call_names.update((c.id, c.name) for c in message.tool_calls)
        elif message.role == "tool":
            role, parts = "user", _tool_result_parts(message, call_names)
        else:
            role, parts = "user", _user_parts(message)
        if not parts:
            continue
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})
    return system, contents


def tool_to_gemini(tool: Tool) -> dict[str, Any]:
    # parametersJsonSchema takes full JSON Schema ($ref, anyOf, additionalProperties...), unlike the
    # OpenAPI subset that `parameters` accepts.
    out: dict[str, Any] = {"name": tool.name, "parametersJsonSchema": tool.parameters}
    if tool.description:
        out["description"] = tool.description
    return out


def tool_choice_to_gemini(choice: ToolChoice) -> dict[str, Any]:
    if choice.mode == "none":
        return {"mode": "NONE"}
    if choice.mode == "required":
        return {"mode": "ANY"}
    if choice.mode == "tool":
        return {"mode": "ANY", "allowedFunctionNames": [choice.name or ""]}
    return {"mode": "AUTO"}


def _thinking_config(request: ChatRequest) -> dict[str, Any] | None:
    thinking = request.thinking
    if thinking and thinking.get("type") == "enabled":
        config: dict[str, Any] = {"includeThoughts": True}
        if isinstance(thinking.get("budget_tokens"), int):
            config["thinkingBudget"] = thinking["budget_tokens"]
        return config
    if request.reasoning_effort in _EFFORT_BUDGET:
        return {"thinkingBudget": _EFFORT_BUDGET[request.reasoning_effort]}
    return None


def generation_config(request: ChatRequest) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for key, value in (
        ("temperature", request.temperature),
        ("topP", request.top_p),
        ("topK", request.top_k),
        ("maxOutputTokens", request.max_tokens),
        ("seed", request.seed),
    ):
        if value is not None:
            config[key] = value
    if request.stop:
        config["stopSequences"] = list(request.stop)
    if request.n != 1:
        config["candidateCount"] = request.n
    rf = request.response_format
    if rf is not None and rf.type != "text":
        config["responseMimeType"] = "application/json"
        if rf.type == "json_schema" and rf.schema is not None:
            config["responseJsonSchema"] = rf.schema
    thinking = _thinking_config(request)
    if thinking is not None:
        config["thinkingConfig"] = thinking
    return config


def request_to_gemini(request: ChatRequest) -> dict[str, Any]:
    system, contents = messages_to_gemini(request.messages)
    body: dict[str, Any] = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    if request.tools:
        body["tools"] = [{"functionDeclarations": [tool_to_gemini(t) for t in request.tools]}]
    if request.tool_choice is not None:
        body["toolConfig"] = {"functionCallingConfig": tool_choice_to_gemini(request.tool_choice)}
    config = generation_config(request)
    if config:
        body["generationConfig"] = config
    return body


# --- Gemini -> canonical ---------------------------------------------------------------------


class _CallIds:
    """Synthesizes tool call ids for one response: `call_<token>_<n>`, unique across turns."""

    def __init__(self) -> None:
        self._token = uuid.uuid4().hex[:12]
        self._n = 0

    def get(self, given: Any) -> str:
        if isinstance(given, str) and given:
            return given
        call_id = f"{SYNTHETIC_ID_PREFIX}{self._token}_{self._n}"
        self._n += 1
        return call_id


def finish_from_gemini(reason: str | None, has_tool_calls: bool) -> FinishReason:
    if reason in _CONTENT_FILTER:
        return "content_filter"
    if reason == "MAX_TOKENS":
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


def usage_from_gemini(meta: Any) -> Usage | None:
    """promptTokenCount already includes cached tokens; output counts candidates plus thoughts."""
    if not isinstance(meta, dict):
        return None
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    return Usage(
        input_tokens=int(meta.get("promptTokenCount") or 0) + int(meta.get("toolUsePromptTokenCount") or 0),
        output_tokens=int(meta.get("candidatesTokenCount") or 0) + thoughts,
        cached_input_tokens=int(meta.get("cachedContentTokenCount") or 0),
        reasoning_tokens=thoughts,
    )


def _tool_call(part: dict[str, Any], ids: _CallIds) -> ToolCall:
    fc = part["functionCall"]
    return ToolCall(
        id=ids.get(fc.get("id")),
        name=str(fc.get("name") or ""),
        arguments=orjson.dumps(fc.get("args") or {}).decode(),
    )


def _append_text(content: list[ContentPart], text: str) -> None:
    if content and isinstance(content[-1], TextPart):
        content[-1].text += text
    else:
        content.append(TextPart(text))


def message_from_gemini(parts: list[dict[str, Any]], ids: _CallIds) -> Message:
    content: list[ContentPart] = []
    calls: list[ToolCall] = []
    call_signature: str | None = None
    for part in parts:
        signature = _wrap_signature(part.get("thoughtSignature"))
        if "functionCall" in part:
            calls.append(_tool_call(part, ids))
            call_signature = call_signature or signature
        elif part.get("thought"):
            content.append(ThinkingPart(text=str(part.get("text") or ""), signature=signature))
        elif "text" in part:
            if signature:
                content.append(ThinkingPart(text="", signature=signature))
                content.append(TextPart(str(part["text"])))
            else:
                _append_text(content, str(part["text"]))
        elif "inlineData" in part:
            data = part["inlineData"]
            content.append(ImagePart(data=data.get("data"), media_type=data.get("mimeType")))
    if call_signature:
        content.append(ThinkingPart(text="", signature=call_signature))
    return Message(role="assistant", content=content, tool_calls=calls)


def _candidate_parts(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    parts = (candidate.get("content") or {}).get("parts") or []
    return [p for p in parts if isinstance(p, dict)]


def _blocked(data: dict[str, Any]) -> bool:
    return bool((data.get("promptFeedback") or {}).get("blockReason"))


def response_from_gemini(data: Any, request: ChatRequest, upstream_model: str) -> ChatResponse:
    if not isinstance(data, dict):
        raise ProviderError("upstream response is not a JSON object", kind="bad_upstream_response")
    ids = _CallIds()
    choices: list[ChatChoice] = []
    for position, candidate in enumerate(data.get("candidates") or []):
        message = message_from_gemini(_candidate_parts(candidate), ids)
        finish = finish_from_gemini(candidate.get("finishReason"), bool(message.tool_calls))
        choices.append(ChatChoice(int(candidate.get("index", position)), message, finish))
    if not choices:
        # No candidates: the prompt was blocked (promptFeedback.blockReason) or filtered outright.
        choices = [ChatChoice(i, Message(role="assistant"), "content_filter") for i in range(request.n)]
    choices.sort(key=lambda c: c.index)
    usage = usage_from_gemini(data.get("usageMetadata"))
    if usage is None:
        output = sum(estimate_text_tokens(c.message.text()) for c in choices)
        usage = Usage(estimate_prompt_tokens(request), output, estimated=True)
    return ChatResponse(
        id=f"chatcmpl-{data.get('responseId') or uuid.uuid4().hex[:24]}",
        model=str(data.get("modelVersion") or upstream_model),
        created=int(time.time()),
        choices=choices,
        usage=usage,
    )


# --- streaming -------------------------------------------------------------------------------


def _stream_error(error: Any) -> ProviderError:
    """An error object sent inside the SSE body after the stream started."""
    if not isinstance(error, dict):
        return ProviderError(f"upstream stream failed: {error}", retryable=True)
    code = error.get("code")
    message = f"upstream stream failed: {error.get('message') or error.get('status') or 'unknown error'}"
    return classify_status(code if isinstance(code, int) else 500, message)


@dataclass(slots=True)
class _StreamState:
    """Turns GenerateContentResponse chunks into canonical events, one candidate index at a time."""

    request: ChatRequest
    ids: _CallIds = field(default_factory=_CallIds)
    tool_counts: dict[int, int] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    usage: Usage | None = None
    blocked: bool = False
    output_chars: int = 0

    def feed(self, chunk: dict[str, Any]) -> Iterator[StreamEvent]:
        if "error" in chunk:
            raise _stream_error(chunk["error"])
        self.usage = usage_from_gemini(chunk.get("usageMetadata")) or self.usage
        self.blocked = self.blocked or _blocked(chunk)
        for position, candidate in enumerate(chunk.get("candidates") or []):
            index = int(candidate.get("index", position))
            for part in _candidate_parts(candidate):
                yield from self._part(part, index)
            reason = candidate.get("finishReason")
            if reason and index not in self.finished:
                self.finished.add(index)
                yield FinishEvent(finish_from_gemini(reason, index in self.tool_counts), index=index)

    def _part(self, part: dict[str, Any], index: int) -> Iterator[StreamEvent]:
        signature = _wrap_signature(part.get("thoughtSignature"))
        text = str(part.get("text") or "")
        self.output_chars += len(text)
        if "functionCall" in part:
            call = _tool_call(part, self.ids)
            self.output_chars += len(call.arguments)
            if signature:
                yield ThinkingDelta(signature=signature, index=index)
            n = self.tool_counts.get(index, 0)
            self.tool_counts[index] = n + 1
            yield ToolCallDelta(n, call.arguments, id=call.id, name=call.name, index=index)
        elif part.get("thought"):
            yield ThinkingDelta(text=text, signature=signature, index=index)
        elif "text" in part:
            if signature:
                yield ThinkingDelta(signature=signature, index=index)
            if text:
                yield TextDelta(text, index=index)

    def close(self) -> Iterator[StreamEvent]:
        for index in range(self.request.n):
            if index not in self.finished:
                reason: FinishReason = "content_filter" if self.blocked else "stop"
                if index in self.tool_counts and not self.blocked:
                    reason = "tool_calls"
                yield FinishEvent(reason, index=index)
        usage = self.usage
        if usage is None:
            output = (self.output_chars + 3) // 4
            usage = Usage(estimate_prompt_tokens(self.request), output, estimated=True)
        yield UsageEvent(usage)


async def _events(resp: UpstreamStream, request: ChatRequest) -> AsyncIterator[StreamEvent]:
    state = _StreamState(request)
    async for _event, data in iter_sse(resp):
        if data.strip() == b"[DONE]":
            break
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProviderError(
                "upstream sent invalid JSON in its stream", kind="bad_upstream_response"
            ) from None
        if isinstance(chunk, list):  # some proxies send a JSON array per event
            chunk = chunk[0] if chunk else {}
        if isinstance(chunk, dict):
            for event in state.feed(chunk):
                yield event
    for event in state.close():
        yield event


# --- the provider ----------------------------------------------------------------------------


def _auth_fault(exc: ProviderError) -> ProviderError:
    """Gemini answers a bad API key with 400 INVALID_ARGUMENT; that is the operator's fault, not the caller's."""
    if exc.status == 400 and "API key" in exc.message:
        fixed = ProviderError(exc.message, status=502, kind="upstream_auth")
        fixed.deployment = exc.deployment
        return fixed
    return exc


def _model_path(upstream_model: str) -> str:
    """`gemini-2.5-flash` -> `models/gemini-2.5-flash`; `tunedModels/x` and `models/x` stay as they are."""
    return upstream_model if "/" in upstream_model else f"models/{upstream_model}"


class GeminiProvider(Provider):
    type_name = "gemini"
    supports_n = True  # generationConfig.candidateCount

    def __init__(self, deployment: DeploymentConfig, http: HttpClient, *, name: str) -> None:
        super().__init__(deployment, http, name=name)
        base = (self.deployment.base_url or DEFAULT_BASE_URL).rstrip("/")
        # Accept a base URL given with or without the API version.
        self._root = base if base.rsplit("/", 1)[-1].startswith("v1") else f"{base}/{API_VERSION}"
        headers = {"content-type": "application/json"}
        headers.update({k: v.get_secret_value() for k, v in self.deployment.headers.items()})
        if self.deployment.api_key is not None:
            headers["x-goog-api-key"] = self.deployment.api_key.get_secret_value()
        self._headers = headers

    def _url(self, upstream_model: str, method: str) -> str:
        return f"{self._root}/{_model_path(upstream_model)}:{method}"

    async def _post(self, url: str, body: dict[str, Any]) -> UpstreamResponse:
        d = self.deployment
        try:
            return await self.http.post(
                url,
                orjson.dumps(body),
                self._headers,
                timeout_s=d.timeout_s,
                connect_timeout_s=d.connect_timeout_s,
            )
        except ProviderError as exc:
            raise _auth_fault(exc) from None

    async def chat(self, request: ChatRequest, upstream_model: str) -> ChatResponse:
        body = request_to_gemini(request)
        resp = await self._post(self._url(upstream_model, "generateContent"), body)
        return response_from_gemini(resp.json(), request, upstream_model)

    async def stream_chat(self, request: ChatRequest, upstream_model: str) -> ChatStream:
        body = orjson.dumps(request_to_gemini(request))
        url = self._url(upstream_model, "streamGenerateContent") + "?alt=sse"
        d = self.deployment
        try:
            resp = await self.http.open_stream(
                url,
                body,
                self._headers,
                connect_timeout_s=d.connect_timeout_s,
                read_timeout_s=d.read_timeout_s,
            )
        except ProviderError as exc:
            raise _auth_fault(exc) from None
        return ChatStream(events=_events(resp, request), model=upstream_model)

    async def embed(self, request: EmbeddingRequest, upstream_model: str) -> EmbeddingResponse:
        dimensions = (
            request.dimensions if request.dimensions is not None else self.deployment.embedding_dimensions
        )
        url = self._url(upstream_model, "batchEmbedContents")
        vectors: list[list[float]] = []
        for start in range(0, len(request.inputs), EMBED_BATCH):
            batch = request.inputs[start : start + EMBED_BATCH]
            body = {"requests": [_embed_request(upstream_model, text, dimensions) for text in batch]}
            vectors.extend(_vectors(await self._post(url, body), len(batch)))
        # Gemini reports no token usage for embeddings.
        tokens = sum(estimate_text_tokens(text) for text in request.inputs)
        return EmbeddingResponse(model=upstream_model, vectors=vectors, usage=Usage(tokens, estimated=True))


def _embed_request(upstream_model: str, text: str, dimensions: int | None) -> dict[str, Any]:
    item: dict[str, Any] = {"model": _model_path(upstream_model), "content": {"parts": [{"text": text}]}}
    if dimensions is not None:
        item["outputDimensionality"] = dimensions
    return item


def _vectors(resp: UpstreamResponse, expected: int) -> list[list[float]]:
    data = resp.json()
    embeddings = data.get("embeddings") if isinstance(data, dict) else None
    if not isinstance(embeddings, list) or len(embeddings) != expected:
        raise ProviderError(
            f"upstream returned {len(embeddings) if isinstance(embeddings, list) else 'no'} embeddings "
            f"for {expected} inputs",
            kind="bad_upstream_response",
        )
    return [[float(x) for x in (e.get("values") or [])] for e in embeddings]
