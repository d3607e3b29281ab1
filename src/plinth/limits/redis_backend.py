"""Limit counters in Redis, shared by every worker and replica: exact across processes.

Each admission is one EVALSHA of a Lua script that purges, checks and (only if every scope fits)
counts the request in all its scopes; Redis runs scripts one at a time, so two processes can never
both take the last slot. Times come from the Redis server's clock, so replicas need not agree on
theirs. Releases are batched into one pipeline per event-loop turn, off the request path.

Per scope four keys, all under one hash tag so a Redis Cluster keeps them on one shard:
requests (sorted set: lease -> admission time), tokens (sorted set: lease -> time, and a hash:
lease -> tokens plus the running sum under "#sum"), leases (sorted set: lease -> expiry).
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
from redis.exceptions import RedisError

from plinth.limits.base import LEASE_S, WINDOW_S, Refusal, RefusalKind, Scope

log = logging.getLogger("plinth.limits")

PREFIX = "{plinth:lim}:"

_COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local cutoff = now - window

local function purge_tokens(z, h)
  local old = redis.call('ZRANGEBYSCORE', z, '-inf', cutoff)
  if #old == 0 then
    return tonumber(redis.call('HGET', h, '#sum') or '0')
  end
  local freed = 0
  for s = 1, #old, 500 do
    local chunk = {}
    for j = s, math.min(s + 499, #old) do chunk[#chunk + 1] = old[j] end
    local vals = redis.call('HMGET', h, unpack(chunk))
    for j = 1, #vals do freed = freed + (tonumber(vals[j]) or 0) end
    redis.call('HDEL', h, unpack(chunk))
  end
  redis.call('ZREMRANGEBYSCORE', z, '-inf', cutoff)
  return redis.call('HINCRBY', h, '#sum', -freed)
end
"""

# KEYS: 4 per scope. ARGV: window ms, lease ms, lease id, tokens, then per scope rpm, tpm, concurrency
# (0: none). Returns {0} when admitted, else {scope index (1-based), kind, retry ms, requests used,
# requests reset ms, tokens used, tokens reset ms}.
ACQUIRE = (
    _COMMON
    + """
local lease_ms = tonumber(ARGV[2])
local id = ARGV[3]
local need = tonumber(ARGV[4])
local n = (#ARGV - 4) / 3

local function refuse(i, kind, retry)
  local k = (i - 1) * 4
  local a = 4 + (i - 1) * 3
  local rused, rreset, tused, treset = 0, 0, 0, 0
  if tonumber(ARGV[a + 1]) > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 1], '-inf', cutoff)
    rused = redis.call('ZCARD', KEYS[k + 1])
    local last = redis.call('ZRANGE', KEYS[k + 1], -1, -1, 'WITHSCORES')
    if #last > 0 then rreset = tonumber(last[2]) + window - now end
  end
  if tonumber(ARGV[a + 2]) > 0 then
    tused = purge_tokens(KEYS[k + 2], KEYS[k + 3])
    local last = redis.call('ZRANGE', KEYS[k + 2], -1, -1, 'WITHSCORES')
    if #last > 0 then treset = tonumber(last[2]) + window - now end
  end
  return {i, kind, math.max(0, retry), rused, rreset, tused, treset}
end

for i = 1, n do
  local k = (i - 1) * 4
  local a = 4 + (i - 1) * 3
  local rpm, tpm, conc = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 1], '-inf', cutoff)
    local used = redis.call('ZCARD', KEYS[k + 1])
    if used >= rpm then
      local e = redis.call('ZRANGE', KEYS[k + 1], used - rpm, used - rpm, 'WITHSCORES')
      return refuse(i, 'requests', tonumber(e[2]) + window - now)
    end
  end
  if tpm > 0 then
    if need > tpm then return refuse(i, 'too_large', 0) end
    local sum = purge_tokens(KEYS[k + 2], KEYS[k + 3])
    if sum + need > tpm then
      local entries = redis.call('ZRANGE', KEYS[k + 2], 0, -1, 'WITHSCORES')
      local freed, retry = 0, window
      for j = 1, #entries, 2 do
        freed = freed + (tonumber(redis.call('HGET', KEYS[k + 3], entries[j])) or 0)
        if sum - freed + need <= tpm then
          retry = tonumber(entries[j + 1]) + window - now
          break
        end
      end
      return refuse(i, 'tokens', retry)
    end
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 4], '-inf', now)
    if redis.call('ZCARD', KEYS[k + 4]) >= conc then return refuse(i, 'concurrency', 1000) end
  end
end

for i = 1, n do
  local k = (i - 1) * 4
  local a = 4 + (i - 1) * 3
  if tonumber(ARGV[a + 1]) > 0 then
    redis.call('ZADD', KEYS[k + 1], now, id)
    redis.call('PEXPIRE', KEYS[k + 1], window + 1000)
  end
  if tonumber(ARGV[a + 2]) > 0 then
    redis.call('ZADD', KEYS[k + 2], now, id)
    redis.call('HSET', KEYS[k + 3], id, need)
    redis.call('HINCRBY', KEYS[k + 3], '#sum', need)
    redis.call('PEXPIRE', KEYS[k + 2], 2 * window)
    redis.call('PEXPIRE', KEYS[k + 3], 2 * window)
  end
  if tonumber(ARGV[a + 3]) > 0 then
    redis.call('ZADD', KEYS[k + 4], now + lease_ms, id)
    redis.call('PEXPIRE', KEYS[k + 4], 2 * lease_ms)
  end
end
return {0}
"""
)

# KEYS: 4 per scope. ARGV: window ms, lease id, tokens used, then per scope "tpm?" "concurrency?" (1/0).
RELEASE = (
    _COMMON
    + """
local id = ARGV[2]
local used = tonumber(ARGV[3])
local n = (#ARGV - 3) / 2
for i = 1, n do
  local k = (i - 1) * 4
  if ARGV[3 + (i - 1) * 2 + 1] == '1' then
    local z, h = KEYS[k + 2], KEYS[k + 3]
    local old = tonumber(redis.call('HGET', h, id) or '0')
    if used > 0 then
      redis.call('ZADD', z, now, id)
      redis.call('HSET', h, id, used)
    else
      redis.call('ZREM', z, id)
      redis.call('HDEL', h, id)
    end
    if used ~= old then redis.call('HINCRBY', h, '#sum', used - old) end
    redis.call('PEXPIRE', z, 2 * window)
    redis.call('PEXPIRE', h, 2 * window)
  end
  if ARGV[3 + (i - 1) * 2 + 2] == '1' then
    redis.call('ZREM', KEYS[k + 4], id)
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
        keys += (base + ":r", base + ":t", base + ":h", base + ":c")
    return keys


class RedisBackend:
    """Exact limits across every worker and replica that share one Redis."""

    def __init__(
        self,
        url: str,
        *,
        window_s: float = WINDOW_S,
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
        self.window_ms = round(window_s * 1000)
        self.lease_ms = round(lease_s * 1000)
        self._acquire = self.client.register_script(ACQUIRE)
        self._release = self.client.register_script(RELEASE)
        self._renew = self.client.register_script(RENEW)
        self._pending: deque[tuple[list[str], list[Any]]] = deque()
        self._flushing = False
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

    async def acquire(self, lease: str, scopes: Sequence[Scope], tokens: int) -> Refusal | None:
        self._loop = self._loop or asyncio.get_running_loop()
        args: list[Any] = [self.window_ms, self.lease_ms, lease, tokens]
        for scope in scopes:
            args += (scope.rpm or 0, scope.tpm or 0, scope.max_concurrency or 0)
        try:
            reply = await self._acquire(keys=_keys(scopes), args=args)
        except (RedisError, OSError) as exc:
            # Fail open: an unreachable Redis must not take the whole gateway down.
            self._warn("admission", exc)
            return None
        if reply[0] == 0:
            return None
        index, kind, retry, r_used, r_reset, t_used, t_reset = reply
        kind_str = cast(RefusalKind, kind.decode() if isinstance(kind, bytes) else str(kind))
        return Refusal(
            int(index) - 1, kind_str, retry / 1000, int(r_used), r_reset / 1000, int(t_used), t_reset / 1000
        )

    def release(self, lease: str, scopes: Sequence[Scope], tokens: int) -> None:
        args: list[Any] = [self.window_ms, lease, tokens]
        for scope in scopes:
            args += ("1" if scope.tpm is not None else "0", "1" if scope.max_concurrency is not None else "0")
        self._pending.append((_keys(scopes), args))
        if self._flushing or self._loop is None:
            return
        self._flushing = True
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        try:
            if running is self._loop:
                self._start_flush()
            else:  # settled from another thread (a finalizer): hand over to the loop
                self._loop.call_soon_threadsafe(self._start_flush)
        except RuntimeError:  # loop closed: the leases expire and the tokens leave the window
            self._flushing = False

    def _start_flush(self) -> None:
        self._flush_task = asyncio.get_running_loop().create_task(self._flush(), name="plinth-limits-release")

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = list(self._pending)
                self._pending.clear()
                pipe = self.client.pipeline(transaction=False)
                for keys, args in batch:
                    await self._release(keys=keys, args=args, client=pipe)
                try:
                    await pipe.execute()
                except (RedisError, OSError) as exc:
                    self._warn("release", exc)  # leases expire by themselves; tokens leave the window
        finally:
            self._flushing = False

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
        """Wait until every release handed over so far has reached Redis."""
        while self._flushing or self._pending:
            task = self._flush_task
            if task is not None and not task.done():
                await task
            elif self._pending:
                self._flushing = True
                self._start_flush()
            else:
                await asyncio.sleep(0)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), timeout=5)
        await self.client.aclose()
