"""Admin operations on knowledge bases under `/api/knowledge-bases` (an `AdminExtension`).

Permissions reuse the project ones, since a base is a team-level resource like a project: reading
needs `teams:read`, creating and deleting `projects:write` (platform and team admins). Team admins
and developers act on their own team only; a base of another team is a 404.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from plinth.admin.api import Call, Operation
from plinth.gateway.errors import GatewayError
from plinth.storage import Database

if TYPE_CHECKING:
    from plinth.knowledge.store import KnowledgeStore


class KbCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    team_id: str | None = None  # default: the caller's own team
    chunk_size: int = Field(default=180, ge=1, le=2000)
    chunk_overlap: int = Field(default=30, ge=0, le=1999)
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


class KnowledgeAdmin:
    def __init__(self, database: Database) -> None:
        self.database = database

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
        if not body.plaintext and not os.environ.get("PLINTH_MASTER_KEY"):
            raise GatewayError(
                400,
                "PLINTH_MASTER_KEY is not set on the gateway: set it to encrypt chunks at rest, "
                'or send "plaintext": true.',
                param="plaintext",
            )
        store = self._store(encrypt=not body.plaintext)
        settings = {"chunk_size": body.chunk_size, "chunk_overlap": body.chunk_overlap}
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
        ]  # fmt: skip
