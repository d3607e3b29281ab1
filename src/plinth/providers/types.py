"""Plinth's canonical chat and embedding model.

Every inbound protocol (OpenAI, Anthropic) decodes into these types and every provider encodes from
them, so N protocols and M providers need N + M translators instead of N x M. They are plain slotted
dataclasses: they sit on the hot path and are built once per request, so they must be cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]

# Canonical finish reasons. OpenAI's names, because most protocols map onto them without loss;
# a stop-sequence stop is "stop" with ChatChoice.stop_sequence set.
FinishReason = Literal["stop", "length", "tool_calls", "content_filter"]


@dataclass(slots=True)
class TextPart:
    text: str
    # Anthropic prompt-caching marker ({"type": "ephemeral"}), carried through to providers that use it.
    cache_control: dict[str, Any] | None = None


@dataclass(slots=True)
class ImagePart:
    """An image, either by URL or inline. `data` is base64 (no data: prefix) when inline."""

    url: str | None = None
    data: str | None = None
    media_type: str | None = None
    detail: str | None = None

    @classmethod
    def from_url(cls, url: str, detail: str | None = None) -> ImagePart:
        """Split a data: URL into media type and base64 data; keep other URLs as they are."""
        if url.startswith("data:"):
            header, _, payload = url.partition(",")
            media_type = header[5:].split(";", 1)[0] or "application/octet-stream"
            return cls(data=payload, media_type=media_type, detail=detail)
        return cls(url=url, detail=detail)

    def as_url(self) -> str:
        if self.url is not None:
            return self.url
        return f"data:{self.media_type or 'image/png'};base64,{self.data or ''}"


@dataclass(slots=True)
class ThinkingPart:
    """Model reasoning that a protocol exposes (Anthropic thinking blocks, Gemini thoughts)."""

    text: str
    signature: str | None = None
    redacted: bool = False


ContentPart = TextPart | ImagePart | ThinkingPart


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model produced it


@dataclass(slots=True)
class Message:
    role: Role
    content: list[ContentPart] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None  # role == "tool": which call this answers
    is_error: bool = False  # role == "tool": the tool failed (Anthropic's is_error)
    name: str | None = None
    refusal: str | None = None

    def text(self) -> str:
        return "".join(p.text for p in self.content if isinstance(p, TextPart))


@dataclass(slots=True)
class Tool:
    name: str
    description: str | None = None
    parameters: dict[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = None


@dataclass(slots=True)
class ToolChoice:
    """auto: model decides; none: no tools; required: some tool; tool: the named one."""

    mode: Literal["auto", "none", "required", "tool"] = "auto"
    name: str | None = None


@dataclass(slots=True)
class ResponseFormat:
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


@dataclass(slots=True)
class ChatRequest:
    model: str
    messages: list[Message]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    seed: int | None = None
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    stream: bool = False
    # The client asked for a usage chunk at the end of the stream. Plinth always meters streams;
    # this only decides whether the caller sees the usage chunk.
    include_usage: bool = False
    user: str | None = None
    # Anthropic extended thinking: {"type": "enabled", "budget_tokens": N}
    thinking: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    # Fields of the inbound protocol that have no canonical meaning; passed through to providers
    # speaking the same protocol family (for example logit_bias to OpenAI-compatible servers).
    extra: dict[str, Any] = field(default_factory=dict)
    # Which inbound protocol produced this request ("openai" or "anthropic").
    protocol: str = "openai"


@dataclass(slots=True)
class Usage:
    """Token usage. input_tokens counts every prompt token, cached ones included."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0  # read from a prompt cache
    cache_creation_input_tokens: int = 0  # written to a prompt cache
    reasoning_tokens: int = 0  # part of output_tokens
    estimated: bool = False  # counted by Plinth because the upstream reported nothing

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: Usage) -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.cache_creation_input_tokens += other.cache_creation_input_tokens
        self.reasoning_tokens += other.reasoning_tokens
        self.estimated = self.estimated or other.estimated


@dataclass(slots=True)
class ChatChoice:
    index: int
    message: Message
    finish_reason: FinishReason = "stop"
    stop_sequence: str | None = None
    logprobs: Any = None


@dataclass(slots=True)
class ChatResponse:
    id: str
    model: str
    created: int
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


# --- Streaming -------------------------------------------------------------------------------
# A provider stream yields these events. Every stream ends with one FinishEvent per choice and
# exactly one UsageEvent (providers estimate usage when the upstream reported none).


@dataclass(slots=True)
class TextDelta:
    text: str
    index: int = 0


@dataclass(slots=True)
class ThinkingDelta:
    text: str = ""
    signature: str | None = None
    index: int = 0


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of a tool call. The first piece of a call carries its id and name."""

    tool_index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None
    index: int = 0


@dataclass(slots=True)
class FinishEvent:
    finish_reason: FinishReason
    stop_sequence: str | None = None
    index: int = 0


@dataclass(slots=True)
class UsageEvent:
    usage: Usage


StreamEvent = TextDelta | ThinkingDelta | ToolCallDelta | FinishEvent | UsageEvent


# --- Embeddings ------------------------------------------------------------------------------


@dataclass(slots=True)
class EmbeddingRequest:
    model: str
    inputs: list[str]
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class EmbeddingResponse:
    model: str
    vectors: list[list[float]]
    usage: Usage
