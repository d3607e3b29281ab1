"""The low-priority writer thread: usage records and other bulk writes yield the CPU to requests."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from plinth.storage.background import NICE_INCREMENT, run_in_background


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
