"""`plinth orgs|teams|projects|keys|users`: the CLI against a real server over HTTP."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from conftest import ADMIN_KEY, GatewayServer
from plinth.admin.cli import DataClassChoice, RoleChoice
from plinth.cli import app
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
    ],
)
def test_usage_errors_exit_2(server: GatewayServer, args: list[str]) -> None:
    assert Cli(server.url)(*args).exit_code == 2


def test_missing_credential_or_bad_url_exit_2(server: GatewayServer) -> None:
    no_token = Cli(server.url, None)("orgs", "list")
    assert no_token.exit_code == 2 and "PLINTH_TOKEN" in no_token.stderr
    bad_url = Cli("ftp://example.invalid")("orgs", "list")
    assert bad_url.exit_code == 2 and "invalid --url" in bad_url.stderr
