"""Optional named-entity backends for names, places and organizations: spaCy, GLiNER or a
transformers token-classification model. Nothing is ever downloaded: the model must be an installed
package or a local directory (`local_files_only`), and the library is imported only when configured.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from plinth.guardrails.config import NerConfig

# Backend labels (spaCy/OntoNotes, CoNLL, GLiNER prompts) -> Plinth types. Others are dropped.
LABELS = {
    "PERSON": "PERSON", "PER": "PERSON", "person": "PERSON", "name": "PERSON",
    "GPE": "LOCATION", "LOC": "LOCATION", "LOCATION": "LOCATION", "location": "LOCATION", "city": "LOCATION",
    "country": "LOCATION", "FAC": "LOCATION",
    "ORG": "ORGANIZATION", "ORGANIZATION": "ORGANIZATION", "organization": "ORGANIZATION", "company": "ORGANIZATION",
    "NORP": "NRP", "nationality": "NRP",
    "address": "STREET_ADDRESS", "street address": "STREET_ADDRESS",
}  # fmt: skip
GLINER_LABELS = ["person", "organization", "location", "street address", "nationality"]

Entities = list[tuple[str, int, int, float]]


class NerUnavailable(ValueError):
    """The configured backend or model is not installed; the message says what to install."""


def _spacy(config: NerConfig) -> Callable[[str], Entities]:
    try:
        import spacy
    except ImportError:
        raise NerUnavailable("guardrails.ner: backend 'spacy' needs the spacy package installed") from None
    try:
        nlp = spacy.load(config.model)
    except OSError as exc:
        raise NerUnavailable(
            f"guardrails.ner: spaCy model '{config.model}' is not installed (install its package; "
            f"Plinth downloads nothing): {exc}"
        ) from None
    lock = threading.Lock()  # spaCy pipelines are not documented as thread-safe

    def run(text: str) -> Entities:
        with lock:
            doc = nlp(text)
        return [(LABELS[e.label_], e.start_char, e.end_char, 0.85) for e in doc.ents if e.label_ in LABELS]

    return run


def _gliner(config: NerConfig) -> Callable[[str], Entities]:
    try:
        from gliner import GLiNER
    except ImportError:
        raise NerUnavailable("guardrails.ner: backend 'gliner' needs the gliner package installed") from None
    model = GLiNER.from_pretrained(config.model, local_files_only=True)
    labels = config.labels or GLINER_LABELS
    lock = threading.Lock()

    def run(text: str) -> Entities:
        with lock:
            found = model.predict_entities(text, labels, threshold=config.threshold)
        return [
            (LABELS[e["label"]], int(e["start"]), int(e["end"]), float(e["score"]))
            for e in found
            if e["label"] in LABELS
        ]

    return run


def _transformers(config: NerConfig) -> Callable[[str], Entities]:
    try:
        from transformers import pipeline
    except ImportError:
        raise NerUnavailable(
            "guardrails.ner: backend 'transformers' needs the transformers package installed"
        ) from None
    ner = pipeline(
        "token-classification",
        model=config.model,
        aggregation_strategy="simple",
        model_kwargs={"local_files_only": True},
    )
    lock = threading.Lock()

    def run(text: str) -> Entities:
        with lock:
            found: list[dict[str, Any]] = ner(text)
        return [
            (LABELS[e["entity_group"]], int(e["start"]), int(e["end"]), float(e["score"]))
            for e in found
            if e["entity_group"] in LABELS and float(e["score"]) >= config.threshold
        ]

    return run


_BACKENDS = {"spacy": _spacy, "gliner": _gliner, "transformers": _transformers}


def load_backend(config: NerConfig) -> Callable[[str], Entities]:
    return _BACKENDS[config.backend](config)


__all__ = ["GLINER_LABELS", "LABELS", "NerUnavailable", "load_backend"]
