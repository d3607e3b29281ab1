"""`plinth orgs|teams|projects|keys|users …`: the admin API from the command line.

The commands talk to a running gateway over HTTP (never to the database directly), so they work
the same against a laptop and a remote cluster, and every permission check happens in one place:
the server. Output is a table, or the API's JSON with `--json`. Exit codes: 1 when the API or the
network refuses, 2 for usage errors (including a missing credential).
"""

from __future__ import annotations

import datetime as dt
import json
from enum import StrEnum
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table

DEFAULT_URL = "http://127.0.0.1:4000"
# The same values as plinth.tenancy.models.Role / DataClass (a test keeps them equal); repeated
# here so the CLI does not import the database layer.


class RoleChoice(StrEnum):
    platform_admin = "platform_admin"
    team_admin = "team_admin"
    developer = "developer"
    auditor = "auditor"


class DataClassChoice(StrEnum):
    public = "public"
    internal = "internal"
    confidential = "confidential"
    restricted = "restricted"


orgs_app = typer.Typer(help="Organizations.", no_args_is_help=True)
teams_app = typer.Typer(help="Teams inside organizations.", no_args_is_help=True)
projects_app = typer.Typer(help="Projects (applications) inside teams.", no_args_is_help=True)
keys_app = typer.Typer(help="Virtual API keys.", no_args_is_help=True)
users_app = typer.Typer(help="Users of the admin API and their roles.", no_args_is_help=True)

UrlOption = Annotated[str, typer.Option("--url", envvar="PLINTH_URL", help="Base URL of the Plinth gateway.")]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar=["PLINTH_TOKEN", "PLINTH_ADMIN_KEY"],
        help="User token (pt-...) or admin key; prefer the PLINTH_TOKEN / PLINTH_ADMIN_KEY variables.",
        show_default=False,
        show_envvar=True,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
TeamOption = Annotated[
    str | None, typer.Option("--team", help="Team id (default for team members: their own team).")
]

_err = Console(stderr=True, highlight=False)


def _fail(message: str, code: int = 1) -> NoReturn:
    _err.print(f"[red]Error:[/red] {message}", soft_wrap=True, markup=True)
    raise typer.Exit(code)


class AdminClient:
    """A thin HTTP client: one request, one line of error on failure."""

    def __init__(self, url: str, token: str | None) -> None:
        if not token:
            _fail("no credential: set PLINTH_TOKEN (a user token) or PLINTH_ADMIN_KEY, or pass --token.", 2)
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, *, body: dict[str, Any] | None = None, **params: Any) -> Any:
        query = {name: value for name, value in params.items() if value is not None}
        try:
            response = httpx.request(
                method,
                self.url + "/api" + path,
                json=body,
                params=query,
                headers={"authorization": f"Bearer {self.token}"},
                timeout=30,
            )
        except (httpx.UnsupportedProtocol, httpx.InvalidURL):
            _fail(f"invalid --url / PLINTH_URL '{self.url}': give e.g. {DEFAULT_URL}", 2)
        except httpx.ConnectError:
            _fail(f"cannot reach Plinth at {self.url}")
        except httpx.TimeoutException:
            _fail(f"Plinth at {self.url} did not answer in time")
        except httpx.HTTPError as exc:
            _fail(f"cannot talk to Plinth at {self.url}: {exc}")
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400:
            error = data.get("error") if isinstance(data, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            _fail(f"{message or response.reason_phrase} (HTTP {response.status_code})")
        if data is None:
            _fail(f"{self.url} answered something that is not JSON; is it a Plinth gateway?")
        return data


# --- output ----------------------------------------------------------------------------------------


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(item) for item in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    if isinstance(value, str) and len(value) >= 19 and value[4] == "-" and value[10] == "T":
        return value[:16].replace("T", " ")  # timestamps to the minute, UTC
    return str(value)


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> None:
    """Several records: one row each. Ids and prefixes never wrap; other cells fold, never hide."""
    table = Table()
    for field, header in columns:
        no_wrap = field in ("id", "prefix")
        table.add_column(header, no_wrap=no_wrap, overflow="ellipsis" if no_wrap else "fold")
    for row in rows:
        table.add_row(*(_cell(row.get(field)) for field, _ in columns))
    Console().print(table)


def _record(row: dict[str, Any], columns: list[tuple[str, str]]) -> None:
    """One record: a field/value table, readable however many fields it has."""
    table = Table(show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for field, header in columns:
        table.add_row(header, _cell(row.get(field)))
    Console().print(table)


def _show(data: Any, columns: list[tuple[str, str]], as_json: bool) -> None:
    """A list response (`{"data": [...]}`) as a table, or one object as a record; or either as JSON."""
    rows = data["data"] if isinstance(data, dict) and isinstance(data.get("data"), list) else None
    if as_json:
        _print_json(rows if rows is not None else data)
    elif rows is not None:
        _table(rows, columns)
    else:
        _record(data, columns)


def _show_secret(data: dict[str, Any], field: str, columns: list[tuple[str, str]], as_json: bool) -> None:
    """A created key or user: the record, then its secret, which the server never shows again."""
    what = "key" if field == "key" else "token"
    if as_json:
        _print_json(data)
    else:
        _record(data, columns)
        typer.echo(f"{what}: {data[field]}")
    _err.print(f"[yellow]Save this {what} now: it cannot be shown again.[/yellow]", markup=True)


ORG_COLUMNS = [("id", "ID"), ("name", "Name"), ("created_at", "Created (UTC)")]
TEAM_COLUMNS = [("id", "ID"), ("name", "Name"), ("org_id", "Organization"), ("created_at", "Created (UTC)")]
PROJECT_COLUMNS = [("id", "ID"), ("name", "Name"), ("team_id", "Team"), ("created_at", "Created (UTC)")]
KEY_COLUMNS = [  # the list view; `keys show` and --json have every field
    ("id", "ID"),
    ("name", "Name"),
    ("prefix", "Prefix"),
    ("status", "Status"),
    ("models", "Models"),
    ("environment", "Env"),
    ("expires_at", "Expires (UTC)"),
]
KEY_DETAIL_COLUMNS = [
    ("id", "ID"),
    ("name", "Name"),
    ("prefix", "Prefix"),
    ("team_id", "Team"),
    ("project_id", "Project"),
    ("status", "Status"),
    ("models", "Models"),
    ("environment", "Env"),
    ("data_class", "Data class"),
    ("tags", "Tags"),
    ("metadata", "Metadata"),
    ("expires_at", "Expires (UTC)"),
    ("created_by", "Created by"),
    ("created_at", "Created (UTC)"),
    ("revoked_at", "Revoked (UTC)"),
    ("revoked_reason", "Revoked because"),
    ("rotated_from", "Rotated from"),
]
USER_COLUMNS = [
    ("id", "ID"),
    ("email", "Email"),
    ("name", "Name"),
    ("role", "Role"),
    ("team_id", "Team"),
    ("token_prefix", "Token prefix"),
]


# --- organizations, teams, projects ------------------------------------------------------------------


@orgs_app.command("create")
def orgs_create(
    name: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Create an organization."""
    _show(AdminClient(url, token).call("POST", "/orgs", body={"name": name}), ORG_COLUMNS, as_json)


@orgs_app.command("list")
def orgs_list(url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """List organizations."""
    _show(AdminClient(url, token).call("GET", "/orgs"), ORG_COLUMNS, as_json)


@teams_app.command("create")
def teams_create(
    name: str,
    org: Annotated[str, typer.Option("--org", help="Organization id.")],
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a team in an organization."""
    data = AdminClient(url, token).call("POST", "/teams", body={"org_id": org, "name": name})
    _show(data, TEAM_COLUMNS, as_json)


@teams_app.command("list")
def teams_list(
    org: Annotated[str | None, typer.Option("--org", help="Only this organization's teams.")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List teams."""
    _show(AdminClient(url, token).call("GET", "/teams", org_id=org), TEAM_COLUMNS, as_json)


@teams_app.command("show")
def teams_show(
    team_id: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Show one team."""
    _show(AdminClient(url, token).call("GET", f"/teams/{_segment(team_id)}"), TEAM_COLUMNS, as_json)


@projects_app.command("create")
def projects_create(
    name: str,
    team: TeamOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a project in a team."""
    data = AdminClient(url, token).call("POST", "/projects", body={"team_id": team, "name": name})
    _show(data, PROJECT_COLUMNS, as_json)


@projects_app.command("list")
def projects_list(
    team: TeamOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List projects."""
    _show(AdminClient(url, token).call("GET", "/projects", team_id=team), PROJECT_COLUMNS, as_json)


# --- keys ------------------------------------------------------------------------------------------


def _metadata(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise typer.BadParameter(f"'{pair}' is not KEY=VALUE", param_hint="--meta")
        out[name] = value
    return out


def _segment(ident: str) -> str:
    """An id as one URL path segment (an id with '/' must not reach another endpoint)."""
    return quote(ident, safe="")


@keys_app.command("create")
def keys_create(
    name: str,
    team: TeamOption = None,
    project: Annotated[str | None, typer.Option("--project", help="Project id.")] = None,
    model: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="Allowed model (repeat); default: all.")
    ] = None,
    expires_in_days: Annotated[int | None, typer.Option("--expires-in-days", min=1, max=3650)] = None,
    expires_at: Annotated[
        dt.datetime | None, typer.Option("--expires-at", help="Expiry, UTC unless an offset is given.")
    ] = None,
    env: Annotated[str | None, typer.Option("--env", help="Environment, e.g. dev or prod.")] = None,
    data_class: Annotated[
        DataClassChoice, typer.Option("--data-class", help="Highest data classification allowed.")
    ] = DataClassChoice.internal,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Free tag (repeat).")] = None,
    meta: Annotated[list[str] | None, typer.Option("--meta", help="Metadata KEY=VALUE (repeat).")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a virtual API key; its secret is printed once."""
    if expires_in_days is not None and expires_at is not None:
        raise typer.BadParameter("give --expires-in-days or --expires-at, not both")
    body: dict[str, Any] = {
        "team_id": team,
        "name": name,
        "project_id": project,
        "models": model or None,
        "expires_in_days": expires_in_days,
        "expires_at": expires_at.isoformat() if expires_at is not None else None,
        "environment": env,
        "data_class": data_class.value,
        "tags": tag or [],
        "metadata": _metadata(meta or []),
    }
    data = AdminClient(url, token).call("POST", "/keys", body=body)
    _show_secret(data, "key", KEY_DETAIL_COLUMNS, as_json)


@keys_app.command("list")
def keys_list(
    team: TeamOption = None,
    include_revoked: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List keys (their prefixes; secrets are never shown again)."""
    revoked = "true" if include_revoked else None
    _show(
        AdminClient(url, token).call("GET", "/keys", team_id=team, include_revoked=revoked),
        KEY_COLUMNS,
        as_json,
    )


@keys_app.command("show")
def keys_show(
    key_id: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Show one key."""
    _show(AdminClient(url, token).call("GET", f"/keys/{_segment(key_id)}"), KEY_DETAIL_COLUMNS, as_json)


@keys_app.command("rotate")
def keys_rotate(
    key_id: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Replace a key with a new secret (same settings); the old one is revoked."""
    data = AdminClient(url, token).call("POST", f"/keys/{_segment(key_id)}/rotate")
    _show_secret(data, "key", KEY_DETAIL_COLUMNS, as_json)


@keys_app.command("revoke")
def keys_revoke(
    key_id: str,
    reason: Annotated[str | None, typer.Option("--reason", help="Why (kept with the key).")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke a key; gateways refuse it within about a second."""
    data = AdminClient(url, token).call("POST", f"/keys/{_segment(key_id)}/revoke", body={"reason": reason})
    _show(data, KEY_DETAIL_COLUMNS, as_json)


# --- users -----------------------------------------------------------------------------------------


@users_app.command("create")
def users_create(
    email: str,
    role: Annotated[RoleChoice, typer.Option("--role", help="The user's role.")],
    team: Annotated[str | None, typer.Option("--team", help="Team id (team_admin, developer).")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Display name.")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a user; their personal token is printed once."""
    body = {"email": email, "role": role.value, "team_id": team, "name": name}
    data = AdminClient(url, token).call("POST", "/users", body=body)
    _show_secret(data, "token", USER_COLUMNS, as_json)


@users_app.command("list")
def users_list(url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """List users."""
    _show(AdminClient(url, token).call("GET", "/users"), USER_COLUMNS, as_json)
