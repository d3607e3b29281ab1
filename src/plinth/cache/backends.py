"""Where cache entries live: this process's memory (one process) or Redis (shared by every worker).

Two kinds of entries:
- answers, by exact key: the serialized canonical ChatResponse, with a TTL;
- semantic candidates, by bucket (see `canonical.semantic_bucket`): the newest `scan` entries of
  (expiry, answer key, unit vector as float32). A lookup compares the query vector with all of them,
  so a bucket is a bounded linear scan, not an index: good for the repeated-question workloads a
  gateway sees, not for millions of distinct questions per bucket.
"""

from __future__ import annotations

import struct
import time
from collections import OrderedDict, deque
from typing import Protocol, cast

import redis.asyncio as aioredis

Candidate = tuple[str, bytes]  # (answer key, float32 vector)
_HEAD = struct.Struct("<d")  # expiry, Unix time
_KEY_BYTES = 32  # answer keys are sha256 hex digests


class CacheBackend(Protocol):
    async def get(self, key: str) -> bytes | None: ...
    async def put(self, key: str, value: bytes, ttl_s: float) -> None: ...
    async def candidates(self, bucket: str) -> list[Candidate]: ...
    async def add_candidate(self, bucket: str, key: str, vector: bytes, ttl_s: float) -> None: ...
    async def aclose(self) -> None: ...


class MemoryBackend:
    """LRU with TTL, bounded to `max_entries` answers and as many semantic buckets."""

    def __init__(self, max_entries: int, scan: int) -> None:
        self.max_entries = max_entries
        self.scan = scan
        self._answers: OrderedDict[str, tuple[float, bytes]] = OrderedDict()
        self._buckets: OrderedDict[str, deque[tuple[float, str, bytes]]] = OrderedDict()

    async def get(self, key: str) -> bytes | None:
        entry = self._answers.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._answers[key]
            return None
        self._answers.move_to_end(key)
        return entry[1]

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        self._answers[key] = (time.monotonic() + ttl_s, value)
        self._answers.move_to_end(key)
        while len(self._answers) > self.max_entries:
            self._answers.popitem(last=False)

    async def candidates(self, bucket: str) -> list[Candidate]:
        entries = self._buckets.get(bucket)
        if not entries:
            return []
        self._buckets.move_to_end(bucket)
        now = time.monotonic()
        return [(key, vector) for expires, key, vector in entries if expires > now]

    async def add_candidate(self, bucket: str, key: str, vector: bytes, ttl_s: float) -> None:
        entries = self._buckets.get(bucket)
        if entries is None:
            entries = self._buckets[bucket] = deque(maxlen=self.scan)
        entries.appendleft((time.monotonic() + ttl_s, key, vector))
        self._buckets.move_to_end(bucket)
        while len(self._buckets) > self.max_entries:
            self._buckets.popitem(last=False)

    async def aclose(self) -> None:
        self._answers.clear()
        self._buckets.clear()


class RedisBackend:
    """Answers as plain keys with PX expiry; each semantic bucket a list trimmed to `scan` entries.

    A lookup is one GET, plus for semantic mode one LRANGE and one more GET on a match. Memory is
    bounded by TTLs and Redis's own `maxmemory` policy (use allkeys-lru for a cache-heavy Redis)."""

    def __init__(self, url: str, scan: int, prefix: str = "plinth:cache:") -> None:
        self._redis: aioredis.Redis = aioredis.Redis.from_url(url)
        self.scan = scan
        self._answer = prefix + "a:"
        self._bucket = prefix + "s:"

    async def get(self, key: str) -> bytes | None:
        return cast("bytes | None", await self._redis.get(self._answer + key))

    async def put(self, key: str, value: bytes, ttl_s: float) -> None:
        await self._redis.set(self._answer + key, value, px=max(1, int(ttl_s * 1000)))

    async def candidates(self, bucket: str) -> list[Candidate]:
        raw = cast("list[bytes]", await self._redis.lrange(self._bucket + bucket, 0, self.scan - 1))
        now = time.time()
        out: list[Candidate] = []
        for item in raw:
            (expires,) = _HEAD.unpack_from(item)
            if expires > now:
                start = _HEAD.size
                key = item[start : start + _KEY_BYTES].hex()
                out.append((key, item[start + _KEY_BYTES :]))
        return out

    async def add_candidate(self, bucket: str, key: str, vector: bytes, ttl_s: float) -> None:
        name = self._bucket + bucket
        item = _HEAD.pack(time.time() + ttl_s) + bytes.fromhex(key) + vector
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.lpush(name, item)
            pipe.ltrim(name, 0, self.scan - 1)
            # The list lives as long as its newest entry may (older ones are skipped by expiry).
            pipe.pexpire(name, max(1, int(ttl_s * 1000)), gt=True)
            pipe.pexpire(name, max(1, int(ttl_s * 1000)), nx=True)
            await pipe.execute()

    async def aclose(self) -> None:
        await self._redis.aclose()
