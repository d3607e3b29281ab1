"""The admin API end to end: a real server, real HTTP, its own SQLite database per test."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import httpx
import pytest

from conftest import ADMIN_KEY, USER_KEY, GatewayServer
from plinth.admin.api import AdminApi

_names = itertools.count()


def uniq(prefix: str) -> str:
    return f"{prefix}-{next(_names)}"


class Api:
    """httpx against one server with one credential; asserts the error shape on every failure."""

    def __init__(self, server: GatewayServer, token: str | None) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=server.url + "/api", headers=headers, timeout=10)

    def __call__(self, method: str, path: str, body: Any = None, **params: Any) -> httpx.Response:
        response = self.client.request(method, path, json=body, params=params or None)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, error
            assert "Traceback" not in error["message"]
        return response

    def ok(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        response = self(method, path, body, **params)
        assert response.status_code in (200, 201), response.text
        return response.json()


@dataclass
class World:
    """Two teams in one organization, a project and key in each, and one user of every role."""

    server: GatewayServer
    admin: Api
    org: str
    team_a: str
    team_b: str
    project_a: str
    project_b: str
    key_a: str
    key_b: str
    virtual_key: str
    tokens: dict[str, str]

    def as_(self, who: str) -> Api:
        if who == "admin_key":
            return self.admin
        if who == "virtual_key":
            return Api(self.server, self.virtual_key)
        return Api(self.server, self.tokens[who])

    def fresh_key(self, team: str) -> str:
        return str(self.admin.ok("POST", "/keys", {"team_id": team, "name": uniq("k")})["id"])

    def budget(self, scope: str, scope_id: str, period: str = "month") -> str:
        """The id of the (created or replaced) budget of a scope."""
        body = {"scope": scope, "scope_id": scope_id, "period": period, "limit_usd": 10}
        return str(self.admin.ok("POST", "/budgets", body)["id"])


def build_world(server: GatewayServer) -> World:
    admin = Api(server, ADMIN_KEY)
    org = admin.ok("POST", "/orgs", {"name": "acme"})["id"]
    team_a = admin.ok("POST", "/teams", {"org_id": org, "name": "team-a"})["id"]
    team_b = admin.ok("POST", "/teams", {"org_id": org, "name": "team-b"})["id"]
    project_a = admin.ok("POST", "/projects", {"team_id": team_a, "name": "app-a"})["id"]
    project_b = admin.ok("POST", "/projects", {"team_id": team_b, "name": "app-b"})["id"]
    key_a = admin.ok("POST", "/keys", {"team_id": team_a, "name": "key-a"})
    key_b = admin.ok("POST", "/keys", {"team_id": team_b, "name": "key-b"})
    tokens = {}
    for role, team in [
        ("platform_admin", None),
        ("team_admin", team_a),
        ("developer", team_a),
        ("auditor", None),
    ]:
        user = admin.ok("POST", "/users", {"email": f"{role}@acme.test", "role": role, "team_id": team})
        tokens[role] = user["token"]
    return World(
        server,
        admin,
        org,
        team_a,
        team_b,
        project_a,
        project_b,
        key_a["id"],
        key_b["id"],
        key_a["key"],
        tokens,
    )


@pytest.fixture
def world(gateway_factory: Callable[..., GatewayServer]) -> World:
    return build_world(gateway_factory({"models": []}))


# --- role x operation ----------------------------------------------------------------------------

ROLES = ("admin_key", "platform_admin", "team_admin", "developer", "auditor", "virtual_key")
Request = Callable[[World], tuple[str, str, Any]]


def row(ok: int, *allowed: str) -> dict[str, int]:
    """Expected status per role: `ok` for the allowed roles, 403 for every other."""
    return {role: ok if role in allowed else 403 for role in ROLES}


ADMINS = ("admin_key", "platform_admin")
EVERYONE = (*ADMINS, "team_admin", "developer", "auditor")
READERS = (*ADMINS, "auditor")

MATRIX: list[tuple[str, Request, dict[str, int]]] = [
    ("create org", lambda w: ("POST", "/orgs", {"name": uniq("org")}), row(201, *ADMINS)),
    ("list orgs", lambda w: ("GET", "/orgs", None), row(200, *READERS)),
    ("create team", lambda w: ("POST", "/teams", {"org_id": w.org, "name": uniq("t")}), row(201, *ADMINS)),
    ("list teams", lambda w: ("GET", "/teams", None), row(200, *EVERYONE)),
    ("show own team", lambda w: ("GET", f"/teams/{w.team_a}", None), row(200, *EVERYONE)),
    ("show other team", lambda w: ("GET", f"/teams/{w.team_b}", None), row(200, *READERS)),
    (
        "create project in own team",
        lambda w: ("POST", "/projects", {"team_id": w.team_a, "name": uniq("p")}),
        row(201, *ADMINS, "team_admin"),
    ),
    (
        "create project in other team",
        lambda w: ("POST", "/projects", {"team_id": w.team_b, "name": uniq("p")}),
        row(201, *ADMINS),
    ),
    ("list own projects", lambda w: ("GET", f"/projects?team_id={w.team_a}", None), row(200, *EVERYONE)),
    ("list other projects", lambda w: ("GET", f"/projects?team_id={w.team_b}", None), row(200, *READERS)),
    (
        "create key in own team",
        lambda w: ("POST", "/keys", {"team_id": w.team_a, "name": uniq("k")}),
        row(201, *ADMINS, "team_admin", "developer"),
    ),
    (
        "create key in other team",
        lambda w: ("POST", "/keys", {"team_id": w.team_b, "name": uniq("k")}),
        row(201, *ADMINS),
    ),
    ("list own keys", lambda w: ("GET", f"/keys?team_id={w.team_a}", None), row(200, *EVERYONE)),
    ("list other keys", lambda w: ("GET", f"/keys?team_id={w.team_b}", None), row(200, *READERS)),
    ("show own key", lambda w: ("GET", f"/keys/{w.key_a}", None), row(200, *EVERYONE)),
    ("show other key", lambda w: ("GET", f"/keys/{w.key_b}", None), row(200, *READERS)),
    (
        "rotate own key",
        lambda w: ("POST", f"/keys/{w.fresh_key(w.team_a)}/rotate", None),
        row(200, *ADMINS, "team_admin", "developer"),
    ),
    (
        "rotate other key",
        lambda w: ("POST", f"/keys/{w.fresh_key(w.team_b)}/rotate", None),
        row(200, *ADMINS),
    ),
    (
        "revoke own key",
        lambda w: ("POST", f"/keys/{w.fresh_key(w.team_a)}/revoke", {"reason": "test"}),
        row(200, *ADMINS, "team_admin", "developer"),
    ),
    ("revoke other key", lambda w: ("POST", f"/keys/{w.fresh_key(w.team_b)}/revoke", {}), row(200, *ADMINS)),
    (
        "create developer in own team",
        lambda w: (
            "POST",
            "/users",
            {"email": uniq("d") + "@x.test", "role": "developer", "team_id": w.team_a},
        ),
        row(201, *ADMINS, "team_admin"),
    ),
    (
        "create team admin in own team",
        lambda w: (
            "POST",
            "/users",
            {"email": uniq("a") + "@x.test", "role": "team_admin", "team_id": w.team_a},
        ),
        row(201, *ADMINS),
    ),
    (
        "create developer in other team",
        lambda w: (
            "POST",
            "/users",
            {"email": uniq("d") + "@x.test", "role": "developer", "team_id": w.team_b},
        ),
        row(201, *ADMINS),
    ),
    (
        "create auditor",
        lambda w: ("POST", "/users", {"email": uniq("u") + "@x.test", "role": "auditor"}),
        row(201, *ADMINS),
    ),
    ("list users", lambda w: ("GET", "/users", None), row(200, *READERS, "team_admin")),
    ("whoami", lambda w: ("GET", "/whoami", None), row(200, *EVERYONE)),
    # --- limits: team admins set their own team's keys' limits; a team's own limits are above it.
    (
        "create team with limits",
        lambda w: ("POST", "/teams", {"org_id": w.org, "name": uniq("t"), "rpm_limit": 60}),
        row(201, *ADMINS),
    ),
    (
        "create key with limits in own team",
        lambda w: ("POST", "/keys", {"team_id": w.team_a, "name": uniq("k"), "tpm_limit": 1000}),
        row(201, *ADMINS, "team_admin"),
    ),
    (
        "create key with limits in other team",
        lambda w: ("POST", "/keys", {"team_id": w.team_b, "name": uniq("k"), "rpm_limit": 5}),
        row(201, *ADMINS),
    ),
    (
        "set own key limits",
        lambda w: ("PATCH", f"/keys/{w.key_a}/limits", {"rpm_limit": 100}),
        row(200, *ADMINS, "team_admin"),
    ),
    (
        "set other key limits",
        lambda w: ("PATCH", f"/keys/{w.key_b}/limits", {"rpm_limit": 100}),
        row(200, *ADMINS),
    ),
    (
        "set own team limits",
        lambda w: ("PATCH", f"/teams/{w.team_a}/limits", {"max_concurrency": 10}),
        row(200, *ADMINS),
    ),
    (
        "set other team limits",
        lambda w: ("PATCH", f"/teams/{w.team_b}/limits", {"tpm_limit": None}),
        row(200, *ADMINS),
    ),
    # --- budgets: team admins write their team's and its keys'; members read them; auditors read all.
    (
        "set own team budget",
        lambda w: (
            "POST",
            "/budgets",
            {"scope": "team", "scope_id": w.team_a, "period": "day", "limit_usd": 5},
        ),
        row(200, *ADMINS, "team_admin"),
    ),
    (
        "set own key budget",
        lambda w: (
            "POST",
            "/budgets",
            {"scope": "key", "scope_id": w.key_a, "period": "day", "limit_usd": 1},
        ),
        row(200, *ADMINS, "team_admin"),
    ),
    (
        "set other team budget",
        lambda w: (
            "POST",
            "/budgets",
            {"scope": "team", "scope_id": w.team_b, "period": "day", "limit_usd": 5},
        ),
        row(200, *ADMINS),
    ),
    (
        "set other key budget",
        lambda w: (
            "POST",
            "/budgets",
            {"scope": "key", "scope_id": w.key_b, "period": "day", "limit_usd": 1},
        ),
        row(200, *ADMINS),
    ),
    (
        "set org budget",
        lambda w: (
            "POST",
            "/budgets",
            {"scope": "org", "scope_id": w.org, "period": "month", "limit_usd": 99},
        ),
        row(200, *ADMINS),
    ),
    ("list budgets", lambda w: ("GET", "/budgets", None), row(200, *EVERYONE)),
    ("list budget events", lambda w: ("GET", "/budgets/events", None), row(200, *EVERYONE)),
    (
        "show own team budget",
        lambda w: ("GET", f"/budgets/{w.budget('team', w.team_a)}", None),
        row(200, *EVERYONE),
    ),
    (
        "show own key budget",
        lambda w: ("GET", f"/budgets/{w.budget('key', w.key_a)}", None),
        row(200, *EVERYONE),
    ),
    (
        "show other team budget",
        lambda w: ("GET", f"/budgets/{w.budget('team', w.team_b)}", None),
        row(200, *READERS),
    ),
    ("show org budget", lambda w: ("GET", f"/budgets/{w.budget('org', w.org)}", None), row(200, *READERS)),
    (
        "own budget status",
        lambda w: ("GET", f"/budgets/{w.budget('team', w.team_a)}/status", None),
        row(200, *EVERYONE),
    ),
    (
        "other budget status",
        lambda w: ("GET", f"/budgets/{w.budget('key', w.key_b)}/status", None),
        row(200, *READERS),
    ),
    (
        "delete own budget",
        lambda w: ("DELETE", f"/budgets/{w.budget('key', w.key_a, 'day')}", None),
        row(200, *ADMINS, "team_admin"),
    ),
    (
        "delete other budget",
        lambda w: ("DELETE", f"/budgets/{w.budget('team', w.team_b, 'day')}", None),
        row(200, *ADMINS),
    ),
    # --- usage: team members read their own team's spend.
    ("usage (default team)", lambda w: ("GET", "/usage", None), row(200, *EVERYONE)),
    ("own team usage", lambda w: ("GET", f"/usage?team_id={w.team_a}", None), row(200, *EVERYONE)),
    ("other team usage", lambda w: ("GET", f"/usage?team_id={w.team_b}", None), row(200, *READERS)),
    ("own team usage csv", lambda w: ("GET", f"/usage.csv?team_id={w.team_a}", None), row(200, *EVERYONE)),
    ("other team usage csv", lambda w: ("GET", f"/usage.csv?team_id={w.team_b}", None), row(200, *READERS)),
]


def test_role_permission_matrix(world: World) -> None:
    mismatches = []
    for (name, request, expected), role in itertools.product(MATRIX, ROLES):
        method, path, body = request(world)
        got = world.as_(role)(method, path, body).status_code
        if got != expected[role]:
            mismatches.append(f"{name} as {role}: {got}, expected {expected[role]}")
    assert not mismatches, "\n".join(mismatches)


def test_matrix_covers_every_operation() -> None:
    """A new endpoint must get a row in the matrix (operations are matched by method and path)."""
    covered = {
        (
            method,
            path.split("?")[0]
            .replace("key_", "{key_id}")
            .replace("team_", "{team_id}")
            .replace("bud_", "{budget_id}"),
        )
        for _, request, _ in MATRIX
        for method, path, _ in [request(cast(World, _FakeWorld()))]
    }
    api = AdminApi.__new__(AdminApi)
    table = {(op.method, op.path) for op in AdminApi._operations(api)}
    assert table <= covered, table - covered


class _FakeWorld:
    """Placeholder ids, to read the matrix's paths without a server."""

    org = "org_x"
    team_a = team_b = "team_"
    project_a = project_b = "proj_x"
    key_a = key_b = "key_"

    def fresh_key(self, team: str) -> str:
        return "key_"

    def budget(self, scope: str, scope_id: str, period: str = "month") -> str:
        return "bud_"


def test_team_members_see_only_their_team(world: World) -> None:
    team_admin = world.as_("team_admin")
    developer = world.as_("developer")
    assert [t["id"] for t in team_admin.ok("GET", "/teams")["data"]] == [world.team_a]
    assert {t["id"] for t in world.admin.ok("GET", "/teams")["data"]} == {world.team_a, world.team_b}
    # Without team_id, lists default to the caller's own team.
    assert {k["team_id"] for k in developer.ok("GET", "/keys")["data"]} == {world.team_a}
    assert {p["id"] for p in developer.ok("GET", "/projects")["data"]} == {world.project_a}
    assert {k["team_id"] for k in world.admin.ok("GET", "/keys")["data"]} == {world.team_a, world.team_b}
    users = team_admin.ok("GET", "/users")["data"]
    assert {u["team_id"] for u in users} == {world.team_a}
    # A developer's key without team_id lands in their team; a team admin's new user too.
    key = developer.ok("POST", "/keys", {"name": "mine"})
    assert key["team_id"] == world.team_a and key["created_by"] == "developer@acme.test"
    user = team_admin.ok("POST", "/users", {"email": "new@acme.test", "role": "developer"})
    assert user["team_id"] == world.team_a
    denied = team_admin("POST", "/users", {"email": "boss@acme.test", "role": "platform_admin"})
    assert denied.status_code == 403 and "developer users only" in denied.json()["error"]["message"]
    # A platform admin must name the team.
    missing = world.admin("POST", "/keys", {"name": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "team_id"


def test_whoami(world: World) -> None:
    me = world.as_("developer").ok("GET", "/whoami")
    assert me["kind"] == "user" and me["role"] == "developer" and me["team_id"] == world.team_a
    assert me["user"]["email"] == "developer@acme.test" and "token" not in me["user"]
    assert "keys:write" in me["permissions"] and "orgs:read" not in me["permissions"]
    assert {"budgets:read", "usage:read"} <= set(me["permissions"])
    assert not {"limits:write", "budgets:write"} & set(me["permissions"])
    admin = world.admin.ok("GET", "/whoami")
    assert admin == {
        "kind": "admin_key",
        "role": "platform_admin",
        "team_id": None,
        "user": None,
        "permissions": admin["permissions"],
    }
    assert "orgs:write" in admin["permissions"]


# --- credentials ---------------------------------------------------------------------------------


def test_credentials(world: World) -> None:
    for token, status, code in [
        (None, 401, "missing_api_key"),
        ("nonsense", 401, "invalid_api_key"),
        ("sk-plinth-" + "x" * 43, 401, "invalid_api_key"),
        ("pt-" + "x" * 43, 401, "invalid_api_key"),
        (world.virtual_key, 403, "not_admin_credential"),
    ]:
        response = Api(world.server, token)("GET", "/whoami")
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), token
    refused = Api(world.server, world.virtual_key)("GET", "/keys").json()["error"]["message"]
    assert "virtual API key" in refused and "not an admin credential" in refused
    # Basic auth or a bare token is not a bearer credential.
    assert (
        httpx.get(world.server.url + "/api/whoami", headers={"authorization": ADMIN_KEY}).status_code == 401
    )


def test_config_file_key_is_not_admin(gateway_factory: Callable[..., GatewayServer]) -> None:
    server = gateway_factory({"models": [], "keys": [{"name": "app", "key": USER_KEY}]})
    response = Api(server, USER_KEY)("GET", "/orgs")
    assert response.status_code == 403 and response.json()["error"]["code"] == "not_admin_credential"


def test_a_brand_new_virtual_key_is_refused_not_unknown(world: World) -> None:
    """Before the key cache has seen it, a new virtual key is still recognised as one (403, not 401)."""
    secret = world.admin.ok("POST", "/keys", {"team_id": world.team_a, "name": "fresh"})["key"]
    assert Api(world.server, secret)("GET", "/orgs").status_code == 403


# --- keys ----------------------------------------------------------------------------------------


def test_key_lifecycle_and_secrets_shown_once(world: World) -> None:
    admin = world.admin
    created = admin.ok(
        "POST",
        "/keys",
        {
            "team_id": world.team_a,
            "name": "ci",
            "project_id": world.project_a,
            "models": ["gpt-4o-mini"],
            "expires_in_days": 30,
            "environment": "prod",
            "data_class": "confidential",
            "tags": ["ci", "nightly"],
            "metadata": {"owner": "alice", "ticket": 42},
        },
    )
    secret = created["key"]
    assert secret.startswith("sk-plinth-") and created["prefix"] == secret[: len(created["prefix"])]
    assert created["models"] == ["gpt-4o-mini"] and created["environment"] == "prod"
    assert created["data_class"] == "confidential" and created["tags"] == ["ci", "nightly"]
    assert created["metadata"] == {"owner": "alice", "ticket": 42} and created["status"] == "active"
    assert created["project_id"] == world.project_a and created["created_by"] == "admin"
    assert created["expires_at"].endswith("Z")
    assert "key_hash" not in created

    shown = admin.ok("GET", f"/keys/{created['id']}")
    assert {k: v for k, v in created.items() if k != "key"} == shown
    listing = admin("GET", "/keys", team_id=world.team_a, include_revoked="true").text
    users = admin("GET", "/users").text
    for text in (listing, users, admin("GET", f"/keys/{created['id']}").text):
        assert secret not in text and "key_hash" not in text and "token_hash" not in text
        assert '"key":' not in text and '"token":' not in text

    rotated = admin.ok("POST", f"/keys/{created['id']}/rotate")
    assert rotated["key"] != secret and rotated["rotated_from"] == created["id"]
    assert rotated["models"] == ["gpt-4o-mini"] and rotated["metadata"] == created["metadata"]
    old = admin.ok("GET", f"/keys/{created['id']}")
    assert old["status"] == "revoked" and old["revoked_reason"] == f"rotated to {rotated['id']}"
    again = admin("POST", f"/keys/{created['id']}/rotate")
    assert again.status_code == 400 and "revoked" in again.json()["error"]["message"]

    revoked = admin.ok("POST", f"/keys/{rotated['id']}/revoke", {"reason": "leaked in a log"})
    assert revoked["status"] == "revoked" and revoked["revoked_reason"] == "leaked in a log"
    assert "key" not in revoked
    # Revoking needs no body and is idempotent.
    assert admin.ok("POST", f"/keys/{rotated['id']}/revoke")["revoked_reason"] == "leaked in a log"
    active = {k["id"] for k in admin.ok("GET", "/keys", team_id=world.team_a)["data"]}
    everything = {
        k["id"] for k in admin.ok("GET", "/keys", team_id=world.team_a, include_revoked="true")["data"]
    }
    assert created["id"] not in active and rotated["id"] not in active
    assert {created["id"], rotated["id"]} <= everything


def test_expiry_given_as_a_timestamp_with_offset(world: World) -> None:
    key = world.admin.ok(
        "POST", "/keys", {"team_id": world.team_a, "name": "dated", "expires_at": "2999-01-01T02:00:00+02:00"}
    )
    assert key["expires_at"] == "2999-01-01T00:00:00Z"


# --- bad input -----------------------------------------------------------------------------------


def bad_inputs(w: World) -> list[tuple[str, str, Any, int, str | None]]:
    team = w.team_a
    return [
        ("POST", "/orgs", b"", 400, "invalid_json"),
        ("POST", "/orgs", b"{not json", 400, "invalid_json"),
        ("POST", "/orgs", b"[1, 2]", 400, "invalid_value"),
        ("POST", "/orgs", b'"acme"', 400, "invalid_value"),
        ("POST", "/orgs", {}, 400, "missing_field"),
        ("POST", "/orgs", {"name": ""}, 400, "invalid_value"),
        ("POST", "/orgs", {"name": "   "}, 400, "invalid_value"),
        ("POST", "/orgs", {"name": "x" * 201}, 400, "invalid_value"),
        ("POST", "/orgs", {"name": "nul\x00byte"}, 400, "invalid_value"),
        ("POST", "/orgs", {"name": 7}, 400, "invalid_value"),
        ("POST", "/orgs", {"name": "acme"}, 409, "conflict"),
        ("POST", "/orgs", {"name": "ok", "colour": "red"}, 400, "unknown_field"),
        ("POST", "/teams", {"org_id": "org_missing", "name": "t"}, 404, "not_found"),
        ("POST", "/teams", {"org_id": w.org, "name": "team-a"}, 409, "conflict"),
        ("GET", "/teams/team_missing", None, 404, "not_found"),
        ("POST", "/projects", {"team_id": "team_missing", "name": "p"}, 404, "not_found"),
        ("POST", "/keys", {"team_id": team, "name": "k", "data_class": "secret"}, 400, "invalid_value"),
        ("POST", "/keys", {"team_id": team, "name": "k", "models": "gpt-4o"}, 400, "invalid_value"),
        ("POST", "/keys", {"team_id": team, "name": "k", "tags": [1]}, 400, "invalid_value"),
        ("POST", "/keys", {"team_id": team, "name": "k", "metadata": []}, 400, "invalid_value"),
        ("POST", "/keys", {"team_id": team, "name": "k", "expires_at": "2001-01-01T00:00:00Z"}, 400, None),
        ("POST", "/keys", {"team_id": team, "name": "k", "expires_at": "tomorrow"}, 400, "invalid_value"),
        (
            "POST",
            "/keys",
            {"team_id": team, "name": "k", "expires_at": "9999-12-31T23:59:59-12:00"},
            400,
            None,
        ),
        ("POST", "/keys", {"team_id": team, "name": "k", "expires_in_days": 0}, 400, "invalid_value"),
        ("POST", "/keys", {"team_id": team, "name": "k", "expires_in_days": 10**30}, 400, None),
        (
            "POST",
            "/keys",
            {"team_id": team, "name": "k", "expires_in_days": 1, "expires_at": "2999-01-01T00:00:00Z"},
            400,
            "invalid_value",
        ),
        ("POST", "/keys", {"team_id": team, "name": "k", "project_id": w.project_b}, 400, "invalid_value"),
        ("POST", "/keys", {"team_id": team, "name": "k", "project_id": "proj_missing"}, 404, "not_found"),
        ("POST", "/keys", {"team_id": "team_missing", "name": "k"}, 404, "not_found"),
        ("GET", "/keys/key_missing", None, 404, "not_found"),
        ("POST", "/keys/key_missing/rotate", None, 404, "not_found"),
        ("POST", "/keys/key_missing/revoke", None, 404, "not_found"),
        ("POST", f"/keys/{w.key_a}/revoke", {"reason": 5}, 400, "invalid_value"),
        ("GET", "/keys?include_revoked=perhaps", None, 400, "invalid_value"),
        ("GET", "/keys?colour=red", None, 400, "unknown_field"),
        (
            "POST",
            "/users",
            {"email": "not-an-email", "role": "developer", "team_id": team},
            400,
            "invalid_value",
        ),
        ("POST", "/users", {"email": "a@b.test", "role": "wizard"}, 400, "invalid_value"),
        ("POST", "/users", {"email": "a@b.test", "role": "developer"}, 400, "invalid_value"),
        ("POST", "/users", {"email": "auditor@acme.test", "role": "auditor"}, 409, "conflict"),
        # limits
        ("POST", "/keys", {"team_id": team, "name": "k", "rpm_limit": 0}, 400, "invalid_value"),
        ("POST", "/keys", {"team_id": team, "name": "k", "tpm_limit": "5"}, 400, "invalid_value"),
        ("POST", "/keys", {"team_id": team, "name": "k", "max_concurrency": True}, 400, "invalid_value"),
        ("POST", "/keys", {"team_id": team, "name": "k", "rpm_limit": 1.5}, 400, "invalid_value"),
        ("POST", "/keys", {"team_id": team, "name": "k", "rpm_limit": 10**10}, 400, "invalid_value"),
        ("POST", "/teams", {"org_id": w.org, "name": "t9", "rpm_limit": -1}, 400, "invalid_value"),
        ("PATCH", f"/keys/{w.key_a}/limits", {}, 400, "invalid_value"),
        ("PATCH", f"/keys/{w.key_a}/limits", b"", 400, "invalid_json"),
        ("PATCH", f"/keys/{w.key_a}/limits", {"rpm": 5}, 400, "unknown_field"),
        ("PATCH", "/keys/key_missing/limits", {"rpm_limit": 5}, 404, "not_found"),
        ("PATCH", "/teams/team_missing/limits", {"rpm_limit": 5}, 404, "not_found"),
        # budgets
        ("POST", "/budgets", {"scope": "team", "scope_id": team, "period": "day"}, 400, "missing_field"),
        (
            "POST",
            "/budgets",
            {"scope": "galaxy", "scope_id": team, "period": "day", "limit_usd": 1},
            400,
            "invalid_value",
        ),
        (
            "POST",
            "/budgets",
            {"scope": "team", "scope_id": team, "period": "week", "limit_usd": 1},
            400,
            "invalid_value",
        ),
        (
            "POST",
            "/budgets",
            {"scope": "team", "scope_id": team, "period": "day", "limit_usd": -1},
            400,
            "invalid_value",
        ),
        (
            "POST",
            "/budgets",
            {"scope": "team", "scope_id": team, "period": "day", "limit_usd": 1, "soft_limit_usd": 2},
            400,
            "invalid_value",
        ),
        (
            "POST",
            "/budgets",
            {"scope": "team", "scope_id": "team_missing", "period": "day", "limit_usd": 1},
            404,
            "not_found",
        ),
        ("GET", "/budgets/bud_missing", None, 404, "not_found"),
        ("GET", "/budgets/bud_missing/status", None, 404, "not_found"),
        ("DELETE", "/budgets/bud_missing", None, 404, "not_found"),
        ("GET", "/budgets?scope=galaxy", None, 400, "invalid_value"),
        ("GET", "/budgets/events?limit=0", None, 400, "invalid_value"),
        # usage
        ("GET", "/usage?group_by=team,colour", None, 400, "invalid_value"),
        ("GET", "/usage?since=yesterday", None, 400, "invalid_value"),
        ("GET", "/usage?since=2026-02-01&until=2026-01-01", None, 400, "invalid_value"),
        ("GET", "/usage?since=2999-01-01", None, 400, "invalid_value"),
        ("GET", "/usage.csv?group_by=nope", None, 400, "invalid_value"),
        ("GET", "/usage?colour=red", None, 400, "unknown_field"),
        ("GET", "/nowhere", None, 404, "unknown_url"),
        ("DELETE", "/keys", None, 405, "method_not_allowed"),
        ("POST", "/orgs", b"{" + b" " * (2 << 20) + b"}", 413, "request_too_large"),
    ]


def test_bad_input_gets_a_clear_error_never_a_500(world: World) -> None:
    client = httpx.Client(
        base_url=world.server.url + "/api", headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=10
    )
    problems = []
    for method, path, body, status, code in bad_inputs(world):
        kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
        response = client.request(method, path, **kwargs)
        try:
            error = response.json()["error"]
        except Exception:
            problems.append(f"{method} {path} {body!r}: not an error body: {response.text[:200]}")
            continue
        got = (response.status_code, error["code"] if code is not None else None)
        if got != (status, code) or set(error) != {"message", "type", "param", "code"}:
            problems.append(f"{method} {path} {str(body)[:80]!r}: {response.status_code} {error}")
        if response.status_code == 400 and error["type"] != "invalid_request_error":
            problems.append(f"{method} {path}: type {error['type']}")
    assert not problems, "\n".join(problems)


# --- OpenAPI -------------------------------------------------------------------------------------


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_openapi_document(world: World) -> None:
    response = httpx.get(world.server.url + "/api/openapi.json")  # public: no credential needed
    assert response.status_code == 200
    doc = response.json()
    assert doc["openapi"].startswith("3.1")
    expected = {
        ("post", "/api/orgs"),
        ("get", "/api/orgs"),
        ("post", "/api/teams"),
        ("get", "/api/teams"),
        ("get", "/api/teams/{team_id}"),
        ("post", "/api/projects"),
        ("get", "/api/projects"),
        ("post", "/api/keys"),
        ("get", "/api/keys"),
        ("get", "/api/keys/{key_id}"),
        ("post", "/api/keys/{key_id}/rotate"),
        ("post", "/api/keys/{key_id}/revoke"),
        ("post", "/api/users"),
        ("get", "/api/users"),
        ("get", "/api/whoami"),
        ("get", "/api/openapi.json"),
        ("patch", "/api/keys/{key_id}/limits"),
        ("patch", "/api/teams/{team_id}/limits"),
        ("post", "/api/budgets"),
        ("get", "/api/budgets"),
        ("get", "/api/budgets/events"),
        ("get", "/api/budgets/{budget_id}"),
        ("delete", "/api/budgets/{budget_id}"),
        ("get", "/api/budgets/{budget_id}/status"),
        ("get", "/api/usage"),
        ("get", "/api/usage.csv"),
    }
    # Extensions (governance, ...) add their own paths; they test those in their own files.
    assert expected <= {(m, p) for p, item in doc["paths"].items() for m in item}
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    create_key = doc["paths"]["/api/keys"]["post"]
    body_schema = schemas[
        create_key["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/")[-1]
    ]
    assert {"team_id", "name", "models", "expires_in_days", "data_class", "metadata"} <= set(
        body_schema["properties"]
    )
    assert set(create_key["responses"]) >= {"201", "400", "401", "403", "404"}
    assert {"rpm_limit", "tpm_limit", "max_concurrency"} <= set(body_schema["properties"])
    assert "text/csv" in doc["paths"]["/api/usage.csv"]["get"]["responses"]["200"]["content"]
    usage_params = {p["name"] for p in doc["paths"]["/api/usage"]["get"]["parameters"]}
    assert {"group_by", "since", "until", "team_id", "key_id", "model"} <= usage_params
    list_keys = doc["paths"]["/api/keys"]["get"]
    assert {p["name"] for p in list_keys["parameters"]} == {"team_id", "include_revoked"}
    text = response.text
    assert "key_hash" not in text and "token_hash" not in text
    try:
        from openapi_spec_validator import validate
    except ImportError:  # optional dev dependency; the structural checks above still ran
        return
    validate(doc)


# --- the data plane ------------------------------------------------------------------------------


async def _until(check: Callable[[], Any], timeout: float) -> float:
    """Poll `check` (an async callable returning truthy) and return the seconds it took."""
    started = time.monotonic()
    while not await check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_api_key_works_on_chat_and_stops_after_revoke(
    gateway_factory: Callable[..., GatewayServer], basic_config: dict[str, Any]
) -> None:
    server = gateway_factory(basic_config)
    headers = {"authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

        async def ok(path: str, body: dict[str, Any]) -> Any:
            response = await client.post(path, json=body, headers=headers)
            assert response.status_code == 201, response.text
            return response.json()

        org = await ok("/api/orgs", {"name": "acme"})
        team = await ok("/api/teams", {"org_id": org["id"], "name": "ml"})
        key = await ok("/api/keys", {"team_id": team["id"], "name": "app", "models": ["gpt-4o-mini"]})
        chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
        auth = {"authorization": f"Bearer {key['key']}"}

        async def status() -> int:
            return (await client.post("/v1/chat/completions", json=chat, headers=auth)).status_code

        async def works() -> bool:
            return await status() == 200

        async def refused() -> bool:
            return await status() == 401

        await _until(works, timeout=2.0)  # the key cache picks up new keys within key_refresh_s
        answer = await client.post("/v1/chat/completions", json=chat, headers=auth)
        assert answer.json()["choices"][0]["message"]["content"] == "echo: hi"
        # Allowed models are enforced for API-created keys too.
        other = await client.post(
            "/v1/chat/completions", json={**chat, "model": "text-embedding-3-small"}, headers=auth
        )
        assert other.status_code in (403, 404)

        revoke = await client.post(f"/api/keys/{key['id']}/revoke", json={"reason": "test"}, headers=headers)
        assert revoke.status_code == 200
        took = await _until(refused, timeout=1.5)
        assert took < 1.5
        body = (await client.post("/v1/chat/completions", json=chat, headers=auth)).json()
        assert body["error"]["code"] == "invalid_api_key"


# --- limits, budgets, usage ----------------------------------------------------------------------


def test_limits_on_create_and_patch(world: World) -> None:
    admin = world.admin
    team = admin.ok("POST", "/teams", {"org_id": world.org, "name": "limited", "rpm_limit": 600})
    assert (team["rpm_limit"], team["tpm_limit"], team["max_concurrency"]) == (600, None, None)
    key = admin.ok(
        "POST", "/keys", {"team_id": team["id"], "name": "k", "rpm_limit": 60, "max_concurrency": 4}
    )
    assert (key["rpm_limit"], key["tpm_limit"], key["max_concurrency"]) == (60, None, 4)
    # PATCH: fields left out stay, null lifts that limit.
    patched = admin.ok("PATCH", f"/keys/{key['id']}/limits", {"tpm_limit": 10_000, "max_concurrency": None})
    assert (patched["rpm_limit"], patched["tpm_limit"], patched["max_concurrency"]) == (60, 10_000, None)
    assert admin.ok("GET", f"/keys/{key['id']}") == patched
    team = admin.ok("PATCH", f"/teams/{team['id']}/limits", {"rpm_limit": None, "tpm_limit": 50_000})
    assert (team["rpm_limit"], team["tpm_limit"]) == (None, 50_000)
    assert admin.ok("GET", f"/teams/{team['id']}")["tpm_limit"] == 50_000
    # Rotation keeps the limits.
    rotated = admin.ok("POST", f"/keys/{key['id']}/rotate")
    assert (rotated["rpm_limit"], rotated["tpm_limit"]) == (60, 10_000)
    # A developer creates keys but may not give them limits; the error names the field.
    denied = world.as_("developer")("POST", "/keys", {"name": "fast", "tpm_limit": 99})
    error = denied.json()["error"]
    assert denied.status_code == 403 and error["param"] == "tpm_limit" and "key limits" in error["message"]
    bad = admin("PATCH", f"/keys/{key['id']}/limits", {"rpm_limit": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "rpm_limit"
    empty = admin("PATCH", f"/keys/{key['id']}/limits", {})
    assert empty.status_code == 400 and "rpm_limit" in empty.json()["error"]["message"]


def test_rotate_is_atomic(world: World) -> None:
    """A rotation that cannot create the new key leaves the old one working (one transaction)."""
    from plinth.tenancy.service import TenancyService

    db = _database(world)
    service = TenancyService(db)
    key = service.create_key(world.team_a, "to-rotate").key
    original = service._insert_key

    def failing(*args: Any, **kwargs: Any) -> Any:
        original(*args, **kwargs)
        raise RuntimeError("disk full")

    service._insert_key = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        service.rotate_key(key.id)
    service._insert_key = original  # type: ignore[method-assign]
    assert service.get_key(key.id).revoked_at is None
    assert [k.id for k in service.list_keys(world.team_a) if k.rotated_from == key.id] == []
    rotated = service.rotate_key(key.id)
    assert service.get_key(key.id).revoked_reason == f"rotated to {rotated.key.id}"


def _database(world: World) -> Any:
    """The server's own database (to write usage records as the gateway would)."""
    return world.server.app.state.budgets.service.db


def _usage(world: World, when: dt.datetime, *, team: str, key: str, model: str, cost: float) -> None:
    from plinth.metering.models import UsageRecord

    with _database(world).session() as session:
        session.add(
            UsageRecord(
                request_id=uniq("req"),
                created_at=when,
                org_id=world.org,
                team_id=team,
                key_id=key,
                key_name="k",
                route="chat",
                model=model,
                status=200,
                input_tokens=100,
                output_tokens=10,
                cost_usd=cost,
            )
        )


def test_budgets_crud_status_and_scoping(world: World) -> None:
    admin = world.admin
    body = {"scope": "team", "scope_id": world.team_a, "period": "month", "limit_usd": 10}
    budget = admin.ok("POST", "/budgets", body)
    assert budget["object"] == "budget" and budget["soft_limit_usd"] is None
    replaced = admin.ok("POST", "/budgets", {**body, "limit_usd": 20, "soft_limit_usd": 15})
    assert replaced["id"] == budget["id"] and (replaced["limit_usd"], replaced["soft_limit_usd"]) == (20, 15)
    assert admin.ok("GET", f"/budgets/{budget['id']}") == replaced
    other = admin.ok("POST", "/budgets", {**body, "scope_id": world.team_b})
    key_budget = admin.ok(
        "POST", "/budgets", {"scope": "key", "scope_id": world.key_a, "period": "day", "limit_usd": 1}
    )
    org_budget = admin.ok(
        "POST", "/budgets", {"scope": "org", "scope_id": world.org, "period": "month", "limit_usd": 100}
    )
    every = {b["id"] for b in admin.ok("GET", "/budgets")["data"]}
    assert every == {budget["id"], other["id"], key_budget["id"], org_budget["id"]}
    assert [b["id"] for b in admin.ok("GET", "/budgets", scope="key")["data"]] == [key_budget["id"]]
    # Team members see their team's budget and its keys' budgets, nothing else.
    for role in ("team_admin", "developer"):
        seen = {b["id"] for b in world.as_(role).ok("GET", "/budgets")["data"]}
        assert seen == {budget["id"], key_budget["id"]}, role
    assert {b["id"] for b in world.as_("auditor").ok("GET", "/budgets")["data"]} == every
    denied = world.as_("team_admin")("POST", "/budgets", {**body, "scope": "org", "scope_id": world.org})
    assert denied.status_code == 403 and denied.json()["error"]["param"] == "scope"

    # Status: spend of this period from the usage records; reservations in flight from the tracker.
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
    _usage(world, now, team=world.team_a, key=world.key_a, model="gpt-4o-mini", cost=2.5)
    _usage(world, now - dt.timedelta(days=40), team=world.team_a, key=world.key_a, model="m", cost=100)
    status = admin.ok("GET", f"/budgets/{budget['id']}/status")
    assert (status["spent_usd"], status["reserved_usd"], status["remaining_usd"]) == (2.5, 0, 17.5)
    assert status["period_start"].endswith("-01T00:00:00Z") and status["limit_usd"] == 20
    from plinth.budgets.periods import window
    from plinth.budgets.tracker import NANO, Check, Rule

    tracker = world.server.app.state.budgets.tracker
    win = window("month", time.time())
    check = Check.of(Rule("team", world.team_a, "month", 20 * NANO), win)
    assert asyncio.run(tracker.reserve([check], 3 * NANO)) is None  # a request in flight holds $3
    status = admin.ok("GET", f"/budgets/{budget['id']}/status")
    assert (status["spent_usd"], status["reserved_usd"], status["remaining_usd"]) == (2.5, 3, 14.5)

    events = admin.ok("GET", "/budgets/events")
    assert events == {"object": "list", "data": []}
    deleted = admin.ok("DELETE", f"/budgets/{budget['id']}")
    assert deleted == {"id": budget["id"], "object": "budget", "deleted": True}
    assert admin("GET", f"/budgets/{budget['id']}").status_code == 404


def test_budget_events_are_listed_per_scope(world: World) -> None:
    from plinth.budgets.service import BudgetService, PendingEvent

    start = dt.datetime(2026, 1, 1)
    BudgetService(_database(world)).record_events(
        [
            PendingEvent("team", world.team_a, "month", start, "soft", 10.0, 8.0),
            PendingEvent("team", world.team_b, "month", start, "hard", 10.0, 10.0),
        ]
    )
    assert len(world.admin.ok("GET", "/budgets/events")["data"]) == 2
    mine = world.as_("developer").ok("GET", "/budgets/events")["data"]
    assert [(e["scope_id"], e["kind"], e["spent_usd"]) for e in mine] == [(world.team_a, "soft", 8.0)]
    hard = world.admin.ok("GET", "/budgets/events", scope="team", scope_id=world.team_b)["data"]
    assert [e["kind"] for e in hard] == ["hard"]


def test_usage_report_json_and_csv(world: World) -> None:
    now = dt.datetime.now(dt.UTC).replace(tzinfo=None, microsecond=0)
    for team, key, model, cost in [
        (world.team_a, world.key_a, "gpt-4o-mini", 0.5),
        (world.team_a, world.key_a, "gpt-4o-mini", 0.25),
        (world.team_a, world.key_a, "claude", 1.0),
        (world.team_b, world.key_b, "gpt-4o-mini", 4.0),
    ]:
        _usage(world, now, team=team, key=key, model=model, cost=cost)
    _usage(world, now - dt.timedelta(days=40), team=world.team_a, key=world.key_a, model="old", cost=9)
    admin = world.admin
    report = admin.ok("GET", "/usage", group_by="team,model")
    assert report["group_by"] == ["team", "model"] and report["since"].endswith("-01T00:00:00Z")
    rows = {(r["team_id"], r["model"]): (r["requests"], r["cost_usd"]) for r in report["data"]}
    assert rows == {
        (world.team_a, "claude"): (1, 1.0),
        (world.team_a, "gpt-4o-mini"): (2, 0.75),
        (world.team_b, "gpt-4o-mini"): (1, 4.0),
    }
    # A developer sees their own team only, whatever they group by.
    mine = world.as_("developer").ok("GET", "/usage", group_by="team")["data"]
    assert [(r["team_id"], r["cost_usd"]) for r in mine] == [(world.team_a, 1.75)]
    total = admin.ok("GET", "/usage", group_by="", model="gpt-4o-mini")["data"]
    assert [(r["requests"], r["cost_usd"]) for r in total] == [(3, 4.75)]
    since = (now - dt.timedelta(days=60)).date().isoformat()
    old = admin.ok("GET", "/usage", group_by="day,model", since=since, key_id=world.key_a)["data"]
    assert {r["model"] for r in old} == {"old", "gpt-4o-mini", "claude"}

    csv_response = admin("GET", "/usage.csv", group_by="team,model", team_id=world.team_a)
    assert csv_response.status_code == 200
    assert csv_response.headers["content-type"].startswith("text/csv")
    assert csv_response.headers["content-disposition"].startswith('attachment; filename="plinth-usage-')
    lines = csv_response.text.splitlines()
    assert lines[0] == "team_id,model,requests,input_tokens,output_tokens,cached_input_tokens,cost_usd"
    assert lines[1:] == [
        f"{world.team_a},claude,1,100,10,0,1.000000",
        f"{world.team_a},gpt-4o-mini,2,200,20,0,0.750000",
    ]


def test_concurrent_rotations_issue_one_key(world: World) -> None:
    """Two rotations of one key at once: one wins, the other is told the key is revoked."""
    from concurrent.futures import ThreadPoolExecutor

    key = world.fresh_key(world.team_a)
    with ThreadPoolExecutor(4) as pool:
        codes = sorted(pool.map(lambda _: world.admin("POST", f"/keys/{key}/rotate").status_code, range(4)))
    assert codes == [200, 400, 400, 400]
    keys = world.admin.ok("GET", "/keys", team_id=world.team_a, include_revoked="true")["data"]
    assert len([k for k in keys if k["rotated_from"] == key]) == 1
