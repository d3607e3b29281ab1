"""What a limiter backend sees: the scopes a request must fit in, and why one refused it.

Requests/min and tokens/min are counted in one-second buckets. A request counts in the bucket of
the second it was admitted in, and that bucket leaves the window `WINDOW_S + 1` seconds after the
second began, so an admitted request is counted for at least 60 and at most 61 seconds: no 60-second
span ever holds more than the limit, and the state per scope is at most 61 numbers whatever the
request rate (a log of every request, as an exact sliding log keeps, grows with the traffic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

WINDOW_S = 60  # requests/min and tokens/min are counted over a sliding window of this many seconds
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


@dataclass(frozen=True, slots=True)
class Grant:
    """An admission: where its reservation was counted, and every scope's use for the headers."""

    second: int  # the bucket holding this request's tokens reservation (given back to `release`)
    reset_s: float  # until that bucket leaves the window (then every counter is back to zero)
    used: tuple[tuple[int, int], ...]  # per scope: (requests, tokens) counted, this request included


class Backend(Protocol):
    """Where the counters live: this process's memory, or Redis shared by every process."""

    async def acquire(self, lease: str, scopes: Sequence[Scope], tokens: int) -> Grant | Refusal:
        """Check every scope and, only if all fit, count the request in each (all or nothing).

        `lease` names this request's concurrency slots; `tokens` is its tokens/min reservation."""

    def release(self, lease: str, scopes: Sequence[Scope], reserved: int, second: int, used: int) -> None:
        """The request is over: take its `reserved` tokens out of bucket `second` (if still in the
        window), count the `used` tokens now, and free its concurrency slots. Synchronous, cheap and
        never raising (called from `settle`)."""

    async def renew(self, leases: Sequence[tuple[str, Sequence[Scope]]]) -> None:
        """Extend the concurrency leases of requests still running."""

    async def aclose(self) -> None:
        """Finish pending releases and close connections."""


def bucket_of(now: float) -> int:
    return math.floor(now)


__all__ = ["LEASE_S", "WINDOW_S", "Backend", "Grant", "Refusal", "RefusalKind", "Scope", "bucket_of"]
