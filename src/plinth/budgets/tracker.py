"""Spend trackers: per budget window, what is spent and what is reserved by requests in flight.

Amounts are integers in nano-USD (1e-9 USD), so sums are exact in Python, in Redis and in Lua.
Two backends with one contract:

- `LocalSpendTracker`: a dict in this process. Check-and-reserve has no `await` in it, so it is
  atomic on the event loop. Right when one process serves the gateway.
- `RedisSpendTracker`: a hash per window in Redis; one Lua script checks every applicable budget
  and reserves on all of them or none, so several workers and replicas share one exact budget.

A window's spent amount starts from the database (the sum of usage records, via `load_spent`) the
first time it is needed, so a restart, a new worker or a flushed Redis does not reset a budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from plinth.budgets.periods import Window

log = logging.getLogger("plinth.budgets")

NANO = 1_000_000_000  # nano-USD per USD


@dataclass(frozen=True, slots=True)
class Rule:
    """A cached budget definition, in nano-USD."""

    scope: str
    scope_id: str
    period: str
    limit: int
    soft: int | None = None


@dataclass(frozen=True, slots=True)
class Check:
    """One budget applied to one window: the unit that is checked, reserved and settled."""

    rule: Rule
    window: Window
    key: str

    @classmethod
    def of(cls, rule: Rule, window: Window) -> Check:
        return cls(rule, window, f"{rule.scope}:{rule.scope_id}:{rule.period}:{window.start}")


LoadSpent = Callable[[Check], int]  # blocking: runs in a worker thread
OnCrossing = Callable[[Check, str, int], None]  # (check, "soft" | "hard", spent nano-USD)


class SpendTracker(Protocol):
    async def reserve(self, checks: Sequence[Check], amount: int) -> Check | None:
        """Reserve `amount` on every check, or on none; returns the check that refused, if any."""

    def settle(self, held: Sequence[Check], amount: int, charged: Sequence[Check], actual: int) -> None:
        """Release `amount` from `held` and add `actual` to `charged`. Cheap, never blocks."""

    async def snapshot(self, check: Check) -> tuple[int, int, int] | None:
        """(spent, reserved, peak reserved) of a window, None when it is not tracked."""

    def purge(self, now: float) -> None:
        """Forget windows that are over (housekeeping, off the hot path)."""

    async def aclose(self) -> None: ...


def refuses(spent: int, reserved: int, amount: int, limit: int) -> bool:
    """Refuse when the budget is used up, or when this estimate would not fit beside the rest."""
    return spent >= limit or spent + reserved + amount > limit


class _Counter:
    __slots__ = ("alerted", "end", "peak", "reserved", "spent")

    def __init__(self, spent: int, end: int) -> None:
        self.spent = spent
        self.reserved = 0
        self.peak = 0
        self.end = end
        self.alerted: set[str] = set()


class LocalSpendTracker:
    """Budget windows in this process's memory (a single gateway process)."""

    def __init__(self, load_spent: LoadSpent, on_crossing: OnCrossing) -> None:
        self._load_spent = load_spent
        self._on_crossing = on_crossing
        self._counters: dict[str, _Counter] = {}

    async def reserve(self, checks: Sequence[Check], amount: int) -> Check | None:
        counters = self._counters
        for check in checks:
            if check.key not in counters:
                spent = await asyncio.to_thread(self._load_spent, check)
                counters.setdefault(check.key, _Counter(spent, check.window.end))
        # From here on no await: the check and the reservations are one step for the event loop.
        held = [counters[check.key] for check in checks]
        for check, counter in zip(checks, held, strict=True):
            if refuses(counter.spent, counter.reserved, amount, check.rule.limit):
                self._alert(check, counter, "hard")
                return check
        for counter in held:
            counter.reserved += amount
            counter.peak = max(counter.peak, counter.reserved)
        return None

    def settle(self, held: Sequence[Check], amount: int, charged: Sequence[Check], actual: int) -> None:
        counters = self._counters
        for check in held:
            counter = counters.get(check.key)
            if counter is not None:
                counter.reserved = max(0, counter.reserved - amount)
        if actual <= 0:
            return
        for check in charged:
            # A window not loaded yet will read this cost from the usage record when it loads.
            counter = counters.get(check.key)
            if counter is None:
                continue
            counter.spent += actual
            if check.rule.soft is not None and counter.spent >= check.rule.soft:
                self._alert(check, counter, "soft")
            if counter.spent >= check.rule.limit:
                self._alert(check, counter, "hard")

    def _alert(self, check: Check, counter: _Counter, kind: str) -> None:
        if kind not in counter.alerted:
            counter.alerted.add(kind)
            self._on_crossing(check, kind, counter.spent)

    async def snapshot(self, check: Check) -> tuple[int, int, int] | None:
        counter = self._counters.get(check.key)
        return None if counter is None else (counter.spent, counter.reserved, counter.peak)

    def purge(self, now: float) -> None:
        over = [k for k, c in self._counters.items() if c.end <= now and c.reserved == 0]
        for key in over:
            del self._counters[key]

    async def aclose(self) -> None:
        return None


# KEYS: the windows. ARGV: amount, then per window its limit, its base spend ('' = unknown: answer
# {-1, i} so the caller loads it from the database and retries) and its time to live.
_RESERVE = """
local n = #KEYS
local amount = tonumber(ARGV[1])
for i = 1, n do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    local base = ARGV[1 + n + i]
    if base == '' then return {-1, i, 0, 0} end
    redis.call('HSET', KEYS[i], 'spent', base, 'reserved', 0, 'peak', 0)
    redis.call('EXPIRE', KEYS[i], tonumber(ARGV[1 + 2 * n + i]))
  end
end
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  local spent = tonumber(v[1])
  local limit = tonumber(ARGV[1 + i])
  if spent >= limit or spent + tonumber(v[2]) + amount > limit then
    return {0, i, redis.call('HSETNX', KEYS[i], 'hard', 1), v[1]}
  end
end
for i = 1, n do
  local reserved = redis.call('HINCRBY', KEYS[i], 'reserved', amount)
  if reserved > tonumber(redis.call('HGET', KEYS[i], 'peak')) then
    redis.call('HSET', KEYS[i], 'peak', reserved)
  end
end
return {1, 0, 0, 0}
"""

# KEYS: the held windows, then the charged ones. ARGV: number held, amount, actual, then per
# charged window its limit and its soft limit (''). Returns flat triples (index, kind, spent) for
# limits crossed now for the first time in the window (1 soft, 2 hard).
_SETTLE = """
local nh = tonumber(ARGV[1])
local amount = tonumber(ARGV[2])
local actual = tonumber(ARGV[3])
local m = #KEYS - nh
for i = 1, nh do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('HINCRBY', KEYS[i], 'reserved', -amount) < 0 then
      redis.call('HSET', KEYS[i], 'reserved', 0)
    end
  end
end
local out = {}
if actual <= 0 then return out end
for j = 1, m do
  local key = KEYS[nh + j]
  if redis.call('EXISTS', key) == 1 then
    local spent = redis.call('HINCRBY', key, 'spent', actual)
    local soft = ARGV[3 + m + j]
    if soft ~= '' and spent >= tonumber(soft) and redis.call('HSETNX', key, 'soft', 1) == 1 then
      table.insert(out, j); table.insert(out, 1); table.insert(out, spent)
    end
    if spent >= tonumber(ARGV[3 + j]) and redis.call('HSETNX', key, 'hard', 1) == 1 then
      table.insert(out, j); table.insert(out, 2); table.insert(out, spent)
    end
  end
end
return out
"""

_TTL_MARGIN_S = 2 * 86400  # windows outlive their period a little, for late settlements


class RedisSpendTracker:
    """Budget windows shared by every worker and replica through Redis."""

    def __init__(
        self,
        client: Any,  # redis.asyncio.Redis
        load_spent: LoadSpent,
        on_crossing: OnCrossing,
        *,
        prefix: str = "plinth:{budget}:",  # one hash slot, so the scripts also run on a cluster
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = client
        self._load_spent = load_spent
        self._on_crossing = on_crossing
        self._prefix = prefix
        self._clock = clock
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(
        cls,
        url: str,
        load_spent: LoadSpent,
        on_crossing: OnCrossing,
        *,
        max_connections: int = 32,
        timeout_s: float = 2.0,
        **kw: Any,
    ) -> RedisSpendTracker:
        import redis.asyncio

        # A bounded pool that waits for a free connection: with the default pool a burst gets
        # "Too many connections", and a failed check admits the request unchecked (fail open).
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=10,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
        )
        return cls(redis.asyncio.Redis(connection_pool=pool), load_spent, on_crossing, **kw)

    async def reserve(self, checks: Sequence[Check], amount: int) -> Check | None:
        self._loop = asyncio.get_running_loop()
        keys = [self._prefix + check.key for check in checks]
        limits = [str(check.rule.limit) for check in checks]
        bases = [""] * len(checks)
        now = self._clock()
        ttls = [str(max(60, int(check.window.end - now) + _TTL_MARGIN_S)) for check in checks]
        for _ in range(len(checks) + 1):
            ok, index, first, spent = await self._reserve(keys, [amount, *limits, *bases, *ttls])
            if ok == -1:  # that window is not in Redis yet: its spend so far comes from the database
                check = checks[int(index) - 1]
                bases[int(index) - 1] = str(await asyncio.to_thread(self._load_spent, check))
                continue
            if ok == 1:
                return None
            check = checks[int(index) - 1]
            if int(first) == 1:
                self._on_crossing(check, "hard", int(spent))
            return check
        raise RuntimeError("budget windows kept disappearing from Redis")

    def settle(self, held: Sequence[Check], amount: int, charged: Sequence[Check], actual: int) -> None:
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # called from a finalizer outside the loop's thread
            loop = self._loop
            if loop is None or loop.is_closed():
                log.error("cannot settle a budget reservation: no event loop")
                return
            loop.call_soon_threadsafe(self._start, held, amount, charged, actual)
            return
        self._start(held, amount, charged, actual)

    def _start(self, held: Sequence[Check], amount: int, charged: Sequence[Check], actual: int) -> None:
        task = asyncio.get_running_loop().create_task(self._run_settle(held, amount, charged, actual))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_settle(
        self, held: Sequence[Check], amount: int, charged: Sequence[Check], actual: int
    ) -> None:
        keys = [self._prefix + c.key for c in held] + [self._prefix + c.key for c in charged]
        limits = [str(c.rule.limit) for c in charged]
        softs = ["" if c.rule.soft is None else str(c.rule.soft) for c in charged]
        try:
            crossed = await self._settle(keys, [len(held), amount, actual, *limits, *softs])
        except Exception as exc:
            # The reservation stays counted until the window ends: safe (never overspends), and logged.
            log.error("could not settle a budget reservation in Redis: %s", exc)
            return
        for i in range(0, len(crossed), 3):
            kind = "soft" if int(crossed[i + 1]) == 1 else "hard"
            self._on_crossing(charged[int(crossed[i]) - 1], kind, int(crossed[i + 2]))

    async def snapshot(self, check: Check) -> tuple[int, int, int] | None:
        values = await self._redis.hmget(self._prefix + check.key, ["spent", "reserved", "peak"])
        if values[0] is None:
            return None
        return int(values[0]), int(values[1]), int(values[2])

    def purge(self, now: float) -> None:
        return None  # windows expire in Redis by themselves

    async def drain(self) -> None:
        """Wait for the settlements in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        await self.drain()
        with contextlib.suppress(Exception):
            await self._redis.aclose()
