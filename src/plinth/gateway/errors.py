"""The gateway's error type. Each inbound protocol renders it in its own error shape."""

from __future__ import annotations

from plinth.providers.base import ProviderError

# OpenAI error "type" per HTTP status; Anthropic has its own table in anthropic_protocol.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


class GatewayError(Exception):
    """A request that Plinth answers with an error. `message` is safe to show the caller."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _OPENAI_TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.param = param
        self.code = code
        self.retry_after = retry_after
        self.headers = headers or {}

    @classmethod
    def from_provider(cls, exc: ProviderError) -> GatewayError:
        where = f" (deployment {exc.deployment})" if exc.deployment else ""
        return cls(
            exc.status,
            exc.message + where if exc.status >= 500 or exc.status == 429 else exc.message,
            param=exc.param,
            code=exc.kind,
            retry_after=exc.retry_after,
        )

    def openai_body(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
