"""Knowledge-base ingestion, the finishing pieces: staged uploads and URLs sealed for encrypted bases
and deleted once processed, URLs stored and audited without their query string, `retrieve`
decisions in the audit trail, interrupted jobs resumed at gateway start, cancel, and bases
embedded through the gateway ingested by jobs (in the server and from the CLI)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from sqlalchemy import select, update
from typer.testing import CliRunner

from conftest import ADMIN_KEY, GatewayServer, wait_for
from mocks.openai_upstream import OpenAIUpstream
from plinth.cli import app
from plinth.governance.audit import AuditLog
from plinth.governance.models import AuditRecord
from plinth.knowledge.crypto import CryptoError
from plinth.knowledge.embedders import EmbeddingFailed, GatewayEmbedder, HashingEmbedder
from plinth.knowledge.jobs import IngestJobs, JobError, KbJob, StoreProvider, Upload
from plinth.knowledge.store import KnowledgeStore
from plinth.storage import Database
from plinth.tenancy.service import TenancyService
from test_knowledge_chat import chat_body, setup_bases
from test_knowledge_url import LOOPBACK_ONLY, Site, site  # noqa: F401  (the `site` fixture)

MODEL = "text-embedding-3-small"  # 3-dimensional vectors on the OpenAI mock
SECRET = b"# Launch\n\nThe launch code is PLUM-7781 and nobody outside the vault may know it.\n"
TERMINAL = ("succeeded", "failed", "partial", "cancelled")


def staged(url: str) -> dict[str, bytes | None]:
    """kb_job_files.data as stored, read with plain SQL (no ORM, no decryption)."""
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        rows = {
            r[0]: bytes(r[1]) if r[1] is not None else None
            for r in conn.exec_driver_sql("SELECT source, data FROM kb_job_files")
        }
    engine.dispose()
    return rows


def test_staged_uploads_are_sealed_for_an_encrypted_base_and_deleted_once_processed(
    database_url: str,
) -> None:
    url = database_url
    db = Database(url)
    db.migrate()
    master = secrets.token_bytes(32)
    base = KnowledgeStore(db, HashingEmbedder(), master_key=master).create_base("team_a", "vault")
    assert base.settings["encrypted"]
    jobs = IngestJobs(db, StoreProvider(db, master))
    uploads = [Upload("plan.md", SECRET), Upload("bad.pdf", b"%PDF-1.5 truncated")]
    job = jobs.create(base, "upload", "2 files", actor="t", uploads=uploads)

    raw = staged(url)
    plan = raw["plan.md"]
    assert plan is not None and b"PLUM-7781" not in plan and b"launch" not in plan.lower()
    assert raw["bad.pdf"] is not None and b"%PDF" not in raw["bad.pdf"]
    # sealed with the team's key and bound to the job and the file name
    cipher = StoreProvider(db, master).cipher(base.id, base.settings)
    assert cipher is not None and cipher.open_staged(plan, job.id, "plan.md") == SECRET
    for job_id, name in [(job.id, "bad.pdf"), ("job_other", "plan.md")]:
        with pytest.raises(CryptoError):
            cipher.open_staged(plan, job_id, name)

    done = jobs.run(job.id)
    assert (done.status, done.added, done.failed) == ("partial", 1, 1)
    # ingested, and failed for good (unparseable): both files' bytes are deleted
    assert staged(url) == {"plan.md": None, "bad.pdf": None}
    hits = KnowledgeStore(db, HashingEmbedder(), master_key=master).search(base.id, "launch code", top_k=1)
    assert "PLUM-7781" in hits[0].text

    # a process without the master key refuses to stage into an encrypted base (nothing in clear)
    with pytest.raises(JobError, match="PLINTH_MASTER_KEY"):
        IngestJobs(db, StoreProvider(db, None)).create(
            base, "upload", "x.md", actor="t", uploads=[Upload("x.md", SECRET)]
        )
    assert len(staged(url)) == 2
    db.dispose()


def test_a_file_that_may_pass_later_keeps_its_sealed_bytes_for_the_retry(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/kb.db"
    db = Database(url)
    db.migrate()
    master = secrets.token_bytes(32)
    calls: list[int] = []

    def flaky(batch: list[str]) -> list[list[float]]:
        """An embeddings upstream that is rate-limited on the first call."""
        calls.append(len(batch))
        if len(calls) == 1:
            raise EmbeddingFailed("gateway embeddings: 429 rate limit reached", 429)
        return [[1.0, float(i), 0.5] for i in range(len(batch))]

    base = KnowledgeStore(db, GatewayEmbedder(MODEL, 3), master_key=master).create_base("team_a", "gw")
    jobs = IngestJobs(db, StoreProvider(db, master), embedders=lambda job, m, d: GatewayEmbedder(m, d, flaky))
    job = jobs.create(base, "upload", "plan.md", actor="t", uploads=[Upload("plan.md", SECRET)])
    first = jobs.run(job.id)
    assert first.status == "failed" and "429" in first.errors[0]["reason"]
    kept = staged(url)["plan.md"]
    assert kept is not None and b"PLUM" not in kept  # still sealed, kept for the retry
    again = jobs.resume(job.id, "team_a", background=False)
    assert (again.status, again.added, again.chunks) == ("succeeded", 1, 1) and calls == [1, 1]
    assert staged(url)["plan.md"] is None

    # a process that cannot reach a gateway refuses to resume such a job, with the reason
    other = jobs.create(base, "upload", "x.md", actor="t", uploads=[Upload("x.md", b"# X\n\nx\n")])
    with pytest.raises(JobError, match="embeds through the gateway"):
        IngestJobs(db, StoreProvider(db, master)).resume(other.id, "team_a", background=False)
    db.dispose()


def test_a_url_is_stored_and_audited_without_its_query_string(site: Site, tmp_path: Path) -> None:  # noqa: F811
    url = f"sqlite:///{tmp_path}/kb.db"
    db = Database(url)
    db.migrate()
    master = secrets.token_bytes(32)
    store = KnowledgeStore(db, HashingEmbedder(), master_key=master)
    base = store.create_base("team_a", "wiki")
    jobs = IngestJobs(db, StoreProvider(db, master), LOOPBACK_ONLY, audit=AuditLog(db))
    signed = site.url("/leave.md?X-Amz-Signature=deadbeefcafe&X-Amz-Expires=60#top")
    job = jobs.create(base, "url", signed, actor="t")
    plain = site.url("/leave.md")
    assert job.source == plain and job.params["url_sha256"] == hashlib.sha256(signed.encode()).hexdigest()
    sealed = staged(url)[plain]
    assert sealed is not None and b"deadbeefcafe" not in sealed  # the full URL waits sealed

    done = jobs.run(job.id)
    assert (done.status, done.added) == ("succeeded", 1)
    assert site.paths[-1] == "/leave.md?X-Amz-Signature=deadbeefcafe&X-Amz-Expires=60"  # fetched in full
    assert [d.source for d in store.documents(base.id)] == [plain]
    assert staged(url)[plain] is None
    # a freshly signed URL of the same document is the same source: unchanged, nothing embedded
    again = jobs.run(jobs.create(base, "url", site.url("/leave.md?X-Amz-Signature=0ther"), actor="t").id)
    assert (again.unchanged, again.chunks) == (1, 0)
    with db.session() as s:
        records = list(s.scalars(select(AuditRecord)))
        jobs_rows = list(s.scalars(select(KbJob)))
    assert {r.action for r in records} == {"knowledge_ingest", "knowledge_ingest_finished"}
    trail = json.dumps([[r.target, r.reason, r.detail] for r in records])
    assert plain in trail and "deadbeefcafe" not in trail and "0ther" not in trail
    assert all("?" not in j.source for j in jobs_rows)
    db.dispose()


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def test_retrieve_decisions_are_in_the_audit_trail(
    gateway_factory: Callable[..., GatewayServer],
    basic_config: dict[str, Any],
    openai_upstream: OpenAIUpstream,
    tmp_path: Path,
) -> None:
    url, key_a, _key_b, kb_id = setup_bases(tmp_path)
    server = gateway_factory({**basic_config, "storage": {"url": url}})
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        query = await client.post(
            "/v1/knowledge/handbook/query", json={"query": "paid leave"}, headers=auth(key_a)
        )
        assert query.status_code == 200, query.text
        chat = await client.post(
            "/v1/chat/completions", json=chat_body(knowledge_bases=["handbook"]), headers=auth(key_a)
        )
        assert chat.status_code == 200, chat.text
        denied = await client.post(
            f"/v1/knowledge/{kb_id}/query", json={"query": "x"}, headers=auth(ADMIN_KEY)
        )
        assert denied.status_code == 403  # the admin key is in no team: no policy permits it

        async def retrieves() -> list[dict[str, Any]]:
            listed = await client.get("/api/audit/records?kind=decision&limit=5000", headers=auth(ADMIN_KEY))
            assert listed.status_code == 200, listed.text
            return [r for r in listed.json()["data"] if r["action"] == "retrieve"]

        for _ in range(200):  # decisions are written in batches
            found = await retrieves()
            if len(found) >= 3:
                break
            await asyncio.sleep(0.05)
        by_request = {r["request_id"]: r for r in found}
        target = f"KnowledgeBase:{kb_id}"
        for response in (query, chat):
            record = by_request[response.headers["x-request-id"]]
            assert (record["outcome"], record["target"]) == ("allow", target)
            assert record["policy_ids"] and record["detail"]["team"] and record["actor"].startswith("key_")
        refused = by_request[denied.headers["x-request-id"]]
        assert refused["outcome"] == "deny" and refused["policy_ids"] and refused["reason"]
        # the chat request's model decision carries the same request id
        decisions = (await client.get(f"/api/audit/records?request_id={chat.headers['x-request-id']}",
                                      headers=auth(ADMIN_KEY))).json()["data"]  # fmt: skip
        assert {d["action"] for d in decisions} == {"retrieve", "invoke"}
        verified = await client.get("/api/audit/verify", headers=auth(ADMIN_KEY))
        assert verified.json()["ok"] is True and verified.json()["records"] >= 4


def gateway_setup(tmp_path: Path) -> tuple[str, str, str, str]:
    """A team with a key, a base embedded through the gateway (`gateway:<model>`), plaintext."""
    url = f"sqlite:///{tmp_path}/plinth.db"
    db = Database(url)
    db.migrate()
    tenancy = TenancyService(db)
    team = tenancy.create_team(tenancy.create_org("acme").id, "a")
    created = tenancy.create_key(team.id, "ingest")
    KnowledgeStore(db, GatewayEmbedder(MODEL, 3)).create_base(team.id, "gw")
    db.dispose()
    return url, team.id, created.key.id, created.secret


async def poll(client: httpx.AsyncClient, path: str, key: str, timeout: float = 15.0) -> dict[str, Any]:
    """Poll without blocking the loop: the upstream mock runs on it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        job: dict[str, Any] = (await client.get(path, headers=auth(key))).json()
        if job["status"] in TERMINAL or asyncio.get_running_loop().time() > deadline:
            return job
        await asyncio.sleep(0.05)


async def test_a_crashed_job_finishes_after_a_restart_embedding_as_its_uploader(
    gateway_factory: Callable[..., GatewayServer],
    basic_config: dict[str, Any],
    openai_upstream: OpenAIUpstream,
    tmp_path: Path,
) -> None:
    url, _team_id, key_id, key = gateway_setup(tmp_path)
    db = Database(url)
    base = KnowledgeStore(db, GatewayEmbedder(MODEL, 3)).get_base("gw", None)
    uploads = [
        Upload("leave.md", b"# Leave\n\nEveryone gets 25 days of paid leave a year.\n"),
        Upload("it.txt", b"Laptops are replaced every three years."),
    ]
    jobs = IngestJobs(db, StoreProvider(db, None))
    job = jobs.create(base, "upload", "2 files", actor=key_id, params={"key_id": key_id}, uploads=uploads)
    old = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=5)
    with db.session() as s:  # the process running it died minutes ago, mid-job
        s.execute(
            update(KbJob).where(KbJob.id == job.id).values(status="running", heartbeat_at=old, attempts=1)
        )
    db.dispose()

    server = gateway_factory({**basic_config, "storage": {"url": url}})  # the restart
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        done = await poll(client, f"/v1/knowledge/gw/jobs/{job.id}", key)
        assert (done["status"], done["added"], done["attempts"]) == ("succeeded", 2, 2), done
        assert staged(url) == {"leave.md": None, "it.txt": None}
        # a new upload is embedded in process too, on the uploading key
        up = await client.post(
            "/v1/knowledge/gw/documents?filename=travel.txt",
            content=b"Book trains for trips under four hours.",
            headers=auth(key),
        )
        assert up.status_code == 202, up.text
        assert (await poll(client, up.headers["location"], key))["status"] == "succeeded"
        found = await client.post(
            "/v1/knowledge/gw/query",
            json={"query": "laptops", "mode": "dense", "top_k": 3},
            headers=auth(key),
        )
        assert found.status_code == 200 and len(found.json()["data"]) == 3

        # cancel: a queued job stops, its staged bytes go; it can be neither cancelled nor resumed again
        db = Database(url)
        queued = IngestJobs(db, StoreProvider(db, None)).create(
            base, "upload", "x.md", actor=key_id, params={"key_id": key_id}, uploads=[Upload("x.md", b"x")]
        )
        db.dispose()
        path = f"/v1/knowledge/gw/jobs/{queued.id}"
        cancelled = await client.post(f"{path}/cancel", headers=auth(key))
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert staged(url)["x.md"] is None
        again = await client.post(f"{path}/cancel", headers=auth(key))
        assert again.status_code == 409 and again.json()["error"]["param"] == "job_id"
        assert (await client.post(f"{path}/resume", headers=auth(key))).status_code == 409
        admin = await client.post(f"/api/knowledge-bases/gw/jobs/{queued.id}/cancel", headers=auth(ADMIN_KEY))
        assert admin.status_code == 409
        # the admin API cannot embed for a team: it refuses URL ingests of a gateway-embedded base
        refused = await client.post(
            "/api/knowledge-bases/gw/ingest", json={"url": "https://example.com/x"}, headers=auth(ADMIN_KEY)
        )
        assert (
            refused.status_code == 400 and "embeds through the gateway" in refused.json()["error"]["message"]
        )

    usage = server.app.state.usage
    await wait_for(lambda: usage.written >= 3)
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.exec_driver_sql("SELECT * FROM usage_records")]
    engine.dispose()
    ingest_rows = [r for r in rows if r["route"] == "knowledge_embeddings"]
    assert ingest_rows and all(r["key_name"] == "ingest" for r in ingest_rows)


async def test_cli_creates_and_ingests_a_gateway_embedded_base_with_the_key_from_the_environment(
    gateway_factory: Callable[..., GatewayServer],
    basic_config: dict[str, Any],
    openai_upstream: OpenAIUpstream,
    tmp_path: Path,
) -> None:
    url, team_id, _key_id, key = gateway_setup(tmp_path)
    server = gateway_factory({**basic_config, "storage": {"url": url}})
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "handbook.md").write_text(
        "# Leave\n\n25 days of paid leave.\n\n# IT\n\nLaptops every three years.\n"
    )
    runner = CliRunner()
    common = ["--team", team_id, "--db", url]
    env = {"PLINTH_MASTER_KEY": "", "PLINTH_API_KEY": key, "PLINTH_GATEWAY_URL": ""}

    def cli(*args: str, **extra: str) -> Any:
        return runner.invoke(app, ["kb", *args, *common], env={**env, **extra})

    gw = ["--gateway-url", server.url]
    created = await asyncio.to_thread(
        cli, "create", "wiki", "--embedder", f"gateway:{MODEL}", "--plaintext", *gw
    )
    assert created.exit_code == 0, created.output
    base = KnowledgeStore(Database(url), HashingEmbedder()).get_base("wiki", team_id)
    assert base.settings["embedder"] == f"gateway:{MODEL}" and base.settings["dimensions"] == 3  # probed

    keyless = await asyncio.to_thread(cli, "ingest", "wiki", str(docs), *gw, PLINTH_API_KEY="")
    assert keyless.exit_code == 2 and "PLINTH_API_KEY" in keyless.stderr
    ingested = await asyncio.to_thread(cli, "ingest", "wiki", str(docs), *gw)
    assert ingested.exit_code == 0, ingested.output
    assert "succeeded: added 1" in ingested.stdout and "2 chunks embedded" in ingested.stdout
    assert key not in ingested.output and key not in ingested.stderr
    again = await asyncio.to_thread(cli, "ingest", "wiki", str(docs), *gw)
    assert "unchanged 1" in again.stdout and "0 chunks embedded" in again.stdout

    # cancel from the CLI (a queued job: it never runs)
    db = Database(url)
    queued = IngestJobs(db, StoreProvider(db, None)).create(base, "folder", str(docs), actor="t")
    db.dispose()
    stopped = await asyncio.to_thread(cli, "cancel", queued.id)
    assert stopped.exit_code == 0 and "cancelled" in stopped.stdout
    twice = await asyncio.to_thread(cli, "cancel", queued.id)
    assert twice.exit_code == 2 and "already ended" in twice.stderr
