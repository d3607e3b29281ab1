"""`plinth orgs|teams|projects|keys|users|budgets|usage`: the CLI against a real server over HTTP."""

from __future__ import annotations

import datetime as dt
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from conftest import ADMIN_KEY, GatewayServer
from plinth.admin.cli import DataClassChoice, RoleChoice
from plinth.cli import app
from plinth.metering.models import UsageRecord
from plinth.tenancy.models import DataClass, Role


class Cli:
    """Runs `plinth …` in-process with the environment a user would have set."""

    def __init__(
        self, url: str, token: str | None = ADMIN_KEY, *, token_var: str = "PLINTH_ADMIN_KEY"
    ) -> None:
        self.env: dict[str, str | None] = {
            "PLINTH_URL": url,
            "PLINTH_TOKEN": None,
            "PLINTH_ADMIN_KEY": None,
            "COLUMNS": "200",
        }
        if token is not None:
            self.env[token_var] = token
        self.runner = CliRunner()

    def __call__(self, *args: str) -> Result:
        return self.runner.invoke(app, list(args), env=self.env)

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return json.loads(result.stdout)


@pytest.fixture
def server(gateway_factory: Callable[..., GatewayServer]) -> GatewayServer:
    return gateway_factory({"models": []})


def test_enum_choices_match_the_models() -> None:
    assert [r.value for r in RoleChoice] == [r.value for r in Role]
    assert [d.value for d in DataClassChoice] == [d.value for d in DataClass]


def test_full_flow_as_json(server: GatewayServer) -> None:
    cli = Cli(server.url)
    org = cli.json("orgs", "create", "acme")
    assert cli.json("orgs", "list") == [org]
    team = cli.json("teams", "create", "ml", "--org", org["id"])
    assert cli.json("teams", "list", "--org", org["id"]) == [team]
    assert cli.json("teams", "show", team["id"]) == team
    project = cli.json("projects", "create", "chatbot", "--team", team["id"])
    assert cli.json("projects", "list", "--team", team["id"]) == [project]

    result = cli(
        "keys", "create", "ci", "--team", team["id"], "--project", project["id"], "-m", "gpt-4o-mini",
        "-m", "claude", "--expires-in-days", "7", "--env", "prod", "--data-class", "confidential",
        "--tag", "ci", "--meta", "owner=alice", "--meta", "cost_center=42", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    key = json.loads(result.stdout)
    assert key["key"].startswith("sk-plinth-") and "cannot be shown again" in result.stderr
    assert key["models"] == ["gpt-4o-mini", "claude"] and key["environment"] == "prod"
    assert key["data_class"] == "confidential" and key["tags"] == ["ci"]
    assert key["metadata"] == {"owner": "alice", "cost_center": "42"}

    listed = cli.json("keys", "list", "--team", team["id"])
    assert [k["id"] for k in listed] == [key["id"]] and "key" not in listed[0]
    shown = cli.json("keys", "show", key["id"])
    assert shown == {k: v for k, v in key.items() if k != "key"}

    rotated = cli("keys", "rotate", key["id"], "--json")
    assert rotated.exit_code == 0 and "cannot be shown again" in rotated.stderr
    new = json.loads(rotated.stdout)
    assert new["key"] != key["key"] and new["rotated_from"] == key["id"]
    revoked = cli.json("keys", "revoke", new["id"], "--reason", "done")
    assert revoked["status"] == "revoked" and revoked["revoked_reason"] == "done"
    assert cli.json("keys", "list", "--team", team["id"]) == []
    assert len(cli.json("keys", "list", "--team", team["id"], "--all")) == 2

    user = cli("users", "create", "dev@acme.test", "--role", "developer", "--team", team["id"], "--json")
    assert user.exit_code == 0 and "cannot be shown again" in user.stderr
    token = json.loads(user.stdout)["token"]
    assert token.startswith("pt-")
    assert [u["email"] for u in cli.json("users", "list")] == ["dev@acme.test"]

    # The developer's own token: keys of their team by default, nothing above it.
    dev = Cli(server.url, token, token_var="PLINTH_TOKEN")
    mine = dev.json("keys", "create", "laptop")
    assert mine["team_id"] == team["id"] and mine["created_by"] == "dev@acme.test"
    denied = dev("orgs", "list")
    assert denied.exit_code == 1
    assert denied.stderr.strip() == "Error: Role 'developer' may not list organizations. (HTTP 403)"


def test_tables_and_secret_printed_once(server: GatewayServer) -> None:
    cli = Cli(server.url)
    org = cli.json("orgs", "create", "acme")
    team = cli.json("teams", "create", "ml", "--org", org["id"])
    listed = cli("orgs", "list")
    assert listed.exit_code == 0 and "acme" in listed.stdout and org["id"] in listed.stdout
    created = cli("keys", "create", "ci", "--team", team["id"], "-m", "gpt-4o-mini")
    assert created.exit_code == 0, created.stderr
    secret_lines = [line for line in created.stdout.splitlines() if line.startswith("key: sk-plinth-")]
    assert len(secret_lines) == 1
    secret = secret_lines[0].removeprefix("key: ")
    assert "Save this key now: it cannot be shown again." in created.stderr
    table = cli("keys", "list", "--team", team["id"])
    assert table.exit_code == 0 and "ci" in table.stdout and "active" in table.stdout
    assert secret not in table.stdout and secret[:18] in table.stdout  # the visible prefix only
    shown = cli("keys", "show", json.loads(cli("keys", "list", "--json").stdout)[0]["id"])
    assert shown.exit_code == 0 and "gpt-4o-mini" in shown.stdout and secret not in shown.stdout
    users = cli("users", "create", "aud@acme.test", "--role", "auditor")
    assert users.exit_code == 0 and "token: pt-" in users.stdout and "auditor" in users.stdout


def test_api_errors_exit_1_with_one_line(server: GatewayServer) -> None:
    cli = Cli(server.url)
    cli.json("orgs", "create", "acme")
    dup = cli("orgs", "create", "acme")
    assert dup.exit_code == 1
    assert dup.stderr.strip() == "Error: organization 'acme' already exists (HTTP 409)"
    missing = cli("keys", "show", "key_nope")
    assert (
        missing.exit_code == 1 and missing.stderr.strip() == "Error: key 'key_nope' does not exist (HTTP 404)"
    )
    # An id cannot reach another endpoint through a slash.
    assert cli("keys", "show", "../orgs").exit_code == 1
    bad_token = Cli(server.url, "wrong")("orgs", "list")
    assert bad_token.exit_code == 1 and "Invalid admin key or user token" in bad_token.stderr


def test_cannot_reach_server() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()  # nothing listens there now
    result = Cli(url)("orgs", "list")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: cannot reach Plinth at {url}"


@pytest.mark.parametrize(
    "args",
    [
        ["users", "create", "a@b.test", "--role", "wizard"],
        ["keys", "create", "k", "--data-class", "secret"],
        ["keys", "create", "k", "--meta", "no-equals-sign"],
        ["keys", "create", "k", "--expires-in-days", "3", "--expires-at", "2999-01-01"],
        ["keys", "create", "k", "--expires-in-days", "0"],
        ["teams", "create", "ml"],  # --org is required
        ["keys", "show"],
        ["keys", "create", "k", "--rpm", "0"],
        ["keys", "limits", "key_x"],  # nothing to change
        ["keys", "limits", "key_x", "--rpm", "fast"],
        ["teams", "limits", "team_x", "--tpm", "-5"],
        ["budgets", "set", "--limit", "5"],  # whose?
        ["budgets", "set", "--limit", "5", "--team", "t", "--org", "o"],
        ["budgets", "set", "--limit", "-1", "--team", "t"],
        ["budgets", "set", "--limit", "5", "--team", "t", "--period", "week"],
    ],
)
def test_usage_errors_exit_2(server: GatewayServer, args: list[str]) -> None:
    assert Cli(server.url)(*args).exit_code == 2


def test_missing_credential_or_bad_url_exit_2(server: GatewayServer) -> None:
    no_token = Cli(server.url, None)("orgs", "list")
    assert no_token.exit_code == 2 and "PLINTH_TOKEN" in no_token.stderr
    bad_url = Cli("ftp://example.invalid")("orgs", "list")
    assert bad_url.exit_code == 2 and "invalid --url" in bad_url.stderr


def test_limits(server: GatewayServer) -> None:
    cli = Cli(server.url)
    org = cli.json("orgs", "create", "acme")
    team = cli.json("teams", "create", "ml", "--org", org["id"], "--rpm", "600")
    assert team["rpm_limit"] == 600 and team["tpm_limit"] is None
    key = cli.json("keys", "create", "ci", "--team", team["id"], "--rpm", "60", "--tpm", "1000")
    assert (key["rpm_limit"], key["tpm_limit"], key["max_concurrency"]) == (60, 1000, None)
    changed = cli.json("keys", "limits", key["id"], "--tpm", "none", "--max-concurrency", "3")
    assert (changed["rpm_limit"], changed["tpm_limit"], changed["max_concurrency"]) == (60, None, 3)
    team = cli.json("teams", "limits", team["id"], "--rpm", "unlimited", "--tpm", "90000")
    assert (team["rpm_limit"], team["tpm_limit"]) == (None, 90000)
    table = cli("keys", "show", key["id"])
    assert table.exit_code == 0 and "RPM" in table.stdout and "60" in table.stdout


def test_budgets(server: GatewayServer) -> None:
    cli = Cli(server.url)
    org = cli.json("orgs", "create", "acme")
    team = cli.json("teams", "create", "ml", "--org", org["id"])
    budget = cli.json("budgets", "set", "--team", team["id"], "--limit", "50", "--soft", "40")
    assert (budget["scope"], budget["period"], budget["limit_usd"], budget["soft_limit_usd"]) == (
        "team",
        "month",
        50,
        40,
    )
    daily = cli.json("budgets", "set", "--org", org["id"], "--period", "day", "--limit", "5")
    assert [b["id"] for b in cli.json("budgets", "list")] == [daily["id"], budget["id"]]
    assert [b["id"] for b in cli.json("budgets", "list", "--team", team["id"])] == [budget["id"]]
    status = cli.json("budgets", "show", budget["id"])
    assert (status["spent_usd"], status["reserved_usd"], status["remaining_usd"]) == (0, 0, 50)
    shown = cli("budgets", "show", budget["id"])
    assert shown.exit_code == 0 and "Remaining USD" in shown.stdout and "50.0" in shown.stdout
    assert cli.json("budgets", "events") == []
    assert cli("budgets", "events").stdout.strip() == "No budget events."
    deleted = cli("budgets", "delete", budget["id"])
    assert deleted.exit_code == 0 and deleted.stdout.strip() == f"Deleted budget {budget['id']}."
    gone = cli("budgets", "show", budget["id"])
    assert gone.exit_code == 1 and f"budget '{budget['id']}' does not exist (HTTP 404)" in gone.stderr
    bad = cli("budgets", "set", "--team", team["id"], "--limit", "5", "--soft", "6")
    assert bad.exit_code == 1 and "soft_limit_usd" in bad.stderr


def test_usage(server: GatewayServer, tmp_path: Any) -> None:
    cli = Cli(server.url)
    org = cli.json("orgs", "create", "acme")
    team = cli.json("teams", "create", "ml", "--org", org["id"])
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    with server.app.state.budgets.service.db.session() as session:
        for model, cost in (("gpt-4o-mini", 0.5), ("gpt-4o-mini", 0.25), ("claude", 2.0)):
            session.add(
                UsageRecord(
                    request_id=f"r-{model}-{cost}",
                    created_at=now,
                    org_id=org["id"],
                    team_id=team["id"],
                    route="chat",
                    model=model,
                    status=200,
                    input_tokens=10,
                    output_tokens=5,
                    cost_usd=cost,
                )
            )
    report = cli.json("usage", "--by", "model")
    assert [(r["model"], r["requests"], r["cost_usd"]) for r in report["data"]] == [
        ("claude", 1, 2.0),
        ("gpt-4o-mini", 2, 0.75),
    ]
    table = cli("usage", "--by", "team,model,day", "--team", team["id"])
    assert table.exit_code == 0, table.stderr
    assert (
        "Cost USD" in table.stdout and "2.000000" in table.stdout and now.date().isoformat() in table.stdout
    )
    assert "Total: 3 requests, 2.750000 USD" in table.stdout
    out = tmp_path / "spend.csv"
    written = cli("usage", "--by", "model", "--csv", str(out))
    assert written.exit_code == 0 and "Wrote 2 rows" in written.stderr
    assert out.read_text().splitlines() == [
        "model,requests,input_tokens,output_tokens,cached_input_tokens,cost_usd",
        "claude,1,10,5,0,2.000000",
        "gpt-4o-mini,2,20,10,0,0.750000",
    ]
    to_stdout = cli("usage", "--by", "", "--csv", "-")
    assert to_stdout.stdout.splitlines()[1] == "3,30,15,0,2.750000"
    empty = cli("usage", "--since", "2020-01-01", "--until", "2020-02-01")
    assert empty.exit_code == 0 and "No usage in this range." in empty.stdout
    bad = cli("usage", "--by", "colour")
    assert bad.exit_code == 1 and "group_by" in bad.stderr and "colour" in bad.stderr
    bad_date = cli("usage", "--since", "yesterday")
    assert bad_date.exit_code == 1 and "since" in bad_date.stderr
