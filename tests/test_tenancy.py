"""Tenancy on SQLite and PostgreSQL: the service, migrations, and the cached key store."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from plinth.storage import Database, utcnow
from plinth.tenancy import DatabaseKeyStore
from plinth.tenancy.models import Role
from plinth.tenancy.service import Conflict, NotFound, TenancyError, TenancyService

ADMIN = "c0ffee" + "1b2d3f4a5e6c7b8a9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a"


@pytest.fixture
def service(database_url: str) -> TenancyService:
    db = Database(database_url)
    db.migrate()
    db.migrate()  # idempotent: a second start must not fail
    return TenancyService(db)


def test_hierarchy_and_key_lifecycle(service: TenancyService) -> None:
    org = service.create_org("Acme Bank")
    team = service.create_team(org.id, "payments")
    project = service.create_project(team.id, "fraud-bot")
    created = service.create_key(
        team.id, "ci", project_id=project.id, allowed_models=["gpt-4o-mini"], environment="prod",
        data_class="confidential", tags=["pci"], metadata={"owner": "alice"},
    )  # fmt: skip
    key = created.key
    assert created.secret.startswith("sk-plinth-") and created.secret.startswith(key.prefix)
    assert key.key_hash != created.secret and created.secret not in repr(key.__dict__)
    assert [k.id for k in service.list_keys(team.id)] == [key.id]

    rotated = service.rotate_key(key.id)
    assert rotated.secret != created.secret and rotated.key.rotated_from == key.id
    assert rotated.key.allowed_models == ["gpt-4o-mini"] and rotated.key.tags == ["pci"]
    assert service.get_key(key.id).revoked_at is not None
    assert [k.id for k in service.list_keys(team.id)] == [rotated.key.id]
    assert len(service.list_keys(team.id, include_revoked=True)) == 2


def test_clear_errors(service: TenancyService) -> None:
    org = service.create_org("Acme")
    with pytest.raises(Conflict, match="already exists"):
        service.create_org("Acme")
    with pytest.raises(NotFound, match="team 'team_nope' does not exist"):
        service.create_key("team_nope", "k")
    team = service.create_team(org.id, "t")
    with pytest.raises(TenancyError, match="data_class must be one of"):
        service.create_key(team.id, "k", data_class="secret")
    with pytest.raises(TenancyError, match="in the future"):
        service.create_key(team.id, "k", expires_at=utcnow() - dt.timedelta(days=1))
    with pytest.raises(TenancyError, match="belongs to a team"):
        service.create_user("dev@example.com", Role.DEVELOPER)
    with pytest.raises(TenancyError, match="must not be empty"):
        service.create_team(org.id, "  ")


def test_user_tokens(service: TenancyService) -> None:
    team = service.create_team(service.create_org("o").id, "t")
    created = service.create_user("ana@example.com", Role.TEAM_ADMIN, team_id=team.id)
    assert created.token.startswith("pt-")
    found = service.user_by_token(created.token)
    assert found is not None and found.email == "ana@example.com" and found.role == "team_admin"
    assert service.user_by_token("pt-wrong") is None


def test_key_store_follows_changes_incrementally(service: TenancyService) -> None:
    team = service.create_team(service.create_org("o").id, "t")
    store = DatabaseKeyStore(service)
    first = service.create_key(team.id, "a", allowed_models=["m1"])
    assert store.refresh() == 1
    principal = store.authenticate(first.secret)
    assert principal is not None and principal.team_id == team.id and principal.may_use("m1")
    assert not principal.may_use("m2") and principal.org_id == team.org_id
    assert store.refresh() == 0  # nothing new: nothing fetched

    second = service.create_key(team.id, "b")
    service.revoke_key(first.key.id, "leaked")
    assert store.refresh() == 2
    assert store.authenticate(first.secret) is None
    assert store.authenticate(second.secret) is not None
    assert store.authenticate("sk-plinth-unknown") is None


def test_expired_keys_stop_working_without_a_database_change(service: TenancyService) -> None:
    team = service.create_team(service.create_org("o").id, "t")
    expires_at = utcnow() + dt.timedelta(seconds=3)  # room for a slow database under load
    created = service.create_key(team.id, "short", expires_at=expires_at)
    store = DatabaseKeyStore(service)
    store.refresh()
    assert store.authenticate(created.secret) is not None
    time.sleep(max(0.0, (expires_at - utcnow()).total_seconds()) + 0.2)
    assert store.authenticate(created.secret) is None


# --- across processes: a revoked key stops working everywhere within a second ---------------------


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def test_revocation_reaches_every_process_within_a_second(database_url: str, tmp_path: Path) -> None:
    config = tmp_path / "plinth.yaml"
    config.write_text(f"storage: {{url: '{database_url}'}}\nmodels: []\n")
    env = {**os.environ, "PLINTH_ADMIN_KEY": ADMIN}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    ports = [_free_port(), _free_port()]

    def serve(port: int) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "plinth", "serve", "--config", str(config), "--port", str(port)]
        command += ["--workers", "2", "--log-level", "warning"]
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    procs = [serve(port) for port in ports]
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            for port in ports:
                for _ in range(300):
                    try:
                        if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"plinth serve on port {port} never became ready")
            service = TenancyService(Database(database_url))
            team = service.create_team(service.create_org("o").id, "t")
            created = service.create_key(team.id, "k")
            headers = {"authorization": f"Bearer {created.secret}"}

            async def statuses() -> list[int]:
                # Several requests per replica, so both of each replica's workers are asked.
                replies = await asyncio.gather(
                    *(
                        http.get(f"http://127.0.0.1:{p}/v1/models", headers=headers)
                        for p in ports
                        for _ in range(6)
                    )
                )
                return [r.status_code for r in replies]

            deadline = time.monotonic() + 5
            while set(await statuses()) != {200}:
                assert time.monotonic() < deadline, "new key never accepted"
                await asyncio.sleep(0.05)
            service.revoke_key(created.key.id, "test")
            revoked_at = time.monotonic()
            while set(await statuses()) != {401}:
                await asyncio.sleep(0.02)
                assert time.monotonic() - revoked_at < 3, "revoked key still accepted"
            assert time.monotonic() - revoked_at < 1.0
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
