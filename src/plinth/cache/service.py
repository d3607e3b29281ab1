"""The response cache as the pipeline sees it: plan (free when not asked for), lookup, store.

- Opt-in: the request header `x-plinth-cache: exact|semantic|off` wins over the key's own mode
  (key metadata `{"cache": ...}` or `cache:` on a config key). Neither: `plan` returns None after
  one header read, and nothing else runs.
- Partitioned per team (per key for keys without a team): the partition is hashed into every key,
  so one tenant can never be served another's answer.
- Lookups run before admission, so a hit reserves nothing against limits or budgets. A failing
  backend or embedder is logged and counts as a miss: the cache never fails a request.
- Writes run in background tasks after the answer was sent (streams: once they completed).
"""

from __future__ import annotations

import asyncio
import logging
import math
from array import array
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

from plinth.cache import canonical
from plinth.cache.backends import CacheBackend, Candidate, MemoryBackend, RedisBackend
from plinth.config.schema import CacheConfig, PlinthConfig
from plinth.gateway.errors import GatewayError
from plinth.observability.metrics import CACHE_LOOKUPS
from plinth.providers.base import ChatStream
from plinth.providers.types import ChatRequest, ChatResponse, EmbeddingRequest, StreamEvent
from plinth.routing import Attempt, Router, UnknownModel
from plinth.tenancy import Principal

if TYPE_CHECKING:
    from plinth.providers.local import SharedModel

log = logging.getLogger("plinth.cache")

HEADER = "x-plinth-cache"
TTL_HEADER = "x-plinth-cache-ttl"
Mode = Literal["exact", "semantic"]


@dataclass(slots=True)
class CachePlan:
    """One request's use of the cache; keys are filled in by `lookup` and reused by `store`."""

    mode: Mode
    ttl_s: float
    partition: str
    chat: ChatRequest
    cacheable: bool = True  # False: n > 1, answered but never looked up or stored
    key: str | None = None
    bucket: str | None = None
    text: str | None = None
    vector: bytes | None = None

    @property
    def header(self) -> str:
        """The `x-plinth-cache` value of a response that was not a hit."""
        return "miss" if self.cacheable else "bypass"


class Embedder(Protocol):
    @property
    def ready(self) -> bool: ...
    def warm(self) -> None: ...
    async def embed(self, text: str) -> bytes: ...


class LocalEmbedder:
    """The in-process all-MiniLM-L6-v2. Lookups skip semantic matching until the model is loaded
    (the first load takes seconds and must not stall requests); stores wait for it in background."""

    def __init__(self) -> None:
        self._ready = False
        self._loading: asyncio.Future[object] | None = None

    @property
    def ready(self) -> bool:
        return self._ready

    def warm(self) -> None:
        if self._loading is None:
            shared = _shared()
            self._loading = asyncio.get_running_loop().run_in_executor(shared.executor(), shared.model)
            self._loading.add_done_callback(self._loaded)

    def _loaded(self, future: asyncio.Future[object]) -> None:
        if future.cancelled() or future.exception() is not None:
            self._loading = None  # try again on a later request; embed() will report why
        else:
            self._ready = True

    async def embed(self, text: str) -> bytes:
        vector = await asyncio.get_running_loop().run_in_executor(_shared().executor(), _encode_one, text)
        self._ready = True
        return vector


def _shared() -> SharedModel:
    from plinth.providers.local import SHARED

    return SHARED


def _encode_one(text: str) -> bytes:
    """Blocking: one unit vector, without the token count that the embeddings endpoint reports."""
    matrix = (
        _shared()
        .model()
        .encode([text], normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    )
    return bytes(matrix[0].astype("float32").tobytes())


class AliasEmbedder:
    """An embedding model from the catalog, called through the router (not metered per tenant)."""

    def __init__(self, router: Router, alias: str) -> None:
        self._router = router
        self._alias = alias

    @property
    def ready(self) -> bool:
        return True

    def warm(self) -> None:
        pass

    async def embed(self, text: str) -> bytes:
        route = self._router.resolve(self._alias)
        answer = await self._router.embed(
            route, EmbeddingRequest(model=self._alias, inputs=[text]), Attempt()
        )
        vector = answer.vectors[0]
        norm = math.sqrt(sum(x * x for x in vector)) or 1.0
        return array("f", (x / norm for x in vector)).tobytes()


def best_match(query: bytes, candidates: list[Candidate], threshold: float) -> tuple[str, float] | None:
    """The most similar candidate at or above `threshold` (vectors are unit length: dot = cosine)."""
    usable = [(k, v) for k, v in candidates if len(v) == len(query)]
    if not usable:
        return None
    try:
        import numpy as np
    except ImportError:  # plain Python: about 20 us per 384-dim candidate
        q = array("f", query)
        scores = [math.fsum(a * b for a, b in zip(q, array("f", v), strict=True)) for _, v in usable]
    else:
        matrix = np.frombuffer(b"".join(v for _, v in usable), dtype=np.float32).reshape(len(usable), -1)
        scores = (matrix @ np.frombuffer(query, dtype=np.float32)).tolist()
    best = max(range(len(usable)), key=scores.__getitem__)
    return (usable[best][0], scores[best]) if scores[best] >= threshold else None


class ResponseCache:
    def __init__(self, config: CacheConfig, backend: CacheBackend, embedder: Embedder) -> None:
        self.config = config
        self.backend = backend
        self.embedder = embedder
        self._writes: set[asyncio.Task[None]] = set()
        self.hits = 0
        self.misses = 0

    @property
    def pending_writes(self) -> int:
        return len(self._writes)

    # --- on the request path ---

    def plan(self, headers: Mapping[str, str], principal: Principal, chat: ChatRequest) -> CachePlan | None:
        """None unless the request or its key asked for caching; a bad header value is a 400."""
        asked = headers.get(HEADER)
        if asked is None:
            mode = principal.cache
            if mode is None:
                return None
        else:
            mode = asked.strip().lower()
            if mode == "off":
                return None
            if mode not in ("exact", "semantic"):
                raise GatewayError(
                    400,
                    f"'{HEADER}' must be exact, semantic or off, not '{asked[:40]}'.",
                    code="invalid_header",
                )
        ttl = self.config.ttl_s
        raw_ttl = headers.get(TTL_HEADER)
        if raw_ttl is not None:
            try:
                ttl = float(raw_ttl)
            except ValueError:
                ttl = math.nan
            if not ttl > 0 or math.isinf(ttl):
                raise GatewayError(
                    400, f"'{TTL_HEADER}' must be a positive number of seconds.", code="invalid_header"
                )
            ttl = min(ttl, self.config.max_ttl_s)
        partition = f"team:{principal.team_id}" if principal.team_id else f"key:{principal.name}"
        return CachePlan("semantic" if mode == "semantic" else "exact", ttl, partition, chat, chat.n == 1)

    async def lookup(self, plan: CachePlan) -> ChatResponse | None:
        """The cached answer, or None. Exact match first; then similarity in semantic mode."""
        if not plan.cacheable:
            return None
        chat = plan.chat
        result = "miss"
        try:
            plan.key = canonical.exact_key(plan.partition, chat.model, chat)
            raw = await self.backend.get(plan.key)
            if raw is not None:
                result = "hit_exact"
            elif plan.mode == "semantic":
                raw = await self._semantic(plan)
                result = "miss" if raw is None else "hit_semantic"
            if raw is not None:
                answer = canonical.loads(raw)
                self.hits += 1
                CACHE_LOOKUPS.labels(plan.mode, result).inc()
                return answer
        except Exception as exc:
            log.warning("cache lookup failed, answering from the upstream: %r", exc)
            result = "error"
        self.misses += 1
        CACHE_LOOKUPS.labels(plan.mode, result).inc()
        return None

    async def _semantic(self, plan: CachePlan) -> bytes | None:
        chat = plan.chat
        plan.text = canonical.semantic_text(chat, self.config.semantic_max_chars)
        if plan.text is None:
            return None
        plan.bucket = canonical.semantic_bucket(plan.partition, chat.model, chat)
        if not self.embedder.ready:
            self.embedder.warm()  # this request misses; the store embeds once the model is there
            return None
        plan.vector = await self.embedder.embed(plan.text)
        match = best_match(
            plan.vector, await self.backend.candidates(plan.bucket), self.config.semantic_threshold
        )
        return None if match is None else await self.backend.get(match[0])

    def store(self, plan: CachePlan, response: ChatResponse) -> None:
        """Queue the write of a complete answer; returns at once."""
        if not plan.cacheable or plan.key is None or not canonical.cacheable(response):
            return
        task = asyncio.create_task(self._write(plan, response))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, plan: CachePlan, response: ChatResponse) -> None:
        assert plan.key is not None
        try:
            await self.backend.put(plan.key, canonical.dumps(response), plan.ttl_s)
            if plan.bucket is not None and plan.text is not None:
                vector = plan.vector or await self.embedder.embed(plan.text)
                await self.backend.add_candidate(plan.bucket, plan.key, vector, plan.ttl_s)
        except Exception as exc:
            log.warning("cache write failed: %r", exc)

    def record(self, plan: CachePlan, stream: ChatStream, first: StreamEvent) -> AsyncIterator[StreamEvent]:
        """Wrap a stream's remaining events so its answer is stored once the stream completed."""
        if not plan.cacheable or plan.key is None:
            return stream.events
        return self._recording(plan, stream, first, stream.events)

    async def _recording(
        self, plan: CachePlan, stream: ChatStream, first: StreamEvent, events: AsyncIterator[StreamEvent]
    ) -> AsyncIterator[StreamEvent]:
        assembler = canonical.StreamAssembler()
        assembler.add(first)
        try:
            async for event in events:
                assembler.add(event)
                yield event
            response = assembler.response(stream)
            if response is not None:
                self.store(plan, response)
        finally:
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    # --- lifecycle ---

    async def drain(self) -> None:
        """Wait for the queued writes (tests, shutdown)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    async def aclose(self) -> None:
        try:
            await asyncio.wait_for(self.drain(), timeout=5)
        except TimeoutError:
            log.warning("cache writes still pending at shutdown were dropped")
        await self.backend.aclose()


def build_cache(config: PlinthConfig, router: Router) -> ResponseCache | None:
    """Redis when `redis.url` is set, else this process's memory; None when caching is disabled."""
    cache = config.cache
    if not cache.enabled:
        return None
    backend: CacheBackend
    if config.redis.url is not None:
        backend = RedisBackend(config.redis.url.get_secret_value(), cache.semantic_scan)
    else:
        backend = MemoryBackend(cache.max_entries, cache.semantic_scan)
    embedder: Embedder = LocalEmbedder()
    if cache.embedding_model != "local":
        try:
            route = router.resolve(cache.embedding_model)
        except UnknownModel:
            raise ValueError(
                f"cache.embedding_model '{cache.embedding_model}' is not in the catalog"
            ) from None
        if route.config.type == "chat":
            raise ValueError(f"cache.embedding_model '{cache.embedding_model}' is a chat model")
        embedder = AliasEmbedder(router, cache.embedding_model)
    return ResponseCache(cache, backend, embedder)
