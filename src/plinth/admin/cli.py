"""`plinth orgs|teams|projects|keys|users|budgets|usage …`: the admin API from the command line.

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
budgets_app = typer.Typer(help="Spend limits per key, team or organization.", no_args_is_help=True)
usage_app = typer.Typer(help="Spend reports.")

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

RpmOption = Annotated[int | None, typer.Option("--rpm", min=1, help="Requests per minute.")]
TpmOption = Annotated[int | None, typer.Option("--tpm", min=1, help="Tokens per minute.")]
ConcurrencyOption = Annotated[
    int | None, typer.Option("--max-concurrency", min=1, help="Requests in flight at once.")
]
# For `limits`: a number, or `none` to lift that limit; left out, a limit stays as it is.
_LIMIT_HELP = "a whole number, or 'none' for no limit"
SetRpmOption = Annotated[str | None, typer.Option("--rpm", help=f"Requests per minute: {_LIMIT_HELP}.")]
SetTpmOption = Annotated[str | None, typer.Option("--tpm", help=f"Tokens per minute: {_LIMIT_HELP}.")]
SetConcurrencyOption = Annotated[
    str | None, typer.Option("--max-concurrency", help=f"Requests in flight: {_LIMIT_HELP}.")
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
        """The JSON answer of one API call; exits with a one-line error on any failure."""
        response = self.request(method, path, body=body, **params)
        try:
            data = response.json()
        except ValueError:
            data = None
        if data is None:
            _fail(f"{self.url} answered something that is not JSON; is it a Plinth gateway?")
        return data

    def request(
        self, method: str, path: str, *, body: dict[str, Any] | None = None, **params: Any
    ) -> httpx.Response:
        """The successful response itself (for downloads such as CSV)."""
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
        if response.status_code >= 400:
            try:
                data = response.json()
            except ValueError:
                data = None
            error = data.get("error") if isinstance(data, dict) else None
            message = error.get("message") if isinstance(error, dict) else None
            _fail(f"{message or response.reason_phrase} (HTTP {response.status_code})")
        return response


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
LIMIT_COLUMNS = [("rpm_limit", "RPM"), ("tpm_limit", "TPM"), ("max_concurrency", "Concurrency")]
TEAM_COLUMNS = [
    ("id", "ID"),
    ("name", "Name"),
    ("org_id", "Organization"),
    *LIMIT_COLUMNS,
    ("created_at", "Created (UTC)"),
]
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
    *LIMIT_COLUMNS,
    ("expires_at", "Expires (UTC)"),
    ("created_by", "Created by"),
    ("created_at", "Created (UTC)"),
    ("revoked_at", "Revoked (UTC)"),
    ("revoked_reason", "Revoked because"),
    ("rotated_from", "Rotated from"),
]
BUDGET_COLUMNS = [
    ("id", "ID"),
    ("scope", "Scope"),
    ("scope_id", "Of"),
    ("period", "Period"),
    ("limit_usd", "Limit USD"),
    ("soft_limit_usd", "Soft USD"),
    ("updated_at", "Updated (UTC)"),
]
BUDGET_STATUS_COLUMNS = [
    *BUDGET_COLUMNS[:6],
    ("period_start", "Period from (UTC)"),
    ("period_end", "Period to (UTC)"),
    ("spent_usd", "Spent USD"),
    ("reserved_usd", "Reserved USD"),
    ("remaining_usd", "Remaining USD"),
]
EVENT_COLUMNS = [
    ("created_at", "When (UTC)"),
    ("scope", "Scope"),
    ("scope_id", "Of"),
    ("period", "Period"),
    ("kind", "Kind"),
    ("limit_usd", "Limit USD"),
    ("spent_usd", "Spent USD"),
]
USAGE_HEADERS = {
    "team_id": "Team",
    "key_id": "Key",
    "key_name": "Key name",
    "model": "Model",
    "day": "Day",
    "org_id": "Organization",
    "project_id": "Project",
    "deployment": "Deployment",
    "route": "Route",
    "status": "Status",
    "requests": "Requests",
    "input_tokens": "Input tok",
    "output_tokens": "Output tok",
    "cached_input_tokens": "Cached tok",
    "cost_usd": "Cost USD",
}
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
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    concurrency: ConcurrencyOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a team in an organization, optionally with limits shared by its keys."""
    body = {"org_id": org, "name": name, **_limits(rpm, tpm, concurrency)}
    _show(AdminClient(url, token).call("POST", "/teams", body=body), TEAM_COLUMNS, as_json)


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


def _limits(rpm: int | None, tpm: int | None, concurrency: int | None) -> dict[str, int]:
    """The limit fields of a create body; only those given, so the server's defaults apply."""
    given = {"rpm_limit": rpm, "tpm_limit": tpm, "max_concurrency": concurrency}
    return {name: value for name, value in given.items() if value is not None}


def _limit_patch(rpm: str | None, tpm: str | None, concurrency: str | None) -> dict[str, int | None]:
    """The body of a limits PATCH: numbers, None for `none`; options left out are not sent."""
    patch: dict[str, int | None] = {}
    for name, option, text in (
        ("rpm_limit", "--rpm", rpm),
        ("tpm_limit", "--tpm", tpm),
        ("max_concurrency", "--max-concurrency", concurrency),
    ):
        if text is None:
            continue
        if text.strip().lower() in ("none", "unlimited", "null"):
            patch[name] = None
        elif text.strip().isdigit() and int(text) >= 1:
            patch[name] = int(text)
        else:
            raise typer.BadParameter(f"'{text}' is not {_LIMIT_HELP}", param_hint=option)
    if not patch:
        raise typer.BadParameter("give at least one of --rpm, --tpm, --max-concurrency")
    return patch


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
    rpm: RpmOption = None,
    tpm: TpmOption = None,
    concurrency: ConcurrencyOption = None,
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
        **_limits(rpm, tpm, concurrency),
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


@keys_app.command("limits")
def keys_limits(
    key_id: str,
    rpm: SetRpmOption = None,
    tpm: SetTpmOption = None,
    concurrency: SetConcurrencyOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a key's limits ('none' lifts one; those not given stay)."""
    body = _limit_patch(rpm, tpm, concurrency)
    data = AdminClient(url, token).call("PATCH", f"/keys/{_segment(key_id)}/limits", body=body)
    _show(data, KEY_DETAIL_COLUMNS, as_json)


@teams_app.command("limits")
def teams_limits(
    team_id: str,
    rpm: SetRpmOption = None,
    tpm: SetTpmOption = None,
    concurrency: SetConcurrencyOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change the limits a team's keys share ('none' lifts one; those not given stay)."""
    body = _limit_patch(rpm, tpm, concurrency)
    data = AdminClient(url, token).call("PATCH", f"/teams/{_segment(team_id)}/limits", body=body)
    _show(data, TEAM_COLUMNS, as_json)


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


# --- budgets ---------------------------------------------------------------------------------------


class PeriodChoice(StrEnum):
    day = "day"
    month = "month"


class ScopeChoice(StrEnum):
    key = "key"
    team = "team"
    org = "org"


def _scope(key: str | None, team: str | None, org: str | None, *, required: bool) -> tuple[str, str] | None:
    given = [(scope, ident) for scope, ident in (("key", key), ("team", team), ("org", org)) if ident]
    if len(given) > 1:
        raise typer.BadParameter("give one of --key, --team, --org")
    if not given:
        if required:
            raise typer.BadParameter("give one of --key, --team, --org: whose budget it is")
        return None
    return given[0]


ScopeKeyOption = Annotated[str | None, typer.Option("--key", help="Key id.")]
ScopeTeamOption = Annotated[str | None, typer.Option("--team", help="Team id.")]
ScopeOrgOption = Annotated[str | None, typer.Option("--org", help="Organization id.")]


@budgets_app.command("set")
def budgets_set(
    limit: Annotated[float, typer.Option("--limit", min=0, help="Hard limit in USD (429 once reached).")],
    key: ScopeKeyOption = None,
    team: ScopeTeamOption = None,
    org: ScopeOrgOption = None,
    period: Annotated[PeriodChoice, typer.Option("--period", help="UTC day or month.")] = PeriodChoice.month,
    soft: Annotated[
        float | None, typer.Option("--soft", min=0, help="Soft limit in USD: an alert event, no refusal.")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create or replace the budget of a key, team or organization for a period."""
    scope = _scope(key, team, org, required=True)
    assert scope is not None
    body = {
        "scope": scope[0],
        "scope_id": scope[1],
        "period": period.value,
        "limit_usd": limit,
        "soft_limit_usd": soft,
    }
    _show(AdminClient(url, token).call("POST", "/budgets", body=body), BUDGET_COLUMNS, as_json)


@budgets_app.command("list")
def budgets_list(
    key: ScopeKeyOption = None,
    team: ScopeTeamOption = None,
    org: ScopeOrgOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List budgets (all you may see, or those of one key, team or organization)."""
    scope = _scope(key, team, org, required=False) or (None, None)
    data = AdminClient(url, token).call("GET", "/budgets", scope=scope[0], scope_id=scope[1])
    _show(data, BUDGET_COLUMNS, as_json)


@budgets_app.command("show")
def budgets_show(
    budget_id: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Show a budget with this period's spent, reserved (in flight) and remaining USD."""
    data = AdminClient(url, token).call("GET", f"/budgets/{_segment(budget_id)}/status")
    _show(data, BUDGET_STATUS_COLUMNS, as_json)


@budgets_app.command("delete")
def budgets_delete(
    budget_id: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Delete a budget; gateways stop enforcing it within about a second."""
    data = AdminClient(url, token).call("DELETE", f"/budgets/{_segment(budget_id)}")
    if as_json:
        _print_json(data)
    else:
        typer.echo(f"Deleted budget {data['id']}.")


@budgets_app.command("events")
def budgets_events(
    key: ScopeKeyOption = None,
    team: ScopeTeamOption = None,
    org: ScopeOrgOption = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="At most this many.")] = 100,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Soft and hard limit crossings, newest first."""
    scope = _scope(key, team, org, required=False) or (None, None)
    data = AdminClient(url, token).call(
        "GET", "/budgets/events", scope=scope[0], scope_id=scope[1], limit=limit
    )
    if not as_json and not data["data"]:
        typer.echo("No budget events.")
        return
    _show(data, EVENT_COLUMNS, as_json)


# --- usage -----------------------------------------------------------------------------------------


@usage_app.callback(invoke_without_command=True)
def usage(
    by: Annotated[
        str,
        typer.Option(
            "--by",
            help="Group by, comma-separated: team, key, model, day, org, project, deployment, "
            "route, status ('' for one total).",
        ),
    ] = "team,model",
    since: Annotated[
        str | None, typer.Option("--since", help="From this ISO date/time, inclusive (default: this month).")
    ] = None,
    until: Annotated[
        str | None, typer.Option("--until", help="To this ISO date/time, exclusive (default: next month).")
    ] = None,
    team: Annotated[str | None, typer.Option("--team", help="Only this team.")] = None,
    key: Annotated[str | None, typer.Option("--key", help="Only this key id.")] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model.")] = None,
    csv_file: Annotated[
        str | None,
        typer.Option("--csv", metavar="FILE", help="Write the report as CSV to FILE ('-': stdout)."),
    ] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Spend by team, key, model, day (or any mix) over a time range: a table, JSON or CSV."""
    client = AdminClient(url, token)
    query: dict[str, Any] = {
        "group_by": by,
        "since": since,
        "until": until,
        "team_id": team,
        "key_id": key,
        "model": model,
    }
    if csv_file is not None:
        text = client.request("GET", "/usage.csv", **query).text
        if csv_file == "-":
            typer.echo(text, nl=False)
        else:
            try:
                with open(csv_file, "w", encoding="utf-8", newline="") as out:
                    out.write(text)
            except OSError as exc:
                _fail(f"cannot write {csv_file}: {exc.strerror or exc}")
            _err.print(f"Wrote {max(0, len(text.splitlines()) - 1)} rows to {csv_file}.")
        return
    report = client.call("GET", "/usage", **query)
    if as_json:
        _print_json(report)
        return
    rows: list[dict[str, Any]] = report["data"]
    columns = [name for name in (rows[0] if rows else {}) if name in USAGE_HEADERS]
    table = Table(title=f"Spend {_cell(report['since'])} to {_cell(report['until'])} UTC")
    for name in columns:
        if name.endswith("_id"):  # ids never wrap (a folded id cannot be copied)
            table.add_column(USAGE_HEADERS[name], no_wrap=True)
            continue
        numeric = name in ("requests", "input_tokens", "output_tokens", "cached_input_tokens", "cost_usd")
        table.add_column(USAGE_HEADERS[name], justify="right" if numeric else "left", overflow="fold")
    for row in rows:
        table.add_row(
            *(f"{row[name]:.6f}" if name == "cost_usd" else _cell(row.get(name)) for name in columns)
        )
    if rows:
        Console().print(table)
        total = sum(float(row["cost_usd"]) for row in rows)
        typer.echo(f"Total: {sum(int(row['requests']) for row in rows)} requests, {total:.6f} USD")
    else:
        typer.echo("No usage in this range.")
