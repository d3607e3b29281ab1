"""Ingestion jobs: counts and per-file errors, resume after a process death without redoing work,
idempotent re-runs, uploads over HTTP with the `ingest` policy and the audit trail, the CLI."""

from __future__ import annotations

import datetime as dt
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from typer.testing import CliRunner

from conftest import ADMIN_KEY, GatewayServer
from knowledge_fixtures import two_teams_with_handbook
from plinth.cli import app
from plinth.config.schema import KnowledgeConfig
from plinth.governance.models import AuditRecord
from plinth.knowledge.embedders import HashingEmbedder
from plinth.knowledge.jobs import IngestJobs, JobError, KbJob, StoreProvider, clean_source
from plinth.knowledge.models import KbChunk, KnowledgeBase
from plinth.knowledge.store import KnowledgeStore
from plinth.storage import Database
from test_knowledge_url import configure, wait_done


class Died(BaseException):
    """Stands for the process dying mid-job: nothing in the job runner handles it."""


def make_folder(root: Path) -> Path:
    docs = root / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Cats\n\nCats purr when they are content.\n")
    (docs / "b.txt").write_text("Dogs bark at the mail carrier.")
    (docs / "c.pdf").write_bytes(b"%PDF-1.5 truncated")  # corrupt
    (docs / "d.xyz").write_text("what is this")  # unsupported
    (docs / "e.txt").write_text("Parrots repeat words they hear often.")
    return docs


def test_folder_job_resumes_after_a_death_without_redoing_work(database_url: str, tmp_path: Path) -> None:
    db = Database(database_url)
    db.migrate()
    base = KnowledgeStore(db, HashingEmbedder()).create_base("team_a", "pets")
    docs = make_folder(tmp_path)
    jobs = IngestJobs(db, StoreProvider(db, None))
    job = jobs.create(base, "folder", str(docs), actor="t", params={"folder": str(docs)})
    assert job.status == "queued"

    def die_after_two(done: int, total: int, source: str) -> None:
        if done == 2:
            raise Died

    with pytest.raises(Died):
        jobs.run(job.id, die_after_two)
    dead = jobs.get(job.id, "team_a")
    assert (dead.status, dead.files_done, dead.files_total, dead.added) == ("running", 2, 5, 2)
    with db.session() as s:
        first_chunks = dict(s.execute(select(KbChunk.id, KbChunk.document_id)).all())
    # its heartbeat is fresh: it may still be running somewhere, so it is not taken over
    with pytest.raises(JobError, match="is running"):
        jobs.resume(job.id, "team_a", background=False)
    with db.session() as s:  # a minute later nobody has beaten for it: the process is gone
        old = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(minutes=5)
        s.execute(update(KbJob).where(KbJob.id == job.id).values(heartbeat_at=old))
    assert jobs.resumable(jobs.get(job.id, "team_a"))
    seen: list[str] = []
    done = jobs.run(job.id, lambda d, t, src: seen.append(src))
    assert seen == ["c.pdf", "d.xyz", "e.txt"]  # a.md and b.txt were not read again
    assert (done.status, done.added, done.failed, done.files_done, done.attempts) == ("partial", 3, 2, 5, 2)
    reasons = {e["source"]: e["reason"] for e in done.errors}
    assert set(reasons) == {"c.pdf", "d.xyz"} and "unsupported file type .xyz" in reasons["d.xyz"]
    with db.session() as s:  # the first two files' chunks are the very same rows
        chunks = dict(s.execute(select(KbChunk.id, KbChunk.document_id)).all())
    assert first_chunks.items() <= chunks.items()

    # resuming the partial job retries only the failed files; the counts stay exact
    again = jobs.resume(job.id, "team_a", background=False)
    assert (again.status, again.added, again.failed, again.files_done, again.attempts) == (
        "partial",
        3,
        2,
        5,
        3,
    )
    assert jobs.get(job.id, None).chunks == done.chunks  # nothing embedded again

    # a new job on the unchanged folder embeds nothing; a changed and a deleted file are synced
    rerun = jobs.run(jobs.create(base, "folder", str(docs), actor="t", params={"folder": str(docs)}).id)
    assert (rerun.unchanged, rerun.added, rerun.chunks, rerun.failed) == (3, 0, 0, 2)
    (docs / "a.md").write_text("# Cats\n\nCats also knead blankets.\n")
    (docs / "b.txt").unlink()
    synced = jobs.run(jobs.create(base, "folder", str(docs), actor="t", params={"folder": str(docs)}).id)
    assert (synced.replaced, synced.removed, synced.unchanged) == (1, 1, 1)
    assert [d.source for d in KnowledgeStore(db, HashingEmbedder()).documents(base.id)] == ["a.md", "e.txt"]

    missing = jobs.run(jobs.create(base, "folder", "/nope", actor="t", params={"folder": "/nope"}).id)
    assert missing.status == "failed" and "is not a folder" in (missing.error or "")
    with pytest.raises(JobError) as hidden:
        jobs.get(job.id, "team_b")  # another team's job does not exist for it
    assert hidden.value.status == 404
    listed = jobs.list("team_a", base.id)
    assert listed[0].id == missing.id and len(listed) == 4
    db.dispose()


def test_upload_names_are_clean_relative_paths() -> None:
    assert clean_source("docs\\hr/./leave.md") == "docs/hr/leave.md"
    assert clean_source("/abs/x.md") == "abs/x.md"
    for bad in ("../x.md", "a/../../b", "", "a\x00b.md"):
        with pytest.raises(JobError):
            clean_source(bad)


def setup_gateway_db(tmp_path: Path) -> tuple[str, str, str, str]:
    return two_teams_with_handbook(tmp_path)


def test_upload_over_http_with_policy_progress_and_audit(
    gateway_factory: Callable[..., GatewayServer], basic_config: dict[str, Any], tmp_path: Path
) -> None:
    url, key_a, key_b, kb_id = setup_gateway_db(tmp_path)
    server = gateway_factory({**basic_config, "storage": {"url": url}})
    a = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {key_a}"}, timeout=10)
    files = [
        (
            "file",
            ("hr/leave.md", b"# HR\n\n## Leave\n\nEveryone gets 25 days of paid leave.\n", "text/markdown"),
        ),
        ("file", ("it.txt", b"Laptops are replaced every three years.", "text/plain")),
        ("file", ("broken.pdf", b"%PDF-1.5 truncated", "application/pdf")),
        ("note", (None, b"a plain form field is ignored")),
    ]
    started = a.post("/v1/knowledge/handbook/documents", files=files)
    assert started.status_code == 202, started.text
    body = started.json()
    assert body["object"] == "knowledge.ingest_job" and body["kind"] == "upload"
    assert body["files"]["total"] == 3 and started.headers["location"].endswith(body["id"])
    job = wait_done(a, started.headers["location"])
    assert (job["status"], job["added"], job["failed"]) == ("partial", 2, 1)
    assert job["errors"][0]["source"] == "broken.pdf" and job["errors"][0]["reason"]
    hit = a.post("/v1/knowledge/handbook/query", json={"query": "days of paid leave", "top_k": 1}).json()
    assert hit["data"][0]["source"] == "hr/leave.md"

    # a raw body with ?filename=; the same bytes again are skipped by their hash
    raw = a.post(
        "/v1/knowledge/handbook/documents?filename=it.txt",
        content=b"Laptops are replaced every three years.",
        headers={"content-type": "text/plain"},
    )
    assert raw.status_code == 202
    assert wait_done(a, raw.headers["location"])["unchanged"] == 1
    listed = a.get("/v1/knowledge/handbook/jobs").json()["data"]
    assert [j["id"] for j in listed] == [raw.json()["id"], body["id"]]
    resumed = a.post(f"/v1/knowledge/handbook/jobs/{body['id']}/resume")
    assert resumed.status_code == 202  # partial: the broken file is retried (and fails again)
    assert wait_done(a, started.headers["location"])["failed"] == 1

    # bad input is a 4xx naming the field
    nameless = a.post(
        "/v1/knowledge/handbook/documents", content=b"x", headers={"content-type": "text/plain"}
    )
    assert nameless.status_code == 400 and nameless.json()["error"]["param"] == "filename"
    escape = a.post("/v1/knowledge/handbook/documents?filename=../../etc/x.md", content=b"x")
    assert escape.status_code == 400 and escape.json()["error"]["param"] == "filename"
    empty = a.post("/v1/knowledge/handbook/documents?filename=e.md", content=b"")
    assert empty.status_code == 400
    nofile = a.post("/v1/knowledge/handbook/documents", files=[("note", (None, b"x"))])
    assert nofile.status_code == 400 and nofile.json()["error"]["param"] == "file"
    configure(server, KnowledgeConfig(upload_max_bytes=1024))
    big = a.post("/v1/knowledge/handbook/documents?filename=big.txt", content=b"z" * 5000)
    assert big.status_code == 413 and "upload_max_bytes" in big.json()["error"]["message"]
    assert a.get("/v1/knowledge/handbook/jobs/job_nope").status_code == 404

    # a folder job (the CLI's) is never resumed by the gateway: it would read a local folder
    db = Database(url)
    with db.session() as s:
        base = s.get(KnowledgeBase, kb_id)
        assert base is not None
        s.expunge(base)
    folder_job = IngestJobs(db, StoreProvider(db, None)).create(
        base, "folder", "/srv/docs", actor="t", params={"folder": "/srv/docs"}
    )
    db.dispose()
    refused = a.post(f"/v1/knowledge/handbook/jobs/{folder_job.id}/resume")
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "job_id"

    # team B sees neither the base nor its jobs; the admin key is in no team: `ingest` is denied
    b = httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {key_b}"}, timeout=10)
    assert b.post("/v1/knowledge/handbook/documents?filename=x.md", content=b"x").status_code == 404
    assert b.get(f"/v1/knowledge/{kb_id}/jobs/{body['id']}").status_code == 404
    admin = httpx.post(
        f"{server.url}/v1/knowledge/{kb_id}/documents?filename=x.md",
        content=b"hello",
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert admin.status_code == 403 and "ingest on KnowledgeBase" in admin.json()["error"]["message"]

    # the admin API lists and shows the jobs too
    api = httpx.Client(base_url=f"{server.url}/api", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert len(api.get(f"/knowledge-bases/{kb_id}/jobs").json()["data"]) == 3
    assert api.post(f"/knowledge-bases/{kb_id}/jobs/{folder_job.id}/resume").status_code == 400
    shown = api.get(f"/knowledge-bases/{kb_id}/jobs/{body['id']}").json()
    assert shown["id"] == body["id"] and shown["failed"] == 1
    assert (
        api.post(f"/knowledge-bases/{kb_id}/jobs/{raw.json()['id']}/resume").json()["status"] == "succeeded"
    )
    assert "/api/knowledge-bases/{kb}/jobs/{job_id}" in api.get("/openapi.json").json()["paths"]
    for client in (a, b, api):
        client.close()

    # the audit trail: the decisions, each job's start and end (never the file contents)
    def audit() -> list[AuditRecord]:
        with Database(url).session() as s:
            return list(s.scalars(select(AuditRecord).order_by(AuditRecord.seq)))

    deadline = time.monotonic() + 5  # decisions are written in batches
    while not any(r.kind == "decision" and r.outcome == "deny" for r in audit()):
        assert time.monotonic() < deadline, [(r.kind, r.action, r.outcome) for r in audit()]
        time.sleep(0.05)
    records = audit()
    decisions = {(r.action, r.outcome, r.target) for r in records if r.kind == "decision"}
    assert {
        ("ingest", "allow", f"KnowledgeBase:{kb_id}"),
        ("ingest", "deny", f"KnowledgeBase:{kb_id}"),
    } <= decisions
    started_records = [r for r in records if r.action == "knowledge_ingest"]
    assert started_records and started_records[0].target == kb_id
    finished = [r for r in records if r.action == "knowledge_ingest_finished"]
    assert any(r.detail["status"] == "partial" and r.detail["failed"] == 1 for r in finished)
    assert not any("25 days" in json.dumps(r.detail) for r in records)
    resumed_admin = [r for r in records if r.action == "resume_job"]
    assert resumed_admin and resumed_admin[0].kind == "admin"


def test_cli_jobs_job_and_resume(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path}/plinth.db"
    docs = make_folder(tmp_path)
    runner = CliRunner()
    common = ["--team", "team_a", "--db", db_url]
    env = {"PLINTH_MASTER_KEY": ""}
    created = runner.invoke(
        app, ["kb", "create", "pets", *common, "--embedder", "hashing", "--plaintext"], env=env
    )
    assert created.exit_code == 0, created.output
    ingested = runner.invoke(app, ["kb", "ingest", "pets", str(docs), *common], env=env)
    assert ingested.exit_code == 0, ingested.output
    assert "partial: added 3" in ingested.stdout and "failed 2" in ingested.stdout
    assert "c.pdf" in ingested.stderr
    listed = runner.invoke(app, ["kb", "jobs", *common, "--json"], env=env)
    job = json.loads(listed.stdout.splitlines()[0])
    assert job["status"] == "partial" and job["files"] == {"total": 5, "done": 5}
    shown = runner.invoke(app, ["kb", "job", job["id"], *common, "--json"], env=env)
    assert json.loads(shown.stdout)["id"] == job["id"]
    record = runner.invoke(app, ["kb", "job", job["id"], *common], env=env)
    assert record.exit_code == 0 and job["id"] in record.stdout and "5/5" in record.stdout
    assert "partial" in record.stdout and "c.pdf" in record.stderr  # the failed files, with why
    table = runner.invoke(app, ["kb", "jobs", *common, "--kb", "pets"], env=env)
    assert job["id"] in table.stdout and "partial" in table.stdout
    other = runner.invoke(app, ["kb", "job", job["id"], "--team", "team_b", "--db", db_url], env=env)
    assert other.exit_code == 2 and "not found" in other.stderr
    resumed = runner.invoke(app, ["kb", "resume", job["id"], *common], env=env)
    assert resumed.exit_code == 0 and "added 3" in resumed.stdout and "0 chunks embedded" in resumed.stdout
    url_refused = runner.invoke(
        app, ["kb", "ingest", "pets", "--url", "http://127.0.0.1:9/x", *common], env=env
    )
    assert url_refused.exit_code == 2 and "not a public address" in url_refused.stderr
    both = runner.invoke(app, ["kb", "ingest", "pets", str(docs), "--url", "http://x/", *common], env=env)
    assert both.exit_code == 2
