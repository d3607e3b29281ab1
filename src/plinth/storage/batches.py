"""Records the hot path produces (usage records, audited decisions, guardrail events), written later.

`append()` runs on the event loop once per request, so it only appends to a deque (O(1), no I/O, no
lock: `deque.append` is atomic in CPython). A background task wakes every `interval_s`, or as soon
as `batch_size` items wait, and hands batches to `write_batch` on the low-priority writer thread
(`plinth.storage.background`); far behind, it writes at ordinary priority until it has caught up.

A failed write keeps the batch for the next try, backing off while the database refuses; the
buffer is bounded, so a database that stays down costs the *oldest* items (logged and counted)
rather than the gateway's memory. `aclose()` (application shutdown) writes whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Generic, TypeVar

from prometheus_client import Counter

from plinth.storage.background import run_in_background

T = TypeVar("T")

BEHIND_BATCHES = 2  # batches waiting beyond which the writer stops yielding to requests
RETRY_MAX_S = 5.0


class BatchWriter(Generic[T]):
    """Subclasses name what they write and implement `write_batch` (blocking, one transaction)."""

    what = "records"  # for log lines: "writing <what> failed"

    def __init__(
        self,
        *,
        interval_s: float,
        batch_size: int,
        max_buffer: int,
        dropped: Counter,
        log: logging.Logger,
        retry_max_s: float = RETRY_MAX_S,
    ) -> None:
        self.interval_s = interval_s
        self.batch_size = batch_size
        self.max_buffer = max_buffer
        self.retry_max_s = retry_max_s
        self._dropped_counter = dropped
        self._log = log
        self._buffer: deque[T] = deque()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        self.written = 0
        self.dropped = 0

    def write_batch(self, batch: list[T]) -> None:
        """Write one batch in one transaction (runs in a worker thread); raise to keep it."""
        raise NotImplementedError

    # --- hot path ------------------------------------------------------------------------------

    def append(self, item: T) -> None:
        """Queue one item. Never blocks, never raises for a full buffer (drops the oldest)."""
        buffer = self._buffer
        if len(buffer) >= self.max_buffer:
            buffer.popleft()
            self._count_dropped(1)
        buffer.append(item)
        if len(buffer) >= self.batch_size and not self._wake.is_set():
            self._wake.set()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    # --- background ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start the flush task on the running loop (the application's lifespan)."""
        if self._task is None:
            self._wake = asyncio.Event()  # bound to this loop
            self._stop = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"plinth-writer-{self.what}")

    async def _run(self) -> None:
        delay = self.interval_s
        while not self._stop.is_set():
            # Back off while failing: a full buffer must not hammer a sick database.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((self._stop if self._failing else self._wake).wait(), delay)
            if self._stop.is_set():
                return  # aclose writes what is left
            self._wake.clear()
            delay = self.interval_s if await self.flush() else min(self.retry_max_s, delay * 2)

    async def flush(self) -> bool:
        """Write everything buffered now, batch by batch; False when the database refused a batch."""
        while self._buffer:
            batch = self._take(self.batch_size)
            behind = len(self._buffer) > BEHIND_BATCHES * self.batch_size
            try:
                await run_in_background(self.write_batch, batch, behind=behind)
            except Exception as exc:
                self._put_back(batch)
                if not self._failing:
                    self._log.error("writing %s failed, will retry: %s", self.what, exc)
                    self._failing = True
                return False
            self.written += len(batch)
            if self._failing:
                self._log.warning("writing %s works again", self.what)
                self._failing = False
        return True

    async def aclose(self, timeout_s: float = 10.0) -> None:
        """Stop the task and write everything left (graceful shutdown); retry briefly if need be."""
        if self._task is not None:
            # Not cancel(): a batch being written in a worker thread would go on being written
            # after we return (racing the final flush and the database's disposal), or be lost
            # unnoticed if it failed. The task finishes its current batch and stops.
            self._stop.set()
            self._wake.set()
            await self._task
            self._task = None
        deadline = time.monotonic() + timeout_s
        delay = 0.1
        while not await self.flush():
            if time.monotonic() + delay > deadline:
                lost = len(self._buffer)
                self._buffer.clear()
                self._count_dropped(lost)
                self._log.error("shutting down with the database unavailable: %d %s lost", lost, self.what)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    # --- internals -----------------------------------------------------------------------------

    def _take(self, n: int) -> list[T]:
        buffer = self._buffer
        return [buffer.popleft() for _ in range(min(n, len(buffer)))]

    def _put_back(self, batch: list[T]) -> None:
        """Return a failed batch to the front, keeping the buffer bound (newest items win)."""
        room = self.max_buffer - len(self._buffer)
        if room < len(batch):
            lost = len(batch) - max(room, 0)
            batch = batch[lost:]
            self._count_dropped(lost)
        self._buffer.extendleft(reversed(batch))

    def _count_dropped(self, n: int) -> None:
        if n <= 0:
            return
        if self.dropped == 0 or self.dropped // 1000 != (self.dropped + n) // 1000:
            self._log.error("%s buffer full: dropped %d oldest so far", self.what, self.dropped + n)
        self.dropped += n
        self._dropped_counter.inc(n)


__all__ = ["BatchWriter"]
