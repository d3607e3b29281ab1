"""The low-priority writer thread: usage records and other bulk writes yield the CPU to requests."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from plinth.storage import Database, background
from plinth.storage.background import NICE_INCREMENT, insert_in_slices, run_in_background


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
async def test_background_writes_run_on_one_lower_priority_thread() -> None:
    def where() -> tuple[int, int, str]:
        tid = threading.get_native_id()
        return tid, os.getpriority(os.PRIO_PROCESS, tid), threading.current_thread().name

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    tid, nice, name = await run_in_background(where)
    assert nice == min(19, own + NICE_INCREMENT)
    assert name.startswith("plinth-background")
    assert tid != threading.get_native_id()
    assert (await run_in_background(where))[0] == tid  # one thread: the writes stay in order
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own  # the loop is untouched


async def test_a_writer_that_fell_behind_runs_at_ordinary_priority() -> None:
    def where() -> tuple[int, str]:
        tid = threading.get_native_id()
        return os.getpriority(os.PRIO_PROCESS, tid), threading.current_thread().name

    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    nice, name = await run_in_background(where, behind=True)
    assert nice == own and not name.startswith("plinth-background")


async def test_only_the_writer_thread_yields_and_only_early_in_each_batch() -> None:
    """A batch yields the core between slices for its first YIELD_BUDGET_S, then runs straight
    (yielding throughout starved it under load while it held the database's write lock)."""

    def budget_left() -> float:
        return getattr(background._this_thread, "yield_until", 0.0) - time.monotonic()

    def early_and_late() -> tuple[float, float]:
        early = budget_left()
        time.sleep(background.YIELD_BUDGET_S * 1.5)
        return early, budget_left()

    early, late = await run_in_background(early_and_late)
    assert 0 < early <= background.YIELD_BUDGET_S and late < 0
    assert (await run_in_background(budget_left)) > 0  # each batch gets its own budget
    assert (await run_in_background(budget_left, behind=True)) <= 0  # catching up: no yields
    assert budget_left() <= 0  # never on the event loop's thread


def test_slices_write_every_row_in_order(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/x.db")
    with db.engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE t (n INTEGER)")
        insert_in_slices(connection, "t", ("n",), [(i,) for i in range(21)])
    with db.engine.connect() as connection:
        assert [n for (n,) in connection.exec_driver_sql("SELECT n FROM t ORDER BY rowid")] == list(range(21))
    db.dispose()
