"""`plinth kb create|list|show|delete|ingest|jobs|job|resume|cancel|query`: knowledge bases from the operator's machine.

Unlike the HTTP-backed admin CLI these open the database named by the configuration directly,
because ingestion reads a local folder and embeds it in this process (no file upload, no model
load in the gateway). Whoever runs them already holds the database URL. Exit code 2 for unusable
input or a refused request, with a one-line message.

A base created with `--embedder gateway:<model>` is embedded through a running gateway's
`/v1/embeddings` (`--gateway-url`, or PLINTH_GATEWAY_URL) with the virtual key in PLINTH_API_KEY, so
the key's limits, budget and policy apply. The key is read from the environment only, never from
the command line (where shell history and process listings would show it).
"""

from __future__ import annotations

import dataclasses
import getpass
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Column, Table

from plinth.knowledge.retrieval import SearchMode

if TYPE_CHECKING:
    from plinth.knowledge.jobs import IngestJobs, KbJob
    from plinth.knowledge.store import KnowledgeStore

ENV = "PLINTH_MASTER_KEY"  # plinth.knowledge.crypto.ENV, without importing cryptography at CLI start
API_KEY_ENV = "PLINTH_API_KEY"  # the virtual key for `gateway:<model>` embedders
GATEWAY = "gateway:"  # plinth.knowledge.embedders.GATEWAY_PREFIX, without importing numpy

kb_app = typer.Typer(help="Knowledge bases: create, ingest a folder, query.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="PLINTH_CONFIG", help="Path to plinth.yaml (default: embedded)."),
]
DbOption = Annotated[
    str | None, typer.Option("--db", help="Database URL (default: storage.url from the configuration).")
]
TeamOption = Annotated[str, typer.Option("--team", help="Team id owning the knowledge base.")]
EmbedderOption = Annotated[
    str,
    typer.Option(
        "--embedder",
        help="'local' (all-MiniLM-L6-v2), 'hashing' (no model; demos) or 'gateway:<model>' "
        f"(a catalog embedding model through --gateway-url with {API_KEY_ENV}).",
    ),
]
GatewayUrlOption = Annotated[
    str | None,
    typer.Option(
        "--gateway-url",
        envvar="PLINTH_GATEWAY_URL",
        help=f"Gateway to embed 'gateway:<model>' bases through; the virtual key is read from {API_KEY_ENV}.",
    ),
]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]Error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


@contextmanager
def _store(
    config: Path | None, db: str | None, embedder: str = "local", dimensions: int | None = None
) -> Iterator[KnowledgeStore]:
    from plinth.config import ConfigError, load_config
    from plinth.knowledge.crypto import CryptoError, master_key_from_env
    from plinth.knowledge.embedders import Embedder, HashingEmbedder, LocalEmbedder
    from plinth.knowledge.store import KnowledgeError, KnowledgeStore
    from plinth.storage import Database

    if db is None:
        try:
            db = load_config(config).storage.url.get_secret_value()
        except ConfigError as exc:
            raise _fail(f"configuration: {exc}") from None
    chosen: Embedder
    if embedder.startswith(GATEWAY):  # embeds nothing here: `create` records its name and size
        from plinth.knowledge.embedders import GatewayEmbedder

        chosen = GatewayEmbedder(embedder.removeprefix(GATEWAY), dimensions or 384)
    elif embedder in ("local", "hashing"):
        chosen = LocalEmbedder() if embedder == "local" else HashingEmbedder(384)
    else:
        raise _fail(f"--embedder must be 'local', 'hashing' or 'gateway:<model>', not {embedder!r}")
    try:
        master_key = master_key_from_env()
    except CryptoError as exc:
        raise _fail(str(exc)) from None
    database = Database(db)
    try:
        try:
            database.migrate()
        except Exception as exc:  # unreachable or unusable database: one line, no traceback
            raise _fail(f"database: {type(exc).__name__}: {exc}") from None
        yield KnowledgeStore(database, chosen, master_key=master_key)
    except KnowledgeError as exc:
        raise _fail(str(exc)) from None
    finally:
        database.dispose()


@kb_app.command("create")
def create(
    name: str,
    team: TeamOption,
    chunk_size: Annotated[
        int,
        typer.Option(
            help="Chunk size: words (structure, semantic, hierarchical children) or tokens (fixed)."
        ),
    ] = 180,
    chunk_overlap: Annotated[
        int, typer.Option(help="Overlap of neighbouring chunks, in the same unit as --chunk-size.")
    ] = 30,
    chunking: Annotated[
        str,
        typer.Option(
            help="structure | fixed (size/overlap in tokens) | semantic | hierarchical (see docs/knowledge.md)."
        ),
    ] = "structure",
    config: ConfigOption = None,
    db: DbOption = None,
    embedder: EmbedderOption = "local",
    plaintext: Annotated[
        bool, typer.Option("--plaintext", help=f"Store chunks unencrypted (needed when {ENV} is unset).")
    ] = False,
    dimensions: Annotated[
        int | None,
        typer.Option(help="Vector size of a 'gateway:<model>' embedder (default: asked of the gateway)."),
    ] = None,
    gateway_url: GatewayUrlOption = None,
) -> None:
    """Create a knowledge base for a team (encrypted with the team's key when PLINTH_MASTER_KEY is set)."""
    if not plaintext and not (os.environ.get(ENV) or os.environ.get("PLINTH_KMS")):
        raise _fail(
            f"Neither {ENV} nor PLINTH_KMS is set: set one to encrypt chunks at rest, or pass --plaintext"
        )
    if chunk_size < 1 or not 0 <= chunk_overlap < chunk_size:
        raise _fail("--chunk-size must be positive and --chunk-overlap in [0, chunk size)")
    if embedder.startswith(GATEWAY) and dimensions is None:
        dimensions = _probe_dimensions(embedder, gateway_url)
    if dimensions is not None and not 1 <= dimensions <= 8192:
        raise _fail("--dimensions must be from 1 to 8192")
    with _store(config, db, embedder, dimensions) as store:
        if plaintext:
            store.master_key = None
        base = store.create_base(
            team, name, {"chunk_size": chunk_size, "chunk_overlap": chunk_overlap, "chunking": chunking}
        )
    out.print(base.id)


@kb_app.command("list")
def list_bases(team: TeamOption, config: ConfigOption = None, db: DbOption = None) -> None:
    """List a team's knowledge bases."""
    with _store(config, db, "hashing") as store:
        table = Table("id", "name", "documents", "chunks", "created (UTC)")
        for base in store.list_bases(team):
            stats = store.stats(base.id)
            table.add_row(
                base.id, base.name, str(stats["documents"]), str(stats["chunks"]), str(base.created_at)
            )
    out.print(table)


@kb_app.command("show")
def show(kb: str, team: TeamOption, config: ConfigOption = None, db: DbOption = None) -> None:
    """A knowledge base's settings and documents."""
    with _store(config, db, "hashing") as store:
        base = store.get_base(kb, team)
        out.print(
            json.dumps({"id": base.id, "name": base.name, "settings": base.settings, **store.stats(base.id)})
        )
        table = Table("source", "status", "sha256", "updated (UTC)")
        for doc in store.documents(base.id):
            table.add_row(doc.source, doc.status, doc.content_hash[:12], str(doc.updated_at))
    out.print(table)


@kb_app.command("delete")
def delete(kb: str, team: TeamOption, config: ConfigOption = None, db: DbOption = None) -> None:
    """Delete a knowledge base with its documents and chunks."""
    with _store(config, db, "hashing") as store:
        store.delete_base(kb, team)
    out.print(f"deleted {kb}")


def _gateway_key(embedder: str, gateway_url: str | None) -> tuple[str, str]:
    """The gateway URL and the virtual key (from the environment) a `gateway:<model>` base needs."""
    key = os.environ.get(API_KEY_ENV, "").strip()
    if not gateway_url or not key:
        raise _fail(
            f"this knowledge base embeds through the gateway ({embedder}): give --gateway-url "
            f"(or PLINTH_GATEWAY_URL) and put a virtual key of the team in {API_KEY_ENV}"
        )
    return gateway_url, key


def _probe_dimensions(embedder: str, gateway_url: str | None) -> int:
    """The vector size of a gateway embedding model: one short embeddings call (metered)."""
    from plinth.knowledge.embedders import EmbeddingFailed, GatewayEmbedder

    url, key = _gateway_key(embedder, gateway_url)
    probe = GatewayEmbedder.over_http(url, key, embedder.removeprefix(GATEWAY), 1)
    assert probe.transport is not None
    try:
        vectors = probe.transport(["dimension probe"])
    except EmbeddingFailed as exc:
        raise _fail(f"{exc} (or give --dimensions)") from None
    if not vectors or not vectors[0]:
        raise _fail("the gateway returned no vector; give --dimensions")
    return len(vectors[0])


def _jobs(
    store: KnowledgeStore, config: Path | None, allow_private: bool, gateway_url: str | None = None
) -> IngestJobs:
    """Jobs run in this process; the URL rules come from the configuration (default: refuse private).
    With `gateway_url`, `gateway:<model>` bases embed over HTTP with the key in PLINTH_API_KEY."""
    from plinth.config import ConfigError, load_config
    from plinth.governance.audit import AuditLog
    from plinth.knowledge.embedders import Embedder, GatewayEmbedder
    from plinth.knowledge.fetch import FetchPolicy
    from plinth.knowledge.jobs import IngestJobs, StoreProvider

    try:
        policy = FetchPolicy.from_config(load_config(config).knowledge)
    except ConfigError as exc:
        raise _fail(f"configuration: {exc}") from None
    if allow_private:
        policy = dataclasses.replace(policy, allow_private=True)
    provider = StoreProvider(store.db, store.master_key)

    def over_http(job: KbJob, model: str, dimensions: int) -> Embedder:
        url, key = _gateway_key(GATEWAY + model, gateway_url)
        return GatewayEmbedder.over_http(url, key, model, dimensions)

    factory = over_http if gateway_url else None
    return IngestJobs(store.db, provider, policy, audit=AuditLog(store.db), embedders=factory)


def _check_gateway(base: object, gateway_url: str | None) -> None:
    """Fail early (exit 2) when a `gateway:<model>` base cannot be embedded from here."""
    embedder = str(getattr(base, "settings", {}).get("embedder", ""))
    if embedder.startswith(GATEWAY):
        _gateway_key(embedder, gateway_url)


def _run(jobs: IngestJobs, job_id: str, *, resume: bool = False) -> None:
    """Run a job here with a progress bar, then print its counts; exit 2 when it failed."""
    before = jobs.get(job_id, None).chunks  # a resumed job's earlier attempts embedded these
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err) as progress:
        task = progress.add_task("ingesting", total=None)

        def step(done: int, total: int, source: str) -> None:
            progress.update(task, completed=done, total=total, description=source[-40:])

        job = jobs.run(job_id, step, resume=resume)
    out.print(
        f"{job.id} {job.status}: added {job.added}, replaced {job.replaced}, unchanged {job.unchanged}, "
        f"removed {job.removed}, failed {job.failed}; {job.chunks - before} chunks embedded",
        highlight=False,
        soft_wrap=True,
    )
    for error in job.errors:
        err.print(f"[yellow]skipped[/yellow] {error['source']}: {error['reason']}", highlight=False)
    if job.status == "failed" and job.error:
        raise _fail(job.error)
    if job.status == "running":
        raise _fail(f"job {job.id} is being run by another process")


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name in some containers
        return "unknown"


AllowPrivateOption = Annotated[
    bool,
    typer.Option(
        "--allow-private-urls",
        help="Let --url reach private, loopback and link-local addresses (knowledge.allow_private_urls).",
    ),
]


@kb_app.command("ingest")
def ingest(
    kb: str,
    folder: Annotated[Path | None, typer.Argument(help="Folder to sync (or give --url).")] = None,
    team: TeamOption = "",
    url: Annotated[str | None, typer.Option("--url", help="Fetch one document from a URL.")] = None,
    allow_private_urls: AllowPrivateOption = False,
    config: ConfigOption = None,
    db: DbOption = None,
    embedder: EmbedderOption = "local",
    gateway_url: GatewayUrlOption = None,
) -> None:
    """Sync a folder (new and changed files ingested, unchanged skipped, deleted ones removed) or
    fetch a URL, as a resumable job (`plinth kb jobs`, `plinth kb resume`). The base's own embedder
    is used (`gateway:<model>`: through --gateway-url with the key in PLINTH_API_KEY)."""
    from plinth.knowledge.fetch import FetchError, resolve, validate_url
    from plinth.knowledge.jobs import JobError

    if not team:
        raise _fail("--team is required")
    if (folder is None) == (url is None):
        raise _fail("give a FOLDER or --url, not both")
    with _store(config, db, "hashing") as store:
        base = store.get_base(kb, team)
        _check_gateway(base, gateway_url)
        jobs = _jobs(store, config, allow_private_urls, gateway_url)
        actor = f"cli:{_user()}"
        if url is not None:
            try:
                parsed = validate_url(url)
                resolve(parsed, jobs.fetch_policy)
                job = jobs.create(base, "url", str(parsed), actor=actor)  # stored without its query
            except (FetchError, JobError) as exc:
                raise _fail(f"--url refused: {exc}") from None
        else:
            assert folder is not None
            if not folder.is_dir():
                raise _fail(f"{folder} is not a folder")
            resolved = str(folder.resolve())
            job = jobs.create(base, "folder", resolved, actor=actor, params={"folder": resolved})
        err.print(f"job {job.id}", highlight=False)
        _run(jobs, job.id)


@kb_app.command("jobs")
def list_jobs(
    team: TeamOption,
    kb: Annotated[str | None, typer.Option("--kb", help="Only this knowledge base's jobs.")] = None,
    limit: Annotated[int, typer.Option(help="How many, newest first.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    config: ConfigOption = None,
    db: DbOption = None,
) -> None:
    """A team's ingestion jobs, newest first."""
    from plinth.knowledge.jobs import job_out

    with _store(config, db, "hashing") as store:
        kb_id = store.get_base(kb, team).id if kb is not None else None
        jobs = _jobs(store, config, False).list(team, kb_id, limit)
    if as_json:
        for job in jobs:
            out.print(job_out(job).model_dump_json(), highlight=False, soft_wrap=True)
        return
    table = Table(
        Column("id", no_wrap=True), Column("status", no_wrap=True), "kind", "files", "+", "~", "=", "-", "!",
        caption="+ added  ~ replaced  = unchanged  - removed  ! failed",
    )  # fmt: skip
    for job in jobs:
        table.add_row(
            job.id, job.status, job.kind, f"{job.files_done}/{job.files_total}", str(job.added),
            str(job.replaced), str(job.unchanged), str(job.removed), str(job.failed),
        )  # fmt: skip
    out.print(table)


def _job_or_fail(jobs: IngestJobs, job_id: str, team: str) -> KbJob:
    from plinth.knowledge.jobs import JobError

    try:
        return jobs.get(job_id, team)
    except JobError as exc:
        raise _fail(str(exc)) from None


JOB_FIELDS = ("id", "knowledge_base", "kind", "source", "status", "files", "added", "replaced", "unchanged",
              "removed", "failed", "chunks", "attempts", "error", "created_at", "started_at",
              "finished_at")  # fmt: skip


@kb_app.command("job")
def show_job(
    job_id: str,
    team: TeamOption,
    as_json: Annotated[bool, typer.Option("--json", help="The job as JSON.")] = False,
    config: ConfigOption = None,
    db: DbOption = None,
) -> None:
    """One ingestion job: status, counts and the files that failed, with why."""
    from plinth.knowledge.jobs import job_out

    with _store(config, db, "hashing") as store:
        job = _job_or_fail(_jobs(store, config, False), job_id, team)
    shown = job_out(job)
    if as_json:
        out.print(shown.model_dump_json(indent=2), highlight=False, soft_wrap=True)
        return
    from plinth.admin.cli import _record

    row = shown.model_dump(mode="json") | {"files": f"{shown.files.done}/{shown.files.total}"}
    _record(row, [(name, name) for name in JOB_FIELDS])
    for error in shown.errors:
        err.print(f"[yellow]skipped[/yellow] {error.source}: {error.reason}", highlight=False)


@kb_app.command("resume")
def resume(
    job_id: str,
    team: TeamOption,
    allow_private_urls: AllowPrivateOption = False,
    config: ConfigOption = None,
    db: DbOption = None,
    gateway_url: GatewayUrlOption = None,
) -> None:
    """Resume an interrupted, failed or partial job here: files already done are skipped, failed
    ones retried. A job still running elsewhere (fresh heartbeat) is refused."""
    with _store(config, db, "hashing") as store:
        jobs = _jobs(store, config, allow_private_urls, gateway_url)
        job = _job_or_fail(jobs, job_id, team)
        if job.status == "succeeded":
            out.print(f"{job.id} succeeded already: nothing to do")
            return
        if job.status == "cancelled":
            raise _fail(f"job {job.id} was cancelled: start a new one")
        _check_gateway(store.get_base(job.kb_id, team), gateway_url)
        if not jobs.resumable(job):
            raise _fail(f"job {job.id} is running (its heartbeat is fresh); resume it once it stops")
        _run(jobs, job.id, resume=True)


@kb_app.command("cancel")
def cancel(job_id: str, team: TeamOption, config: ConfigOption = None, db: DbOption = None) -> None:
    """Stop a queued or running job (in any process: it stops after the file at hand). The files
    already ingested stay; staged uploads not yet processed are deleted."""
    from plinth.knowledge.jobs import JobError

    with _store(config, db, "hashing") as store:
        jobs = _jobs(store, config, False)
        try:
            job = jobs.cancel(_job_or_fail(jobs, job_id, team).id, team, actor=f"cli:{_user()}")
        except JobError as exc:
            raise _fail(str(exc)) from None
    out.print(f"{job.id} cancelled ({job.files_done}/{job.files_total} files done)", highlight=False)


@kb_app.command("query")
def query(
    kb: str,
    text: str,
    team: TeamOption,
    top_k: Annotated[int, typer.Option("--top-k")] = 5,
    mode: Annotated[SearchMode, typer.Option()] = SearchMode.HYBRID,
    config: ConfigOption = None,
    db: DbOption = None,
    embedder: EmbedderOption = "local",
) -> None:
    """Retrieve the best chunks for a query (use the embedder the base was built with)."""
    with _store(config, db, embedder) as store:
        base = store.get_base(kb, team)
        if base.settings.get("embedder") != store.embedder.name:
            raise _fail(
                f"this base was embedded with {base.settings.get('embedder')}; pass the same --embedder"
            )
        hits = store.search(base.id, text, top_k=top_k, mode=mode)
    table = Table("score", "chunk", "source", "page", "text")
    for hit in hits:
        page = hit.meta.get("page")
        table.add_row(
            f"{hit.score:.4f}", str(hit.chunk_id), hit.meta.get("source", ""), str(page or ""), hit.text[:120]
        )
    out.print(table)
