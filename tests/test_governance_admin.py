"""Governance through the admin API of a real server: model hub, four eyes, roles, providers, kill
switches reaching every worker, and the audit trail of every admin action."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from conftest import ADMIN_KEY, GatewayServer
from plinth.config import parse_config
from plinth.governance.config import Level
from plinth.governance.engine import Governance
from plinth.storage import Database
from plinth.tenancy.keys import Principal


class Api:
    def __init__(self, server: GatewayServer, token: str) -> None:
        self.client = httpx.Client(
            base_url=server.url + "/api", headers={"authorization": f"Bearer {token}"}, timeout=10
        )

    def __call__(self, method: str, path: str, body: Any = None, **params: Any) -> httpx.Response:
        response = self.client.request(method, path, json=body, params=params or None)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        return response

    def ok(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        response = self(method, path, body, **params)
        assert response.status_code in (200, 201), response.text
        return response.json()


def deployment(name: str, url: str = "http://127.0.0.1:9/v1") -> dict[str, Any]:
    return {"name": name, "provider": "openai", "model": "m", "base_url": url, "api_key": "sk-x"}


def config(tmp_path: Path) -> dict[str, Any]:
    return {
        "storage": {"url": f"sqlite:///{tmp_path}/plinth.db"},
        "models": [
            {"name": "chat", "deployments": [deployment("chat-a"), deployment("chat-b")]},
            {"name": "openai/gpt-4o", "deployments": [deployment("openai/gpt-4o/0")]},
            {"name": "gitops", "deployments": [deployment("gitops-1")]},
        ],
        "keys": [{"name": "ci", "key": "sk-config-key-0123456789"}],
        "governance": {
            "refresh_s": 0.1,
            "models": [{"name": "gitops", "owner": "platform", "data_class": "confidential"}],
            "providers": [{"name": "azure-eu", "reviewer": "sec", "expires_at": "2099-01-01"}],
        },
    }


class Team:
    def __init__(self, server: GatewayServer) -> None:
        self.server = server
        self.admin = Api(server, ADMIN_KEY)
        org = self.admin.ok("POST", "/orgs", {"name": "acme"})["id"]
        self.team = self.admin.ok("POST", "/teams", {"org_id": org, "name": "ml"})["id"]
        self.tokens: dict[str, str] = {}
        for who, role in [("alice", "platform_admin"), ("bob", "platform_admin"), ("dev", "developer"),
                          ("audit", "auditor"), ("lead", "team_admin")]:  # fmt: skip
            team = self.team if role in ("developer", "team_admin") else None
            body = {"email": f"{who}@acme.test", "role": role, "team_id": team}
            self.tokens[who] = self.admin.ok("POST", "/users", body)["token"]

    def as_(self, who: str) -> Api:
        return self.admin if who == "admin" else Api(self.server, self.tokens[who])


@pytest.fixture
def acme(gateway_factory: Callable[..., GatewayServer], tmp_path: Path) -> Team:
    return Team(gateway_factory(config(tmp_path)))


def test_model_lifecycle_needs_four_eyes(acme: Team) -> None:
    alice, bob = acme.as_("alice"), acme.as_("bob")
    model = alice.ok("POST", "/models", {"name": "openai/gpt-4o", "owner": "ml", "data_class": "confidential",
                                         "context_window": 128000, "capabilities": ["chat", "tools"],
                                         "prices": {"input_per_mtok": 2.5}, "card_text": "# GPT-4o",
                                         "card_links": ["https://example.com/card"]})  # fmt: skip
    assert (
        model["status"] == "proposed"
        and model["source"] == "api"
        and model["prices"] == {"input_per_mtok": 2.5}
    )
    # Names with '/' work in paths (encoded or not).
    assert alice.ok("GET", "/models/openai%2Fgpt-4o")["card_text"] == "# GPT-4o"
    assert alice.ok("GET", "/models/openai/gpt-4o")["name"] == "openai/gpt-4o"
    request = alice.ok(
        "POST", "/models/openai/gpt-4o/lifecycle", {"status": "approved", "reason": "eval passed"}
    )
    assert request["state"] == "pending" and request["requested_by"] == "alice@acme.test"
    # The requester may not approve; neither may the shared admin key approve its own requests.
    own = alice("POST", f"/approvals/{request['id']}/approve", {"note": "me"})
    assert own.status_code == 403 and own.json()["error"]["code"] == "four_eyes"
    dup = bob("POST", "/models/openai/gpt-4o/lifecycle", {"status": "approved", "reason": "again"})
    assert dup.status_code == 409 and request["id"] in dup.json()["error"]["message"]
    approved = bob.ok("POST", f"/approvals/{request['id']}/approve", {"note": "looks good"})
    assert approved["state"] == "approved" and approved["decided_by"] == "bob@acme.test"
    assert bob.ok("GET", "/models/openai/gpt-4o")["status"] == "approved"
    assert bob("POST", f"/approvals/{request['id']}/approve").status_code == 409
    bad = alice("POST", "/models/openai/gpt-4o/lifecycle", {"status": "proposed", "reason": "undo it"})
    assert bad.status_code == 400 and "can become deprecated, retired" in bad.json()["error"]["message"]
    admin = acme.as_("admin")
    retire = admin.ok("POST", "/models/openai/gpt-4o/lifecycle", {"status": "retired", "reason": "replaced"})
    assert admin("POST", f"/approvals/{retire['id']}/approve").status_code == 403
    rejected = alice.ok("POST", f"/approvals/{retire['id']}/reject", {"note": "not yet"})
    assert rejected["state"] == "rejected" and bob.ok("GET", "/models/openai/gpt-4o")["status"] == "approved"
    pending = alice.ok(
        "POST", "/models/openai/gpt-4o/lifecycle", {"status": "deprecated", "reason": "v2 is out"}
    )
    assert bob("POST", f"/approvals/{pending['id']}/cancel").status_code == 403
    assert alice.ok("POST", f"/approvals/{pending['id']}/cancel")["state"] == "cancelled"
    states = [a["state"] for a in bob.ok("GET", "/approvals")["data"]]
    assert sorted(states) == ["approved", "cancelled", "rejected"]
    assert [a["id"] for a in bob.ok("GET", "/approvals", state="approved")["data"]] == [request["id"]]


def test_catalog_edits_and_file_declared_entries(acme: Team) -> None:
    alice = acme.as_("alice")
    listed = {m["name"]: m for m in alice.ok("GET", "/models")["data"]}
    assert listed["gitops"]["source"] == "config" and listed["gitops"]["status"] == "approved"
    refused = alice("PATCH", "/models/gitops", {"owner": "me"})
    assert refused.status_code == 409 and "plinth.yaml" in refused.json()["error"]["message"]
    alice.ok("POST", "/models", {"name": "chat"})
    patched = alice.ok("PATCH", "/models/chat", {"owner": "search", "data_class": "restricted"})
    assert patched["owner"] == "search" and patched["data_class"] == "restricted"
    assert alice("PATCH", "/models/chat", {}).status_code == 400
    assert alice("POST", "/models", {"name": "chat"}).status_code == 409
    dep = alice.ok("POST", "/deployments", {"name": "chat-a", "model": "chat", "provider": "openai",
                                            "regions": ["us-east-1"]})  # fmt: skip
    assert dep["status"] == "proposed" and dep["data_class"] == "restricted"  # inherits the model's ceiling
    assert alice.ok("PATCH", "/deployments/chat-a", {"regions": ["eu-west-1"]})["regions"] == ["eu-west-1"]
    assert [d["name"] for d in alice.ok("GET", "/deployments", model="chat")["data"]] == ["chat-a"]
    assert alice("POST", "/deployments", {"name": "x", "model": "nope", "provider": "p"}).status_code == 404
    for body, field in [
        ({"name": "m2", "data_class": "secret"}, "data_class"),
        ({"name": "m2", "context_window": "big"}, "context_window"),
        ({"name": "m2", "colour": "red"}, "colour"),
        ({"name": ""}, "name"),
    ]:
        response = alice("POST", "/models", body)
        assert response.status_code == 400 and field in response.json()["error"]["message"], body


def test_roles(acme: Team) -> None:
    dev, auditor, lead = acme.as_("dev"), acme.as_("audit"), acme.as_("lead")
    assert dev.ok("GET", "/models")["data"] is not None and dev.ok("GET", "/providers")["data"]
    for who, method, path in [
        (dev, "POST", "/models"), (dev, "GET", "/audit/records"), (dev, "GET", "/policy"),
        (lead, "POST", "/kill-switches"), (auditor, "POST", "/approvals/apr_x/approve"),
        (auditor, "PUT", "/providers/p"), (lead, "GET", "/approvals"),
    ]:  # fmt: skip
        response = who(method, path, {})
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["code"] == "insufficient_permissions"
    assert auditor.ok("GET", "/audit/verify")["ok"]
    assert auditor.ok("GET", "/policy")["builtin"] is True
    assert {"audit:read", "policy:read"} <= set(auditor.ok("GET", "/whoami")["permissions"])
    assert "approvals:write" in acme.as_("alice").ok("GET", "/whoami")["permissions"]


def test_provider_review(acme: Team) -> None:
    alice, bob = acme.as_("alice"), acme.as_("bob")
    created = alice.ok("PUT", "/providers/openai", {"data_retention_days": 30, "training_opt_out": True,
                                                    "certifications": ["soc2"], "allowed_regions": ["us-east-1"],
                                                    "data_class": "confidential"})  # fmt: skip
    assert created["status"] == "pending" and created["valid"] is False
    assert alice("POST", "/providers/openai/review", {"reason": "no expiry"}).status_code == 400
    request = alice.ok("POST", "/providers/openai/review", {"valid_days": 365, "reason": "DPA signed"})
    assert request["change"]["status"] == "approved" and "expires_at" in request["change"]
    approved = bob.ok("POST", f"/approvals/{request['id']}/approve")
    assert approved["state"] == "approved"
    shown = bob.ok("GET", "/providers/openai")
    assert (
        shown["valid"]
        and shown["reviewer"] == "bob@acme.test"
        and shown["expires_at"].startswith(str(time.gmtime().tm_year + 1))
    )
    # Updating the facts keeps the approval; the audit trail keeps the difference.
    assert alice.ok("PUT", "/providers/openai", {"data_retention_days": 0})["status"] == "approved"
    assert alice("PUT", "/providers/azure-eu", {}).status_code == 409  # declared in the file
    assert bob.ok("GET", "/providers/azure-eu")["source"] == "config"
    assert alice("GET", "/providers/nobody").status_code == 404


async def test_kill_switch_reaches_every_worker_within_a_second(acme: Team, tmp_path: Path) -> None:
    settings = parse_config(config(tmp_path))
    workers = [Governance(settings, Database(settings.storage.url.get_secret_value())) for _ in range(2)]
    tasks = [asyncio.create_task(worker.follow()) for worker in workers]
    principal = Principal(name="app", key_id="key_1")

    def allowed(worker: Governance, model: str = "chat") -> bool:
        return worker.decide(principal, "invoke", model, ["chat-a", "chat-b"], Level.INTERNAL).allowed

    async def seen_by_all(expect: bool) -> float:
        started = time.perf_counter()
        while not all(allowed(w) is expect for w in workers):
            assert time.perf_counter() - started < 5
            await asyncio.sleep(0.01)
        return time.perf_counter() - started

    try:
        assert all(allowed(w) for w in workers)
        alice = acme.as_("alice")
        kill = await asyncio.to_thread(
            alice.ok,
            "POST",
            "/kill-switches",
            {"target_type": "model", "target": "chat", "reason": "leak found"},
        )
        assert kill["active"] and kill["created_by"] == "alice@acme.test"
        assert await seen_by_all(False) < 1.0
        refused = workers[0].decide(principal, "invoke", "chat", ["chat-a"], Level.INTERNAL)
        assert refused.rule == "plinth:kill-switch" and kill["id"] in (refused.message or "")
        dep_kill = await asyncio.to_thread(
            alice.ok, "POST", "/kill-switches",
            {"target_type": "deployment", "target": "chat-a", "reason": "bad region"},
        )  # fmt: skip
        await asyncio.to_thread(alice.ok, "POST", f"/kill-switches/{kill['id']}/lift", {"reason": "fixed"})
        assert await seen_by_all(True) < 1.0
        assert workers[1].decide(
            principal, "invoke", "chat", ["chat-a", "chat-b"], Level.INTERNAL
        ).deployments == ("chat-b",)
        listed = await asyncio.to_thread(alice.ok, "GET", "/kill-switches")
        assert [k["id"] for k in listed["data"]] == [dep_kill["id"]]
        everything = await asyncio.to_thread(alice.ok, "GET", "/kill-switches", all="true")
        assert len(everything["data"]) == 2
        for body, status in [
            ({"target_type": "model", "target": "nope", "reason": "typo"}, 404),
            ({"target_type": "deployment", "target": "chat-a", "reason": "twice"}, 409),
            ({"target_type": "planet", "target": "x", "reason": "what"}, 400),
            ({"target_type": "key", "target": "ci", "reason": ""}, 400),
        ]:
            assert (await asyncio.to_thread(alice, "POST", "/kill-switches", body)).status_code == status, (
                body
            )
        key_kill = await asyncio.to_thread(
            alice.ok, "POST", "/kill-switches", {"target_type": "key", "target": "ci", "reason": "leaked key"}
        )
        assert key_kill["target"] == "ci"
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for worker in workers:
            assert worker.database is not None
            worker.database.dispose()


def test_every_admin_action_is_audited(acme: Team, tmp_path: Path) -> None:
    alice, dev, auditor = acme.as_("alice"), acme.as_("dev"), acme.as_("audit")
    key = acme.admin.ok("POST", "/keys", {"team_id": acme.team, "name": "svc"})
    assert dev("POST", "/orgs", {"name": "rogue"}).status_code == 403
    alice.ok("POST", "/models", {"name": "chat"})
    assert alice("POST", "/models", {"name": "chat"}).status_code == 409
    records = auditor.ok("GET", "/audit/records", limit=1000)["data"]
    by_action: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_action.setdefault(record["action"], []).append(record)
    assert [r["target"] for r in by_action["create_org"] if r["outcome"] == "ok"] != []
    created_key = by_action["create_key"][0]
    assert created_key["actor"] == "admin" and created_key["target"] == key["id"]
    assert created_key["detail"]["body"] == {"team_id": acme.team, "name": "svc"}
    assert key["key"] not in str(records)  # the secret is never recorded
    refused = [r for r in by_action["create_org"] if r["outcome"] == "refused"]
    assert refused and refused[0]["actor"] == "dev@acme.test" and refused[0]["detail"]["status"] == 403
    assert len(by_action["model.create"]) == 1  # recorded once, inside its transaction
    assert by_action["create_model"][0]["outcome"] == "error"  # the 409 attempt
    assert all(r["request_id"] for r in records)
    assert auditor.ok("GET", "/audit/verify") == {
        "ok": True, "records": len(records), "head_seq": len(records), "first_bad_seq": None, "problems": [],
    }  # fmt: skip
    with sqlite3.connect(tmp_path / "plinth.db") as raw:
        raw.execute("UPDATE audit_records SET actor = 'someone-else' WHERE seq = 2")
    broken = auditor.ok("GET", "/audit/verify")
    assert broken["ok"] is False and broken["first_bad_seq"] == 2


def test_openapi_documents_governance(acme: Team) -> None:
    from openapi_spec_validator import validate

    doc = httpx.get(acme.server.url + "/api/openapi.json").json()
    validate(doc)
    paths = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert {("get", "/api/models/{name}"), ("post", "/api/models/{name}/lifecycle"),
            ("post", "/api/approvals/{approval_id}/approve"), ("post", "/api/kill-switches"),
            ("get", "/api/audit/verify"), ("put", "/api/providers/{name}")} <= paths  # fmt: skip
    params = doc["paths"]["/api/models/{name}"]["get"]["parameters"]
    assert [p["name"] for p in params] == ["name"]
