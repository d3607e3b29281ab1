"""Governance on the hot path: classification and residency pick the deployment, refusals name the
rule, kill switches and `/v1/models` follow the catalog, and every decision is audited."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from conftest import ADMIN_KEY, USER_KEY, GatewayServer, openai_deployment
from mocks.openai_upstream import OpenAIUpstream

POLICIES = """
@id("every-key") permit (principal, action, resource);
@id("eu-confidential-stays-in-eu")
forbid (principal, action, resource is Plinth::Deployment)
when { context.caller_region like "eu-*" && context.data_class_rank >= 2 }
unless { resource.regions.contains("eu-west-1") };
"""


def governed_config(upstream: OpenAIUpstream, policies: Path) -> dict[str, Any]:
    return {
        "models": [
            {
                "name": "chat",
                "routing": {"strategy": "priority"},
                "deployments": [
                    openai_deployment(upstream.url, name="chat-us", priority=0),
                    openai_deployment(upstream.url, name="chat-eu", priority=1),
                ],
            },
            {"name": "preview", "deployments": [openai_deployment(upstream.url, name="preview-us")]},
            {"name": "mini", "deployments": [openai_deployment(upstream.url, name="mini-us")]},
        ],
        "keys": [{"name": "app", "key": USER_KEY}],
        "governance": {
            "policies": str(policies),
            "default_region": "us-east-1",
            "models": [
                {
                    "name": "chat",
                    "data_class": "restricted",
                    "deployments": [
                        {"name": "chat-us", "provider": "us-vendor", "regions": ["us-east-1"],
                         "data_class": "confidential"},
                        {"name": "chat-eu", "provider": "eu-vendor", "regions": ["eu-west-1"]},
                    ],
                },
                {"name": "preview", "status": "proposed"},
                {"name": "mini", "data_class": "internal"},
            ],
            "providers": [
                {"name": "us-vendor", "reviewer": "sec", "expires_at": "2099-01-01", "data_class": "confidential"},
                {"name": "eu-vendor", "reviewer": "sec", "expires_at": "2099-01-01", "data_class": "restricted",
                 "allowed_regions": ["eu-west-1"]},
            ],
        },
    }  # fmt: skip


def chat(model: str = "chat") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}]}


async def test_requests_are_routed_by_classification_and_region(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    (tmp_path / "main.cedar").write_text(POLICIES)
    gw = gateway_factory(governed_config(openai_upstream, tmp_path))
    auth = {"authorization": f"Bearer {USER_KEY}"}
    async with httpx.AsyncClient(base_url=gw.url, headers=auth) as http:

        async def ask(model: str = "chat", **headers: str) -> httpx.Response:
            return await http.post("/v1/chat/completions", json=chat(model), headers=headers)

        plain = await ask()  # internal data from the default region: the first deployment
        assert plain.status_code == 200 and plain.headers["x-plinth-deployment"] == "chat-us"
        restricted = await ask(**{"x-plinth-data-class": "restricted"})  # above chat-us's ceiling
        assert restricted.status_code == 200 and restricted.headers["x-plinth-deployment"] == "chat-eu"
        eu = await ask(**{"x-plinth-data-class": "confidential", "x-plinth-region": "eu-west-1"})
        assert eu.status_code == 200 and eu.headers["x-plinth-deployment"] == "chat-eu"
        refused = await ask("mini", **{"x-plinth-data-class": "confidential"})
        assert refused.status_code == 403
        error = refused.json()["error"]
        assert error["code"] == "policy_denied" and "plinth:data-class-ceiling" in error["message"]
        assert "plinth:data-class-ceiling" in refused.headers["x-plinth-policy"]
        proposed = await ask("preview")
        assert proposed.status_code == 403 and "plinth:model-status" in proposed.json()["error"]["message"]
        bad = await ask(**{"x-plinth-data-class": "top-secret"})
        assert bad.status_code == 400 and "x-plinth-data-class" in bad.json()["error"]["message"]
        # The same refusal in Anthropic's shape on /v1/messages.
        anthropic = await http.post(
            "/v1/messages",
            json={"model": "mini", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-plinth-data-class": "restricted", "anthropic-version": "2023-06-01"},
        )
        assert anthropic.status_code == 403 and anthropic.json()["error"]["type"] == "permission_error"
        # GET /v1/models shows what this key may call: not the proposed model.
        models = {m["id"] for m in (await http.get("/v1/models")).json()["data"]}
        assert models == {"chat", "mini"}
    assert len(openai_upstream.requests) == 3  # refused requests never went upstream

    # Every decision is in the audit trail, with the ids that decided it; the chain verifies.
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=gw.url, headers=admin) as http:
        records: list[dict[str, Any]] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            reply = await http.get("/api/audit/records", params={"limit": 100})
            records = [r for r in reply.json()["data"] if r["kind"] == "decision"]
            if len(records) >= 7:
                break
            await asyncio.sleep(0.1)
        outcomes = sorted(r["outcome"] for r in records)
        assert outcomes.count("deny") == 3 and outcomes.count("reroute") == 2
        assert all(r["policy_ids"] for r in records)
        assert all("hello" not in str(r) for r in records)  # no prompt content in the trail
        verify = (await http.get("/api/audit/verify")).json()
        assert verify["ok"] is True


async def test_kill_switch_stops_a_deployment_within_a_second(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    (tmp_path / "main.cedar").write_text(POLICIES)
    gw = gateway_factory(governed_config(openai_upstream, tmp_path))
    async with httpx.AsyncClient(base_url=gw.url) as http:
        user = {"authorization": f"Bearer {USER_KEY}"}
        admin = {"authorization": f"Bearer {ADMIN_KEY}"}
        first = await http.post("/v1/chat/completions", json=chat(), headers=user)
        assert first.headers["x-plinth-deployment"] == "chat-us"
        kill = await http.post(
            "/api/kill-switches",
            json={"target_type": "deployment", "target": "chat-us", "reason": "incident 42"},
            headers=admin,
        )
        assert kill.status_code in (200, 201), kill.text
        killed_at = time.monotonic()
        while True:
            reply = await http.post("/v1/chat/completions", json=chat(), headers=user)
            if reply.headers.get("x-plinth-deployment") == "chat-eu":
                break
            assert time.monotonic() - killed_at < 1.0, "the kill switch took longer than 1 s"
            await asyncio.sleep(0.02)
        await http.post(
            f"/api/kill-switches/{kill.json()['id']}/lift", json={"reason": "fixed"}, headers=admin
        )
        kill_model = await http.post(
            "/api/kill-switches",
            json={"target_type": "model", "target": "chat", "reason": "vendor breach"},
            headers=admin,
        )
        assert kill_model.status_code in (200, 201)
        deadline = time.monotonic() + 1.0
        while True:
            reply = await http.post("/v1/chat/completions", json=chat(), headers=user)
            if reply.status_code == 403:
                assert "vendor breach" in reply.json()["error"]["message"] or "kill" in reply.text
                break
            assert time.monotonic() < deadline, "the model kill switch took longer than 1 s"
            await asyncio.sleep(0.02)


async def test_guardrail_findings_raise_the_classification(
    gateway_factory: Callable[..., GatewayServer], openai_upstream: OpenAIUpstream, tmp_path: Path
) -> None:
    (tmp_path / "main.cedar").write_text(POLICIES)
    config = governed_config(openai_upstream, tmp_path)
    config["guardrails"] = {"default_profile": "internal"}  # personal data is flagged, sent as is
    gw = gateway_factory(config)
    auth = {"authorization": f"Bearer {USER_KEY}"}
    async with httpx.AsyncClient(base_url=gw.url, headers=auth) as http:

        async def ask(text: str, model: str = "chat") -> httpx.Response:
            body = {"model": model, "messages": [{"role": "user", "content": text}]}
            return await http.post("/v1/chat/completions", json=body)

        plain = await ask("What is the capital of France?")
        assert plain.headers["x-plinth-deployment"] == "chat-us"
        # A card number found in the prompt makes the request restricted: only chat-eu may take it.
        card = await ask("Why was my card 4111 1111 1111 1111 declined?")
        assert card.status_code == 200 and card.headers["x-plinth-deployment"] == "chat-eu"
        # An e-mail address makes it confidential: above the internal-only model's ceiling.
        refused = await ask("Write to jane.doe@example.com about the invoice.", model="mini")
        assert (
            refused.status_code == 403 and "plinth:data-class-ceiling" in refused.json()["error"]["message"]
        )
        assert "jane.doe" not in refused.text
