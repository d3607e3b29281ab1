"""The writer process: batch inserts in a child process, with the writers' retry and shutdown rules."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import sqlalchemy

from plinth.governance.audit import AuditLog, Entry, verify
from plinth.metering import PriceBook, UsageRecorder
from plinth.providers.types import Usage
from plinth.storage import Database, utcnow
from plinth.storage.writer_process import WriteFailed, WriterProcess
from plinth.tenancy import Principal

PRINCIPAL = Principal(name="k", key_id="key_1", team_id="team_1", org_id="org_1", project_id="prj_1")


def _database(tmp_path: Path) -> Database:
    database = Database(f"sqlite:///{tmp_path}/plinth.db")
    database.migrate()
    return database


def _count(database: Database, table: str) -> int:
    with database.engine.connect() as connection:
        return int(connection.execute(sqlalchemy.text(f"SELECT count(*) FROM {table}")).scalar_one())


def _record(recorder: UsageRecorder, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        recorder.record(f"req-{i}", PRINCIPAL, "chat_completions", "m", "m", "d", 200, Usage(3, 2), 1.5)


async def test_usage_records_and_decisions_are_written_by_the_child(tmp_path: Path) -> None:
    database = _database(tmp_path)
    process = WriterProcess()
    recorder = UsageRecorder(database, PriceBook([]), batch_size=50)
    audit = AuditLog(database, batch_size=50)
    for writer in (recorder, audit):
        writer.use_process(process)
    _record(recorder, 120)
    for i in range(70):
        audit.append(
            Entry("decision", "key_1", "invoke", "allow", "m", None, f"req-{i}", ("p1",), {"n": i}, utcnow())
        )
    assert await recorder.flush() and await audit.flush()
    assert process.pid is not None and process.pid != os.getpid()
    assert process.starts == 1
    await process.aclose()
    assert _count(database, "usage_records") == 120
    assert recorder.written == 120
    result = verify(database)
    assert result.ok and result.records == 70


async def test_a_killed_child_is_restarted_and_its_batch_retried(tmp_path: Path) -> None:
    database = _database(tmp_path)
    process = WriterProcess()
    recorder = UsageRecorder(database, PriceBook([]), batch_size=1000)
    recorder.use_process(process)
    _record(recorder, 10)
    assert await recorder.flush()
    first = process.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # wait until the child is gone
        try:
            os.kill(first, 0)
        except ProcessLookupError:
            break
        time.sleep(0.01)
    _record(recorder, 10, start=10)
    ok = await recorder.flush()
    if not ok:  # the write found the dead child: the batch is kept, and the next flush restarts it
        assert recorder.pending == 10
        assert await recorder.flush()
    assert process.starts == 2 and process.pid != first
    await process.aclose()
    assert _count(database, "usage_records") == 20


async def test_a_refused_batch_is_kept_and_the_error_reported(tmp_path: Path) -> None:
    database = _database(tmp_path)
    process = WriterProcess()
    recorder = UsageRecorder(database, PriceBook([]))
    recorder.use_process(process)
    with database.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE usage_records RENAME TO usage_records_away")
    _record(recorder, 5)
    assert not await recorder.flush()
    assert recorder.pending == 5 and recorder.written == 0
    with database.engine.begin() as connection:
        connection.exec_driver_sql("ALTER TABLE usage_records_away RENAME TO usage_records")
    assert await recorder.flush()
    await process.aclose()
    assert _count(database, "usage_records") == 5


async def test_closed_process_refuses_and_in_memory_sqlite_stays_in_thread() -> None:
    process = WriterProcess()
    await process.aclose()
    with pytest.raises(WriteFailed, match="closed"):
        await process.run(print, "sqlite://", [])
    memory = Database("sqlite://")
    memory.migrate()
    recorder = UsageRecorder(memory, PriceBook([]))
    recorder.use_process(WriterProcess())
    assert recorder.writer_process is None  # a child could not open the parent's in-memory database
