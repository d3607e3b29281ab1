"""In-process limit counters: exact for one process, and nothing to run beside it.

The algorithm is the Redis one (per-second buckets per scope, see `plinth.limits.base`) kept in
dictionaries. Everything happens without an await, and under a lock for callers on other threads,
so a check-and-count is atomic.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from plinth.limits.base import LEASE_S, WINDOW_S, Grant, Refusal, RefusalKind, Scope, bucket_of


class Buckets:
    """Amounts per second, oldest first, and their sum. At most `window + 1` entries."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        # Seconds only ever arrive in increasing order (a monotonic clock), so the dict's insertion
        # order is time order and purging pops from the front.
        self.counts: dict[int, int] = {}
        self.total = 0

    def purge(self, oldest: int) -> None:
        """Drop the buckets of seconds before `oldest`."""
        counts = self.counts
        while counts:
            second = next(iter(counts))
            if second >= oldest:
                return
            self.total -= counts.pop(second)

    def add(self, second: int, amount: int) -> None:
        self.counts[second] = self.counts.get(second, 0) + amount
        self.total += amount

    def take_back(self, second: int, amount: int) -> None:
        """Remove an earlier reservation, if its bucket is still in the window."""
        if second in self.counts:
            amount = min(amount, self.counts[second])
            self.counts[second] -= amount
            self.total -= amount

    def free_in(self, excess: int, now: float, window: int) -> float:
        """Seconds until `excess` of the amount has left the window (oldest buckets leave first)."""
        freed = 0
        for second, amount in self.counts.items():
            freed += amount
            if freed >= excess:
                return second + window + 1 - now
        return float(window + 1)

    def reset_in(self, now: float, window: int) -> float:
        """Seconds until every bucket has left the window."""
        for second in reversed(self.counts):
            return second + window + 1 - now
        return 0.0


class _Counters:
    """One scope's state: requests and tokens per second, and concurrency leases."""

    __slots__ = ("leases", "requests", "tokens")

    def __init__(self) -> None:
        self.requests = Buckets()
        self.tokens = Buckets()
        self.leases: dict[str, float] = {}  # lease -> expiry time; bounded by the concurrency limit


class InProcessBackend:
    """Exact limits for a single process (`plinth serve` with one worker and no Redis)."""

    def __init__(
        self,
        *,
        window_s: int = WINDOW_S,
        lease_s: float = LEASE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = int(window_s)
        self.lease_s = lease_s
        self.clock = clock
        self._scopes: dict[str, _Counters] = {}
        self._lock = threading.Lock()

    def _purge(self, c: _Counters, now: float, oldest: int) -> None:
        c.requests.purge(oldest)
        c.tokens.purge(oldest)
        if c.leases:
            for lease in [lease for lease, until in c.leases.items() if until <= now]:
                del c.leases[lease]

    async def acquire(self, lease: str, scopes: Sequence[Scope], tokens: int) -> Grant | Refusal:
        return self.acquire_now(lease, scopes, tokens)

    def acquire_now(self, lease: str, scopes: Sequence[Scope], tokens: int) -> Grant | Refusal:
        with self._lock:
            now = self.clock()
            second = bucket_of(now)
            oldest = second - self.window
            counters = [self._scopes.get(s.id) or self._scopes.setdefault(s.id, _Counters()) for s in scopes]
            for index, (scope, c) in enumerate(zip(scopes, counters, strict=True)):
                self._purge(c, now, oldest)
                if scope.rpm is not None and c.requests.total >= scope.rpm:
                    retry = c.requests.free_in(c.requests.total - scope.rpm + 1, now, self.window)
                    return self._refusal(index, "requests", retry, c, now)
                if scope.tpm is not None:
                    if tokens > scope.tpm:
                        return self._refusal(index, "too_large", 0.0, c, now)
                    if c.tokens.total + tokens > scope.tpm:
                        retry = c.tokens.free_in(c.tokens.total + tokens - scope.tpm, now, self.window)
                        return self._refusal(index, "tokens", retry, c, now)
                if scope.max_concurrency is not None and len(c.leases) >= scope.max_concurrency:
                    return self._refusal(index, "concurrency", 1.0, c, now)
            used: list[tuple[int, int]] = []
            for scope, c in zip(scopes, counters, strict=True):
                if scope.rpm is not None:
                    c.requests.add(second, 1)
                if scope.tpm is not None:
                    c.tokens.add(second, tokens)
                if scope.max_concurrency is not None:
                    c.leases[lease] = now + self.lease_s
                used.append((c.requests.total, c.tokens.total))
            return Grant(second, second + self.window + 1 - now, tuple(used))

    def _refusal(self, index: int, kind: RefusalKind, retry: float, c: _Counters, now: float) -> Refusal:
        return Refusal(
            index,
            kind,
            max(0.0, retry),
            c.requests.total,
            c.requests.reset_in(now, self.window),
            c.tokens.total,
            c.tokens.reset_in(now, self.window),
        )

    def release(self, lease: str, scopes: Sequence[Scope], reserved: int, second: int, used: int) -> None:
        with self._lock:
            now = self.clock()
            for scope in scopes:
                c = self._scopes.get(scope.id)
                if c is None:
                    continue
                if scope.tpm is not None:
                    c.tokens.take_back(second, reserved)
                    if used > 0:  # counted from now: the tokens were spent when the answer ended
                        c.tokens.add(bucket_of(now), used)
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
