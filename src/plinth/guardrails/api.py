"""The guardrails part of the admin API: list the sessions and users session risk blocked, clear them.

`GuardrailsAdmin` is an `AdminExtension`: its operations join the one route table, so authentication,
permissions (`guardrails:read`, `guardrails:write`), error shapes, the OpenAPI document and the audit
trail come with it. A clear acts on this process's scorers and on their store: with a Redis store
every worker and replica sees it within `sync_interval_s`; with the in-memory store only this one.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from plinth.admin.api import Call, Operation
from plinth.gateway.errors import GatewayError

if TYPE_CHECKING:
    from plinth.guardrails.detectors.session_risk import Block, SessionRiskScorer
    from plinth.guardrails.engine import Guardrails


class BlockOut(BaseModel):
    scope: Literal["session", "user"]
    key: str  # the session id, or the API key's id (its name for keys from plinth.yaml)
    until: dt.datetime
    remaining_s: float
    score: float  # the score that crossed the threshold

    @classmethod
    def of(cls, block: Block, now: float) -> BlockOut:
        until = dt.datetime.fromtimestamp(block.until, dt.UTC)
        return cls(
            scope=block.scope,
            key=block.key,
            until=until,
            remaining_s=round(block.remaining_s(now), 1),
            score=block.score,
        )


class BlockList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BlockOut]


class Cleared(BaseModel):
    scope: Literal["session", "user"]
    key: str
    cleared: bool  # a block or a score was there and is gone


class GuardrailsAdmin:
    """Admin operations over the gateway's guardrails (None: guardrails are off; nothing is blocked)."""

    def __init__(self, guardrails: Guardrails | None) -> None:
        self.guardrails = guardrails

    def _scorers(self) -> list[SessionRiskScorer]:
        return self.guardrails.session_scorers() if self.guardrails is not None else []

    def _blocked(self, call: Call) -> BlockList:
        """The sessions and users blocked now, longest cool-off first."""
        now = time.time()
        blocks = {(b.scope, b.key): b for scorer in self._scorers() for b in scorer.blocks()}
        ordered = sorted(blocks.values(), key=lambda b: -b.until)
        return BlockList(data=[BlockOut.of(b, now) for b in ordered])

    def _clear(self, scope: Literal["session", "user"], key: str) -> Cleared:
        scorers = self._scorers()
        if not scorers:
            raise GatewayError(
                404,
                "Session risk is not enabled: no guardrails profile has the 'session_risk' scanner.",
                code="not_found",
            )
        cleared = False
        for scorer in scorers:
            if scope == "session":
                cleared = scorer.clear(session_id=key) or cleared
            else:
                cleared = scorer.clear(user=key) or cleared
        if not cleared:
            raise GatewayError(404, f"No session-risk block or score for {scope} '{key}'.", code="not_found")
        return Cleared(scope=scope, key=key, cleared=True)

    def _clear_session(self, call: Call) -> Cleared:
        """Lift a session's block and forget its score (the next request is scanned afresh)."""
        return self._clear("session", call.path["session_id"])

    def _clear_user(self, call: Call) -> Cleared:
        """Lift a user's (API key's) block across sessions and forget its score."""
        return self._clear("user", call.path["user"])

    def operations(self) -> list[Operation]:
        read, write = "guardrails:read", "guardrails:write"
        return [
            Operation("GET", "/guardrails/sessions/blocked", self._blocked, BlockList,
                      "List sessions and users blocked by session risk", "guardrails", read,
                      "list blocked sessions"),
            Operation("POST", "/guardrails/sessions/{session_id}/clear", self._clear_session, Cleared,
                      "Clear a session's session-risk block", "guardrails", write,
                      "clear session-risk blocks", errors=(404,)),
            Operation("POST", "/guardrails/users/{user}/clear", self._clear_user, Cleared,
                      "Clear a user's session-risk block", "guardrails", write,
                      "clear session-risk blocks", errors=(404,)),
        ]  # fmt: skip


__all__ = ["BlockList", "BlockOut", "Cleared", "GuardrailsAdmin"]
