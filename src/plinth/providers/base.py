"""What a provider is: a translator between the canonical model and one upstream API.

A provider instance serves one deployment (one upstream model with its credentials). It raises
`ProviderError` for every upstream failure, classified so the router knows whether another attempt,
on this deployment or another, can help.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from plinth.providers.types import (
    ChatRequest,
    ChatResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    StreamEvent,
)

if TYPE_CHECKING:
    from plinth.config.schema import DeploymentConfig
    from plinth.providers.http import HttpClient


class ProviderError(Exception):
    """An upstream failure.

    `status` is what the caller should see (upstream 4xx caused by the request pass through; upstream
    auth and server faults become 502). `retryable` is true for 429, 5xx, connect and read timeouts:
    the same or another deployment may succeed later. `fallback` is true when this deployment cannot
    serve the request at all (bad credentials, unknown upstream model) but another one might.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 502,
        retryable: bool = False,
        fallback: bool | None = None,
        retry_after: float | None = None,
        kind: str = "upstream_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retryable = retryable
        self.fallback = retryable if fallback is None else fallback
        self.retry_after = retry_after
        self.kind = kind
        self.param = param
        self.deployment: str | None = None


class UnsupportedOperation(ProviderError):
    def __init__(self, message: str) -> None:
        super().__init__(message, status=400, kind="unsupported")


@dataclass(slots=True)
class ChatStream:
    """An open upstream stream: metadata known at start plus the event iterator."""

    events: AsyncIterator[StreamEvent]
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex[:24]}")
    model: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    async def aclose(self) -> None:
        aclose = getattr(self.events, "aclose", None)
        if aclose is not None:
            await aclose()


def classify_status(status: int, message: str, retry_after: float | None = None) -> ProviderError:
    """Map an upstream HTTP status to a ProviderError."""
    if status == 429:
        return ProviderError(message, status=429, retryable=True, retry_after=retry_after, kind="rate_limit")
    if status in (408, 409) or status >= 500:
        return ProviderError(
            message, status=502, retryable=True, retry_after=retry_after, kind="server_error"
        )
    if status in (401, 403):
        # The deployment's credentials are wrong: the operator's fault, not the caller's.
        return ProviderError(message, status=502, kind="upstream_auth", fallback=True)
    if status == 404:
        return ProviderError(message, status=502, kind="upstream_not_found", fallback=True)
    if status == 413:
        return ProviderError(message, status=413, kind="invalid_request")
    return ProviderError(message, status=400 if status < 500 else 502, kind="invalid_request")


class Provider(ABC):  # noqa: B024 - every operation is optional; a provider implements what it can
    """Base class. Subclasses implement what their upstream supports."""

    #: The `provider:` value in the config that selects this class.
    type_name: str = ""
    #: The upstream understands n > 1; otherwise the router fans out n single requests.
    supports_n: bool = True

    def __init__(self, deployment: DeploymentConfig, http: HttpClient, *, name: str) -> None:
        self.deployment = deployment
        self.http = http
        self.name = name

    async def chat(self, request: ChatRequest, upstream_model: str) -> ChatResponse:
        raise UnsupportedOperation(f"deployment '{self.name}' does not support chat completions")

    async def stream_chat(self, request: ChatRequest, upstream_model: str) -> ChatStream:
        """Open a stream. Must raise before returning if the upstream refused the request."""
        raise UnsupportedOperation(f"deployment '{self.name}' does not support chat completions")

    async def embed(self, request: EmbeddingRequest, upstream_model: str) -> EmbeddingResponse:
        raise UnsupportedOperation(f"deployment '{self.name}' does not support embeddings")

    async def aclose(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release resources held by the provider (models, sessions)."""
