"""LocalEmbeddingProvider with the real all-MiniLM-L6-v2 weights: no mocks, no network."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

pytest.importorskip("torch")

from plinth.config.schema import DeploymentConfig
from plinth.providers.base import ProviderError, UnsupportedOperation
from plinth.providers.http import HttpClient
from plinth.providers.local import DIMENSIONS, SHARED, LocalEmbeddingProvider
from plinth.providers.types import ChatRequest, EmbeddingRequest, Message, TextPart

MODEL = "all-MiniLM-L6-v2"


def make_provider(**config: object) -> LocalEmbeddingProvider:
    deployment = DeploymentConfig(provider="local", model=MODEL, **config)  # type: ignore[arg-type]
    return LocalEmbeddingProvider(deployment, HttpClient(), name="local-test")


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def embed(texts: list[str], dimensions: int | None = None) -> list[list[float]]:
    result = await make_provider().embed(
        EmbeddingRequest(model="e", inputs=texts, dimensions=dimensions), MODEL
    )
    return result.vectors


async def test_concurrent_first_calls_load_once_without_blocking_the_loop() -> None:
    SHARED.unload()
    before = SHARED.loads
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    results = await asyncio.gather(*(embed([f"sentence number {i}"]) for i in range(8)))
    done.set()
    await tick
    assert SHARED.loads == before + 1
    assert all(len(r) == 1 and len(r[0]) == DIMENSIONS for r in results)
    # Loading runs C code that holds the GIL for a few hundred milliseconds at most; a blocked loop
    # would show one gap as long as the whole load (several seconds).
    assert max(gaps) < 1.5, f"the event loop was blocked for {max(gaps):.2f}s"


async def test_vectors_are_384_dimensional_unit_vectors_with_real_token_counts() -> None:
    provider = make_provider()
    result = await provider.embed(EmbeddingRequest(model="e", inputs=["hello world", "hi there"]), MODEL)
    assert len(result.vectors) == 2
    for vector in result.vectors:
        assert len(vector) == DIMENSIONS
        assert norm(vector) == pytest.approx(1.0, abs=1e-5)
    # WordPiece: [CLS] hello world [SEP] + [CLS] hi there [SEP]
    assert result.usage.input_tokens == 8 and not result.usage.estimated
    assert result.model == MODEL


async def test_the_model_normalizes_by_default_like_sentence_transformers() -> None:
    await embed(["warm up"])
    raw = await asyncio.to_thread(SHARED.model().encode, ["a plain sentence"], normalize_embeddings=False)
    assert float((raw[0] ** 2).sum()) == pytest.approx(1.0, abs=1e-5)


async def test_similar_sentences_are_closer_than_unrelated_ones() -> None:
    cat, kitten, tax = await embed(
        [
            "A cat is sleeping on the sofa.",
            "A kitten naps on the couch.",
            "Quarterly tax filings are due in April.",
        ]
    )
    assert dot(cat, kitten) > dot(cat, tax) + 0.3


async def test_dimensions_truncate_and_renormalize() -> None:
    (full,) = await embed(["truncate me please"])
    (short,) = await embed(["truncate me please"], dimensions=64)
    assert len(short) == 64
    assert norm(short) == pytest.approx(1.0, abs=1e-5)
    scale = norm(full[:64])
    assert short == pytest.approx([x / scale for x in full[:64]], abs=1e-5)


async def test_deployment_default_dimensions() -> None:
    provider = make_provider(embedding_dimensions=128)
    result = await provider.embed(EmbeddingRequest(model="e", inputs=["x"]), MODEL)
    assert len(result.vectors[0]) == 128


@pytest.mark.parametrize("dimensions", [385, 1536, 0, -1])
async def test_bad_dimensions_are_a_400_naming_the_field(dimensions: int) -> None:
    with pytest.raises(ProviderError) as info:
        await embed(["x"], dimensions=dimensions)
    assert info.value.status == 400 and info.value.param == "dimensions"
    assert "dimensions" in info.value.message


async def test_many_inputs_are_batched_and_ordered() -> None:
    texts = [f"item {i} about {'dogs' if i % 2 else 'stocks'}" for i in range(70)]
    vectors = await embed(texts)
    assert len(vectors) == 70
    (again,) = await embed([texts[41]])
    assert vectors[41] == pytest.approx(again, abs=1e-5)


async def test_empty_input_list() -> None:
    assert await embed([]) == []


async def test_other_models_and_chat_are_refused() -> None:
    provider = make_provider()
    with pytest.raises(ProviderError) as info:
        await provider.embed(EmbeddingRequest(model="e", inputs=["x"]), "text-embedding-3-small")
    assert "all-MiniLM-L6-v2" in info.value.message
    with pytest.raises(UnsupportedOperation):
        await provider.chat(
            ChatRequest(model="m", messages=[Message(role="user", content=[TextPart("hi")])]), MODEL
        )
