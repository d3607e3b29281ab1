"""Embedders: the local MiniLM model for real use, a hashing embedder for tests and offline demos."""

from __future__ import annotations

import hashlib
import re
from typing import Protocol

import numpy as np
import numpy.typing as npt

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


def embedder_for(name: str, dimensions: int) -> Embedder:
    """The embedder a base was built with (its settings name it), so queries use the same space."""
    if name == LocalEmbedder.name:
        return LocalEmbedder()
    if name == HashingEmbedder.name:
        return HashingEmbedder(dimensions)
    raise ValueError(f"unknown embedder {name!r}")
