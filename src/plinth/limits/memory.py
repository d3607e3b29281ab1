"""In-process limit counters: exact for one process, and nothing to run beside it.

The algorithm is the Redis one (a sliding log per scope) kept in dictionaries. Everything happens
without an await, and under a lock for callers on other threads, so a check-and-count is atomic.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from plinth.limits.base import LEASE_S, WINDOW_S, Refusal, RefusalKind, Scope


class _Counters:
    """One scope's state: admitted request times, token entries and concurrency leases."""

    __slots__ = ("leases", "requests", "token_sum", "tokens")

    def __init__(self) -> None:
        self.requests: deque[float] = deque()  # admission times, oldest first
        self.tokens: OrderedDict[str, tuple[float, int]] = OrderedDict()  # lease -> (time, tokens)
        self.token_sum = 0
        self.leases: dict[str, float] = {}  # lease -> expiry time


class InProcessBackend:
    """Exact limits for a single process (`plinth serve` with one worker and no Redis)."""

    def __init__(
        self,
        *,
        window_s: float = WINDOW_S,
        lease_s: float = LEASE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.lease_s = lease_s
        self.clock = clock
        self._scopes: dict[str, _Counters] = {}
        self._lock = threading.Lock()

    def _purge(self, c: _Counters, now: float) -> None:
        cutoff = now - self.window_s
        requests = c.requests
        while requests and requests[0] <= cutoff:
            requests.popleft()
        tokens = c.tokens
        while tokens:
            lease, (at, n) = next(iter(tokens.items()))
            if at > cutoff:
                break
            del tokens[lease]
            c.token_sum -= n
        if c.leases:
            for lease in [lease for lease, until in c.leases.items() if until <= now]:
                del c.leases[lease]

    async def acquire(self, lease: str, scopes: Sequence[Scope], tokens: int) -> Refusal | None:
        return self.acquire_now(lease, scopes, tokens)

    def acquire_now(self, lease: str, scopes: Sequence[Scope], tokens: int) -> Refusal | None:
        with self._lock:
            now = self.clock()
            counters = [self._scopes.get(s.id) or self._scopes.setdefault(s.id, _Counters()) for s in scopes]
            for index, (scope, c) in enumerate(zip(scopes, counters, strict=True)):
                self._purge(c, now)
                if scope.rpm is not None and len(c.requests) >= scope.rpm:
                    # Free once the entry that puts us at the limit leaves the window.
                    at = c.requests[len(c.requests) - scope.rpm]
                    return self._refusal(index, "requests", at + self.window_s - now, scope, c, now)
                if scope.tpm is not None:
                    if tokens > scope.tpm:
                        return self._refusal(index, "too_large", 0.0, scope, c, now)
                    if c.token_sum + tokens > scope.tpm:
                        retry = self._tokens_free_in(c, scope.tpm, tokens, now)
                        return self._refusal(index, "tokens", retry, scope, c, now)
                if scope.max_concurrency is not None and len(c.leases) >= scope.max_concurrency:
                    return self._refusal(index, "concurrency", 1.0, scope, c, now)
            for scope, c in zip(scopes, counters, strict=True):
                if scope.rpm is not None:
                    c.requests.append(now)
                if scope.tpm is not None:
                    c.tokens[lease] = (now, tokens)
                    c.token_sum += tokens
                if scope.max_concurrency is not None:
                    c.leases[lease] = now + self.lease_s
            return None

    def _tokens_free_in(self, c: _Counters, limit: int, need: int, now: float) -> float:
        freed = 0
        for at, n in c.tokens.values():
            freed += n
            if c.token_sum - freed + need <= limit:
                return at + self.window_s - now
        return self.window_s

    def _refusal(
        self, index: int, kind: RefusalKind, retry: float, scope: Scope, c: _Counters, now: float
    ) -> Refusal:
        requests_reset = c.requests[-1] + self.window_s - now if c.requests else 0.0
        tokens_reset = next(reversed(c.tokens.values()))[0] + self.window_s - now if c.tokens else 0.0
        return Refusal(
            index, kind, max(0.0, retry), len(c.requests), requests_reset, c.token_sum, tokens_reset
        )

    def release(self, lease: str, scopes: Sequence[Scope], tokens: int) -> None:
        with self._lock:
            now = self.clock()
            for scope in scopes:
                c = self._scopes.get(scope.id)
                if c is None:
                    continue
                if scope.tpm is not None:
                    old = c.tokens.pop(lease, None)
                    if old is not None:
                        c.token_sum -= old[1]
                    if tokens > 0:  # counted from now: the tokens were spent when the answer ended
                        c.tokens[lease] = (now, tokens)
                        c.token_sum += tokens
                if scope.max_concurrency is not None:
                    c.leases.pop(lease, None)

    async def renew(self, leases: Sequence[tuple[str, Sequence[Scope]]]) -> None:
        with self._lock:
            until = self.clock() + self.lease_s
            for lease, scopes in leases:
                for scope in scopes:
                    c = self._scopes.get(scope.id)
                    if c is not None and lease in c.leases:
                        c.leases[lease] = until

    async def aclose(self) -> None:
        return None
