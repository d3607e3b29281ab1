"""A child process that performs the batch writers' inserts, so their work never holds our GIL.

Why a process and not the low-priority thread (`plinth.storage.background`): building and inserting
100 usage rows and 100 audited decisions costs 5-8 ms of CPU, nearly all of it holding the GIL (row
tuples, timestamps, hashes, the DB-API's parameter binding). A niced thread yields the *core* to the
event loop but not the GIL: each time the loop gives the GIL up around a socket call, the writer
takes it, and the loop waits up to the switch interval to get it back, several times per request.
That was the whole 1-connection p99 of the production profile (4.1 ms added, against about 1 ms
with the writers stopped). In a child process the same work only competes for a core, which the
kernel takes back from a nice +10 process the moment the event loop wakes.

The parent pickles each batch (a few hundred microseconds per 100 records, in one I/O thread) and
waits for the child's answer: `None` when the batch is committed, else the error as text, so the
caller's retry and shutdown logic (`BatchWriter`) works exactly as in thread mode. A dead child is
started again on the next batch; the batch it was writing is retried, never silently lost.

A task is a picklable callable `task(database, batch)`: a module-level function, or a
`functools.partial` of one. The child opens each database URL once and keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from plinth.storage.db import Database

log = logging.getLogger("plinth.storage")

NICE_INCREMENT = 10
Task = Callable[["Database", list[Any]], None]


class WriteFailed(Exception):
    """The child could not write a batch (the database refused it, or the child died)."""


class WriterProcess:
    """One writer child per gateway process, started on the first batch and stopped by `close`."""

    def __init__(self, *, start_timeout_s: float = 30.0) -> None:
        self.start_timeout_s = start_timeout_s
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._io: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # one batch at a time through the pipe
        self._closed = False
        self.starts = 0  # how many children were started (1 unless one died)

    async def run(self, task: Task, database_url: str, batch: list[Any]) -> None:
        """Write `batch` with `task` in the child; raises WriteFailed when it was not committed."""
        if self._closed:
            raise WriteFailed("the writer process is closed")
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="plinth-writer-io")
        await asyncio.get_running_loop().run_in_executor(
            self._io, self._round_trip, task, database_url, batch
        )

    def _round_trip(self, task: Task, database_url: str, batch: list[Any]) -> None:
        payload = pickle.dumps((database_url, task, batch), protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            conn = self._ensure_started()
            try:
                conn.send_bytes(payload)
                reply = conn.recv()
            except (EOFError, OSError) as exc:
                self._reap()
                raise WriteFailed(f"the writer process stopped ({exc.__class__.__name__})") from None
        if reply is not None:
            raise WriteFailed(str(reply))

    def _ensure_started(self) -> Connection:
        if self._conn is not None and self._process is not None and self._process.is_alive():
            return self._conn
        self._reap()
        context = multiprocessing.get_context("spawn")  # never fork a process with threads and a loop
        parent, child = context.Pipe()
        process = context.Process(target=_serve, args=(child,), name="plinth-writer", daemon=True)
        process.start()
        child.close()
        if not parent.poll(self.start_timeout_s):
            process.kill()
            raise WriteFailed("the writer process did not start")
        parent.recv()  # "ready": imports done
        self._process, self._conn = process, parent
        self.starts += 1
        return parent

    def _reap(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        if self._process is not None:
            self._process.join(timeout=1)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=1)
        self._process = self._conn = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    async def aclose(self) -> None:
        """Stop the child after the batches in flight (the writers have flushed before this)."""
        self._closed = True
        if self._io is not None:
            io, self._io = self._io, None
            await asyncio.get_running_loop().run_in_executor(None, io.shutdown)
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.send_bytes(b"")  # end of work: the child disposes its engines and exits
            self._reap()


def _serve(conn: Connection) -> None:
    """The child's loop: one batch in, one answer out, until an empty message or end of file."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, 0, NICE_INCREMENT)
    from plinth.storage.db import Database

    databases: dict[str, Database] = {}
    conn.send("ready")
    try:
        while True:
            try:
                payload = conn.recv_bytes()
            except (EOFError, OSError):
                return  # the gateway went away
            if not payload:
                return
            try:
                url, task, batch = pickle.loads(payload)
                database = databases.get(url)
                if database is None:
                    database = databases[url] = Database(url)
                task(database, batch)
            except Exception as exc:  # reported to the parent, which keeps the batch and retries
                conn.send(f"{exc.__class__.__name__}: {exc}"[:2000])
            else:
                conn.send(None)
    finally:
        for database in databases.values():
            database.engine.dispose()


__all__ = ["Task", "WriteFailed", "WriterProcess"]
