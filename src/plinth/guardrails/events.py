"""Guardrail events: every finding acted on, written off the hot path, never with the matched value.

`record()` appends to a bounded deque (O(1), no I/O); a background task writes batches on the
low-priority writer thread, like the usage records (`plinth.metering.recorder`). A database that
stays down costs the oldest events (counted in `plinth_guardrail_events_dropped_total`), not memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import Counter

from plinth.storage import Database
from plinth.storage.background import run_in_background

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


class EventRecorder:
    """Buffers guardrail events and inserts them in batches from a background task."""

    def __init__(
        self, database: Database, *, interval_s: float = 0.5, batch_size: int = 500, max_buffer: int = 50_000
    ) -> None:
        self.database = database
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.max_buffer = max_buffer
        self._buffer: deque[GuardrailEvent] = deque()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.written = 0
        self.dropped = 0

    def record(self, event: GuardrailEvent) -> None:
        if len(self._buffer) >= self.max_buffer:
            self._buffer.popleft()
            self.dropped += 1
            DROPPED.inc()
        self._buffer.append(event)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def start(self) -> None:
        if self._task is None:
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name="plinth-guardrail-events")

    async def _run(self) -> None:
        delay = self.interval_s
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if self._stop.is_set():
                return
            delay = self.interval_s if await self.flush() else min(5.0, delay * 2)

    async def flush(self) -> bool:
        """Write everything buffered now; False when the database refused a batch (kept for later)."""
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]
            try:
                await run_in_background(self._write, batch)
            except Exception as exc:
                room = self.max_buffer - len(self._buffer)
                keep = batch[max(0, len(batch) - room) :]
                self._buffer.extendleft(reversed(keep))
                lost = len(batch) - len(keep)
                if lost:
                    self.dropped += lost
                    DROPPED.inc(lost)
                if not self._failing:
                    log.error("writing guardrail events failed, will retry: %s", exc)
                    self._failing = True
                return False
            self._failing = False
        return True

    async def aclose(self, timeout_s: float = 5.0) -> None:
        if self._task is not None:
            self._stop.set()
            await self._task
            self._task = None
        deadline = time.monotonic() + timeout_s
        while not await self.flush():
            if time.monotonic() > deadline:
                lost = len(self._buffer)
                self._buffer.clear()
                self.dropped += lost
                DROPPED.inc(lost)
                log.error("shutting down with the database unavailable: %d guardrail events lost", lost)
                return
            await asyncio.sleep(0.2)

    def _write(self, batch: list[GuardrailEvent]) -> None:
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
            mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
            sql = (
                f"INSERT INTO guardrail_events ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join([mark] * len(_COLUMNS))})"
            )
            connection.exec_driver_sql(sql, rows)
        self.written += len(batch)


__all__ = ["EventRecorder", "EventSink", "GuardrailEvent"]
