"""The admin API under `/api/`: one table of operations drives routing, auth and the OpenAPI document.

Each `Operation` names its method, path, permission, body/query/response models and a plain
synchronous handler. The handlers call `TenancyService`, `BudgetService` and the spend reports
(blocking database I/O), so they run in a worker thread; nothing here is on the model-serving hot path. Every failure is answered in the
OpenAI error shape with a fitting status, never a traceback.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import orjson
from pydantic import BaseModel, ValidationError
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route

from plinth.admin import schemas as s
from plinth.admin.auth import ADMIN_ACTOR, VIRTUAL_KEY_REFUSED, Actor
from plinth.budgets.admission import BudgetAdmission
from plinth.budgets.models import Budget, BudgetScope
from plinth.budgets.periods import Window, window
from plinth.budgets.service import BudgetService
from plinth.budgets.tracker import NANO, Check, Rule, SpendTracker
from plinth.gateway import openai_protocol
from plinth.gateway.errors import GatewayError
from plinth.gateway.pipeline import Endpoint, error_response, new_context
from plinth.metering import reports
from plinth.storage import utcnow
from plinth.tenancy.keys import KeyStore, key_digest
from plinth.tenancy.models import ApiKey, Role, User
from plinth.tenancy.service import KEY_PREFIX, Conflict, NotFound, TenancyError, TenancyService

ADMIN = Endpoint("admin", openai_protocol.error_body)
MAX_BODY_BYTES = 1 << 20
PREFIX = "/api"

B = TypeVar("B", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Call:
    """One admin request after authentication and parsing, as a handler sees it."""

    actor: Actor
    path: dict[str, str]
    body: BaseModel | None
    query: BaseModel | None
    # The gateway's budget tracker and event loop, to read reservations in flight (budget status).
    tracker: SpendTracker | None = None
    loop: asyncio.AbstractEventLoop | None = None
    request_id: str | None = None  # for the audit trail

    def body_as(self, model: type[B]) -> B:
        assert isinstance(self.body, model)
        return self.body

    def query_as(self, model: type[B]) -> B:
        assert isinstance(self.query, model)
        return self.query


@dataclass(frozen=True, slots=True)
class Operation:
    method: str
    path: str  # relative to /api, Starlette/OpenAPI style: "/keys/{key_id}"
    handler: Callable[[Call], BaseModel]
    response: type[BaseModel]
    summary: str
    tag: str
    permission: str | None = None  # None: any admin credential
    doing: str = ""  # for the 403 message: "Role 'x' may not <doing>."
    status: int = 200
    body: type[BaseModel] | None = None
    body_optional: bool = False
    query: type[BaseModel] | None = None
    public: bool = False  # no credential needed (the OpenAPI document)
    media_type: str = "application/json"  # "text/csv": the handler returns `CsvOut`
    errors: tuple[int, ...] = field(default=())

    @property
    def operation_id(self) -> str:
        return self.handler.__name__.lstrip("_")


def _error(exc: TenancyError) -> GatewayError:
    code = "not_found" if isinstance(exc, NotFound) else "conflict" if isinstance(exc, Conflict) else None
    return GatewayError(exc.status, str(exc), code=code or "invalid_value")


def _validation_error(exc: ValidationError, where: str) -> GatewayError:
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")  # our own validators' messages read alone
    if first["type"] == "missing":
        return GatewayError(400, f"Missing {where} field '{loc}'.", param=loc, code="missing_field")
    if first["type"] == "extra_forbidden":
        return GatewayError(400, f"Unknown {where} field '{loc}'.", param=loc, code="unknown_field")
    text = f"Invalid {where} field '{loc}': {message}." if loc else f"Invalid {where}: {message}."
    return GatewayError(400, text, param=loc or None, code="invalid_value")


class AdminExtension(Protocol):
    """A later part of the product (governance, knowledge bases, ...) adding its own operations.

    Its operations share the route table, so authentication, permission checks, error shapes and the
    OpenAPI document work for them exactly as for the built-in ones.
    """

    def operations(self) -> list[Operation]: ...


@runtime_checkable
class AdminObserver(Protocol):
    """An extension told about every admin call after its handler ran or was refused (the audit
    trail records them). Called in a worker thread; it may block."""

    def observe(
        self, operation: Operation, call: Call, result: BaseModel | None, error: GatewayError | None
    ) -> None: ...


class AdminApi:
    """The handlers, bound to one tenancy service and the gateway's key store."""

    def __init__(
        self, tenancy: TenancyService, keys: KeyStore, extensions: Sequence[AdminExtension] = ()
    ) -> None:
        self.tenancy = tenancy
        self.budgets = BudgetService(tenancy.db)
        self.keys = keys
        self.operations = self._operations()
        for extension in extensions:
            self.operations.extend(extension.operations())
        self.observers = [e for e in extensions if isinstance(e, AdminObserver)]
        self._openapi: bytes | None = None

    # --- authentication --------------------------------------------------------------------

    def authenticate(self, authorization: str | None) -> Actor:
        """Resolve the bearer credential to an actor. Blocking (a user token is looked up in the DB)."""
        scheme, _, value = (authorization or "").partition(" ")
        presented = value.strip() if scheme.lower() == "bearer" else ""
        if not presented:
            raise GatewayError(
                401,
                "Missing credential: send 'Authorization: Bearer <admin key or user token>'.",
                code="missing_api_key",
            )
        principal = self.keys.authenticate(presented)
        if principal is not None:
            if principal.is_admin:
                return ADMIN_ACTOR
            raise GatewayError(403, VIRTUAL_KEY_REFUSED, code="not_admin_credential")
        user = self.tenancy.user_by_token(presented)
        if user is not None:
            return Actor(kind="user", role=Role(user.role), team_id=user.team_id, user=user)
        if presented.startswith(KEY_PREFIX) and self._is_virtual_key(presented):
            # A key created in the last instant, not yet in the key cache: still not an admin credential.
            raise GatewayError(403, VIRTUAL_KEY_REFUSED, code="not_admin_credential")
        # Never echo any part of the presented credential.
        raise GatewayError(401, "Invalid admin key or user token.", code="invalid_api_key")

    def _is_virtual_key(self, presented: str) -> bool:
        with self.tenancy.db.session() as session:
            digest = key_digest(presented)
            return session.scalar(select(ApiKey.id).where(ApiKey.key_hash == digest)) is not None

    # --- organizations, teams, projects ----------------------------------------------------

    def _create_org(self, call: Call) -> s.OrgOut:
        """Create an organization, the top of the tenancy tree."""
        return s.OrgOut.of(self.tenancy.create_org(call.body_as(s.OrgCreate).name))

    def _list_orgs(self, call: Call) -> s.OrgList:
        """List organizations by name."""
        return s.OrgList(data=[s.OrgOut.of(org) for org in self.tenancy.list_orgs()])

    def _create_team(self, call: Call) -> s.TeamOut:
        """Create a team inside an organization."""
        body = call.body_as(s.TeamCreate)
        return s.TeamOut.of(self.tenancy.create_team(body.org_id, body.name, **body.limits()))

    def _set_team_limits(self, call: Call) -> s.TeamOut:
        """Change a team's shared limits; fields left out stay, null removes a limit."""
        team = self.tenancy.get_team(call.path["team_id"])
        limits = call.body_as(s.LimitsPatch).merged(team)
        return s.TeamOut.of(self.tenancy.set_team_limits(team.id, **limits))

    def _list_teams(self, call: Call) -> s.TeamList:
        """List teams, optionally of one organization; team members see only their own team."""
        teams = self.tenancy.list_teams(call.query_as(s.TeamQuery).org_id)
        if call.actor.team_scoped:
            teams = [team for team in teams if team.id == call.actor.team_id]
        return s.TeamList(data=[s.TeamOut.of(team) for team in teams])

    def _get_team(self, call: Call) -> s.TeamOut:
        """Show one team."""
        team_id = call.path["team_id"]
        call.actor.check_team(team_id)
        return s.TeamOut.of(self.tenancy.get_team(team_id))

    def _create_project(self, call: Call) -> s.ProjectOut:
        """Create a project (an application) inside a team."""
        body = call.body_as(s.ProjectCreate)
        team_id = call.actor.team_or_own(body.team_id)
        return s.ProjectOut.of(self.tenancy.create_project(team_id, body.name))

    def _list_projects(self, call: Call) -> s.ProjectList:
        """List projects, optionally of one team (team members: their own team by default)."""
        team_id = call.query_as(s.ProjectQuery).team_id
        if call.actor.team_scoped:
            team_id = call.actor.team_or_own(team_id)
        return s.ProjectList(data=[s.ProjectOut.of(p) for p in self.tenancy.list_projects(team_id)])

    # --- keys ------------------------------------------------------------------------------

    def _create_key(self, call: Call) -> s.CreatedKeyOut:
        """Create a virtual API key. The secret is in `key` and is never shown again."""
        body = call.body_as(s.KeyCreate)
        team_id = call.actor.team_or_own(body.team_id)
        limits = body.limits()
        given = [name for name, value in limits.items() if value is not None]
        if given:
            # Developers may create keys but not give them limits (that is the team admin's call).
            call.actor.require("limits:write", "set key limits", param=given[0])
        now = utcnow()
        created = self.tenancy.create_key(
            team_id,
            body.name,
            project_id=body.project_id,
            allowed_models=body.models,
            expires_at=body.expiry(now),
            environment=body.environment,
            data_class=body.data_class.value,
            tags=body.tags,
            metadata=body.metadata,
            created_by=call.actor.label,
            rpm_limit=body.rpm_limit,
            tpm_limit=body.tpm_limit,
            max_concurrency=body.max_concurrency,
        )
        return s.CreatedKeyOut.with_secret(created.key, created.secret, now)

    def _list_keys(self, call: Call) -> s.KeyList:
        """List keys (never their secrets), optionally of one team and including revoked ones."""
        query = call.query_as(s.KeyQuery)
        team_id = call.actor.team_or_own(query.team_id) if call.actor.team_scoped else query.team_id
        keys = self.tenancy.list_keys(team_id, include_revoked=query.include_revoked)
        now = utcnow()
        return s.KeyList(data=[s.KeyOut.of(key, now) for key in keys])

    def _own_key(self, call: Call) -> ApiKey:
        key = self.tenancy.get_key(call.path["key_id"])
        call.actor.check_team(key.team_id)
        return key

    def _get_key(self, call: Call) -> s.KeyOut:
        """Show one key (never its secret)."""
        return s.KeyOut.of(self._own_key(call), utcnow())

    def _rotate_key(self, call: Call) -> s.CreatedKeyOut:
        """Issue a new key with the same settings and revoke the old one; the new secret is shown once."""
        key = self._own_key(call)
        created = self.tenancy.rotate_key(key.id, created_by=call.actor.label)
        return s.CreatedKeyOut.with_secret(created.key, created.secret, utcnow())

    def _set_key_limits(self, call: Call) -> s.KeyOut:
        """Change a key's own limits; fields left out stay, null removes a limit. Gateways apply it
        within `storage.key_refresh_s`."""
        key = self._own_key(call)
        limits = call.body_as(s.LimitsPatch).merged(key)
        return s.KeyOut.of(self.tenancy.set_key_limits(key.id, **limits), utcnow())

    def _revoke_key(self, call: Call) -> s.KeyOut:
        """Revoke a key; every gateway worker refuses it within `storage.key_refresh_s`."""
        key = self._own_key(call)
        reason = call.body_as(s.KeyRevoke).reason if call.body is not None else None
        return s.KeyOut.of(self.tenancy.revoke_key(key.id, reason), utcnow())

    # --- budgets ---------------------------------------------------------------------------

    def _check_budget_scope(self, actor: Actor, scope: str, scope_id: str) -> None:
        """Team members act on budgets of their own team and its keys; org budgets are above them."""
        if not actor.team_scoped:
            return
        if scope == BudgetScope.TEAM:
            actor.check_team(scope_id)
        elif scope == BudgetScope.KEY:
            actor.check_team(self.tenancy.get_key(scope_id).team_id)
        else:
            raise GatewayError(
                403,
                f"Role '{actor.role.value}' may not act on organization budgets.",
                param="scope",
                code="other_team",
            )

    def _visible(self, actor: Actor) -> Callable[[str, str], bool]:
        """Which (scope, scope_id) pairs the actor may read: all, or its team's and its keys'."""
        if not actor.team_scoped:
            return lambda scope, scope_id: True
        keys = {key.id for key in self.tenancy.list_keys(actor.team_id, include_revoked=True)}

        def visible(scope: str, scope_id: str) -> bool:
            return (scope == BudgetScope.TEAM and scope_id == actor.team_id) or (
                scope == BudgetScope.KEY and scope_id in keys
            )

        return visible

    def _own_budget(self, call: Call) -> Budget:
        budget = self.budgets.get_budget(call.path["budget_id"])
        if not self._visible(call.actor)(budget.scope, budget.scope_id):
            self._check_budget_scope(call.actor, budget.scope, budget.scope_id)  # raises the 403
        return budget

    def _set_budget(self, call: Call) -> s.BudgetOut:
        """Create the budget of a key, team or organization for a period, or replace its limits."""
        body = call.body_as(s.BudgetSet)
        if body.soft_limit_usd is not None and body.soft_limit_usd > body.limit_usd:
            raise GatewayError(
                400,
                f"soft_limit_usd ({body.soft_limit_usd}) must not be above limit_usd ({body.limit_usd}).",
                param="soft_limit_usd",
                code="invalid_value",
            )
        self._check_budget_scope(call.actor, body.scope, body.scope_id)
        budget = self.budgets.set_budget(
            body.scope, body.scope_id, body.period, body.limit_usd, soft_limit_usd=body.soft_limit_usd
        )
        return s.BudgetOut.of(budget)

    def _list_budgets(self, call: Call) -> s.BudgetList:
        """List budgets, optionally of one scope; team members see their team's and its keys'."""
        query = call.query_as(s.BudgetQuery)
        visible = self._visible(call.actor)
        budgets = self.budgets.list_budgets(query.scope, query.scope_id)
        return s.BudgetList(data=[s.BudgetOut.of(b) for b in budgets if visible(b.scope, b.scope_id)])

    def _get_budget(self, call: Call) -> s.BudgetOut:
        """Show one budget."""
        return s.BudgetOut.of(self._own_budget(call))

    def _delete_budget(self, call: Call) -> s.Deleted:
        """Delete a budget; gateways stop enforcing it on their next poll."""
        budget = self._own_budget(call)
        self.budgets.delete_budget(budget.id)
        return s.Deleted(id=budget.id, object="budget")

    def _budget_status(self, call: Call) -> s.BudgetStatusOut:
        """This period's spend, what requests in flight hold, and what remains."""
        budget = self._own_budget(call)
        win = window(budget.period, dt.datetime.now(dt.UTC).timestamp())
        spent = self.budgets.spent(budget.scope, budget.scope_id, win)
        reserved = 0.0
        tracked = self._snapshot(call, budget, win)
        if tracked is not None:
            # The tracker holds settled costs that the batched usage records may not have yet.
            spent = max(spent, tracked[0] / NANO)
            reserved = tracked[1] / NANO
        return s.BudgetStatusOut.with_spend(budget, win.start_dt, win.end_dt, spent, reserved)

    def _snapshot(self, call: Call, budget: Budget, win: Window) -> tuple[int, int, int] | None:
        """The tracker's (spent, reserved, peak) of the window, read on the gateway's event loop."""
        if call.tracker is None or call.loop is None:
            return None
        rule = Rule(budget.scope, budget.scope_id, budget.period, round(budget.limit_usd * NANO))
        future = asyncio.run_coroutine_threadsafe(call.tracker.snapshot(Check.of(rule, win)), call.loop)
        try:
            return future.result(timeout=5)
        except Exception:  # e.g. Redis unreachable: answer with the database's view, not an error
            future.cancel()
            return None

    def _list_budget_events(self, call: Call) -> s.BudgetEventList:
        """Soft and hard limit crossings, newest first; team members see their team's and its keys'."""
        query = call.query_as(s.EventQuery)
        visible = self._visible(call.actor)
        # Team members' events are filtered after the query: fetch more, then cut to `limit`.
        fetch = max(query.limit * 10, 1000) if call.actor.team_scoped else query.limit
        events = [
            event
            for event in self.budgets.list_events(query.scope, query.scope_id, limit=fetch)
            if visible(event.scope, event.scope_id)
        ]
        return s.BudgetEventList(data=[s.BudgetEventOut.of(e) for e in events[: query.limit]])

    # --- usage -----------------------------------------------------------------------------

    def _report(self, call: Call) -> tuple[list[str], dt.datetime, dt.datetime, list[reports.SpendRow]]:
        """The spend report a usage request asks for, confined to the caller's team if it has one."""
        query = call.query_as(s.UsageQuery)
        team_id = call.actor.team_or_own(query.team_id) if call.actor.team_scoped else query.team_id
        now = utcnow()
        month = dt.datetime(now.year, now.month, 1)
        since = query.since or month
        until = query.until or (month + dt.timedelta(days=32)).replace(day=1)
        if since >= until:
            field = "since" if query.since is not None else "until"
            raise GatewayError(
                400,
                f"since ({since:%Y-%m-%d %H:%M}) must be before until ({until:%Y-%m-%d %H:%M}) UTC.",
                param=field,
                code="invalid_value",
            )
        groups = query.groups()
        rows = reports.spend(
            self.tenancy.db,
            groups,
            since,
            until,
            team_id=team_id,
            key_id=query.key_id,
            org_id=query.org_id,
            model=query.model,
        )
        return groups, since, until, rows

    def _usage(self, call: Call) -> s.UsageReport:
        """Spend summed by the `group_by` columns over [since, until); team members see their team."""
        groups, since, until, rows = self._report(call)
        return s.UsageReport(
            group_by=groups,
            since=since.replace(tzinfo=dt.UTC),
            until=until.replace(tzinfo=dt.UTC),
            data=[row.as_dict() for row in rows],
        )

    def _usage_csv(self, call: Call) -> s.CsvOut:
        """The same report as a CSV file download (`text/csv`)."""
        groups, since, until, rows = self._report(call)
        name = f"plinth-usage-{since:%Y%m%d}-{until:%Y%m%d}.csv"
        return s.CsvOut(filename=name, text=reports.to_csv(rows, groups))

    # --- users -----------------------------------------------------------------------------

    def _create_user(self, call: Call) -> s.CreatedUserOut:
        """Create a user with a role; their personal token is in `token` and is never shown again."""
        body = call.body_as(s.UserCreate)
        team_id = body.team_id
        if call.actor.team_scoped:
            if body.role is not Role.DEVELOPER:
                raise GatewayError(
                    403,
                    f"Role '{call.actor.role.value}' may create developer users only, not {body.role.value}.",
                    param="role",
                    code="insufficient_permissions",
                )
            team_id = call.actor.team_or_own(team_id)
        created = self.tenancy.create_user(body.email, body.role.value, team_id=team_id, name=body.name)
        return s.CreatedUserOut.with_token(created.user, created.token)

    def _list_users(self, call: Call) -> s.UserList:
        """List users (never their tokens); team admins see their own team's users."""
        users: list[User] = self.tenancy.list_users()
        if call.actor.team_scoped:
            users = [user for user in users if user.team_id == call.actor.team_id]
        return s.UserList(data=[s.UserOut.of(user) for user in users])

    # --- misc ------------------------------------------------------------------------------

    def _whoami(self, call: Call) -> s.WhoAmI:
        """Who the credential acts as, with its role, team and permissions."""
        actor = call.actor
        user = s.UserOut.of(actor.user) if actor.user is not None else None
        return s.WhoAmI(
            kind="user" if actor.kind == "user" else "admin_key",
            role=actor.role,
            team_id=actor.team_id,
            user=user,
            permissions=actor.permissions(),
        )

    def _operations(self) -> list[Operation]:
        """The route table: routing, permission checks and the OpenAPI document all read it."""
        return [
            Operation("POST", "/orgs", self._create_org, s.OrgOut, "Create an organization", "orgs",
                      "orgs:write", "create organizations", 201, s.OrgCreate, errors=(409,)),
            Operation("GET", "/orgs", self._list_orgs, s.OrgList, "List organizations", "orgs",
                      "orgs:read", "list organizations"),
            Operation("POST", "/teams", self._create_team, s.TeamOut, "Create a team", "teams",
                      "teams:write", "create teams", 201, s.TeamCreate, errors=(404, 409)),
            Operation("GET", "/teams", self._list_teams, s.TeamList, "List teams", "teams",
                      "teams:read", "list teams", query=s.TeamQuery),
            Operation("GET", "/teams/{team_id}", self._get_team, s.TeamOut, "Show a team", "teams",
                      "teams:read", "read teams", errors=(404,)),
            Operation("POST", "/projects", self._create_project, s.ProjectOut, "Create a project", "projects",
                      "projects:write", "create projects", 201, s.ProjectCreate, errors=(404, 409)),
            Operation("GET", "/projects", self._list_projects, s.ProjectList, "List projects", "projects",
                      "projects:read", "list projects", query=s.ProjectQuery),
            Operation("POST", "/keys", self._create_key, s.CreatedKeyOut, "Create a virtual API key", "keys",
                      "keys:write", "create keys", 201, s.KeyCreate, errors=(404, 409)),
            Operation("GET", "/keys", self._list_keys, s.KeyList, "List virtual API keys", "keys",
                      "keys:read", "list keys", query=s.KeyQuery),
            Operation("GET", "/keys/{key_id}", self._get_key, s.KeyOut, "Show a virtual API key", "keys",
                      "keys:read", "read keys", errors=(404,)),
            Operation("POST", "/keys/{key_id}/rotate", self._rotate_key, s.CreatedKeyOut, "Rotate a key",
                      "keys", "keys:write", "rotate keys", errors=(404,)),
            Operation("POST", "/keys/{key_id}/revoke", self._revoke_key, s.KeyOut, "Revoke a key", "keys",
                      "keys:write", "revoke keys", body=s.KeyRevoke, body_optional=True, errors=(404,)),
            Operation("PATCH", "/keys/{key_id}/limits", self._set_key_limits, s.KeyOut, "Set a key's limits",
                      "keys", "limits:write", "set key limits", body=s.LimitsPatch, errors=(404,)),
            Operation("PATCH", "/teams/{team_id}/limits", self._set_team_limits, s.TeamOut,
                      "Set a team's limits", "teams", "teams:write", "set team limits", body=s.LimitsPatch,
                      errors=(404,)),
            Operation("POST", "/budgets", self._set_budget, s.BudgetOut, "Create or replace a budget",
                      "budgets", "budgets:write", "set budgets", body=s.BudgetSet, errors=(404,)),
            Operation("GET", "/budgets", self._list_budgets, s.BudgetList, "List budgets", "budgets",
                      "budgets:read", "read budgets", query=s.BudgetQuery),
            Operation("GET", "/budgets/events", self._list_budget_events, s.BudgetEventList,
                      "List budget events", "budgets", "budgets:read", "read budgets", query=s.EventQuery),
            Operation("GET", "/budgets/{budget_id}", self._get_budget, s.BudgetOut, "Show a budget",
                      "budgets", "budgets:read", "read budgets", errors=(404,)),
            Operation("GET", "/budgets/{budget_id}/status", self._budget_status, s.BudgetStatusOut,
                      "Show a budget's spend", "budgets", "budgets:read", "read budgets", errors=(404,)),
            Operation("DELETE", "/budgets/{budget_id}", self._delete_budget, s.Deleted, "Delete a budget",
                      "budgets", "budgets:write", "delete budgets", errors=(404,)),
            Operation("GET", "/usage", self._usage, s.UsageReport, "Spend report", "usage", "usage:read",
                      "read usage", query=s.UsageQuery),
            Operation("GET", "/usage.csv", self._usage_csv, s.CsvOut, "Spend report as CSV", "usage",
                      "usage:read", "read usage", query=s.UsageQuery, media_type="text/csv"),
            Operation("POST", "/users", self._create_user, s.CreatedUserOut, "Create a user", "users",
                      "users:write", "create users", 201, s.UserCreate, errors=(404, 409)),
            Operation("GET", "/users", self._list_users, s.UserList, "List users", "users",
                      "users:read", "list users"),
            Operation("GET", "/whoami", self._whoami, s.WhoAmI, "Who am I", "meta"),
        ]  # fmt: skip

    # --- HTTP plumbing ---------------------------------------------------------------------

    def openapi_bytes(self) -> bytes:
        if self._openapi is None:
            from plinth.admin.openapi import openapi_document

            self._openapi = orjson.dumps(openapi_document(self.operations, PREFIX))
        return self._openapi

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route(o.path, self._endpoint(o), methods=[o.method]) for o in self.operations
        ]
        routes.append(Route("/openapi.json", self._openapi_endpoint, methods=["GET"]))
        return routes

    async def _openapi_endpoint(self, request: Request) -> Response:
        ctx = new_context(request)
        return Response(self.openapi_bytes(), 200, {"x-request-id": ctx.request_id}, "application/json")

    def _endpoint(self, operation: Operation) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            ctx = new_context(request)
            try:
                result = await self._run(operation, request, ctx.request_id)
            except TenancyError as exc:
                return error_response(_error(exc), ctx, ADMIN)
            except GatewayError as err:
                return error_response(err, ctx, ADMIN)
            headers = {"x-request-id": ctx.request_id}
            if isinstance(result, s.CsvOut):
                headers["content-disposition"] = f'attachment; filename="{result.filename}"'
                return Response(result.text, operation.status, headers, "text/csv; charset=utf-8")
            body = orjson.dumps(result.model_dump(mode="json"))
            return Response(body, operation.status, headers, "application/json")

        endpoint.__name__ = operation.operation_id
        return endpoint

    async def _run(self, operation: Operation, request: Request, request_id: str | None = None) -> BaseModel:
        actor = await asyncio.to_thread(self.authenticate, request.headers.get("authorization"))
        if operation.permission is not None:
            try:
                actor.require(operation.permission, operation.doing)
            except GatewayError as err:
                call = Call(actor, dict(request.path_params), None, None, request_id=request_id)
                await asyncio.to_thread(self._notify, operation, call, None, err)
                raise
        query = None
        if operation.query is not None:
            try:
                query = operation.query.model_validate(dict(request.query_params))
            except ValidationError as exc:
                raise _validation_error(exc, "query") from None
        body = None
        if operation.body is not None:
            raw = await _read_json(request, optional=operation.body_optional)
            if raw is not None:
                try:
                    body = operation.body.model_validate(raw)
                except ValidationError as exc:
                    raise _validation_error(exc, "body") from None
        admission = getattr(request.app.state, "budgets", None)
        tracker = admission.tracker if isinstance(admission, BudgetAdmission) else None
        call = Call(
            actor, dict(request.path_params), body, query, tracker, asyncio.get_running_loop(), request_id
        )
        if not self.observers:
            return await asyncio.to_thread(operation.handler, call)
        return await asyncio.to_thread(self._observed, operation, call)

    def _observed(self, operation: Operation, call: Call) -> BaseModel:
        try:
            result = operation.handler(call)
        except (TenancyError, GatewayError) as exc:
            self._notify(operation, call, None, _error(exc) if isinstance(exc, TenancyError) else exc)
            raise
        self._notify(operation, call, result, None)
        return result

    def _notify(
        self, operation: Operation, call: Call, result: BaseModel | None, error: GatewayError | None
    ) -> None:
        for observer in self.observers:
            observer.observe(operation, call, result, error)


async def _read_json(request: Request, *, optional: bool) -> Any:
    """The JSON body, bounded in size; None for an allowed empty body."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise GatewayError(
                413, f"The request body is larger than {MAX_BODY_BYTES} bytes.", code="request_too_large"
            )
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        if optional:
            return None
        raise GatewayError(400, "The request body is empty; send a JSON object.", code="invalid_json")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"The request body is not valid JSON: {exc}.", code="invalid_json") from None


def admin_routes(tenancy: TenancyService, keys: KeyStore, extensions: Sequence[AdminExtension] = ()) -> Mount:
    """The `/api` mount for `create_app`."""
    return Mount(PREFIX, routes=AdminApi(tenancy, keys, extensions).routes())


__all__ = ["AdminApi", "AdminExtension", "AdminObserver", "Call", "Operation", "admin_routes"]
