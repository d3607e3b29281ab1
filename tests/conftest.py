"""Shared fixtures: mock upstreams on loopback and a real Plinth server in a background thread.

The gateway runs under uvicorn on its own event loop in a thread, so tests can talk to it with the
official SDKs (sync or async) while mock upstreams run on the test's loop.
"""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
import uvicorn

from mocks.openai_upstream import OpenAIUpstream
from plinth.config import parse_config
from plinth.gateway.app import AppSettings, create_app

ADMIN_KEY = "sk-admin-" + "9f3a7c1e5b2d4f6a8c0e1b3d5f7a9c2e4b6d8f0a1c3e5b7d"
USER_KEY = "sk-user-team-a-0123456789abcdef"


class GatewayServer:
    """A Plinth server on a free loopback port, in a daemon thread."""

    def __init__(self, config: dict[str, Any], admin_key: str = ADMIN_KEY) -> None:
        if "storage" not in config:  # every server gets its own fresh SQLite database
            config = {
                **config,
                "storage": {"url": f"sqlite:///{tempfile.mkdtemp(prefix='plinth-test-')}/plinth.db"},
            }
        settings = AppSettings(config=parse_config(config), admin_key=admin_key)
        self.app = create_app(settings)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        sock.close()
        cfg = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("gateway did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
async def openai_upstream() -> AsyncIterator[OpenAIUpstream]:
    upstream = await OpenAIUpstream().start()
    yield upstream
    await upstream.close()


@pytest.fixture
def gateway_factory() -> Iterator[Callable[..., GatewayServer]]:
    servers: list[GatewayServer] = []

    def start(config: dict[str, Any], admin_key: str = ADMIN_KEY) -> GatewayServer:
        server = GatewayServer(config, admin_key).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def openai_deployment(upstream_url: str, **extra: Any) -> dict[str, Any]:
    return {
        "provider": "openai",
        "model": "gpt-4o-mini",
        "base_url": upstream_url,
        "api_key": "sk-upstream-secret",
        **extra,
    }


@pytest.fixture
def basic_config(openai_upstream: OpenAIUpstream) -> dict[str, Any]:
    """One chat model on the OpenAI mock and one user key limited to it."""
    return {
        "models": [
            {"name": "gpt-4o-mini", "deployments": [openai_deployment(openai_upstream.url)]},
            {
                "name": "text-embedding-3-small",
                "type": "embedding",
                "deployments": [openai_deployment(openai_upstream.url, model="text-embedding-3-small")],
            },
        ],
        "keys": [{"name": "team-a", "key": USER_KEY, "models": ["gpt-4o-mini"]}],
    }


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


# --- databases: SQLite always, PostgreSQL when scripts/services started one ---------------------

POSTGRES_URL = os.environ.get("PLINTH_TEST_POSTGRES_URL")
REDIS_URL = os.environ.get("PLINTH_TEST_REDIS_URL")
needs_postgres = pytest.mark.skipif(
    not POSTGRES_URL, reason="no PostgreSQL: run under scripts/test as root or CI"
)
needs_redis = pytest.mark.skipif(not REDIS_URL, reason="no Redis: run under scripts/test as root or CI")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=needs_postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/plinth.db"
        return
    assert POSTGRES_URL is not None
    name = f"plinth_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(POSTGRES_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield POSTGRES_URL.rsplit("/", 1)[0] + "/" + name
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()
