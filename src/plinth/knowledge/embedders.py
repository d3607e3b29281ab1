"""Embedders: the local MiniLM model in process (the default), the gateway's embeddings path
(`gateway:<model>`: limits, cost and policy apply), a hashing embedder for tests and offline demos."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from plinth.providers.types import EmbeddingRequest

if TYPE_CHECKING:
    from plinth.gateway.pipeline import Gateway
    from plinth.tenancy import Principal

Matrix = npt.NDArray[np.float32]


class Embedder(Protocol):
    """Turns texts into L2-normalized float32 rows (dot product = cosine similarity)."""

    name: str
    dimensions: int

    def embed(self, texts: list[str]) -> Matrix: ...


class LocalEmbedder:
    """all-MiniLM-L6-v2 in process (plinth.providers.local): no text leaves the machine."""

    name = "local/all-MiniLM-L6-v2"
    dimensions = 384

    def embed(self, texts: list[str]) -> Matrix:
        from plinth.providers.local import SHARED

        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        rows, _tokens = SHARED.embed(texts, self.dimensions)
        return np.asarray(rows, dtype=np.float32)


_WORD = re.compile(r"\w+")


class HashingEmbedder:
    """Deterministic bag-of-words hashed into `dimensions` buckets: fast, no model, for tests."""

    name = "hashing"

    def __init__(self, dimensions: int = 256) -> None:
        self.dimensions = dimensions
        self.calls = 0  # texts embedded so far (tests check that unchanged files cost nothing)

    def embed(self, texts: list[str]) -> Matrix:
        self.calls += len(texts)
        out = np.zeros((len(texts), self.dimensions), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                digest = hashlib.blake2b(word.encode(), digest_size=4).digest()
                out[row, int.from_bytes(digest, "little") % self.dimensions] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        normalized: Matrix = (out / np.maximum(norms, 1e-12)).astype(np.float32)
        return normalized


GATEWAY_PREFIX = "gateway:"
GATEWAY_BATCH = 64  # texts per embeddings call: one usage record, one limits check per batch
# Usage records of embeddings made for knowledge bases (ingestion and queries) carry this label.
KNOWLEDGE_EMBEDDINGS = "knowledge_embeddings"

Transport = Callable[[list[str]], list[list[float]]]


class EmbeddingFailed(RuntimeError):
    """The gateway refused or failed an embeddings call; the message is safe to show (no key)."""

    def __init__(self, message: str, status: int = 502) -> None:
        super().__init__(message)
        self.status = status


class GatewayEmbedder:
    """Embeds through the gateway's embeddings path, in batches, so the catalog, the key's model
    permissions, policy (`embed`), rate limits, budgets and usage records apply to knowledge bases
    like to any model call. Named `gateway:<model>` in a base's settings.

    Two transports: `in_process` (inside the server: the Gateway object, no HTTP, on the caller's
    principal) and `over_http` (the CLI: `POST /v1/embeddings` with a virtual key). Without one it
    can only name its space (queries then pass the vector, embedded by `embed_query`)."""

    def __init__(
        self,
        model: str,
        dimensions: int = 384,
        transport: Transport | None = None,
        batch_size: int = GATEWAY_BATCH,
    ) -> None:
        if not model:
            raise ValueError("a gateway embedder needs a model: 'gateway:<model>'")
        self.model = model
        self.name = GATEWAY_PREFIX + model
        self.dimensions = dimensions
        self.batch_size = max(1, batch_size)
        self.transport = transport
        self.calls = 0  # embeddings calls made (one per batch)

    def embed(self, texts: list[str]) -> Matrix:
        if self.transport is None:
            raise EmbeddingFailed(f"embedder {self.name!r} has no gateway to call here", 400)
        rows: list[list[float]] = []
        for i in range(0, len(texts), self.batch_size):
            batch = texts[i : i + self.batch_size]
            vectors = self.transport(batch)
            self.calls += 1
            if len(vectors) != len(batch):
                raise EmbeddingFailed(f"{self.name}: {len(vectors)} vectors for {len(batch)} texts")
            rows.extend(vectors)
        return normalized(rows, self.dimensions, self.name)

    @classmethod
    def in_process(
        cls,
        gateway: Gateway,
        principal: Principal,
        model: str,
        dimensions: int,
        loop: asyncio.AbstractEventLoop,
        batch_size: int = GATEWAY_BATCH,
        timeout_s: float = 300.0,
    ) -> GatewayEmbedder:
        """For a worker thread of the server (`embed` blocks): each batch runs on `loop` through
        the gateway's embeddings path as `principal`. Never call `embed` on the loop's own thread."""

        def call(batch: list[str]) -> list[list[float]]:
            future = asyncio.run_coroutine_threadsafe(
                _embed_in_process(gateway, principal, model, batch), loop
            )
            return future.result(timeout_s)

        return cls(model, dimensions, call, batch_size)

    @classmethod
    def over_http(
        cls,
        base_url: str,
        api_key: str,
        model: str,
        dimensions: int,
        batch_size: int = GATEWAY_BATCH,
        timeout_s: float = 120.0,
    ) -> GatewayEmbedder:
        """For the CLI: `POST {base_url}/v1/embeddings` with a virtual key (never logged)."""
        import httpx

        client = httpx.Client(
            base_url=base_url.rstrip("/"), headers={"authorization": f"Bearer {api_key}"}, timeout=timeout_s
        )

        def call(batch: list[str]) -> list[list[float]]:
            try:
                response = client.post("/v1/embeddings", json={"model": model, "input": batch})
            except httpx.HTTPError as exc:
                raise EmbeddingFailed(f"gateway at {base_url} unreachable: {type(exc).__name__}") from None
            if response.status_code != 200:
                try:
                    message = str(response.json()["error"]["message"])
                except (ValueError, KeyError, TypeError):
                    message = response.text[:200]
                raise EmbeddingFailed(
                    f"gateway embeddings: {response.status_code} {message}", response.status_code
                )
            data = sorted(response.json()["data"], key=lambda d: int(d["index"]))
            return [list(d["embedding"]) for d in data]

        return cls(model, dimensions, call, batch_size)


def normalized(rows: Sequence[Sequence[float]], dimensions: int, name: str) -> Matrix:
    """Rows as L2-normalized float32, checked against the base's dimensions."""
    if not rows:
        return np.zeros((0, dimensions), dtype=np.float32)
    matrix = np.asarray(rows, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[1] != dimensions:
        got = matrix.shape[1] if matrix.ndim == 2 else "?"
        raise EmbeddingFailed(f"{name} returned {got}-dimensional vectors; the base uses {dimensions}", 400)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    out: Matrix = (matrix / np.maximum(norms, 1e-12)).astype(np.float32)
    return out


async def _embed_in_process(
    gateway: Gateway, principal: Principal, model: str, texts: list[str]
) -> list[list[float]]:
    from plinth.gateway import openai_protocol
    from plinth.gateway.pipeline import Endpoint, embed_in_process

    endpoint = Endpoint(KNOWLEDGE_EMBEDDINGS, openai_protocol.error_body)
    answer = await embed_in_process(gateway, principal, EmbeddingRequest(model, texts), endpoint)
    return answer.vectors


async def embed_query(
    gateway: Gateway, principal: Principal, embedder: str, dimensions: int, query: str
) -> Matrix:
    """The query vector of a `gateway:<model>` base, embedded through the gateway on the caller's
    key (so it is metered and limited like the caller's other calls). Raises GatewayError."""
    vectors = await _embed_in_process(gateway, principal, embedder.removeprefix(GATEWAY_PREFIX), [query])
    try:
        row: Matrix = normalized(vectors, dimensions, embedder)[0]
    except EmbeddingFailed as exc:
        from plinth.gateway.errors import GatewayError

        raise GatewayError(exc.status, str(exc), code="embedding_failed") from None
    return row


def embedder_for(name: str, dimensions: int) -> Embedder:
    """The embedder a base was built with (its settings name it), so queries use the same space.
    A `gateway:<model>` embedder comes without a transport: queries embed with `embed_query`."""
    if name == LocalEmbedder.name:
        return LocalEmbedder()
    if name == HashingEmbedder.name:
        return HashingEmbedder(dimensions)
    if name.startswith(GATEWAY_PREFIX):
        return GatewayEmbedder(name.removeprefix(GATEWAY_PREFIX), dimensions)
    raise ValueError(f"unknown embedder {name!r}")
