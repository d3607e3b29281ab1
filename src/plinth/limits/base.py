"""What a limiter backend sees: the scopes a request must fit in, and why one refused it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

WINDOW_S = 60.0  # requests/min and tokens/min are counted over a sliding 60-second window
LEASE_S = 30.0  # a concurrency slot not renewed for this long is free again (crashed process)

RefusalKind = Literal["requests", "tokens", "concurrency", "too_large"]


@dataclass(frozen=True, slots=True)
class Scope:
    """One set of counters a request is charged to: a key, a team or a model alias."""

    id: str  # storage name: "k:<key id>", "t:<team id>", "m:<model alias>"
    label: str  # for people: "key 'ci'", "team 'payments'", "model 'gpt-4o-mini'"
    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a backend refused, with the refusing scope's numbers for the x-ratelimit-* headers."""

    index: int  # position of the refusing scope in the list given to `acquire`
    kind: RefusalKind
    retry_after_s: float  # until the request could fit (concurrency: a guess, slots free unpredictably)
    requests_used: int = 0
    requests_reset_s: float = 0.0  # until the requests window is empty again
    tokens_used: int = 0
    tokens_reset_s: float = 0.0


class Backend(Protocol):
    """Where the counters live: this process's memory, or Redis shared by every process."""

    async def acquire(self, lease: str, scopes: Sequence[Scope], tokens: int) -> Refusal | None:
        """Check every scope and, only if all fit, count the request in each (all or nothing).

        `lease` names this request's entries; `tokens` is its tokens/min reservation."""

    def release(self, lease: str, scopes: Sequence[Scope], tokens: int) -> None:
        """The request is over: replace its token reservation with `tokens` used (0: drop it) and
        free its concurrency slots. Synchronous, cheap and never raising (called from `settle`)."""

    async def renew(self, leases: Sequence[tuple[str, Sequence[Scope]]]) -> None:
        """Extend the concurrency leases of requests still running."""

    async def aclose(self) -> None:
        """Finish pending releases and close connections."""
