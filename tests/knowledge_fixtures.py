"""Shared set-up of the knowledge-base tests: two teams with a key each, team a's 'handbook' base."""

from __future__ import annotations

from pathlib import Path

from plinth.knowledge.embedders import HashingEmbedder
from plinth.knowledge.store import KnowledgeStore
from plinth.storage import Database
from plinth.tenancy.service import TenancyService

HANDBOOK = {
    "leave.md": "# HR\n\n## Leave\n\nEveryone gets 25 days of paid leave a year.\n",
    "it.txt": "Laptops are replaced every three years.",
}


def two_teams_with_handbook(
    tmp_path: Path, *, files: dict[str, str] | None = None, base_of_b: str | None = None
) -> tuple[str, str, str, str]:
    """A fresh SQLite database: teams a and b with a key each, and team a's 'handbook' base (hashing
    embedder), holding `files` when given (ingested from a folder). Returns url, key a, key b, kb id."""
    url = f"sqlite:///{tmp_path}/plinth.db"
    db = Database(url)
    db.migrate()
    tenancy = TenancyService(db)
    org = tenancy.create_org("acme")
    team_a, team_b = tenancy.create_team(org.id, "a"), tenancy.create_team(org.id, "b")
    key_a = tenancy.create_key(team_a.id, "a").secret
    key_b = tenancy.create_key(team_b.id, "b").secret
    store = KnowledgeStore(db, HashingEmbedder())
    kb_id = store.create_base(team_a.id, "handbook").id
    if base_of_b is not None:
        store.create_base(team_b.id, base_of_b)
    if files:
        folder = tmp_path / "docs"
        folder.mkdir()
        for name, text in files.items():
            (folder / name).write_text(text)
        store.ingest_folder(kb_id, folder)
    db.dispose()
    return url, key_a, key_b, kb_id
