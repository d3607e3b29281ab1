"""A low-priority thread for bulk writes that must not delay requests (usage records, audit events).

The batch writers run beside the event loop in the same process, and so on the same CPU cores. In a
worker thread of normal priority a 150-row insert takes the core away from the event loop for a few
milliseconds, which showed as the 1-connection p99 (4.1 ms against 1.1 ms with the writer stopped).
Here the thread runs at a lower OS priority (nice +10, Linux sets it per thread). Under full load
that share (about a tenth of a contended core) is too little for usage records and audited
decisions together, and the buffers grew (measured: +48 MB over 100,000 requests at 1,500 req/s). So a writer that falls behind passes
`behind=True` and its batch runs on an ordinary-priority thread until it has caught up.

Priority alone was not enough. On the kernel we measured (Linux 6.18, EEVDF, CONFIG_PREEMPT_NONE,
250 Hz) a request's wake-up did not preempt the writer, whatever its nice value or scheduling
class: `perf sched timehist` showed the event loop runnable but waiting up to 2.5 ms behind it. A
bare system call between slices did not help; an explicit `sched_yield` did. So the writers work
in slices of a few rows and call `yield_to_requests()` between them (docs/benchmarks.md). Only
this thread yields, and only for the first `YIELD_BUDGET_S` of each batch: under full load a request
is always waiting, every yield gave the core away, and a batch that yielded throughout took seconds
while holding SQLite's write lock (measured: the usage writer fell ever further behind).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from sqlalchemy import Connection

T = TypeVar("T")

NICE_INCREMENT = 10
SLICE_ROWS = 8  # rows per executemany between yields: about 0.1 ms of work on the writer thread
YIELD_BUDGET_S = 0.02  # a batch yields for this long, then runs straight to its end

_executor: ThreadPoolExecutor | None = None
_lock = threading.Lock()
_this_thread = threading.local()  # `.yield_until`: set on the low-priority writer thread only


def _lower_priority() -> None:
    # On Linux `setpriority(PRIO_PROCESS, tid)` applies to one thread; raising one's own nice
    # value needs no privilege. Elsewhere this is a harmless no-op. Not SCHED_IDLE, although it
    # helped the 1-connection median: a writer starved mid-transaction holds SQLite's write lock,
    # and with 2 workers the other's writes timed out ("database is locked"; docs/benchmarks.md).
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE_INCREMENT)


def background_executor() -> ThreadPoolExecutor:
    """The process's low-priority writer thread (one: the writes are serialised anyway)."""
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="plinth-background", initializer=_lower_priority
            )
        return _executor


async def run_in_background(fn: Callable[..., T], *args: object, behind: bool = False) -> T:
    """`asyncio.to_thread` on the low-priority writer thread; on an ordinary one when `behind`."""
    loop = asyncio.get_running_loop()
    if behind:
        return await loop.run_in_executor(None, fn, *args)
    return await loop.run_in_executor(background_executor(), _with_yield_budget, fn, *args)


def _with_yield_budget(fn: Callable[..., T], *args: object) -> T:
    _this_thread.yield_until = time.monotonic() + YIELD_BUDGET_S
    try:
        return fn(*args)
    finally:
        yield_to_requests()  # after the commit, before the next batch
        _this_thread.yield_until = 0.0


def yield_to_requests() -> None:
    """Hand the core to a request that woke meanwhile (see the module docstring).

    `sched_yield` also releases the GIL; with nothing waiting it returns in about a microsecond.
    A no-op on any other thread than the low-priority writer, and once its batch's budget is spent."""
    if time.monotonic() < getattr(_this_thread, "yield_until", 0.0):
        os.sched_yield()


@contextlib.contextmanager
def dbapi_cursor(connection: Connection) -> Iterator[Any]:
    """A cursor of the DB-API connection under `connection`, in its transaction. The writers use it
    rather than `exec_driver_sql`: SQLAlchemy's execution context cost as much Python per statement
    as the statement itself, and Python on this thread is what delays requests (perf: 55% of the
    writer's time in the interpreter; docs/benchmarks.md)."""
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        yield cursor
    finally:
        cursor.close()


def placeholder(connection: Connection) -> str:
    """The DB-API parameter marker of `connection`'s driver (`?` for SQLite, `%s` for psycopg)."""
    return "?" if connection.dialect.paramstyle == "qmark" else "%s"


def insert_in_slices(
    connection: Connection, table: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """INSERT `rows` into `table`, one executemany per `SLICE_ROWS` rows with `yield_to_requests()`
    between them, in the caller's transaction."""
    marks = ", ".join([placeholder(connection)] * len(columns))
    sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"
    with dbapi_cursor(connection) as cursor:
        for start in range(0, len(rows), SLICE_ROWS):
            yield_to_requests()
            cursor.executemany(sql, rows[start : start + SLICE_ROWS])
    yield_to_requests()  # before the commit


__all__ = [
    "background_executor",
    "dbapi_cursor",
    "insert_in_slices",
    "placeholder",
    "run_in_background",
    "yield_to_requests",
]
