"""Guardrail events: every finding acted on, written off the hot path, never with the matched value.

`record()` appends to a bounded deque (O(1), no I/O); the background writer
(`plinth.storage.batches.BatchWriter`, as for usage records) inserts them in batches. A database that
stays down costs the oldest events (counted in `plinth_guardrail_events_dropped_total`), not memory.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter

from plinth.storage import Database
from plinth.storage.background import insert_in_slices
from plinth.storage.batches import BatchWriter

log = logging.getLogger("plinth.guardrails")

DROPPED = Counter(
    "plinth_guardrail_events_dropped", "Guardrail events lost because the database could not take them."
)

_COLUMNS = (
    "request_id", "created_at", "stage", "profile", "scanner", "rule", "type", "action", "score", "location",
    "data_class", "key_id", "team_id", "model",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class GuardrailEvent:
    request_id: str
    stage: str
    profile: str
    scanner: str
    rule: str
    type: str
    action: str
    score: float
    location: str
    data_class: str | None = None
    key_id: str | None = None
    team_id: str | None = None
    model: str | None = None
    created: float = field(default_factory=time.time)


class EventSink(Protocol):
    def record(self, event: GuardrailEvent) -> None: ...


def _clip(value: str | None, limit: int) -> str | None:
    return value if value is None or len(value) <= limit else value[:limit]


class EventRecorder(BatchWriter[GuardrailEvent]):
    """Buffers guardrail events and inserts them in batches from a background task."""

    what = "guardrail events"

    def __init__(
        self, database: Database, *, interval_s: float = 0.5, batch_size: int = 500, max_buffer: int = 50_000
    ) -> None:
        super().__init__(
            interval_s=interval_s, batch_size=batch_size, max_buffer=max_buffer, dropped=DROPPED, log=log
        )
        self.database = database

    def record(self, event: GuardrailEvent) -> None:
        self.append(event)

    def write_batch(self, batch: list[GuardrailEvent]) -> None:
        with self.database.engine.begin() as connection:
            sqlite = connection.dialect.name == "sqlite"
            rows: list[tuple[Any, ...]] = []
            for e in batch:
                created = dt.datetime.fromtimestamp(e.created, dt.UTC).replace(tzinfo=None)
                rows.append(
                    (
                        _clip(e.request_id, 128),
                        created.strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else created,
                        e.stage, _clip(e.profile, 100), _clip(e.scanner, 100), _clip(e.rule, 200),
                        _clip(e.type, 64), e.action, float(e.score), _clip(e.location, 200), e.data_class,
                        _clip(e.key_id, 200), _clip(e.team_id, 40), _clip(e.model, 200),
                    )
                )  # fmt: skip
            insert_in_slices(connection, "guardrail_events", _COLUMNS, rows)


__all__ = ["EventRecorder", "EventSink", "GuardrailEvent"]
