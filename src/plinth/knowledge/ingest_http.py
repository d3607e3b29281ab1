"""Data-plane ingestion: upload files or a URL into a knowledge base, and follow the job.

Routes (added to `KnowledgeApi.routes()`), all with a virtual key of the base's team:

- `POST /v1/knowledge/{kb}/documents`: multipart/form-data (every part with a filename is a file),
  a raw body with `?filename=NAME`, or JSON `{"url": "https://..."}` to fetch a URL (fetch.py).
  A policy decision `ingest` on `KnowledgeBase::<id>`; 202 with the job, which runs in a worker
  thread (jobs.py).
- `GET /v1/knowledge/{kb}/jobs`, `GET /v1/knowledge/{kb}/jobs/{job}`: status, counts, per-file errors.
- `POST /v1/knowledge/{kb}/jobs/{job}/resume`: an interrupted, failed or partial job again (`ingest`).
- `POST /v1/knowledge/{kb}/jobs/{job}/cancel`: stop a queued or running job (`ingest`).

At start the app calls `follow_jobs` (through `KnowledgeAccess`): upload and URL jobs that no live
process runs any more (a crash mid-ingest) are resumed in the background, then checked again every
`RESUME_EVERY_S`. A base embedded through the gateway (`gateway:<model>`) is embedded in process,
on the principal of the key whose upload started the job (limits, cost and policy apply to it).

A key sees only its own team's bases and jobs (anything else is a 404). Decisions are recorded in
the audit trail when `governance.audit_decisions` is on; each job's creation and end always are.
"""

from __future__ import annotations

import asyncio
import logging
from email import policy as email_policy
from email.parser import BytesParser
from typing import TYPE_CHECKING, Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from plinth.gateway import openai_protocol
from plinth.gateway.errors import GatewayError
from plinth.gateway.pipeline import Endpoint, Gateway, error_response, new_context
from plinth.knowledge.augment import knowledge_error
from plinth.storage import Database, utcnow

if TYPE_CHECKING:
    from plinth.config.schema import KnowledgeConfig
    from plinth.governance.engine import Governance
    from plinth.knowledge.embedders import Embedder
    from plinth.knowledge.jobs import IngestJobs, JobOut, KbJob
    from plinth.knowledge.models import KnowledgeBase

log = logging.getLogger(__name__)
RESUME_EVERY_S = 30.0  # half the heartbeat staleness: a crashed job resumes within about 90 s
INGEST = Endpoint("knowledge_ingest", openai_protocol.error_body)
DEFAULT_UPLOAD_BYTES = 20 * 1024 * 1024


class IngestApi:
    def __init__(
        self,
        gateway: Gateway,
        database: Database,
        governance: Governance | None = None,
        knowledge: KnowledgeConfig | None = None,
    ) -> None:
        """`knowledge`: the `knowledge:` configuration (URL address rules, size and time limits)."""
        self.gateway = gateway
        self.database = database
        self.governance = governance
        self.knowledge = knowledge
        self._jobs: IngestJobs | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, for in-process embedding
        if gateway.knowledge is not None:
            gateway.knowledge.ingest = self  # so the app's start hook finds the jobs

    def routes(self) -> list[Route]:
        return [
            Route("/v1/knowledge/{kb}/documents", self.upload, methods=["POST"]),
            Route("/v1/knowledge/{kb}/jobs", self.list_jobs, methods=["GET"]),
            Route("/v1/knowledge/{kb}/jobs/{job_id}", self.show_job, methods=["GET"]),
            Route("/v1/knowledge/{kb}/jobs/{job_id}/resume", self.resume_job, methods=["POST"]),
            Route("/v1/knowledge/{kb}/jobs/{job_id}/cancel", self.cancel_job, methods=["POST"]),
        ]

    @property
    def jobs(self) -> IngestJobs:
        """Built on first use: the master key, numpy and the embedders load then, not at start."""
        if self._jobs is None:
            from plinth.knowledge.crypto import CryptoError, master_key_from_env
            from plinth.knowledge.fetch import FetchPolicy
            from plinth.knowledge.jobs import IngestJobs, StoreProvider

            try:
                key = master_key_from_env()
            except CryptoError as exc:
                log.warning("knowledge bases: %s; encrypted bases cannot be ingested", exc)
                key = None
            self._jobs = IngestJobs(
                self.database,
                StoreProvider(self.database, key),
                FetchPolicy.from_config(self.knowledge),
                audit=self.gateway.audit,
                embedders=self._gateway_embedder,
            )
        return self._jobs

    def _gateway_embedder(self, job: KbJob, model: str, dimensions: int) -> Embedder:
        """A `gateway:<model>` base's embedder for one job (called in the job's thread): in process,
        as the key whose upload started the job, looked up again so a revoked key stops it."""
        from plinth.knowledge.embedders import GatewayEmbedder
        from plinth.knowledge.jobs import JobError
        from plinth.tenancy.keys import principal_for
        from plinth.tenancy.service import NotFound, TenancyService

        if self._loop is None or self._loop.is_closed():
            raise JobError("the gateway is not serving: resume the job once it runs")
        key_id = job.params.get("key_id")
        if not isinstance(key_id, str):
            raise JobError("the job names no key to embed with: start a new upload with a team key")
        tenancy = TenancyService(self.database)
        try:
            key = tenancy.get_key(key_id)
            team = tenancy.get_team(key.team_id)
        except NotFound:
            raise JobError(f"key {key_id} that started the job no longer exists") from None
        expired = key.expires_at is not None and key.expires_at <= utcnow()
        if key.revoked_at is not None or expired:
            raise JobError(f"key {key_id} that started the job is revoked or expired")
        return GatewayEmbedder.in_process(
            self.gateway, principal_for(key, team), model, dimensions, self._loop
        )

    async def follow(self, interval_s: float = RESUME_EVERY_S) -> None:
        """Resume interrupted jobs now and every `interval_s` (until cancelled): a crash mid-ingest
        finishes after a restart, once the dead process's heartbeat is stale."""
        self._loop = asyncio.get_running_loop()
        while True:
            try:
                started = await asyncio.to_thread(self.jobs.resume_interrupted)
                if started:
                    log.info("resuming %d interrupted ingestion job(s): %s", len(started), ", ".join(started))
            except Exception:  # database down or not migrated yet: try again next round
                log.warning("could not look for interrupted ingestion jobs", exc_info=True)
            await asyncio.sleep(interval_s)

    def _authorize(self, principal: Any, base: KnowledgeBase, request_id: str) -> None:
        """The `ingest` policy decision on the base, recorded in the audit trail."""
        if self.governance is None:
            return
        from plinth.governance.config import Level
        from plinth.governance.engine import Resource

        decision = self.governance.check(
            principal, "ingest", Resource("KnowledgeBase", base.id, base.team_id), Level(principal.data_class)
        )
        audit = self.gateway.audit
        if audit is not None and self.governance.settings.audit_decisions:
            audit.record_decision(request_id, principal, decision)
        if not decision.allowed:
            raise knowledge_error(403, decision.message or "ingestion refused by policy")

    async def _base(self, request: Request, ctx: Any) -> tuple[Any, KnowledgeBase]:
        """Authenticate and find the base within the key's team (404 otherwise). Raises GatewayError."""
        from plinth.knowledge.store import KnowledgeError

        principal = ctx.principal = self.gateway.authenticate(request, allow_x_api_key=False)
        ref = request.path_params["kb"]
        if not principal.is_admin and principal.team_id is None:
            raise knowledge_error(404, f"knowledge base {ref!r} not found")  # a key without a team owns none
        team = None if principal.is_admin else principal.team_id
        lookup = self.jobs.stores.for_base({"embedder": "hashing", "dimensions": 1})  # embeds nothing
        try:
            base: KnowledgeBase = await asyncio.to_thread(lookup.get_base, ref, team)
        except KnowledgeError as exc:
            raise knowledge_error(exc.status, str(exc)) from None
        return principal, base

    async def upload(self, request: Request) -> Response:
        """Start an ingestion job from uploaded files or a URL; 202 with the job."""
        from plinth.knowledge.fetch import FetchError, resolve, validate_url
        from plinth.knowledge.jobs import JobError, Upload, clean_source, job_out

        ctx = new_context(request)
        self._loop = asyncio.get_running_loop()
        try:
            principal, base = await self._base(request, ctx)
            self._authorize(principal, base, ctx.request_id)
            # The key whose upload starts the job embeds a `gateway:<model>` base (jobs.py).
            params = {"key_id": principal.key_id} if principal.key_id else {}
            limit = self.knowledge.upload_max_bytes if self.knowledge is not None else DEFAULT_UPLOAD_BYTES
            ctype = request.headers.get("content-type", "")
            mime = ctype.split(";", 1)[0].strip().lower()
            actor = principal.key_id or principal.name
            jobs = self.jobs
            if mime == "application/json":
                body = await self.gateway.read_json(request)
                url = body.get("url") if isinstance(body, dict) else None
                if not isinstance(url, str) or not url.strip():
                    raise knowledge_error(400, "'url' must be an http(s) URL to ingest", "url")
                try:
                    parsed = validate_url(url)
                    # Refuse a private address now with a clear 400; the job checks again as it connects.
                    await asyncio.to_thread(resolve, parsed, jobs.fetch_policy)
                except FetchError as exc:
                    raise knowledge_error(400, f"'url' refused: {exc}", "url") from None
                job = await self._create(
                    base, "url", str(parsed), actor=actor, request_id=ctx.request_id, params=params
                )
            else:
                raw = await _read_body(request, limit)
                if mime == "multipart/form-data":
                    files = _multipart(ctype, raw)
                else:
                    name = request.query_params.get("filename")
                    if not name:
                        raise knowledge_error(
                            400,
                            "send files as multipart/form-data, or the raw body with '?filename=NAME'",
                            "filename",
                        )
                    files = [(name, raw)]
                try:
                    uploads = [Upload(clean_source(name), data) for name, data in files]
                except JobError as exc:
                    raise knowledge_error(400, str(exc), "filename") from None
                for upload in uploads:
                    if not upload.data:
                        raise knowledge_error(400, f"file {upload.source!r} is empty", "filename")
                label = uploads[0].source if len(uploads) == 1 else f"{len(uploads)} files"
                job = await self._create(
                    base,
                    "upload",
                    label,
                    actor=actor,
                    uploads=uploads,
                    request_id=ctx.request_id,
                    params=params,
                )
            jobs.start(job.id)
        except GatewayError as err:
            return error_response(err, ctx, INGEST)
        return _job_response(job_out(job), 202, ctx.request_id)

    async def _create(self, base: KnowledgeBase, kind: Any, source: str, **kwargs: Any) -> KbJob:
        """`IngestJobs.create` in a thread; a refusal (an encrypted base without a master key, a URL
        too long) is a GatewayError."""
        from plinth.knowledge.jobs import JobError

        try:
            return await asyncio.to_thread(self.jobs.create, base, kind, source, **kwargs)
        except JobError as exc:
            raise knowledge_error(exc.status, str(exc), "url" if kind == "url" else None) from None

    async def list_jobs(self, request: Request) -> Response:
        """The base's ingestion jobs, newest first (`?limit=`, default 50)."""
        from plinth.knowledge.jobs import JobList, job_out

        ctx = new_context(request)
        try:
            _principal, base = await self._base(request, ctx)
            raw_limit = request.query_params.get("limit", "50")
            if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 500:
                raise knowledge_error(400, "'limit' must be an integer from 1 to 500", "limit")
            jobs = await asyncio.to_thread(self.jobs.list, None, base.id, int(raw_limit))
        except GatewayError as err:
            return error_response(err, ctx, INGEST)
        body = JobList(data=[job_out(j) for j in jobs]).model_dump(mode="json")
        return Response(orjson.dumps(body), 200, {"x-request-id": ctx.request_id}, "application/json")

    async def show_job(self, request: Request) -> Response:
        """One job's status and counts (poll it for progress)."""
        from plinth.knowledge.jobs import JobError, job_out

        ctx = new_context(request)
        try:
            _principal, base = await self._base(request, ctx)
            try:
                job = await asyncio.to_thread(self.jobs.get, request.path_params["job_id"], None, base.id)
            except JobError as exc:
                raise knowledge_error(exc.status, str(exc)) from None
        except GatewayError as err:
            return error_response(err, ctx, INGEST)
        return _job_response(job_out(job), 200, ctx.request_id)

    async def resume_job(self, request: Request) -> Response:
        """Resume an interrupted, failed or partial job (202); a succeeded job is returned as is (200)."""
        from plinth.knowledge.jobs import FOLDER_RESUME, JobError, job_out

        ctx = new_context(request)
        self._loop = asyncio.get_running_loop()
        try:
            principal, base = await self._base(request, ctx)
            self._authorize(principal, base, ctx.request_id)
            job_id = request.path_params["job_id"]
            try:
                found = await asyncio.to_thread(self.jobs.get, job_id, None, base.id)
                if found.kind == "folder":  # the gateway never reads a local folder for a key
                    raise knowledge_error(400, FOLDER_RESUME, "job_id")
                job = await asyncio.to_thread(self.jobs.resume, job_id, None)
            except JobError as exc:
                raise knowledge_error(exc.status, str(exc)) from None
        except GatewayError as err:
            return error_response(err, ctx, INGEST)
        return _job_response(job_out(job), 200 if job.status == "succeeded" else 202, ctx.request_id)

    async def cancel_job(self, request: Request) -> Response:
        """Stop a queued or running job (200 with it, `cancelled`); an ended job is a 409."""
        from plinth.knowledge.jobs import JobError, job_out

        ctx = new_context(request)
        try:
            principal, base = await self._base(request, ctx)
            self._authorize(principal, base, ctx.request_id)
            job_id = request.path_params["job_id"]
            actor = principal.key_id or principal.name
            try:
                await asyncio.to_thread(self.jobs.get, job_id, None, base.id)
                job = await asyncio.to_thread(self.jobs.cancel, job_id, None, actor=actor)
            except JobError as exc:
                raise knowledge_error(exc.status, str(exc), "job_id" if exc.status == 409 else None) from None
        except GatewayError as err:
            return error_response(err, ctx, INGEST)
        return _job_response(job_out(job), 200, ctx.request_id)


def _job_response(job: JobOut, status: int, request_id: str) -> Response:
    headers = {"x-request-id": request_id, "location": f"/v1/knowledge/{job.knowledge_base}/jobs/{job.id}"}
    return Response(orjson.dumps(job.model_dump(mode="json")), status, headers, "application/json")


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused with a 413 past `limit` bytes (checked as it streams in)."""
    too_big = f"the upload is larger than the limit of {limit} bytes (knowledge.upload_max_bytes)"
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise knowledge_error(413, too_big)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise knowledge_error(413, too_big)
        chunks.append(chunk)
    return b"".join(chunks)


def _multipart(content_type: str, raw: bytes) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every part with a filename (stdlib email parser; no extra dependency)."""
    if "boundary=" not in content_type:
        raise knowledge_error(400, "multipart/form-data without a boundary", "file")
    message = BytesParser(policy=email_policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + raw
    )
    if not message.is_multipart():
        raise knowledge_error(400, "the multipart body could not be parsed", "file")
    files: list[tuple[str, bytes]] = []
    for part in message.iter_parts():
        name = part.get_filename()
        if not name:
            continue  # a plain form field
        payload = part.get_payload(decode=True)
        files.append((name, payload if isinstance(payload, bytes) else b""))
    if not files:
        raise knowledge_error(
            400, "no file in the upload: send each file as a form part with a filename", "file"
        )
    return files
