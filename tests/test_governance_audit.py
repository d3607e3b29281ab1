"""The audit trail: hash chain, tamper detection (database and exports), buffered decision records."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from plinth.cli import app
from plinth.config import parse_config
from plinth.governance import audit
from plinth.governance.config import Level
from plinth.governance.engine import Governance
from plinth.storage import Database, utcnow
from plinth.tenancy.keys import Principal


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.migrate()
    yield database
    database.dispose()


def fill(log: audit.AuditLog, n: int) -> None:
    for i in range(n):
        log.record_admin_action(
            "alice@example.com", "model.create", target=f"m{i}", detail={"n": i, "x": [1, "a"]}
        )


def test_chain_verifies_and_links(db: Database) -> None:
    log = audit.AuditLog(db)
    assert log.verify().ok and log.verify().records == 0
    fill(log, 4)
    # The writer hashes `detail` serialised once; the verifier hashes what the database gives back.
    log.record_admin_action(
        "bob", "x.y", detail={"z": 1, "a": {"y": 2.5, "b": None}, 10: "int key", "é": ("t", 2)}
    )
    result = log.verify()
    assert result.ok and result.records == 5 and result.head_seq == 5
    records = audit.records_after(db, 0, 100)
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev_hash"] == audit.GENESIS
    assert all(b["prev_hash"] == a["hash"] for a, b in itertools.pairwise(records))


@pytest.mark.parametrize("sqlite", [True, False])
def test_prepared_entries_hash_exactly_like_the_records_they_become(sqlite: bool) -> None:
    """`_chain` splices seq and prev_hash into JSON serialised earlier; the verifier serialises the
    whole record. Awkward values (escapes, unicode, None, clipped fields, non-string keys) must
    give the same bytes, or every such record would read as edited."""
    entries = [
        audit.Entry("decision", 'quote" back\\slash', "invoke", "deny", None, "línea\nnueva \u2028", "r-1",
                    ("p1", "p\"2"), {"z": [1, 2.5, None], 3: "int key", "é": {"b": True, "a": ()}}),
        audit.Entry("admin", "a" * 500, "x" * 150, "ok-but-much-too-long-outcome", "t", None, None, (), {}),
    ]  # fmt: skip
    prepared = [audit.prepare(e, sqlite=sqlite) for e in entries]
    rows, head = audit._chain(prepared, 41, "f" * 64)
    assert [r[0] for r in rows] == [42, 43] and rows[0][-2] == "f" * 64 and head == rows[-1][-1]
    for row in rows:
        record = dict(zip(audit._COLUMNS, row, strict=True))
        record["created_at"] = str(record["created_at"]).replace(" ", "T")
        record["policy_ids"] = json.loads(record["policy_ids"])
        record["detail"] = json.loads(record["detail"])
        assert audit.record_hash(record) == record["hash"]
    assert len(rows[1][3]) == 200 and rows[1][3].endswith("…")  # clipped before hashing


def test_decision_batches_larger_than_a_slice_are_written_whole(db: Database) -> None:
    """The writer inserts in slices of a few rows (yielding the core between them)."""
    log = audit.AuditLog(db)
    decision = Governance(parse_config({}), None).decide(
        Principal(name="x"), "invoke", "m", ["m-1"], Level.PUBLIC
    )
    for i in range(21):
        log.record_decision(f"r{i}", None, decision)
    log.write_batch(list(log._buffer))
    result = log.verify()
    assert result.ok and result.records == 21
    assert [r["request_id"] for r in audit.records_after(db, 0, 100)] == [f"r{i}" for i in range(21)]


def test_a_memoised_decision_is_serialised_once_but_recorded_per_request(db: Database) -> None:
    """`record_decision` reuses the serialised decision; the time, the request id and whatever
    differs between callers (region, entity types, principal) must still be each record's own."""
    log = audit.AuditLog(db)
    decision = Governance(parse_config({}), None).decide(
        Principal(name="x"), "invoke", "m", ["m-1"], Level.PUBLIC
    )
    alice, bob = Principal(name="alice", team_id="t-a"), Principal(name="bob", team_id="t-b")
    log.record_decision("r1", alice, decision, entity_types=["EMAIL_ADDRESS"])
    log.record_decision("r2", alice, decision)
    log.record_decision("r3", bob, decision, caller_region="eu-west-1")
    log.record_decision("r4", alice, decision, entity_types=["EMAIL_ADDRESS"])
    log.write_batch(list(log._buffer))
    assert log.verify().ok
    records = audit.records_after(db, 0, 10)
    assert [r["request_id"] for r in records] == ["r1", "r2", "r3", "r4"]
    assert [r["actor"] for r in records] == ["alice", "alice", "bob", "alice"]
    assert [r["detail"].get("entity_types") for r in records] == [
        ["EMAIL_ADDRESS"],
        None,
        None,
        ["EMAIL_ADDRESS"],
    ]
    assert [r["detail"]["team"] for r in records] == ["t-a", "t-a", "t-b", "t-a"]
    assert records[2]["detail"]["caller_region"] == "eu-west-1"
    assert records[0]["created_at"] <= records[3]["created_at"] and len(log._templates) == 3


def test_a_decision_is_dated_when_it_is_made_not_when_it_is_written(db: Database) -> None:
    """The writer thread fills in the time later (`PendingDecision`): the record must still carry
    the moment `record_decision` was called."""
    log = audit.AuditLog(db)
    decision = Governance(parse_config({}), None).decide(
        Principal(name="x"), "invoke", "m", ["m-1"], Level.PUBLIC
    )
    before = utcnow()
    log.record_decision("r1", None, decision)
    after = utcnow()
    time.sleep(0.2)
    log.write_batch(list(log._buffer))
    assert log.verify().ok
    (record,) = audit.records_after(db, 0, 10)
    created = dt.datetime.fromisoformat(record["created_at"])
    assert before <= created <= after


def _sqlite_path(db: Database) -> str:
    assert db.is_sqlite and db.url.database
    return db.url.database


@pytest.mark.parametrize(
    ("tamper", "bad_seq", "words"),
    [
        ("UPDATE audit_records SET actor = 'mallory' WHERE seq = 3", 3, "edited"),
        ('UPDATE audit_records SET detail = \'{"n": 99, "x": [1, "a"]}\' WHERE seq = 2', 2, "edited"),
        ("DELETE FROM audit_records WHERE seq = 3", 4, "removed"),
        (  # swap records 2 and 3
            "UPDATE audit_records SET seq = -2 WHERE seq = 2; UPDATE audit_records SET seq = 2 WHERE seq = 3;"
            "UPDATE audit_records SET seq = 3 WHERE seq = -2",
            2,
            "link",
        ),
        ("DELETE FROM audit_records WHERE seq = 5", 5, "removed from the end"),
        ("UPDATE audit_head SET seq = 4", 5, "head"),
    ],
)
def test_tampering_in_the_database_is_detected(tmp_path: Path, tamper: str, bad_seq: int, words: str) -> None:
    db = Database(f"sqlite:///{tmp_path}/plinth.db")
    db.migrate()
    fill(audit.AuditLog(db), 5)
    db.dispose()
    with sqlite3.connect(_sqlite_path(db)) as raw:
        raw.executescript(tamper)
    result = audit.verify(db)
    assert not result.ok and result.first_bad_seq == bad_seq, result.problems
    assert any(words in problem for problem in result.problems), result.problems
    # `plinth audit verify --db` says so and exits 1; an intact chain exits 0.
    runner = CliRunner()
    broken = runner.invoke(app, ["audit", "verify", "--db", f"sqlite:///{tmp_path}/plinth.db"])
    assert broken.exit_code == 1 and f"from record {bad_seq}" in broken.stderr


def test_cli_verify_intact_and_unreachable(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/plinth.db"
    db = Database(url)
    db.migrate()
    fill(audit.AuditLog(db), 3)
    runner = CliRunner()
    ok = runner.invoke(app, ["audit", "verify", "--db", url, "--json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["records"] == 3
    missing = runner.invoke(app, ["audit", "verify", "--db", f"sqlite:///{tmp_path}/nothing/x.db"])
    assert missing.exit_code == 2 and "Traceback" not in missing.stderr


def test_concurrent_writers_form_one_chain(db: Database) -> None:
    log = audit.AuditLog(db)

    def write(who: str) -> None:
        for i in range(15):
            log.record_admin_action(who, "kill.create", target=f"{who}-{i}")

    threads = [threading.Thread(target=write, args=(f"user{t}",)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = log.verify()
    assert result.ok and result.records == 60, result.problems


def test_export_segments_manifest_and_offline_verify(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/plinth.db")
    db.migrate()
    log = audit.AuditLog(db)
    fill(log, 25)
    out = tmp_path / "export"
    manifest = log.export(out, segment_records=10)
    assert manifest["records"] == 25 and [s["records"] for s in manifest["segments"]] == [10, 10, 5]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["audit-000000000001-000000000010.jsonl", "audit-000000000011-000000000020.jsonl",
                     "audit-000000000021-000000000025.jsonl", "manifest.json"]  # fmt: skip
    assert all(not (p.stat().st_mode & 0o222) for p in out.iterdir())  # read-only
    assert audit.verify_export(out).ok
    with pytest.raises(FileExistsError):
        log.export(out)  # never over an earlier export
    # An incremental export starts mid-chain and still verifies.
    fill(log, 3)
    more = log.export(tmp_path / "export2", after_seq=25)
    assert more["first_seq"] == 26 and more["segments"][0]["first_prev_hash"] == manifest["last_hash"]
    assert audit.verify_export(tmp_path / "export2").ok
    # Editing one line of a segment is caught (by the segment hash and the record hash).
    segment = out / "audit-000000000011-000000000020.jsonl"
    segment.chmod(0o644)
    lines = segment.read_text().splitlines()
    record = json.loads(lines[4])
    record["outcome"] = "error"
    lines[4] = json.dumps(record)
    segment.write_text("\n".join(lines) + "\n")
    result = audit.verify_export(out)
    assert not result.ok and result.first_bad_seq == 11
    assert any("sha256 differs" in p for p in result.problems) and any(
        "record 15" in p for p in result.problems
    )
    runner = CliRunner()
    assert runner.invoke(app, ["audit", "verify", "--export", str(out)]).exit_code == 1
    assert runner.invoke(app, ["audit", "verify", "--export", str(tmp_path / "export2")]).exit_code == 0


async def test_decisions_are_buffered_and_written_in_batches(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/plinth.db")
    db.migrate()
    log = audit.AuditLog(db, interval_s=0.05)
    gov = Governance(parse_config({"models": [{"name": "m", "deployments": [
        {"name": "m-1", "provider": "openai", "model": "m", "api_key": "k"}]}]}), db)  # fmt: skip
    principal = Principal(name="app", key_id="key_1", team_id="team_1", environment="prod")
    log.start()
    try:
        for i in range(30):
            decision = gov.decide(principal, "invoke", "m", ["m-1"], Level.INTERNAL, "eu-west-1")
            log.record_decision(
                f"req_{i}", principal, decision, caller_region="eu-west-1", entity_types=["EMAIL"]
            )
        assert log.pending == 30  # nothing written on the caller's path
        for _ in range(100):
            if log.pending == 0 and audit.verify(db).records == 30:
                break
            await asyncio.sleep(0.02)
    finally:
        await log.aclose()
    records = audit.records_after(db, 0, 100, kind="decision")
    assert len(records) == 30 and audit.verify(db).ok
    first = records[0]
    assert first["actor"] == "key_1" and first["action"] == "invoke" and first["outcome"] == "allow"
    assert first["policy_ids"] == ["plinth-default-models"] and first["request_id"] == "req_0"
    assert first["detail"]["caller_region"] == "eu-west-1" and first["detail"]["entity_types"] == ["EMAIL"]
    assert first["detail"]["deployments"] == ["m-1"] and first["detail"]["data_class"] == "internal"
    assert audit.records_after(db, 0, 10, request_id="req_7")[0]["request_id"] == "req_7"


async def test_decision_writer_keeps_records_while_the_database_is_down(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path}/plinth.db")  # not migrated: every write fails
    log = audit.AuditLog(db, interval_s=0.01, max_buffer=5)
    gov = Governance(parse_config({}), None)
    decision = gov.decide(Principal(name="x"), "invoke", "m", ["m-1"], Level.PUBLIC)
    for i in range(8):
        log.record_decision(f"r{i}", None, decision)
    assert log.pending == 5 and log.dropped == 3  # bounded: the oldest go first
    assert not await log.flush() and log.pending == 5
    db.migrate()
    assert await log.flush() and log.pending == 0
    assert [r["request_id"] for r in audit.records_after(db, 0, 10)] == ["r3", "r4", "r5", "r6", "r7"]
    db.dispose()


def test_migration_0009_keeps_the_chain_and_drops_the_hash_index(tmp_path: Path) -> None:
    """Records written before the audit table was rebuilt still verify after it, and back."""
    from alembic import command
    from alembic.config import Config

    from plinth.storage.db import MIGRATIONS

    database = Database(f"sqlite:///{tmp_path / 'plinth.db'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))

    def to(revision: str, up: bool = True) -> None:
        with database.engine.begin() as connection:
            config.attributes["connection"] = connection
            (command.upgrade if up else command.downgrade)(config, revision)

    def indexes() -> set[str]:
        with sqlite3.connect(_sqlite_path(database)) as raw:
            return {row[1] for row in raw.execute("PRAGMA index_list(audit_records)")}

    to("0008")
    log = audit.AuditLog(database)
    fill(log, 4)
    assert any(name.startswith("sqlite_autoindex") for name in indexes())
    to("head")
    assert not any(name.startswith("sqlite_autoindex") for name in indexes())  # no hash or seq index
    assert "ix_audit_records_kind_seq" in indexes()
    fill(log, 3)
    result = log.verify()
    assert result.ok and result.records == 7
    to("0008", up=False)
    assert log.verify().ok and "ix_audit_records_kind" in indexes()
    database.dispose()
