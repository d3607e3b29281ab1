"""Admin operations on knowledge bases under `/api/knowledge-bases` (an `AdminExtension`).

Permissions reuse the project ones, since a base is a team-level resource like a project: reading
needs `teams:read`, creating and deleting `projects:write` (platform and team admins). Team admins
and developers act on their own team only; a base of another team is a 404.

Ingestion here is from a URL only (`POST /knowledge-bases/{kb}/ingest`, JSON bodies are capped at
1 MiB by the admin API): files are uploaded on the data plane with a team key (ingest_http.py).
Jobs are listed, shown, resumed and cancelled here too. A base embedded through the gateway
(`gateway:<model>`) is ingested on the data plane only: the embedding calls need a team key. Every POST is in the admin audit trail (the API's
observer), and each job's end is recorded by the job itself.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from plinth.admin.api import Call, Operation
from plinth.gateway.errors import GatewayError
from plinth.knowledge.jobs import JobList, JobOut
from plinth.storage import Database

if TYPE_CHECKING:
    from plinth.config.schema import KnowledgeConfig
    from plinth.knowledge.jobs import IngestJobs
    from plinth.knowledge.store import KnowledgeStore


class KbCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    team_id: str | None = None  # default: the caller's own team
    chunk_size: int = Field(default=180, ge=1, le=2000)
    chunk_overlap: int = Field(default=30, ge=0, le=1999)
    chunking: Literal["structure", "fixed", "semantic", "hierarchical"] = "structure"
    plaintext: bool = False  # required when PLINTH_MASTER_KEY is unset


class KbOut(BaseModel):
    object: Literal["knowledge_base"] = "knowledge_base"
    id: str
    team_id: str
    name: str
    settings: dict[str, Any]
    documents: int
    chunks: int
    created_at: dt.datetime


class KbList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KbOut]


class KbDeleted(BaseModel):
    id: str
    deleted: bool = True


class KbIngest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(min_length=1, max_length=2000)  # http(s); private addresses refused unless allowed


class KnowledgeAdmin:
    def __init__(self, database: Database, knowledge: KnowledgeConfig | None = None) -> None:
        """`knowledge`: the `knowledge:` configuration (URL ingestion rules and limits)."""
        self.database = database
        self.knowledge = knowledge
        self._jobs: IngestJobs | None = None

    @property
    def jobs(self) -> IngestJobs:
        if self._jobs is None:
            from plinth.governance.audit import AuditLog
            from plinth.knowledge.crypto import CryptoError, master_key_from_env
            from plinth.knowledge.fetch import FetchPolicy
            from plinth.knowledge.jobs import IngestJobs, StoreProvider

            try:
                key = master_key_from_env()
            except CryptoError as exc:
                raise GatewayError(500, f"knowledge bases: {exc}", code="server_misconfigured") from None
            self._jobs = IngestJobs(
                self.database,
                StoreProvider(self.database, key),
                FetchPolicy.from_config(self.knowledge),
                audit=AuditLog(self.database),  # job ends (admin actions are written at once)
            )
        return self._jobs

    def _store(self, encrypt: bool = False) -> KnowledgeStore:
        from plinth.knowledge.crypto import CryptoError, master_key_from_env
        from plinth.knowledge.embedders import LocalEmbedder
        from plinth.knowledge.store import KnowledgeStore

        try:
            key = master_key_from_env() if encrypt else None
        except CryptoError as exc:
            raise GatewayError(500, f"knowledge bases: {exc}", code="server_misconfigured") from None
        # Bases created here are for the local model; nothing is embedded by these operations.
        return KnowledgeStore(self.database, LocalEmbedder(), master_key=key)

    def _out(self, store: KnowledgeStore, base: Any) -> KbOut:
        stats = store.stats(base.id)
        return KbOut(
            id=base.id,
            team_id=base.team_id,
            name=base.name,
            settings=base.settings,
            documents=stats["documents"],
            chunks=stats["chunks"],
            created_at=base.created_at,
        )

    def _get(self, call: Call) -> tuple[KnowledgeStore, Any]:
        from plinth.knowledge.store import KnowledgeError

        store = self._store()
        team = call.actor.team_id if call.actor.team_scoped else None
        try:
            return store, store.get_base(call.path["kb"], team)
        except KnowledgeError as exc:
            raise GatewayError(
                exc.status, str(exc), code="not_found" if exc.status == 404 else None
            ) from None

    def _list_bases(self, call: Call) -> KbList:
        """Knowledge bases: the caller's team's, or every team's for platform admins and auditors."""
        store = self._store()
        team = call.actor.team_id if call.actor.team_scoped else None
        return KbList(data=[self._out(store, b) for b in store.list_bases(team)])

    def _show_base(self, call: Call) -> KbOut:
        """One knowledge base with its document and chunk counts."""
        store, base = self._get(call)
        return self._out(store, base)

    def _create_base(self, call: Call) -> KbOut:
        """Create a knowledge base (encrypted with the team's key when PLINTH_MASTER_KEY is set)."""
        from plinth.knowledge.store import KnowledgeError

        body = call.body_as(KbCreate)
        if body.chunk_overlap >= body.chunk_size:
            raise GatewayError(400, "'chunk_overlap' must be below 'chunk_size'.", param="chunk_overlap")
        team_id = call.actor.team_or_own(body.team_id)
        if not body.plaintext and not (os.environ.get("PLINTH_MASTER_KEY") or os.environ.get("PLINTH_KMS")):
            raise GatewayError(
                400,
                "Neither PLINTH_MASTER_KEY nor PLINTH_KMS is set on the gateway: set one to encrypt chunks at rest, "
                'or send "plaintext": true.',
                param="plaintext",
            )
        store = self._store(encrypt=not body.plaintext)
        settings = {
            "chunk_size": body.chunk_size,
            "chunk_overlap": body.chunk_overlap,
            "chunking": body.chunking,
        }
        try:
            base = store.create_base(team_id, body.name, settings)
        except KnowledgeError as exc:
            raise GatewayError(exc.status, str(exc), code="conflict" if exc.status == 409 else None) from None
        return self._out(store, base)

    def _delete_base(self, call: Call) -> KbDeleted:
        """Delete a knowledge base with its documents and chunks."""
        store, base = self._get(call)
        store.delete_base(base.id, None)
        return KbDeleted(id=base.id)

    def _ingest_url(self, call: Call) -> JobOut:
        """Start a job that fetches a URL into the knowledge base (202; poll the job for progress)."""
        from plinth.knowledge.embedders import GATEWAY_PREFIX
        from plinth.knowledge.fetch import FetchError, resolve, validate_url
        from plinth.knowledge.jobs import JobError, job_out

        _store, base = self._get(call)
        jobs = self.jobs
        embedder = str(base.settings.get("embedder", ""))
        if embedder.startswith(GATEWAY_PREFIX):
            raise GatewayError(
                400,
                f"this knowledge base embeds through the gateway ({embedder}): ingest with a team key "
                f"(POST /v1/knowledge/{base.id}/documents with {{'url': ...}})",
                param="kb",
            )
        try:
            parsed = validate_url(call.body_as(KbIngest).url)
            resolve(parsed, jobs.fetch_policy)  # a private address is a 400 now, and again at connect
        except FetchError as exc:
            raise GatewayError(400, f"'url' refused: {exc}", param="url") from None
        try:  # the job and the audit trail name the URL without its query string (fetch.source_for)
            job = jobs.create(
                base, "url", str(parsed), actor=call.actor.label, request_id=call.request_id, record=False
            )
        except JobError as exc:
            raise GatewayError(exc.status, str(exc), param="url") from None
        jobs.start(job.id)
        return job_out(job)

    def _list_jobs(self, call: Call) -> JobList:
        """A knowledge base's ingestion jobs, newest first (the last 50)."""
        from plinth.knowledge.jobs import job_out

        _store, base = self._get(call)
        return JobList(data=[job_out(j) for j in self.jobs.list(None, base.id)])

    def _job(self, call: Call) -> Any:
        from plinth.knowledge.jobs import JobError

        _store, base = self._get(call)
        try:
            return self.jobs.get(call.path["job_id"], None, base.id)
        except JobError as exc:
            raise GatewayError(exc.status, str(exc), code="not_found") from None

    def _show_job(self, call: Call) -> JobOut:
        """One ingestion job: status, file counts, per-file errors."""
        from plinth.knowledge.jobs import job_out

        return job_out(self._job(call))

    def _resume_job(self, call: Call) -> JobOut:
        """Resume an interrupted, failed or partial ingestion job (files already done are skipped)."""
        from plinth.knowledge.jobs import FOLDER_RESUME, JobError, job_out

        job = self._job(call)
        if job.kind == "folder":  # the gateway never reads a local folder for an API caller
            raise GatewayError(400, FOLDER_RESUME, param="job_id")
        try:
            return job_out(self.jobs.resume(job.id, None))
        except JobError as exc:
            raise GatewayError(exc.status, str(exc), code="conflict" if exc.status == 409 else None) from None

    def _cancel_job(self, call: Call) -> JobOut:
        """Stop a queued or running ingestion job (the files already ingested stay)."""
        from plinth.knowledge.jobs import JobError, job_out

        job = self._job(call)
        try:
            return job_out(self.jobs.cancel(job.id, None, actor=call.actor.label))
        except JobError as exc:
            raise GatewayError(exc.status, str(exc), code="conflict" if exc.status == 409 else None) from None

    def operations(self) -> list[Operation]:
        read, write = "teams:read", "projects:write"
        return [
            Operation("GET", "/knowledge-bases", self._list_bases, KbList,
                      "List knowledge bases", "knowledge", read, "list knowledge bases"),
            Operation("POST", "/knowledge-bases", self._create_base, KbOut,
                      "Create a knowledge base", "knowledge", write, "create knowledge bases",
                      status=201, body=KbCreate, errors=(400, 409)),
            Operation("GET", "/knowledge-bases/{kb}", self._show_base, KbOut,
                      "Show a knowledge base", "knowledge", read, "read knowledge bases", errors=(404,)),
            Operation("DELETE", "/knowledge-bases/{kb}", self._delete_base, KbDeleted,
                      "Delete a knowledge base", "knowledge", write, "delete knowledge bases",
                      errors=(404,)),
            Operation("POST", "/knowledge-bases/{kb}/ingest", self._ingest_url, JobOut,
                      "Ingest a URL into a knowledge base", "knowledge", write, "ingest into knowledge bases",
                      status=202, body=KbIngest, errors=(400, 404)),
            Operation("GET", "/knowledge-bases/{kb}/jobs", self._list_jobs, JobList,
                      "List ingestion jobs", "knowledge", read, "read knowledge bases", errors=(404,)),
            Operation("GET", "/knowledge-bases/{kb}/jobs/{job_id}", self._show_job, JobOut,
                      "Show an ingestion job", "knowledge", read, "read knowledge bases", errors=(404,)),
            Operation("POST", "/knowledge-bases/{kb}/jobs/{job_id}/resume", self._resume_job, JobOut,
                      "Resume an ingestion job", "knowledge", write, "ingest into knowledge bases",
                      status=202, errors=(400, 404, 409)),
            Operation("POST", "/knowledge-bases/{kb}/jobs/{job_id}/cancel", self._cancel_job, JobOut,
                      "Cancel an ingestion job", "knowledge", write, "ingest into knowledge bases",
                      errors=(404, 409)),
        ]  # fmt: skip
