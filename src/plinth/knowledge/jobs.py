"""Ingestion jobs: a folder, a URL or uploaded files ingested in the background, resumable.

A job is a `kb_jobs` row (status, counts, per-file errors) and one `kb_job_files` row per file
(state and outcome; an uploaded file's bytes until it is processed). A job runs in a worker thread,
never on the event loop. While it runs it refreshes `heartbeat_at`; a `running` job whose heartbeat
is older than `STALE_S` belongs to a process that died, and may be claimed again. Resuming skips
the files already done (they are not even read again) and retries the failed ones; a file whose
ingest committed just before the process died is found unchanged by its content hash, so no
embedding work is ever repeated. A corrupt or unsupported file fails alone, never the job.

Statuses: queued, running, succeeded (no file failed), partial (some failed), failed (all failed,
or the job itself could not run, e.g. a missing folder), cancelled (stopped on request; the files
already ingested stay).

Staged data: an upload's bytes and a URL job's full URL (its query string may be a signed token)
wait in `kb_job_files.data`, sealed with the team's data key for encrypted bases (crypto.py, bound
to the job id and file name). They are deleted once the file is processed: ingested, or failed for
good (unparseable). A file that failed for a reason that may pass (the gateway refused an embedding
call, a database error) keeps them, so resuming the job can retry it.

Bases embedded through the gateway (`gateway:<model>`) need an `EmbedderFactory`: inside the
server it embeds in process on the principal of the key that started the job (ingest_http.py),
in the CLI over HTTP with a virtual key (cli.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel
from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    UniqueConstraint,
    case,
    func,
    select,
    update,
)
from sqlalchemy.orm import Mapped, mapped_column

from plinth.knowledge.fetch import FetchError, FetchPolicy, fetch, source_for, url_digest, validate_url
from plinth.storage import Base, Database, utcnow

if TYPE_CHECKING:
    from plinth.governance.audit import AuditLog
    from plinth.knowledge.crypto import MasterKey, TeamCipher
    from plinth.knowledge.embedders import Embedder
    from plinth.knowledge.models import KnowledgeBase
    from plinth.knowledge.store import KnowledgeStore

log = logging.getLogger(__name__)

STALE_S = 60.0  # a running job without a heartbeat for this long is taken to be dead
HEARTBEAT_S = 10.0
MAX_ERRORS = 100  # per-file errors kept in the job row (the count is always exact)
TERMINAL = ("succeeded", "failed", "partial", "cancelled")
AUTO_RESUME_KINDS = ("upload", "url")  # folder jobs read a local folder: only the CLI resumes them
LOOKUP = {"embedder": "hashing", "dimensions": 1}  # a store that embeds nothing: lookups, ciphers
Kind = Literal["folder", "url", "upload"]
Progress = Callable[[int, int, str], None]  # (done, total, source)
# Builds the embedder of a `gateway:<model>` base for one job: (job, model, dimensions).
EmbedderFactory = Callable[["KbJob", str, int], "Embedder"]
FOLDER_RESUME = "a folder job is resumed with `plinth kb resume` on the machine that holds the folder"


class KbJob(Base):
    __tablename__ = "kb_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kb_id: Mapped[str] = mapped_column(ForeignKey("knowledge_bases.id", ondelete="CASCADE"), index=True)
    team_id: Mapped[str] = mapped_column(String(40), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(String(2000))
    status: Mapped[str] = mapped_column(String(20), index=True)
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    actor: Mapped[str | None] = mapped_column(String(200))
    files_total: Mapped[int] = mapped_column(Integer, default=0)
    files_done: Mapped[int] = mapped_column(Integer, default=0)
    added: Mapped[int] = mapped_column(Integer, default=0)
    replaced: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    removed: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    chunks: Mapped[int] = mapped_column(Integer, default=0)  # embedded, over all attempts
    errors: Mapped[list[dict[str, str]]] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(String(500))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class KbJobFile(Base):
    __tablename__ = "kb_job_files"
    __table_args__ = (UniqueConstraint("job_id", "source", name="uq_kb_job_files_job_source"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    job_id: Mapped[str] = mapped_column(ForeignKey("kb_jobs.id", ondelete="CASCADE"), index=True)
    source: Mapped[str] = mapped_column(String(1000))
    state: Mapped[str] = mapped_column(String(20))  # pending, done, failed
    outcome: Mapped[str | None] = mapped_column(String(20))  # added, replaced, unchanged
    reason: Mapped[str | None] = mapped_column(String(500))
    size: Mapped[int | None] = mapped_column(Integer)
    # An upload's bytes or a URL job's full URL, sealed for encrypted bases; cleared once processed.
    data: Mapped[bytes | None] = mapped_column(LargeBinary)


class JobError(Exception):
    """A job request refused; `status` maps it to HTTP (404 hides other teams' jobs)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class JobFiles(BaseModel):
    total: int
    done: int


class JobFileError(BaseModel):
    source: str
    reason: str


class JobOut(BaseModel):
    """An ingestion job as the API and `plinth kb job --json` show it."""

    object: Literal["knowledge.ingest_job"] = "knowledge.ingest_job"
    id: str
    knowledge_base: str
    team_id: str
    kind: str
    source: str
    status: str
    files: JobFiles
    added: int
    replaced: int
    unchanged: int
    removed: int
    failed: int
    chunks: int
    errors: list[JobFileError]
    error: str | None
    attempts: int
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]


def job_out(job: KbJob) -> JobOut:
    return JobOut(
        id=job.id,
        knowledge_base=job.kb_id,
        team_id=job.team_id,
        kind=job.kind,
        source=job.source,
        status=job.status,
        files=JobFiles(total=job.files_total, done=job.files_done),
        added=job.added,
        replaced=job.replaced,
        unchanged=job.unchanged,
        removed=job.removed,
        failed=job.failed,
        chunks=job.chunks,
        errors=[JobFileError(**e) for e in job.errors],
        error=job.error,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def clean_source(name: str) -> str:
    """An uploaded file's name as a document source: a relative POSIX path, no `..`, no control
    characters. The name identifies the document: uploading it again replaces or skips it."""
    text = name.replace("\\", "/").strip()
    if not text or _CONTROL.search(text):
        raise JobError("a file name must be non-empty and free of control characters")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        raise JobError(f"file name {name[:100]!r} is not a relative path (no '..')")
    source = "/".join(parts)
    if len(source) > 1000:
        raise JobError("a file name must be at most 1000 characters")
    return source


@dataclass
class Upload:
    source: str
    data: bytes


class StoreProvider:
    """One KnowledgeStore per embedder, so a base is always embedded with the model that built it."""

    def __init__(self, db: Database, master_key: MasterKey | None) -> None:
        self.db = db
        self.master_key = master_key
        self._stores: dict[tuple[str, int], KnowledgeStore] = {}
        self._lock = threading.Lock()

    def for_base(self, settings: dict[str, Any]) -> KnowledgeStore:
        from plinth.knowledge.embedders import embedder_for
        from plinth.knowledge.store import KnowledgeError, KnowledgeStore

        key = (str(settings.get("embedder", "")), int(settings.get("dimensions", 384)))
        with self._lock:
            store = self._stores.get(key)
            if store is None:
                try:
                    embedder = embedder_for(*key)
                except ValueError as exc:
                    raise KnowledgeError(f"this knowledge base cannot be ingested here: {exc}") from None
                store = self._stores[key] = KnowledgeStore(self.db, embedder, master_key=self.master_key)
            return store

    def cipher(self, kb_id: str, settings: dict[str, Any]) -> TeamCipher | None:
        """The team's cipher for an encrypted base (None for a plaintext one). Raises KnowledgeError
        when the base is encrypted and no master key is set."""
        if not settings.get("encrypted"):
            return None
        return self.for_base(LOOKUP).cipher(kb_id)


class IngestJobs:
    """Create, run, list and resume ingestion jobs. Blocking methods: call them from a thread."""

    def __init__(
        self,
        db: Database,
        stores: StoreProvider,
        fetch_policy: FetchPolicy | None = None,
        audit: AuditLog | None = None,
        max_running: int = 2,
        embedders: EmbedderFactory | None = None,
    ) -> None:
        """`embedders`: how this process embeds `gateway:<model>` bases (None: it cannot)."""
        self.db = db
        self.stores = stores
        self.fetch_policy = fetch_policy or FetchPolicy()
        self.audit = audit
        self.embedders = embedders
        self._slots = threading.BoundedSemaphore(max_running)
        self._active: set[str] = set()
        self._started: set[str] = set()  # handed to a thread that has not finished yet
        self._lock = threading.Lock()

    # -- creating and reading --------------------------------------------------------------------

    def create(
        self,
        base: KnowledgeBase,
        kind: Kind,
        source: str,
        *,
        actor: str | None,
        params: dict[str, Any] | None = None,
        uploads: Iterable[Upload] = (),
        request_id: str | None = None,
        record: bool = True,
    ) -> KbJob:
        """Record a queued job (and an upload's files, or a URL job's one file). `record`: write
        its creation to the audit trail (the admin API's calls are recorded by the API itself).

        A URL job's `source` is the full URL; the job, the document and the audit trail name it
        without query string and fragment, and its sha256 is kept in `params.url_sha256`. Staged
        data is sealed for an encrypted base (JobError when the master key is missing)."""
        from plinth.knowledge.store import KnowledgeError

        now = utcnow()
        params = dict(params or {})
        staged = list(uploads)
        full_url = source.strip() if kind == "url" else None
        if full_url is not None:
            try:
                source = source_for(validate_url(full_url))
            except FetchError as exc:
                raise JobError(f"'url' refused: {exc}") from None
            if len(source) > 1000:
                raise JobError("'url' must be at most 1000 characters without its query string")
            params["url_sha256"] = url_digest(full_url)
        try:
            cipher = self.stores.cipher(base.id, base.settings) if staged or full_url else None
        except KnowledgeError as exc:
            raise JobError(str(exc), exc.status) from None
        job = KbJob(
            id=f"job_{secrets.token_hex(8)}",
            kb_id=base.id,
            team_id=base.team_id,
            kind=kind,
            source=source[:2000],
            status="queued",
            params=params,
            actor=actor,
            files_total=0,
            files_done=0,
            added=0,
            replaced=0,
            unchanged=0,
            removed=0,
            failed=0,
            chunks=0,
            errors=[],
            attempts=0,
            created_at=now,
        )

        def sealed(data: bytes, name: str) -> bytes:
            return cipher.seal_staged(data, job.id, name) if cipher is not None else data

        files: dict[str, KbJobFile] = {}
        for upload in staged:  # the same name twice in one upload: the last one wins
            files[upload.source] = KbJobFile(
                source=upload.source,
                state="pending",
                size=len(upload.data),
                data=sealed(upload.data, upload.source),
            )
        if full_url is not None:
            files[source] = KbJobFile(source=source, state="pending", data=sealed(full_url.encode(), source))
        job.files_total = len(files)
        with self.db.session() as s:
            s.add(job)
            s.flush()
            for row in files.values():
                row.job_id = job.id
                s.add(row)
        if record:
            self._record(
                job,
                "knowledge_ingest",
                request_id=request_id,
                detail={"job": job.id, "kind": kind, "source": job.source, "files": len(files)},
            )
        return self.get(job.id, None)

    def get(self, job_id: str, team_id: str | None, kb_id: str | None = None) -> KbJob:
        """A job of the team (None: any team); another team's job is a 404, never a 403."""
        with self.db.session() as s:
            job = s.get(KbJob, job_id)
            if job is None or (team_id is not None and job.team_id != team_id):
                raise JobError(f"ingestion job {job_id!r} not found", 404)
            if kb_id is not None and job.kb_id != kb_id:
                raise JobError(f"ingestion job {job_id!r} not found in this knowledge base", 404)
            s.expunge(job)
            return job

    def list(self, team_id: str | None, kb_id: str | None = None, limit: int = 50) -> list[KbJob]:
        """Newest first."""
        with self.db.session() as s:
            query = select(KbJob).order_by(KbJob.created_at.desc(), KbJob.id).limit(limit)
            if team_id is not None:
                query = query.where(KbJob.team_id == team_id)
            if kb_id is not None:
                query = query.where(KbJob.kb_id == kb_id)
            jobs = list(s.scalars(query))
            for job in jobs:
                s.expunge(job)
            return jobs

    def resumable(self, job: KbJob) -> bool:
        """Not finished cleanly: queued, failed, partial, or running with a stale heartbeat."""
        if job.status in ("queued", "failed", "partial"):
            return True
        return job.status == "running" and _stale(job.heartbeat_at)

    # -- running ---------------------------------------------------------------------------------

    def start(self, job_id: str) -> bool:
        """Run a job in a daemon thread (a dying process leaves it `running`, to be resumed).
        False when this process has already handed it to a thread that has not finished."""
        with self._lock:
            if job_id in self._started:
                return False
            self._started.add(job_id)
        threading.Thread(target=self._background, args=(job_id,), name=f"kb-{job_id}", daemon=True).start()
        return True

    def _background(self, job_id: str) -> None:
        try:
            with self._slots:
                self.run(job_id)
        except Exception:  # a bug or a database outage: the job stays resumable
            log.exception("ingestion job %s stopped", job_id)
        finally:
            with self._lock:
                self._started.discard(job_id)

    def interrupted(self, limit: int = 20) -> Sequence[str]:
        """Upload and URL jobs no live process runs: `running` with a stale heartbeat, or `queued`
        for longer than STALE_S (the process that created it died before starting it). Oldest first."""
        old = utcnow() - dt.timedelta(seconds=STALE_S)
        stale = (KbJob.status == "running") & (KbJob.heartbeat_at.is_(None) | (KbJob.heartbeat_at < old))
        never = (KbJob.status == "queued") & (KbJob.created_at < old)
        with self.db.session() as s:
            return s.scalars(
                select(KbJob.id)
                .where(KbJob.kind.in_(AUTO_RESUME_KINDS), stale | never)
                .order_by(KbJob.created_at)
                .limit(limit)
            ).all()

    def resume_interrupted(self) -> Sequence[str]:
        """Start every interrupted job in the background (blocking: call it from a thread). Two
        processes may both try: the claim is atomic, so each job runs once."""
        return [job_id for job_id in self.interrupted() if self.start(job_id)]

    def cancel(self, job_id: str, team_id: str | None, *, actor: str | None = None) -> KbJob:
        """Stop a queued or running job: its runner (in any process) stops after the file at hand;
        the files already ingested stay. Staged data of the files not processed is deleted."""
        job = self.get(job_id, team_id)
        if job.status in TERMINAL:
            raise JobError(f"ingestion job {job_id} has already ended ({job.status})", 409)
        now = utcnow()
        with self.db.session() as s:
            done = s.execute(
                update(KbJob)
                .where(KbJob.id == job_id, KbJob.status.in_(("queued", "running")))
                .values(status="cancelled", finished_at=now, error=f"cancelled by {actor or '-'}"[:500])
                .execution_options(synchronize_session=False)
            )
            if not getattr(done, "rowcount", 0):
                raise JobError(f"ingestion job {job_id} has just ended", 409)
            s.execute(
                update(KbJobFile)
                .where(KbJobFile.job_id == job_id, KbJobFile.state == "pending")
                .values(data=None)
                .execution_options(synchronize_session=False)
            )
        cancelled = self.get(job_id, None)
        if job.status == "queued" or _stale(job.heartbeat_at):  # no live runner will record its end
            self._record(cancelled, "knowledge_ingest_finished", outcome="error", reason=cancelled.error,
                         detail={"job": job_id, "status": "cancelled", "files": cancelled.files_total})  # fmt: skip
        return cancelled

    def resume(self, job_id: str, team_id: str | None, *, background: bool = True) -> KbJob:
        """Claim an unfinished job again; a succeeded job is returned as is (nothing to do)."""
        job = self.get(job_id, team_id)
        if job.status == "succeeded":
            return job
        if job.status == "cancelled":
            raise JobError(f"ingestion job {job_id} was cancelled: start a new one", 409)
        self._check_embedder(job)
        if not self.resumable(job) or job_id in self._active:
            raise JobError(f"ingestion job {job_id} is running (resume it once it stops)", 409)
        if background:
            self.start(job_id)
        else:
            self.run(job_id, resume=True)
        return self.get(job_id, team_id)

    def run(self, job_id: str, progress: Progress | None = None, *, resume: bool = True) -> KbJob:
        """Run (or resume) a job in this thread until it ends; returns its final row."""
        with self._lock:
            if job_id in self._active:
                return self.get(job_id, None)
            self._active.add(job_id)
        try:
            if not self._claim(job_id, resume):
                return self.get(job_id, None)
            stop = threading.Event()
            beat = threading.Thread(target=self._heartbeat, args=(job_id, stop), daemon=True)
            beat.start()
            try:
                self._work(job_id, progress)
            finally:
                stop.set()
        finally:
            with self._lock:
                self._active.discard(job_id)
        return self.get(job_id, None)

    def _claim(self, job_id: str, resume: bool) -> bool:
        """Atomically take the job (one runner across processes); requeue its failed files."""
        now = utcnow()
        claimable = (KbJob.status == "queued") | (
            (KbJob.status == "running")
            & (KbJob.heartbeat_at.is_(None) | (KbJob.heartbeat_at < now - dt.timedelta(seconds=STALE_S)))
        )
        if resume:
            claimable = claimable | KbJob.status.in_(("failed", "partial"))
        with self.db.session() as s:
            taken = s.execute(
                update(KbJob)
                .where(KbJob.id == job_id, claimable)
                .values(
                    status="running",
                    attempts=KbJob.attempts + 1,
                    heartbeat_at=now,
                    started_at=func.coalesce(KbJob.started_at, now),
                    finished_at=None,
                    error=None,
                )
                .execution_options(synchronize_session=False)
            )
            if not getattr(taken, "rowcount", 0):
                return False
            s.execute(
                update(KbJobFile)
                .where(KbJobFile.job_id == job_id, KbJobFile.state == "failed")
                .values(state="pending", reason=None)
                .execution_options(synchronize_session=False)
            )
        self._recount(job_id)
        return True

    def _heartbeat(self, job_id: str, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                with self.db.session() as s:
                    s.execute(
                        update(KbJob)
                        .where(KbJob.id == job_id, KbJob.status == "running")
                        .values(heartbeat_at=utcnow())
                        .execution_options(synchronize_session=False)
                    )
            except Exception:  # the next beat may work; a missed one only risks a false "stale"
                log.warning("ingestion job %s: heartbeat failed", job_id, exc_info=True)

    def _store(self, job: KbJob, settings: dict[str, Any]) -> KnowledgeStore:
        """The base's store; a `gateway:<model>` base gets one of its own for this job, embedding
        on the job's principal through `self.embedders`."""
        from plinth.knowledge.embedders import GATEWAY_PREFIX
        from plinth.knowledge.store import KnowledgeStore

        name = str(settings.get("embedder", ""))
        if not name.startswith(GATEWAY_PREFIX):
            return self.stores.for_base(settings)
        if self.embedders is None:
            raise JobError(_NO_GATEWAY.format(name=name))
        embedder = self.embedders(
            job, name.removeprefix(GATEWAY_PREFIX), int(settings.get("dimensions", 384))
        )
        return KnowledgeStore(self.db, embedder, master_key=self.stores.master_key)

    def _check_embedder(self, job: KbJob) -> None:
        """Refuse to resume here a job of a gateway-embedded base when this process cannot embed it."""
        from plinth.knowledge.embedders import GATEWAY_PREFIX
        from plinth.knowledge.models import KnowledgeBase

        if self.embedders is not None:
            return
        with self.db.session() as s:
            base = s.get(KnowledgeBase, job.kb_id)
            name = str(base.settings.get("embedder", "")) if base is not None else ""
        if name.startswith(GATEWAY_PREFIX):
            raise JobError(_NO_GATEWAY.format(name=name))

    def _work(self, job_id: str, progress: Progress | None) -> None:
        from plinth.knowledge.store import KnowledgeError

        job = self.get(job_id, None)
        with self.db.session() as s:
            from plinth.knowledge.models import KnowledgeBase

            base = s.get(KnowledgeBase, job.kb_id)
            settings = dict(base.settings) if base is not None else None
        if settings is None:
            self._finish(job_id, "knowledge base was deleted")
            return
        try:
            store = self._store(job, settings)
            cipher = self.stores.cipher(job.kb_id, settings) if job.kind != "folder" else None
        except (JobError, KnowledgeError) as exc:  # e.g. revoked key, encrypted base without a master key
            self._finish(job_id, str(exc))
            return
        folder = Path(job.params.get("folder", "")) if job.kind == "folder" else None
        if folder is not None:
            if not folder.is_dir():
                self._finish(job_id, f"{folder} is not a folder")
                return
            self._plan_folder(job_id, folder)
        with self.db.session() as s:
            pending = list(
                s.execute(
                    select(KbJobFile.id, KbJobFile.source)
                    .where(KbJobFile.job_id == job_id, KbJobFile.state == "pending")
                    .order_by(KbJobFile.id)
                ).all()
            )
            total = s.scalar(select(func.count()).where(KbJobFile.job_id == job_id)) or 0
        done = total - len(pending)
        for file_id, source in pending:
            chunks, permanent = 0, True
            try:
                outcome, chunks = self._ingest_one(store, job, file_id, source, folder, cipher)
                reason = None
            except Exception as exc:  # corrupt, unsupported, unreachable: this file only
                outcome, reason, permanent = None, _reason(exc), _permanent(exc)
            going = self._file_done(job_id, file_id, source, outcome, reason, chunks, permanent)
            done += 1
            if progress is not None:
                progress(done, total, source)
            if not going:  # cancelled meanwhile (by any process)
                break
        else:
            going = True
        removed = 0
        if going and folder is not None and job.params.get("remove_missing", True):
            with self.db.session() as s:
                keep = set(s.scalars(select(KbJobFile.source).where(KbJobFile.job_id == job_id)))
            removed = len(store.remove_documents(job.kb_id, keep))
        self._finish(job_id, None, removed)

    def _plan_folder(self, job_id: str, folder: Path) -> None:
        """Add a row per file of the folder not yet in the job (a resumed job keeps its done rows)."""
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        with self.db.session() as s:
            known = set(s.scalars(select(KbJobFile.source).where(KbJobFile.job_id == job_id)))
            for path in files:
                source = path.relative_to(folder).as_posix()
                if source not in known:
                    s.add(KbJobFile(job_id=job_id, source=source, state="pending"))
        self._recount(job_id)

    def _ingest_one(
        self,
        store: KnowledgeStore,
        job: KbJob,
        file_id: int,
        source: str,
        folder: Path | None,
        cipher: TeamCipher | None = None,
    ) -> tuple[str, int]:
        """Add, replace or skip one file: (outcome, chunks embedded). Raises on a file that cannot be used."""
        from plinth.knowledge.models import KbDocument
        from plinth.knowledge.parsers import SUPPORTED, ParseError, parse_file

        if job.kind in ("upload", "url"):
            with self.db.session() as s:
                staged = s.scalar(select(KbJobFile.data).where(KbJobFile.id == file_id))
            if staged is not None and cipher is not None:
                staged = cipher.open_staged(staged, job.id, source)
        if job.kind == "upload":
            if staged is None:
                raise ParseError("the uploaded bytes are gone (the job was cleaned up)")
            data = staged
            suffix = Path(source).suffix.lower()
        elif job.kind == "url":
            # The full URL (with its query string) when staged; the stripped source otherwise.
            fetched = fetch(staged.decode() if staged is not None else source, self.fetch_policy)
            data, suffix = fetched.data, fetched.suffix
        else:
            assert folder is not None
            data = (folder / source).read_bytes()
            suffix = Path(source).suffix.lower()
        if suffix not in SUPPORTED:
            raise ParseError(f"unsupported file type {suffix or '(none)'}")
        digest = hashlib.sha256(data).hexdigest()
        with self.db.session() as s:
            known = s.scalar(
                select(KbDocument.content_hash).where(
                    KbDocument.kb_id == job.kb_id, KbDocument.source == source
                )
            )
        if known == digest:
            return "unchanged", 0  # before parsing or embedding
        sections = parse_file(Path(f"document{suffix}"), data)
        if not sections:
            raise ParseError("no text found")
        result = store.ingest_sections(job.kb_id, source, sections, digest)
        outcome = "added" if result.added else "replaced" if result.replaced else "unchanged"
        return outcome, result.chunks

    def _file_done(
        self,
        job_id: str,
        file_id: int,
        source: str,
        outcome: str | None,
        reason: str | None,
        chunks: int,
        permanent: bool = True,
    ) -> bool:
        """Record one file's outcome; its staged data goes unless a retry could still use it.
        False when the job was cancelled or deleted meanwhile (the runner stops)."""
        values: dict[str, Any] = {"state": "failed" if outcome is None else "done", "outcome": outcome}
        values["reason"] = reason
        if outcome is not None or permanent:
            values["data"] = None
        with self.db.session() as s:
            s.execute(
                update(KbJobFile)
                .where(KbJobFile.id == file_id)
                .values(**values)
                .execution_options(synchronize_session=False)
            )
            job = s.get(KbJob, job_id)
            if job is None:
                return False
            job.files_done += 1
            job.chunks += chunks
            job.heartbeat_at = utcnow()
            if outcome is None:
                job.failed += 1
                if len(job.errors) < MAX_ERRORS:
                    job.errors = [*job.errors, {"source": source, "reason": reason or "failed"}]
            else:
                setattr(job, outcome, getattr(job, outcome) + 1)
            return job.status == "running"

    def _recount(self, job_id: str) -> None:
        """Counts from the file rows (after a claim or planning, so a resumed job's counts are exact)."""
        with self.db.session() as s:
            row = s.execute(
                select(
                    func.count(),
                    func.sum(case((KbJobFile.state != "pending", 1), else_=0)),
                    func.sum(case((KbJobFile.outcome == "added", 1), else_=0)),
                    func.sum(case((KbJobFile.outcome == "replaced", 1), else_=0)),
                    func.sum(case((KbJobFile.outcome == "unchanged", 1), else_=0)),
                    func.sum(case((KbJobFile.state == "failed", 1), else_=0)),
                ).where(KbJobFile.job_id == job_id)
            ).one()
            errors = [
                {"source": src, "reason": why or "failed"}
                for src, why in s.execute(
                    select(KbJobFile.source, KbJobFile.reason)
                    .where(KbJobFile.job_id == job_id, KbJobFile.state == "failed")
                    .order_by(KbJobFile.id)
                    .limit(MAX_ERRORS)
                )
            ]
            job = s.get(KbJob, job_id)
            if job is None:
                return
            total, done, added, replaced, unchanged, failed = (int(v or 0) for v in row)
            job.files_total, job.files_done, job.added, job.replaced = total, done, added, replaced
            job.unchanged, job.failed, job.errors = unchanged, failed, errors

    def _finish(self, job_id: str, error: str | None, removed: int = 0) -> None:
        self._recount(job_id)
        with self.db.session() as s:
            job = s.get(KbJob, job_id)
            if job is None:
                return
            job.removed += removed
            if job.status == "cancelled":
                pass  # stopped on request: cancel() set the reason and the time
            elif error is not None:
                job.status, job.error = "failed", error[:500]
            elif job.failed and job.failed == job.files_total:
                job.status = "failed"
            else:
                job.status = "partial" if job.failed else "succeeded"
            job.heartbeat_at = utcnow()
            if job.status != "cancelled":
                job.finished_at = job.heartbeat_at
            s.flush()
            s.expunge(job)
        counts = {k: getattr(job, k) for k in ("added", "replaced", "unchanged", "removed", "failed")}
        self._record(
            job,
            "knowledge_ingest_finished",
            outcome="ok" if job.status == "succeeded" else "error",
            reason=job.error,
            detail={"job": job.id, "status": job.status, "files": job.files_total, **counts},
        )

    def _record(
        self,
        job: KbJob,
        action: str,
        *,
        outcome: str = "ok",
        reason: str | None = None,
        request_id: str | None = None,
        detail: dict[str, Any],
    ) -> None:
        """Audit trail (best effort: an ingest is not refused because the audit write failed)."""
        if self.audit is None:
            return
        try:
            self.audit.record_admin_action(
                job.actor or "-",
                action,
                target=job.kb_id,
                outcome=outcome,
                reason=reason,
                request_id=request_id,
                detail={**detail, "team": job.team_id},
            )
        except Exception:
            log.warning("could not record %s for job %s in the audit trail", action, job.id, exc_info=True)


def _stale(heartbeat: dt.datetime | None) -> bool:
    return heartbeat is None or heartbeat < utcnow() - dt.timedelta(seconds=STALE_S)


_NO_GATEWAY = (
    "this knowledge base embeds through the gateway ({name}): ingest into it through the gateway "
    "with a team key (POST /v1/knowledge/{{kb}}/documents), or with `plinth kb ingest --gateway-url`"
)


def _permanent(exc: Exception) -> bool:
    """A failure that a retry cannot fix (the file itself is unusable): its staged data can go."""
    from plinth.knowledge.parsers import ParseError

    return isinstance(exc, ParseError)


def _reason(exc: Exception) -> str:
    from plinth.knowledge.parsers import ParseError

    if isinstance(exc, ParseError | FetchError | OSError):
        text = str(exc) or type(exc).__name__
    else:
        text = f"{type(exc).__name__}: {exc}"
    return text[:500]
