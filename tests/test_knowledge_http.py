"""`POST /v1/knowledge/{kb}/query` through a running gateway: team isolation, citations, bad input."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ADMIN_KEY, GatewayServer
from knowledge_fixtures import HANDBOOK, two_teams_with_handbook
from mocks.openai_upstream import OpenAIUpstream, Reply, completion
from plinth.storage import Database


def setup_bases(tmp_path: Path) -> tuple[str, str, str, str]:
    """A database with teams a and b, a key each, and team a's 'handbook' base; returns url, keys, kb id."""
    return two_teams_with_handbook(tmp_path, files=HANDBOOK)


def test_query_is_confined_to_the_keys_team(
    gateway_factory: Callable[..., GatewayServer], basic_config: dict[str, Any], tmp_path: Path
) -> None:
    url, key_a, key_b, kb_id = setup_bases(tmp_path)
    server = gateway_factory({**basic_config, "storage": {"url": url}})

    def query(key: str, kb: str, body: Any) -> httpx.Response:
        headers = {"authorization": f"Bearer {key}"}
        return httpx.post(f"{server.url}/v1/knowledge/{kb}/query", json=body, headers=headers, timeout=10)

    ok = query(key_a, "handbook", {"query": "how many days of paid leave", "top_k": 2})
    assert ok.status_code == 200, ok.text
    top = ok.json()["data"][0]
    assert top["source"] == "leave.md" and "25 days" in top["text"]
    assert top["metadata"]["heading_path"] == "HR > Leave" and isinstance(top["chunk_id"], int)
    # the citation is a real chunk of this base
    with Database(url).session() as s:
        from plinth.knowledge.models import KbChunk

        chunk = s.get(KbChunk, top["chunk_id"])
        assert chunk is not None and chunk.kb_id == kb_id and chunk.text == top["text"]

    for ref in ("handbook", kb_id):  # team B sees nothing of team A, by name or id
        denied = query(key_b, ref, {"query": "paid leave"})
        assert denied.status_code == 404 and denied.json()["error"]["code"] == "knowledge_base_not_found"
    # the admin key finds the base, but it is in no team: the governance default denies retrieval
    admin = query(ADMIN_KEY, kb_id, {"query": "laptops"})
    assert admin.status_code == 403 and "retrieve on KnowledgeBase" in admin.json()["error"]["message"]
    bad = query(key_a, "handbook", {"query": "leave", "top_k": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_k"
    assert query(key_a, "handbook", {"query": ""}).status_code == 400
    assert query(key_a, "handbook", {"query": "x", "mode": "fuzzy"}).json()["error"]["param"] == "mode"
    assert query("sk-nope", "handbook", {"query": "leave"}).status_code == 401


async def test_answer_generates_from_retrieved_chunks_with_citations(
    gateway_factory: Callable[..., GatewayServer],
    basic_config: dict[str, Any],
    openai_upstream: OpenAIUpstream,
    tmp_path: Path,
) -> None:
    url, key_a, key_b, _ = setup_bases(tmp_path)
    server = gateway_factory({**basic_config, "storage": {"url": url}})
    openai_upstream.queue(Reply(body=completion("Everyone gets 25 days [1].")))
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        body = {"model": "gpt-4o-mini", "query": "how much paid leave do I get", "top_k": 1}
        ok = await client.post(
            "/v1/knowledge/handbook/answer", json=body, headers={"authorization": f"Bearer {key_a}"}
        )
        assert ok.status_code == 200, ok.text
        answer = ok.json()
        assert answer["answer"] == "Everyone gets 25 days [1]."
        assert answer["citations"][0]["n"] == 1 and answer["citations"][0]["source"] == "leave.md"
        sent = openai_upstream.requests[-1]["messages"]
        assert "[1] (leave.md)" in sent[0]["content"] and "25 days" in sent[0]["content"]
        assert sent[1] == {"role": "user", "content": "how much paid leave do I get"}
        denied = await client.post(
            "/v1/knowledge/handbook/answer", json=body, headers={"authorization": f"Bearer {key_b}"}
        )
        assert denied.status_code == 404 and len(openai_upstream.requests) == 1  # no model call
        missing = await client.post(
            "/v1/knowledge/handbook/answer",
            json={"query": "leave"},
            headers={"authorization": f"Bearer {key_a}"},
        )
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"


def test_admin_operations_create_list_show_delete(
    gateway_factory: Callable[..., GatewayServer],
    basic_config: dict[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PLINTH_MASTER_KEY", raising=False)
    url, _key_a, _key_b, kb_id = setup_bases(tmp_path)
    server = gateway_factory({**basic_config, "storage": {"url": url}})
    admin = httpx.Client(base_url=f"{server.url}/api", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    with Database(url).session() as s:
        from plinth.knowledge.models import KnowledgeBase

        team_a = s.get(KnowledgeBase, kb_id).team_id  # type: ignore[union-attr]
    listed = admin.get("/knowledge-bases")
    assert listed.status_code == 200 and [b["name"] for b in listed.json()["data"]] == ["handbook"]
    shown = admin.get(f"/knowledge-bases/{kb_id}").json()
    assert shown["documents"] == 2 and shown["chunks"] >= 2
    refused = admin.post("/knowledge-bases", json={"name": "wiki", "team_id": team_a})
    assert refused.status_code == 400 and "PLINTH_MASTER_KEY" in refused.json()["error"]["message"]
    created = admin.post("/knowledge-bases", json={"name": "wiki", "team_id": team_a, "plaintext": True})
    assert created.status_code == 201 and created.json()["settings"]["encrypted"] is False
    again = admin.post("/knowledge-bases", json={"name": "wiki", "team_id": team_a, "plaintext": True})
    assert again.status_code == 409
    bad = admin.post("/knowledge-bases", json={"name": "x", "team_id": team_a, "chunk_size": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chunk_size"
    assert admin.delete(f"/knowledge-bases/{kb_id}").status_code == 200
    assert admin.get(f"/knowledge-bases/{kb_id}").status_code == 404
    assert "/api/knowledge-bases/{kb}" in admin.get("/openapi.json").json()["paths"]
    admin.close()
