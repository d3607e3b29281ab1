"""The audit trail: append-only, hash-chained records of admin actions and policy decisions.

Each record's hash covers its own fields and the previous record's hash, and `audit_head` holds the
newest (seq, hash). Writers lock the head row first (an UPDATE: the write lock on SQLite, a row lock
on PostgreSQL), so records from every worker and replica form one chain. `verify()` walks the chain
and names the first record that was edited, removed or moved; `export()` writes JSONL segments
with a manifest of hashes, fit for write-once storage, and `verify_export()` checks such a folder
offline.

Decisions are recorded off the hot path: `record_decision()` appends to a bounded deque and a
background task writes batches (like `plinth.metering.recorder`). Records carry who, what, when,
why and the deciding policy ids; never prompt or answer content.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson
from prometheus_client import Counter
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from plinth.governance.models import AuditHead, AuditRecord
from plinth.storage import Database, utcnow
from plinth.storage.background import (
    SLICE_ROWS,
    dbapi_cursor,
    insert_in_slices,
    placeholder,
    yield_to_requests,
)
from plinth.storage.batches import BatchWriter

if TYPE_CHECKING:
    from plinth.governance.engine import Decision
    from plinth.tenancy.keys import Principal

log = logging.getLogger("plinth.governance.audit")

GENESIS = "0" * 64
EXPORT_FORMAT = "plinth-audit-export/1"
DROPPED = Counter("plinth_audit_records_dropped", "Decision records lost because the database refused them.")

_LIMITS = {"actor": 200, "action": 100, "target": 300, "reason": 1000, "request_id": 128}


@dataclass(frozen=True, slots=True)
class Entry:
    """What a caller records; seq, timestamps and hashes are added when it joins the chain."""

    kind: str  # "admin" or "decision"
    actor: str
    action: str
    outcome: str
    target: str | None = None
    reason: str | None = None
    request_id: str | None = None
    policy_ids: tuple[str, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)
    created_at: dt.datetime | None = None


def _clip(value: str | None, name: str) -> str | None:
    limit = _LIMITS[name]
    return value if value is None or len(value) <= limit else value[: limit - 1] + "…"


def record_hash(record: dict[str, Any]) -> str:
    """The chain hash of one record (a dict as `as_dict` makes it): sha256 of its `_HASHED` fields,
    `prev_hash` included, as one JSON array with sorted keys. `_chain` builds the same bytes."""
    return hashlib.sha256(
        orjson.dumps(tuple(record[c] for c in _HASHED), option=orjson.OPT_SORT_KEYS)
    ).hexdigest()


def _iso(moment: dt.datetime) -> str:
    if moment.tzinfo is not None:
        moment = moment.replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds")


def as_dict(row: AuditRecord) -> dict[str, Any]:
    return {
        "seq": row.seq,
        "created_at": _iso(row.created_at),
        "kind": row.kind,
        "actor": row.actor,
        "action": row.action,
        "target": row.target,
        "outcome": row.outcome,
        "reason": row.reason,
        "request_id": row.request_id,
        "policy_ids": list(row.policy_ids or []),
        "detail": row.detail or {},
        "prev_hash": row.prev_hash,
        "hash": row.hash,
    }


_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS


@dataclass(frozen=True, slots=True)
class Prepared:
    """An entry serialised where it is recorded, so that joining the chain only numbers and hashes it.

    `hashed` is the chain hash's JSON input without its first and last items (`seq`, `prev_hash`),
    which only the writer knows; `values` are the row's columns between `seq` and `prev_hash`."""

    hashed: bytes
    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Template:
    """An entry serialised except for its time and request id: what a memoised decision repeats.

    The governance engine hands back the same `Decision` for every request of the same shape, so
    `AuditLog.record_decision` serialises it once (clipping, the detail's JSON) and fills in only
    the time and the request id per request: measured 22.6 -> 10 µs per decision in a warm loop, and
    60-110 µs less event-loop CPU per request in the gateway (docs/benchmarks.md, 2026-12-07).
    """

    middle: bytes  # JSON of kind, actor, action, target, outcome, reason (between time and request id)
    tail: bytes  # JSON of policy_ids and detail (after the request id)
    columns: tuple[Any, ...]  # the same, as row values
    policy_ids: str
    detail: str

    @classmethod
    def of(cls, entry: Entry) -> Template:
        actor = _clip(entry.actor, "actor") or "-"
        action = _clip(entry.action, "action") or "-"
        target = _clip(entry.target, "target")
        outcome = entry.outcome[:20]
        reason = _clip(entry.reason, "reason")
        detail = orjson.dumps(entry.detail, option=_JSON_OPTIONS)
        return cls(
            middle=orjson.dumps((entry.kind, actor, action, target, outcome, reason))[1:-1],
            tail=orjson.dumps((entry.policy_ids, orjson.Fragment(detail)), option=orjson.OPT_SORT_KEYS)[1:-1],
            columns=(entry.kind, actor, action, target, outcome, reason),
            policy_ids=orjson.dumps(entry.policy_ids).decode(),
            detail=detail.decode(),
        )

    def fill(self, created: dt.datetime, request_id: str | None, *, sqlite: bool) -> Prepared:
        """The record at `created` for `request_id`; `hashed` is byte for byte what `orjson.dumps`
        gives for the whole tuple (JSON arrays join their items with a bare comma)."""
        if created.tzinfo is not None:
            created = created.replace(tzinfo=None)
        iso = _iso(created)
        request_id = _clip(request_id, "request_id")
        hashed = b'"%b",%b,%b,%b' % (iso.encode(), self.middle, orjson.dumps(request_id), self.tail)
        # SQLite: SQLAlchemy's own DateTime text format (its type processing costs more than this).
        when: Any = iso.replace("T", " ") if sqlite else created
        return Prepared(hashed, (when, *self.columns, request_id, self.policy_ids, self.detail))


def prepare(entry: Entry, *, sqlite: bool, now: dt.datetime | None = None) -> Prepared:
    """Serialise one entry (a few µs)."""
    return Template.of(entry).fill(entry.created_at or now or utcnow(), entry.request_id, sqlite=sqlite)


class PendingDecision(NamedTuple):
    """A memoised decision's record before its time and request id are filled in.

    `AuditLog.record_decision` queues this and the writer thread fills it (`Template.fill`), in
    slices that yield to requests like the inserts do: on the event loop the fill cost about 15 µs
    of a request's 1-connection latency in the gateway (docs/benchmarks.md, 2026-12-07, late morning).
    A fill without slices on the writer thread had shown in the p99 (a whole batch in one burst)."""

    template: Template
    at: float  # time.time() when decided
    request_id: str | None

    def fill(self, *, sqlite: bool) -> Prepared:
        created = dt.datetime.fromtimestamp(self.at, dt.UTC)
        return self.template.fill(created, self.request_id, sqlite=sqlite)


def _prepared(entries: Sequence[Entry | Prepared | PendingDecision], *, sqlite: bool) -> list[Prepared]:
    """Every entry serialised, in slices of `SLICE_ROWS` with `yield_to_requests()` between them."""
    now = utcnow()
    out: list[Prepared] = []
    for index, entry in enumerate(entries):
        if index % SLICE_ROWS == 0:
            yield_to_requests()
        if isinstance(entry, Prepared):
            out.append(entry)
        elif isinstance(entry, PendingDecision):
            out.append(entry.fill(sqlite=sqlite))
        else:
            out.append(prepare(entry, sqlite=sqlite, now=now))
    return out


def _chain(entries: Sequence[Prepared], seq: int, prev_hash: str) -> tuple[list[tuple[Any, ...]], str]:
    """The database rows (in `_COLUMNS` order) of entries joining the chain after (seq, prev_hash),
    and the new head hash.

    Each hash is `record_hash` of the record's fields, built by splicing `seq` and `prev_hash` into
    the prepared JSON: the same bytes `orjson.dumps` gives for the whole tuple (the test suite checks
    that `record_hash` of every stored row agrees)."""
    rows: list[tuple[Any, ...]] = []
    for entry in entries:
        seq += 1
        digest = hashlib.sha256(b'[%d,%b,"%b"]' % (seq, entry.hashed, prev_hash.encode())).hexdigest()
        rows.append((seq, *entry.values, prev_hash, digest))
        prev_hash = digest
    return rows, prev_hash


def append(connection: Connection | Session, entries: Sequence[Entry | Prepared | PendingDecision]) -> int:
    """Add entries to the chain inside the caller's transaction; returns the last seq.

    The head is written first, so the lock is held before it is read (see the module docstring).
    Plain SQL on the DB-API cursor (`dbapi_cursor`): this runs for every batch of decisions on the
    background writer thread."""
    if not entries:
        return 0
    raw = connection if isinstance(connection, Connection) else connection.connection()
    prepared = _prepared(entries, sqlite=raw.dialect.name == "sqlite")
    head_table = AuditHead.__tablename__
    mark = placeholder(raw)
    with dbapi_cursor(raw) as cursor:
        cursor.execute(f"UPDATE {head_table} SET seq = seq WHERE id = 1")
        cursor.execute(f"SELECT seq, hash FROM {head_table} WHERE id = 1")
        head = cursor.fetchone()
        if head is None:
            raise RuntimeError("the audit chain head is missing: run `plinth db upgrade`")
        first = int(head[0])
        rows, last_hash = _chain(prepared, first, str(head[1]))
        # Not `insert(AuditRecord)`: its per-row JSON and type processing cost 25-35 µs a record
        # (measured, 1,000 decisions), which kept the low-priority writer behind at gateway rates.
        insert_in_slices(raw, AuditRecord.__tablename__, _COLUMNS, rows)
        seq = first + len(rows)
        cursor.execute(f"UPDATE {head_table} SET seq = {mark}, hash = {mark} WHERE id = 1", (seq, last_hash))
    return seq


_COLUMNS = ("seq", "created_at", "kind", "actor", "action", "target", "outcome", "reason", "request_id",
            "policy_ids", "detail", "prev_hash", "hash")  # fmt: skip
_HASHED = _COLUMNS[:-1]  # what a record's hash covers, in this order


@dataclass(slots=True)
class VerifyResult:
    ok: bool
    records: int
    head_seq: int
    problems: list[str]
    first_bad_seq: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "head_seq": self.head_seq,
            "first_bad_seq": self.first_bad_seq,
            "problems": self.problems,
        }


class _Checker:
    """Walks records in seq order and notes the first problems (shared by database and export)."""

    MAX_PROBLEMS = 20

    def __init__(self, expected_seq: int = 1, prev_hash: str = GENESIS) -> None:
        self.expected = expected_seq
        self.prev = prev_hash
        self.count = 0
        self.problems: list[str] = []
        self.first_bad: int | None = None

    def _bad(self, seq: int, message: str) -> None:
        if self.first_bad is None:
            self.first_bad = seq
        if len(self.problems) < self.MAX_PROBLEMS:
            self.problems.append(message)

    def check(self, record: dict[str, Any]) -> None:
        seq = int(record["seq"])
        self.count += 1
        if seq != self.expected:
            what = "removed" if seq > self.expected else "duplicated or moved"
            self._bad(seq, f"record {seq}: expected seq {self.expected} (records {what})")
        if record["prev_hash"] != self.prev:
            self._bad(seq, f"record {seq}: does not link to the record before it (removed or reordered)")
        if record_hash(record) != record["hash"]:
            self._bad(seq, f"record {seq}: content does not match its hash (edited)")
        self.expected = seq + 1
        self.prev = record["hash"]


def verify(db: Database, *, batch: int = 5000) -> VerifyResult:
    """Check the whole chain in the database, and that the head matches its last record."""
    checker = _Checker()
    with db.session() as session:
        head = session.get(AuditHead, 1)
        head_seq, head_hash = (head.seq, head.hash) if head is not None else (0, GENESIS)
        after = 0
        while True:
            rows = session.scalars(
                select(AuditRecord).where(AuditRecord.seq > after).order_by(AuditRecord.seq).limit(batch)
            ).all()
            if not rows:
                break
            for row in rows:
                checker.check(as_dict(row))
            after = rows[-1].seq
            session.expunge_all()
    if head is None:
        checker._bad(0, "the chain head (audit_head) is missing")
    elif (checker.expected - 1, checker.prev) != (head_seq, head_hash):
        checker._bad(
            min(checker.expected - 1, head_seq) + 1,
            f"the chain ends at record {checker.expected - 1} but its head says {head_seq} "
            "(records removed from the end, or the head was edited)",
        )
    return VerifyResult(not checker.problems, checker.count, head_seq, checker.problems, checker.first_bad)


def records_after(
    db: Database, after_seq: int, limit: int, *, kind: str | None = None, request_id: str | None = None
) -> list[dict[str, Any]]:
    query = select(AuditRecord).where(AuditRecord.seq > after_seq)
    if kind is not None:
        query = query.where(AuditRecord.kind == kind)
    if request_id is not None:
        query = query.where(AuditRecord.request_id == request_id)
    with db.session() as session:
        return [as_dict(row) for row in session.scalars(query.order_by(AuditRecord.seq).limit(limit))]


# --- export to files -------------------------------------------------------------------------------


def _write_once(path: Path, data: bytes) -> str:
    """Write a new file (never over an existing one), make it read-only, return its sha256."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    path.chmod(0o444)
    return hashlib.sha256(data).hexdigest()


def export_records(
    pages: Iterator[list[dict[str, Any]]], out: Path, *, segment_records: int = 10_000
) -> dict[str, Any]:
    """Write records (pages in seq order) as JSONL segments plus `manifest.json`; returns the manifest.

    Files are created exclusively and made read-only: an export never overwrites another."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        raise FileExistsError(f"{out} already holds an export (manifest.json); choose an empty folder")
    segments: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []

    def flush() -> None:
        if not current:
            return
        first, last = current[0], current[-1]
        name = f"audit-{first['seq']:012d}-{last['seq']:012d}.jsonl"
        data = b"".join(orjson.dumps(record, option=orjson.OPT_SORT_KEYS) + b"\n" for record in current)
        segments.append(
            {
                "file": name,
                "first_seq": first["seq"],
                "last_seq": last["seq"],
                "records": len(current),
                "first_prev_hash": first["prev_hash"],
                "last_hash": last["hash"],
                "sha256": _write_once(out / name, data),
            }
        )
        current.clear()

    for page in pages:
        for record in page:
            current.append(record)
            if len(current) >= segment_records:
                flush()
    flush()
    manifest = {
        "format": EXPORT_FORMAT,
        "exported_at": _iso(utcnow()) + "Z",
        "first_seq": segments[0]["first_seq"] if segments else None,
        "last_seq": segments[-1]["last_seq"] if segments else None,
        "records": sum(s["records"] for s in segments),
        "last_hash": segments[-1]["last_hash"] if segments else None,
        "segments": segments,
    }
    body = orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)
    manifest["manifest_sha256"] = _write_once(out / "manifest.json", body)
    return manifest


def db_pages(db: Database, after_seq: int = 0, page: int = 5000) -> Iterator[list[dict[str, Any]]]:
    while True:
        records = records_after(db, after_seq, page)
        if not records:
            return
        yield records
        after_seq = records[-1]["seq"]


def verify_export(folder: Path) -> VerifyResult:
    """Check an export folder offline: file hashes against the manifest and the chain inside."""
    try:
        manifest = orjson.loads((folder / "manifest.json").read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        return VerifyResult(False, 0, 0, [f"cannot read {folder / 'manifest.json'}: {exc}"], None)
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        return VerifyResult(False, 0, 0, [f"{folder}/manifest.json is not a Plinth audit export"], None)
    segments = manifest.get("segments") or []
    checker: _Checker | None = None
    for segment in segments:
        path = folder / str(segment["file"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            return VerifyResult(False, 0, 0, [f"segment {segment['file']}: {exc}"], segment.get("first_seq"))
        if checker is None:
            # An incremental export starts mid-chain: trust its first link, check everything after.
            checker = _Checker(int(segment["first_seq"]), str(segment["first_prev_hash"]))
        if hashlib.sha256(data).hexdigest() != segment["sha256"]:
            checker._bad(
                int(segment["first_seq"]), f"segment {segment['file']}: sha256 differs from the manifest"
            )
        for line in data.splitlines():
            if line.strip():
                checker.check(orjson.loads(line))
    if checker is None:
        return VerifyResult(True, 0, 0, [], None)
    if manifest.get("last_hash") != checker.prev:
        checker._bad(checker.expected, "the last record's hash differs from the manifest (records removed)")
    last = int(manifest.get("last_seq") or 0)
    return VerifyResult(not checker.problems, checker.count, last, checker.problems, checker.first_bad)


# --- the log ---------------------------------------------------------------------------------------


def _decision_entry(
    decision: Decision, principal: Principal | None, caller_region: str | None, entity_types: Sequence[str]
) -> Entry:
    """Who, what and why of one decision (no time, no request id: `Template.fill` adds them)."""
    detail: dict[str, Any] = {
        "data_class": decision.data_class.value,
        "deployments": list(decision.deployments),
        "policy_set": decision.policy_set[:16],
    }
    if caller_region:
        detail["caller_region"] = caller_region
    if entity_types:
        detail["entity_types"] = sorted(entity_types)
    if decision.excluded:
        detail["excluded"] = {e.deployment: e.rule for e in decision.excluded}
    if principal is not None:
        detail["team"] = principal.team_id
        if principal.environment:
            detail["environment"] = principal.environment
    actor = principal.key_id or principal.name if principal is not None else "-"
    return Entry("decision", actor, decision.action, decision.outcome, decision.model, decision.message,
                 None, decision.policy_ids, detail)  # fmt: skip


class AuditLog(BatchWriter[PendingDecision]):
    """Admin actions written at once (in the caller's thread); decisions buffered and batched."""

    what = "audit records"

    def __init__(
        self,
        db: Database,
        *,
        interval_s: float = 0.1,
        batch_size: int = 500,
        max_buffer: int = 100_000,
    ) -> None:
        super().__init__(
            interval_s=interval_s, batch_size=batch_size, max_buffer=max_buffer, dropped=DROPPED, log=log
        )
        self.db = db
        # Serialised records of memoised decisions, by (decision, principal, region, entity types).
        self._templates: dict[tuple[Any, ...], tuple[Decision, Principal | None, Template]] = {}

    # --- admin actions (blocking; admin handlers run in worker threads) --------------------------

    def record_admin_action(
        self,
        actor: str,
        action: str,
        *,
        target: str | None = None,
        outcome: str = "ok",
        reason: str | None = None,
        request_id: str | None = None,
        detail: dict[str, Any] | None = None,
        session: Session | None = None,
    ) -> None:
        """Record one admin action; inside `session` when given (atomic with the change itself)."""
        entry = Entry("admin", actor, action, outcome, target, reason, request_id, (), detail or {})
        if session is not None:
            append(session, [entry])
            return
        with self.db.engine.begin() as connection:
            append(connection, [entry])

    # --- decisions (hot path: O(1), no I/O) ------------------------------------------------------

    def record_decision(
        self,
        request_id: str,
        principal: Principal | None,
        decision: Decision,
        *,
        caller_region: str | None = None,
        entity_types: Sequence[str] = (),
    ) -> None:
        """Queue the record of one decision; never blocks (the oldest is dropped when full)."""
        # The entry holds the decision and principal, so their ids cannot be reused meanwhile.
        key = (id(decision), id(principal), caller_region, tuple(entity_types))
        hit = self._templates.get(key)
        if hit is None:
            if len(self._templates) >= 10_000:
                self._templates.clear()
            entry = _decision_entry(decision, principal, caller_region, entity_types)
            hit = self._templates[key] = (decision, principal, Template.of(entry))
        self.append(PendingDecision(hit[2], time.time(), request_id))

    def write_batch(self, batch: list[PendingDecision]) -> None:
        with self.db.engine.begin() as connection:
            append(connection, batch)

    # --- reading ---------------------------------------------------------------------------------

    def verify(self) -> VerifyResult:
        return verify(self.db)

    def export(self, out: Path, *, after_seq: int = 0, segment_records: int = 10_000) -> dict[str, Any]:
        return export_records(db_pages(self.db, after_seq), out, segment_records=segment_records)
