"""Limit counters in Redis, shared by every worker and replica: exact across processes.

Each admission is one EVALSHA of a Lua script that purges, checks and (only if every scope fits)
counts the request in all its scopes; Redis runs scripts one at a time, so two processes can never
both take the last slot. Times come from the Redis server's clock, so replicas need not agree on
theirs. Releases are sent off the request path: a freed concurrency slot at once, token corrections
batched for up to 20 ms into one pipeline.

Per scope three keys, all under one hash tag so a Redis Cluster keeps them on one shard: requests
and tokens (hashes of per-second buckets, see `plinth.limits.base`), and leases (sorted set:
lease -> expiry, bounded by the concurrency limit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from plinth.limits.base import LEASE_S, WINDOW_S, Grant, Refusal, RefusalKind, Scope

log = logging.getLogger("plinth.limits")

PREFIX = "{plinth:lim}:"
RELEASE_DELAY_S = 0.02  # token corrections are batched this long (concurrency slots go at once)

# Buckets live in a hash per scope and counter: field = the second (Redis server time), plus "#n"
# (the sum over the window) and "#from" (no bucket is older than this second). Purging walks from
# "#from" to the window's start, so it costs one step per second that passed, not per request.
_COMMON = """
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local second = tonumber(t[1])
local window = tonumber(ARGV[1])
local oldest = second - window

local function purge(h)
  local from = tonumber(redis.call('HGET', h, '#from') or '-1')
  if from < 0 or oldest - from > window then
    if from >= 0 then redis.call('DEL', h) end
    redis.call('HSET', h, '#from', oldest, '#n', 0)
    redis.call('PEXPIRE', h, (window + 2) * 1000)
    return 0
  end
  if from < oldest then
    local freed = 0
    local fields = {}
    for s = from, oldest - 1 do fields[#fields + 1] = tostring(s) end
    local vals = redis.call('HMGET', h, unpack(fields))
    for j = 1, #vals do freed = freed + (tonumber(vals[j]) or 0) end
    redis.call('HDEL', h, unpack(fields))
    redis.call('HSET', h, '#from', oldest)
    if freed ~= 0 then return redis.call('HINCRBY', h, '#n', -freed) end
  end
  return tonumber(redis.call('HGET', h, '#n') or '0')
end

-- Seconds (ms) until `excess` of the amount has left the window, oldest buckets first.
local function free_in(h, excess)
  local freed = 0
  for s = oldest, second do
    freed = freed + (tonumber(redis.call('HGET', h, tostring(s))) or 0)
    if freed >= excess then return (s + window + 1) * 1000 - now_ms end
  end
  return (window + 1) * 1000
end

-- Milliseconds until every bucket has left the window.
local function reset_in(h)
  for s = second, oldest, -1 do
    if (tonumber(redis.call('HGET', h, tostring(s))) or 0) > 0 then
      return (s + window + 1) * 1000 - now_ms
    end
  end
  return 0
end
"""

# KEYS: 3 per scope (requests, tokens, leases). ARGV: window s, lease ms, lease id, tokens, then per
# scope rpm, tpm, concurrency (0: none). Returns {0, second, ms until that second leaves the window,
# then per scope requests used, tokens used} when admitted, else {scope index (1-based), kind,
# retry ms, requests used, requests reset ms, tokens used, tokens reset ms}.
ACQUIRE = (
    _COMMON
    + """
local lease_ms = tonumber(ARGV[2])
local id = ARGV[3]
local need = tonumber(ARGV[4])
local n = (#ARGV - 4) / 3
local rsum, tsum = {}, {}

local function refuse(i, kind, retry)
  local k = (i - 1) * 3
  local a = 4 + (i - 1) * 3
  local rused, rreset, tused, treset = 0, 0, 0, 0
  if tonumber(ARGV[a + 1]) > 0 then
    rused = purge(KEYS[k + 1])
    rreset = reset_in(KEYS[k + 1])
  end
  if tonumber(ARGV[a + 2]) > 0 then
    tused = purge(KEYS[k + 2])
    treset = reset_in(KEYS[k + 2])
  end
  return {i, kind, math.max(0, retry), rused, rreset, tused, treset}
end

for i = 1, n do
  local k = (i - 1) * 3
  local a = 4 + (i - 1) * 3
  local rpm, tpm, conc = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  rsum[i], tsum[i] = 0, 0
  if rpm > 0 then
    rsum[i] = purge(KEYS[k + 1])
    if rsum[i] >= rpm then
      return refuse(i, 'requests', free_in(KEYS[k + 1], rsum[i] - rpm + 1))
    end
  end
  if tpm > 0 then
    if need > tpm then return refuse(i, 'too_large', 0) end
    tsum[i] = purge(KEYS[k + 2])
    if tsum[i] + need > tpm then
      return refuse(i, 'tokens', free_in(KEYS[k + 2], tsum[i] + need - tpm))
    end
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now_ms)
    if redis.call('ZCARD', KEYS[k + 3]) >= conc then return refuse(i, 'concurrency', 1000) end
  end
end

local reply = {0, second, (second + window + 1) * 1000 - now_ms}
local ttl = (window + 2) * 1000
for i = 1, n do
  local k = (i - 1) * 3
  local a = 4 + (i - 1) * 3
  if tonumber(ARGV[a + 1]) > 0 then
    redis.call('HINCRBY', KEYS[k + 1], second, 1)
    rsum[i] = redis.call('HINCRBY', KEYS[k + 1], '#n', 1)
    redis.call('PEXPIRE', KEYS[k + 1], ttl)
  end
  if tonumber(ARGV[a + 2]) > 0 then
    if need > 0 then
      redis.call('HINCRBY', KEYS[k + 2], second, need)
      tsum[i] = redis.call('HINCRBY', KEYS[k + 2], '#n', need)
    end
    redis.call('PEXPIRE', KEYS[k + 2], ttl)
  end
  if tonumber(ARGV[a + 3]) > 0 then
    redis.call('ZADD', KEYS[k + 3], now_ms + lease_ms, id)
    redis.call('PEXPIRE', KEYS[k + 3], 2 * lease_ms)
  end
  reply[#reply + 1] = rsum[i]
  reply[#reply + 1] = tsum[i]
end
return reply
"""
)

# KEYS: 3 per scope. ARGV: window s, lease id, tokens reserved, second reserved in, tokens used, then
# per scope "tpm?" "concurrency?" (1/0).
RELEASE = (
    _COMMON
    + """
local id = ARGV[2]
local reserved = tonumber(ARGV[3])
local at = tonumber(ARGV[4])
local used = tonumber(ARGV[5])
local n = (#ARGV - 5) / 2
for i = 1, n do
  local k = (i - 1) * 3
  if ARGV[5 + (i - 1) * 2 + 1] == '1' then
    local h = KEYS[k + 2]
    purge(h)
    if reserved > 0 and at >= oldest then
      local left = tonumber(redis.call('HGET', h, at) or '0')
      local back = math.min(reserved, left)
      if back > 0 then
        redis.call('HINCRBY', h, at, -back)
        redis.call('HINCRBY', h, '#n', -back)
      end
    end
    if used > 0 then
      redis.call('HINCRBY', h, second, used)
      redis.call('HINCRBY', h, '#n', used)
    end
    redis.call('PEXPIRE', h, (window + 2) * 1000)
  end
  if ARGV[5 + (i - 1) * 2 + 2] == '1' then
    redis.call('ZREM', KEYS[k + 3], id)
  end
end
return 0
"""
)

# KEYS: lease sets. ARGV: lease ms, then one lease id per key. Only leases still held are extended.
RENEW = """
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', until_ms, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], 2 * tonumber(ARGV[1]))
end
return 0
"""


def _keys(scopes: Sequence[Scope]) -> list[str]:
    keys: list[str] = []
    for scope in scopes:
        base = PREFIX + scope.id
        keys += (base + ":r", base + ":t", base + ":c")
    return keys


class RedisBackend:
    """Exact limits across every worker and replica that share one Redis."""

    def __init__(
        self,
        url: str,
        *,
        window_s: int = WINDOW_S,
        lease_s: float = LEASE_S,
        timeout_s: float = 1.0,
        max_connections: int = 32,
        client: aioredis.Redis | None = None,
    ) -> None:
        if client is None:
            # A bounded pool that waits for a free connection: a burst queues for a few
            # milliseconds instead of failing (and so being admitted unchecked).
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                max_connections=max_connections,
                timeout=10,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
            )
            client = aioredis.Redis(connection_pool=pool)
        self.client = client
        self.window = int(window_s)
        self.lease_ms = round(lease_s * 1000)
        self._acquire = self.client.register_script(ACQUIRE)
        self._release = self.client.register_script(RELEASE)
        self._renew = self.client.register_script(RENEW)
        self._pending: deque[tuple[list[str], list[Any]]] = deque()
        self._wake = asyncio.Event()
        self._flush_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last_warning = 0.0

    def _warn(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning > 10:  # at most one line per 10 s while Redis is unreachable
            self._last_warning = now
            log.warning(
                "limits: Redis %s failed (%s: %s); admitting without limits", what, type(exc).__name__, exc
            )

    async def acquire(self, lease: str, scopes: Sequence[Scope], tokens: int) -> Grant | Refusal:
        self._loop = self._loop or asyncio.get_running_loop()
        args: list[Any] = [self.window, self.lease_ms, lease, tokens]
        for scope in scopes:
            args += (scope.rpm or 0, scope.tpm or 0, scope.max_concurrency or 0)
        try:
            reply = await self._acquire(keys=_keys(scopes), args=args)
        except (RedisError, OSError) as exc:
            # Fail open: an unreachable Redis must not take the whole gateway down.
            self._warn("admission", exc)
            return Grant(0, 0.0, tuple((0, 0) for _ in scopes))
        if reply[0] == 0:
            used = tuple((int(reply[i]), int(reply[i + 1])) for i in range(3, len(reply), 2))
            return Grant(int(reply[1]), reply[2] / 1000, used)
        index, kind, retry, r_used, r_reset, t_used, t_reset = reply
        kind_str = cast(RefusalKind, kind.decode() if isinstance(kind, bytes) else str(kind))
        return Refusal(
            int(index) - 1, kind_str, retry / 1000, int(r_used), r_reset / 1000, int(t_used), t_reset / 1000
        )

    def release(self, lease: str, scopes: Sequence[Scope], reserved: int, second: int, used: int) -> None:
        args: list[Any] = [self.window, lease, reserved, second, used]
        urgent = False
        for scope in scopes:
            args += ("1" if scope.tpm is not None else "0", "1" if scope.max_concurrency is not None else "0")
            urgent = urgent or scope.max_concurrency is not None
        self._pending.append((_keys(scopes), args))
        if self._loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if running is self._loop:
                self._schedule(urgent)
            else:  # settled from another thread (a finalizer): hand over to the loop
                self._loop.call_soon_threadsafe(self._schedule, urgent)
        except RuntimeError:  # loop closed: the leases expire and the tokens leave the window
            pass

    def _schedule(self, urgent: bool) -> None:
        # A freed concurrency slot goes out at once (a client may be waiting for it); token
        # corrections wait up to RELEASE_DELAY_S to share one round trip with others.
        if urgent:
            self._wake.set()
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(
                self._flush(), name="plinth-limits-release"
            )

    async def _flush(self) -> None:
        while self._pending:
            if not self._wake.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RELEASE_DELAY_S)
            self._wake.clear()
            batch = list(self._pending)
            self._pending.clear()
            try:
                await self._send_releases(batch)
            except (RedisError, OSError) as exc:
                self._warn("release", exc)  # leases expire by themselves; tokens leave the window

    async def _send_releases(self, batch: list[tuple[list[str], list[Any]]]) -> None:
        """EVALSHA each release: alone, or in one pipeline for a batch.

        Not through redis-py's `Script` objects in a pipeline: those make every `execute()` send
        a `SCRIPT EXISTS` first, a second round trip per flush (measured: 375 µs for one release
        and its flush, against 230 µs for an admission)."""
        sha = self._release.sha
        for attempt in (1, 2):
            try:
                if len(batch) == 1:
                    keys, args = batch[0]
                    await self.client.evalsha(sha, len(keys), *keys, *args)
                else:
                    pipe = self.client.pipeline(transaction=False)
                    for keys, args in batch:
                        pipe.evalsha(sha, len(keys), *keys, *args)
                    await pipe.execute()
                return
            except NoScriptError:  # Redis restarted or its script cache was flushed
                if attempt == 2:
                    raise
                await self.client.script_load(RELEASE)

    async def renew(self, leases: Sequence[tuple[str, Sequence[Scope]]]) -> None:
        keys: list[str] = []
        args: list[Any] = [self.lease_ms]
        for lease, scopes in leases:
            for scope in scopes:
                if scope.max_concurrency is not None:
                    keys.append(PREFIX + scope.id + ":c")
                    args.append(lease)
        if not keys:
            return
        try:
            await self._renew(keys=keys, args=args)
        except (RedisError, OSError) as exc:
            self._warn("lease renewal", exc)

    async def flush(self) -> None:
        """Send every release handed over so far now, and wait until it reached Redis."""
        while self._pending or (self._flush_task is not None and not self._flush_task.done()):
            self._wake.set()
            if self._flush_task is None or self._flush_task.done():
                self._schedule(True)
            assert self._flush_task is not None
            await self._flush_task

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout=5)
        await self.client.aclose()
