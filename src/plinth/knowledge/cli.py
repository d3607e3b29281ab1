"""`plinth kb create|list|show|delete|ingest|query`: knowledge bases from the operator's machine.

Unlike the HTTP-backed admin CLI these open the database named by the configuration directly,
because ingestion reads a local folder and embeds it in this process (no file upload, no model
load in the gateway). Whoever runs them already holds the database URL. Exit code 2 for unusable
input or a refused request, with a one-line message.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from plinth.knowledge.retrieval import SearchMode

if TYPE_CHECKING:
    from plinth.knowledge.store import KnowledgeStore

ENV = "PLINTH_MASTER_KEY"  # plinth.knowledge.crypto.ENV, without importing cryptography at CLI start

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
    str, typer.Option("--embedder", help="'local' (all-MiniLM-L6-v2) or 'hashing' (no model; demos).")
]


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]Error:[/red] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


@contextmanager
def _store(config: Path | None, db: str | None, embedder: str = "local") -> Iterator[KnowledgeStore]:
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
    if embedder not in ("local", "hashing"):
        raise _fail(f"--embedder must be 'local' or 'hashing', not {embedder!r}")
    chosen: Embedder = LocalEmbedder() if embedder == "local" else HashingEmbedder(384)
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
    chunk_size: Annotated[int, typer.Option(help="Words per chunk.")] = 180,
    chunk_overlap: Annotated[int, typer.Option(help="Words shared by neighbouring chunks.")] = 30,
    config: ConfigOption = None,
    db: DbOption = None,
    embedder: EmbedderOption = "local",
    plaintext: Annotated[
        bool, typer.Option("--plaintext", help=f"Store chunks unencrypted (needed when {ENV} is unset).")
    ] = False,
) -> None:
    """Create a knowledge base for a team (encrypted with the team's key when PLINTH_MASTER_KEY is set)."""
    if not plaintext and not os.environ.get(ENV):
        raise _fail(f"{ENV} is not set: set it to encrypt chunks at rest, or pass --plaintext")
    if chunk_size < 1 or not 0 <= chunk_overlap < chunk_size:
        raise _fail("--chunk-size must be positive and --chunk-overlap in [0, chunk size)")
    with _store(config, db, embedder) as store:
        if plaintext:
            store.master_key = None
        base = store.create_base(team, name, {"chunk_size": chunk_size, "chunk_overlap": chunk_overlap})
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


@kb_app.command("ingest")
def ingest(
    kb: str,
    folder: Path,
    team: TeamOption,
    config: ConfigOption = None,
    db: DbOption = None,
    embedder: EmbedderOption = "local",
) -> None:
    """Sync a folder: new and changed files ingested, unchanged skipped, deleted ones removed."""
    with _store(config, db, embedder) as store:
        base = store.get_base(kb, team)
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=err) as progress:
            task = progress.add_task("ingesting", total=None)

            def step(done: int, total: int, source: str) -> None:
                progress.update(task, completed=done, total=total, description=source[-40:])

            result = store.ingest_folder(base.id, folder, step)
    out.print(
        f"added {len(result.added)}, replaced {len(result.replaced)}, unchanged {len(result.unchanged)}, "
        f"removed {len(result.removed)}, failed {len(result.failed)}; {result.chunks} chunks embedded"
    )
    for source, reason in result.failed.items():
        err.print(f"[yellow]skipped[/yellow] {source}: {reason}", highlight=False)


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
