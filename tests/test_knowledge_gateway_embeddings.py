"""Knowledge-base embeddings through the gateway (`gateway:<model>` embedders): batched, metered,
permission-checked; in process (inside the server) and over HTTP (the CLI's way)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy
from starlette.applications import Starlette

from conftest import ADMIN_KEY, GatewayServer, wait_for
from mocks.openai_upstream import OpenAIUpstream
from plinth.config import parse_config
from plinth.gateway.app import AppSettings, create_app
from plinth.gateway.errors import GatewayError
from plinth.knowledge.embedders import EmbeddingFailed, GatewayEmbedder, LocalEmbedder, embedder_for
from plinth.knowledge.retrieval import SearchMode
from plinth.knowledge.store import KnowledgeStore
from plinth.storage import Database
from plinth.tenancy.service import TenancyService

MODEL = "text-embedding-3-small"  # on the OpenAI mock: 3-dimensional vectors


def setup_team(tmp_path: Path) -> tuple[str, str, str, str]:
    """A database with team a, a key that may use everything and one limited to the chat model."""
    url = f"sqlite:///{tmp_path}/plinth.db"
    db = Database(url)
    db.migrate()
    tenancy = TenancyService(db)
    team = tenancy.create_team(tenancy.create_org("acme").id, "a")
    key = tenancy.create_key(team.id, "ingest").secret
    chat_only = tenancy.create_key(team.id, "chat-only", allowed_models=["gpt-4o-mini"]).secret
    db.dispose()
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "handbook.md").write_text(  # one document, three sections: three chunks
        "# Leave\n\nEveryone gets 25 days of paid leave a year.\n\n"
        "# IT\n\nLaptops are replaced every three years.\n\n"
        "# Travel\n\nBook trains for trips under four hours.\n"
    )
    return url, team.id, key, chat_only


def usage_rows(url: str) -> list[dict[str, Any]]:
    engine = sqlalchemy.create_engine(url)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.exec_driver_sql("SELECT * FROM usage_records")]
    engine.dispose()
    return rows


@asynccontextmanager
async def running(config: dict[str, Any]) -> AsyncIterator[Starlette]:
    """The app with its lifespan on this event loop (no HTTP server): the in-process path."""
    app = create_app(AppSettings(config=parse_config(config), admin_key=ADMIN_KEY))
    async with app.router.lifespan_context(app):
        yield app


async def test_in_process_embedder_batches_meters_and_checks_the_key(
    basic_config: dict[str, Any], openai_upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    url, team_id, key, chat_only = setup_team(tmp_path)
    async with running({**basic_config, "storage": {"url": url}}) as app:
        gateway = app.state.gateway
        loop = asyncio.get_running_loop()
        principal = gateway.keys.authenticate(key)
        embedder = GatewayEmbedder.in_process(gateway, principal, MODEL, 3, loop, batch_size=2)
        store = KnowledgeStore(Database(url), embedder)
        base = store.create_base(team_id, "handbook")
        assert base.settings["embedder"] == f"gateway:{MODEL}" and base.settings["dimensions"] == 3
        # `embed` blocks: it runs in a worker thread, each batch on the server's loop.
        result = await asyncio.to_thread(store.ingest_folder, base.id, tmp_path / "docs")
        assert result.chunks == 3 and embedder.calls == 2  # 3 chunks in batches of 2
        calls = [r for r in openai_upstream.requests if "input" in r]
        assert [len(r["input"]) for r in calls] == [2, 1] and calls[0]["model"] == MODEL

        # A query of this base embeds the question through the gateway too, on the caller's key.
        hits = await gateway.knowledge.search(
            principal, "handbook", {"query": "paid leave", "top_k": 3, "mode": SearchMode.DENSE}
        )
        assert len(hits[1]) == 3 and len([r for r in openai_upstream.requests if "input" in r]) == 3

        # The key's model permissions apply: a key limited to the chat model cannot embed.
        limited = GatewayEmbedder.in_process(gateway, gateway.keys.authenticate(chat_only), MODEL, 3, loop)
        with pytest.raises(GatewayError) as refused:
            await asyncio.to_thread(limited.embed, ["anything"])
        assert refused.value.status == 403 and refused.value.code == "model_not_allowed"
        recorder = gateway.usage
        await wait_for(lambda: recorder.written >= 3)
    rows = [r for r in usage_rows(url) if r["route"] == "knowledge_embeddings"]
    assert len(rows) == 3 and all(r["status"] == 200 and r["team_id"] == team_id for r in rows)
    assert {r["key_name"] for r in rows} == {"ingest"} and all(r["input_tokens"] > 0 for r in rows)


async def test_over_http_embedder_is_the_clis_way_with_a_virtual_key(
    gateway_factory: Callable[..., GatewayServer],
    basic_config: dict[str, Any],
    openai_upstream: OpenAIUpstream,
    tmp_path: Path,
) -> None:
    url, team_id, key, chat_only = setup_team(tmp_path)
    server = gateway_factory({**basic_config, "storage": {"url": url}})
    embedder = GatewayEmbedder.over_http(server.url, key, MODEL, 3, batch_size=2)
    store = KnowledgeStore(Database(url), embedder)
    base = store.create_base(team_id, "handbook")
    result = await asyncio.to_thread(store.ingest_folder, base.id, tmp_path / "docs")
    assert result.chunks == 3 and embedder.calls == 2
    # Unchanged files: no embedding calls at all.
    again = await asyncio.to_thread(store.ingest_folder, base.id, tmp_path / "docs")
    assert again.unchanged == ["handbook.md"] and embedder.calls == 2
    # Queried over HTTP: the base's embedder is named in its settings, the question embedded via the gateway.
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
        found = await client.post(
            "/v1/knowledge/handbook/query",
            json={"query": "laptops", "mode": "dense", "top_k": 2},
            headers={"authorization": f"Bearer {key}"},
        )
    assert found.status_code == 200, found.text
    assert len(found.json()["data"]) == 2
    usage = server.app.state.usage
    await wait_for(lambda: usage.written >= 3)
    routes = sorted(r["route"] for r in usage_rows(url))
    assert routes == ["embeddings", "embeddings", "knowledge_embeddings"]

    refused = GatewayEmbedder.over_http(server.url, chat_only, MODEL, 3)
    with pytest.raises(EmbeddingFailed) as failed:
        await asyncio.to_thread(refused.embed, ["x"])
    assert (
        failed.value.status == 403
        and "not allowed" in str(failed.value)
        and chat_only not in str(failed.value)
    )
    wrong_size = GatewayEmbedder.over_http(server.url, key, MODEL, 384)
    with pytest.raises(EmbeddingFailed, match="3-dimensional vectors; the base uses 384"):
        await asyncio.to_thread(wrong_size.embed, ["x"])


def test_a_gateway_embedder_without_transport_names_its_space_only() -> None:
    embedder = embedder_for("gateway:text-embedding-3-small", 1536)
    assert embedder.name == "gateway:text-embedding-3-small" and embedder.dimensions == 1536
    with pytest.raises(EmbeddingFailed, match="no gateway"):
        embedder.embed(["x"])
    with pytest.raises(ValueError, match="needs a model"):
        embedder_for("gateway:", 384)


async def test_local_minilm_through_the_gateway_offline_matches_the_in_process_model(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    url, team_id, key, _ = setup_team(tmp_path)
    config = {
        "models": [
            {
                "name": "minilm",
                "type": "embedding",
                "deployments": [{"provider": "local", "model": "all-MiniLM-L6-v2"}],
            }
        ],
        "storage": {"url": url},
    }
    async with running(config) as app:
        gateway = app.state.gateway
        principal = gateway.keys.authenticate(key)
        embedder = GatewayEmbedder.in_process(gateway, principal, "minilm", 384, asyncio.get_running_loop())
        store = KnowledgeStore(Database(url), embedder)
        base = store.create_base(team_id, "handbook")
        await asyncio.to_thread(store.ingest_folder, base.id, tmp_path / "docs")
        texts = ["holiday allowance", "Laptops are replaced every three years."]
        through_gateway = await asyncio.to_thread(embedder.embed, texts)
        direct = await asyncio.to_thread(LocalEmbedder().embed, texts)
        assert abs(through_gateway - direct).max() < 1e-5  # the same model, the same space
        _, hits = await gateway.knowledge.search(
            principal, base.id, {"query": "holiday allowance", "top_k": 1, "mode": SearchMode.DENSE}
        )
        assert hits[0].meta["heading_path"] == "Leave"
