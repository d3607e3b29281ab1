"""`plinth models|providers|approvals|kill|policy|audit`: the governance CLI against a real server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from conftest import ADMIN_KEY, GatewayServer
from plinth.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Cli:
    def __init__(self, url: str, token: str) -> None:
        self.env: dict[str, str | None] = {"PLINTH_URL": url, "PLINTH_TOKEN": token, "PLINTH_ADMIN_KEY": None,
                                           "PLINTH_DATABASE_URL": None, "PLINTH_CONFIG": None, "COLUMNS": "200"}  # fmt: skip
        self.runner = CliRunner()

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(app, list(args), env=self.env)

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return json.loads(result.stdout)


@pytest.fixture
def server(gateway_factory: Callable[..., GatewayServer]) -> GatewayServer:
    upstream = {"provider": "openai", "model": "m", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-x"}
    return gateway_factory({"models": [{"name": "chat", "deployments": [{**upstream, "name": "chat-1"}]}]})


def users(server: GatewayServer) -> tuple[Cli, Cli]:
    admin = Cli(server.url, ADMIN_KEY)
    alice = admin.json("users", "create", "alice@acme.test", "--role", "platform_admin")["token"]
    bob = admin.json("users", "create", "bob@acme.test", "--role", "platform_admin")["token"]
    return Cli(server.url, alice), Cli(server.url, bob)


def test_catalog_approvals_and_kill_switch(server: GatewayServer, tmp_path: Path) -> None:
    alice, bob = users(server)
    card = tmp_path / "card.md"
    card.write_text("# Chat\nFor internal use.")
    model = alice.json("models", "create", "chat", "--owner", "search", "--data-class", "confidential",
                       "--context-window", "8192", "--capability", "chat", "--input-price", "0.5",
                       "--card-file", str(card), "--link", "https://example.com")  # fmt: skip
    assert model["status"] == "proposed" and model["card_text"].startswith("# Chat")
    assert model["prices"] == {"input_per_mtok": 0.5}
    assert [m["name"] for m in bob.json("models", "list")] == ["chat"]
    assert alice.json("models", "update", "chat", "--owner", "ranking")["owner"] == "ranking"
    request = alice.json("models", "lifecycle", "chat", "approved", "--reason", "evaluated")
    own = alice("approvals", "approve", request["id"])
    assert own.exit_code == 1 and "may not also decide" in own.stderr
    assert bob.json("approvals", "approve", request["id"], "--note", "ok")["state"] == "approved"
    assert bob.json("models", "show", "chat")["status"] == "approved"
    assert [a["id"] for a in bob.json("approvals", "list", "--state", "approved")] == [request["id"]]
    table = bob("approvals", "list")
    assert table.exit_code == 0 and request["id"] in table.stdout
    dep = alice.json("models", "deployments", "create", "chat-1", "--model", "chat", "--provider", "openai",
                     "--region", "us-east-1", "--region", "us-west-2")  # fmt: skip
    assert dep["regions"] == ["us-east-1", "us-west-2"] and dep["status"] == "proposed"
    assert bob.json("models", "deployments", "list", "--model", "chat")[0]["name"] == "chat-1"

    provider = alice.json("providers", "set", "openai", "--retention-days", "30", "--training-opt-out",
                          "--cert", "soc2", "--region", "us-east-1", "--data-class", "confidential")  # fmt: skip
    assert provider["status"] == "pending" and provider["training_opt_out"] is True
    review = alice.json("providers", "review", "openai", "--valid-days", "90", "--reason", "DPA signed")
    assert bob.json("approvals", "approve", review["id"])["state"] == "approved"
    assert bob.json("providers", "show", "openai")["valid"] is True
    usage = alice("providers", "review", "openai", "--reason", "no expiry given")
    assert usage.exit_code == 2

    killed = alice.json("kill", "model", "chat", "--reason", "incident 42")
    assert killed["active"] and killed["target_type"] == "model"
    assert [k["id"] for k in bob.json("kill", "list")] == [killed["id"]]
    again = alice("kill", "model", "chat", "--reason", "twice over")
    assert again.exit_code == 1 and "already disabled" in again.stderr
    assert alice.json("kill", "lift", killed["id"], "--reason", "resolved")["active"] is False
    assert bob.json("kill", "list") == [] and len(bob.json("kill", "list", "--all")) == 1
    assert alice("kill", "team", "team_nope", "--reason", "typo here").exit_code == 1

    # The audit trail saw all of it; verify through the API, export it, verify the export offline.
    listed = bob.json("audit", "list", "--limit", "500")
    assert {"approval.approve", "kill.create", "kill.lift", "provider.create"} <= {
        r["action"] for r in listed
    }
    verified = bob("audit", "verify")
    assert verified.exit_code == 0 and "chain intact" in verified.stdout
    out = tmp_path / "export"
    exported = bob("audit", "export", "--out", str(out), "--segment-records", "5")
    assert exported.exit_code == 0, exported.stderr
    assert (out / "manifest.json").exists()
    assert bob("audit", "verify", "--export", str(out)).exit_code == 0
    assert bob("audit", "export", "--out", str(out)).exit_code == 2  # never over an earlier export
    shown = bob.json("policy", "show")
    assert shown["builtin"] is True and next(p["id"] for p in shown["policies"]) == "plinth-default-models"


def test_policy_test_and_check(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"PLINTH_CONFIG": None, "COLUMNS": "200"}
    passed = runner.invoke(app, ["policy", "test", str(EXAMPLES / "policies" / "tests.yaml")], env=env)
    assert passed.exit_code == 0, passed.stdout
    assert "0 failed" in passed.stdout and "eu-confidential-stays-in-eu" in passed.stdout
    cases = tmp_path / "cases.yaml"
    cases.write_text(
        f"config: {EXAMPLES / 'plinth.governance.yaml'}\npolicies: {EXAMPLES / 'policies'}\n"
        "cases:\n"
        "  - {name: wrong on purpose, model: gpt-4o, expect: deny}\n"
        "  - {name: right, model: experimental, expect: deny, expect_rule: 'plinth:model-status'}\n"
    )
    failed = runner.invoke(app, ["policy", "test", str(cases), "--json"], env=env)
    assert failed.exit_code == 1
    results = json.loads(failed.stdout)
    assert [r["passed"] for r in results] == [False, True]
    assert results[0]["problems"] == ["expected deny, got allow"]
    cases.write_text("cases:\n  - {name: x, model: m, expect: maybe}\n")
    bad = runner.invoke(app, ["policy", "test", str(cases)], env=env)
    assert bad.exit_code == 2 and "cases.0.expect" in bad.stderr

    ok = runner.invoke(app, ["policy", "check", "--policies", str(EXAMPLES / "policies")], env=env)
    assert ok.exit_code == 0 and "OK 5 policies" in ok.stdout
    broken = tmp_path / "broken.cedar"
    broken.write_text('@id("x") permit (principal, action, resource) when { context.nope };')
    refused = runner.invoke(app, ["policy", "check", "--policies", str(broken)], env=env)
    assert refused.exit_code == 2 and "broken.cedar" in refused.stderr and "Traceback" not in refused.stderr
    config = tmp_path / "plinth.yaml"
    config.write_text(f"governance:\n  policies: {broken}\n")
    check = runner.invoke(app, ["config", "check", "--config", str(config)], env=env)
    assert check.exit_code == 2 and "broken.cedar" in check.stderr
    schema = runner.invoke(app, ["policy", "schema"], env=env)
    assert schema.exit_code == 0 and "namespace Plinth" in schema.stdout
