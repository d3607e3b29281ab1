"""Request and response bodies of the admin API.

They are pydantic models so one definition validates input, shapes output and feeds the OpenAPI
document. Response models copy only safe columns: key hashes and user token hashes have no field
here, so they cannot leak by accident; the one-time secrets live only on the `Created…` models.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from plinth.budgets.models import Budget, BudgetEvent, BudgetPeriod, BudgetScope
from plinth.metering.reports import GROUP_BY_CHOICES
from plinth.tenancy.models import ApiKey, DataClass, Organization, Project, Role, Team, User


def _printable(value: str) -> str:
    # NUL and other control characters are refused by PostgreSQL or break terminals; say so here.
    if any(ord(ch) < 32 for ch in value):
        raise ValueError("must not contain control characters")
    return value


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]
Ident = Annotated[str, Field(min_length=1, max_length=40), AfterValidator(_printable)]
Short = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_printable)]
# Strict: `true` or `"5"` is a mistake, not a limit. Bounded by the 32-bit database column.
Limit = Annotated[int, Field(strict=True, ge=1, le=2_000_000_000)]
LIMIT_FIELDS = ("rpm_limit", "tpm_limit", "max_concurrency")
Usd = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]


def _utc(value: dt.datetime | None) -> dt.datetime | None:
    """Stored datetimes are naive UTC; answer with an explicit offset so clients need not guess."""
    return value.replace(tzinfo=dt.UTC) if value is not None and value.tzinfo is None else value


class Request(BaseModel):
    """Base of request bodies: unknown fields are an error, not silently dropped."""

    model_config = ConfigDict(extra="forbid")


class Query(BaseModel):
    """Base of query-string parameters (described as `in: query` parameters in OpenAPI)."""

    model_config = ConfigDict(extra="forbid")


# --- organizations, teams, projects ------------------------------------------------------------


class OrgCreate(Request):
    name: Name


class OrgOut(BaseModel):
    id: str
    name: str
    created_at: dt.datetime

    @classmethod
    def of(cls, org: Organization) -> OrgOut:
        return cls(id=org.id, name=org.name, created_at=_utc(org.created_at) or org.created_at)


class Limits(Request):
    """Requests/min, tokens/min and concurrent requests; null or omitted: unlimited."""

    rpm_limit: Limit | None = Field(None, description="Requests per minute; null: unlimited.")
    tpm_limit: Limit | None = Field(None, description="Tokens per minute; null: unlimited.")
    max_concurrency: Limit | None = Field(None, description="Requests in flight; null: unlimited.")

    def limits(self) -> dict[str, int | None]:
        return {name: getattr(self, name) for name in LIMIT_FIELDS}


class LimitsPatch(Limits):
    """A PATCH: fields left out keep their value, null removes that limit."""

    @model_validator(mode="after")
    def _something(self) -> LimitsPatch:
        if not self.model_fields_set:
            raise ValueError(f"give at least one of {', '.join(LIMIT_FIELDS)} (null: unlimited)")
        return self

    def merged(self, current: Any) -> dict[str, int | None]:
        """The limits after this patch, given the object's current ones."""
        return {
            name: getattr(self, name) if name in self.model_fields_set else getattr(current, name)
            for name in LIMIT_FIELDS
        }


class TeamCreate(Limits):
    org_id: Ident
    name: Name


class TeamQuery(Query):
    org_id: Ident | None = None


class TeamOut(BaseModel):
    id: str
    org_id: str
    name: str
    rpm_limit: int | None
    tpm_limit: int | None
    max_concurrency: int | None
    created_at: dt.datetime

    @classmethod
    def of(cls, team: Team) -> TeamOut:
        return cls(
            id=team.id,
            org_id=team.org_id,
            name=team.name,
            rpm_limit=team.rpm_limit,
            tpm_limit=team.tpm_limit,
            max_concurrency=team.max_concurrency,
            created_at=_utc(team.created_at) or team.created_at,
        )


class ProjectCreate(Request):
    team_id: Ident | None = Field(None, description="Defaults to the caller's own team.")
    name: Name


class ProjectQuery(Query):
    team_id: Ident | None = None


class ProjectOut(BaseModel):
    id: str
    team_id: str
    name: str
    created_at: dt.datetime

    @classmethod
    def of(cls, project: Project) -> ProjectOut:
        created = _utc(project.created_at) or project.created_at
        return cls(id=project.id, team_id=project.team_id, name=project.name, created_at=created)


# --- keys ----------------------------------------------------------------------------------------


class KeyCreate(Limits):
    team_id: Ident | None = Field(None, description="Defaults to the caller's own team.")
    name: Name
    project_id: Ident | None = None
    models: list[Short] | None = Field(None, max_length=200, description="Allowed models; omit for all.")
    expires_at: dt.datetime | None = Field(None, description="ISO 8601; without an offset it is UTC.")
    expires_in_days: int | None = Field(None, ge=1, le=3650)
    environment: Short | None = Field(None, description="e.g. dev, staging, prod")
    data_class: DataClass = DataClass.INTERNAL
    tags: list[Short] = Field(default_factory=list, max_length=50)
    metadata: dict[str, Any] = Field(default_factory=dict, max_length=50)

    @model_validator(mode="after")
    def _one_expiry(self) -> KeyCreate:
        if self.expires_at is not None and self.expires_in_days is not None:
            raise ValueError("give expires_at or expires_in_days, not both")
        if self.expires_at is not None and self.expires_at.tzinfo is not None:
            # Stored as naive UTC; convert here so an out-of-range offset is a 400, not a crash later.
            try:
                self.expires_at = self.expires_at.astimezone(dt.UTC).replace(tzinfo=None)
            except OverflowError:
                raise ValueError("expires_at is out of range") from None
        return self

    def expiry(self, now: dt.datetime) -> dt.datetime | None:
        """The expiry as naive UTC, as the database stores it. `now` is naive UTC."""
        if self.expires_in_days is not None:
            return now + dt.timedelta(days=self.expires_in_days)
        return self.expires_at


class KeyQuery(Query):
    team_id: Ident | None = None
    include_revoked: bool = False


class KeyRevoke(Request):
    reason: Annotated[str, Field(max_length=500), AfterValidator(_printable)] | None = None


class KeyOut(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    team_id: str
    project_id: str | None
    name: str
    prefix: str = Field(description="The visible start of the secret, to recognise it.")
    models: list[str] | None = Field(description="Allowed models; null means all.")
    environment: str | None
    data_class: str
    tags: list[str]
    metadata: dict[str, Any]
    status: Literal["active", "expired", "revoked"]
    rpm_limit: int | None
    tpm_limit: int | None
    max_concurrency: int | None
    created_by: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    revoked_reason: str | None
    rotated_from: str | None

    @classmethod
    def of(cls, key: ApiKey, now: dt.datetime) -> KeyOut:
        return cls(**_key_fields(key, now))


def _key_fields(key: ApiKey, now: dt.datetime) -> dict[str, Any]:
    if key.revoked_at is not None:
        status = "revoked"
    elif key.expires_at is not None and key.expires_at <= now:
        status = "expired"
    else:
        status = "active"
    return {
        "id": key.id,
        "team_id": key.team_id,
        "project_id": key.project_id,
        "name": key.name,
        "prefix": key.prefix,
        "models": key.allowed_models,
        "environment": key.environment,
        "data_class": key.data_class,
        "tags": list(key.tags or []),
        "metadata": dict(key.extra or {}),
        "status": status,
        "rpm_limit": key.rpm_limit,
        "tpm_limit": key.tpm_limit,
        "max_concurrency": key.max_concurrency,
        "created_by": key.created_by,
        "created_at": _utc(key.created_at),
        "expires_at": _utc(key.expires_at),
        "revoked_at": _utc(key.revoked_at),
        "revoked_reason": key.revoked_reason,
        "rotated_from": key.rotated_from,
    }


class CreatedKeyOut(KeyOut):
    key: str = Field(description="The secret. Shown this once only; Plinth keeps just its hash.")

    @classmethod
    def with_secret(cls, key: ApiKey, secret: str, now: dt.datetime) -> CreatedKeyOut:
        return cls(**_key_fields(key, now), key=secret)


# --- users ---------------------------------------------------------------------------------------


class UserCreate(Request):
    email: Annotated[str, Field(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+$")]
    role: Role
    team_id: Ident | None = Field(None, description="Required for team_admin and developer.")
    name: Name | None = None


class UserOut(BaseModel):
    id: str
    object: Literal["user"] = "user"
    email: str
    name: str | None
    role: str
    team_id: str | None
    token_prefix: str | None
    created_at: dt.datetime
    disabled_at: dt.datetime | None

    @classmethod
    def of(cls, user: User) -> UserOut:
        return cls(**_user_fields(user))


def _user_fields(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "email": user.email,
        "name": user.name,
        "role": user.role,
        "team_id": user.team_id,
        "token_prefix": user.token_prefix,
        "created_at": _utc(user.created_at),
        "disabled_at": _utc(user.disabled_at),
    }


class CreatedUserOut(UserOut):
    token: str = Field(description="The personal admin-API token. Shown this once only.")

    @classmethod
    def with_token(cls, user: User, token: str) -> CreatedUserOut:
        return cls(**_user_fields(user), token=token)


# --- budgets -------------------------------------------------------------------------------------


class BudgetSet(Request):
    scope: BudgetScope
    scope_id: Ident = Field(description="The key, team or organization id.")
    period: BudgetPeriod = Field(description="UTC calendar day or month.")
    limit_usd: Usd = Field(description="Hard limit: requests are refused (429) once it is reached.")
    soft_limit_usd: Usd | None = Field(
        None, description="Alert (a `soft` event) when spend crosses it; at most limit_usd."
    )


class BudgetQuery(Query):
    scope: BudgetScope | None = None
    scope_id: Ident | None = None


class EventQuery(BudgetQuery):
    limit: int = Field(100, ge=1, le=1000)


class BudgetOut(BaseModel):
    id: str
    object: Literal["budget"] = "budget"
    scope: str
    scope_id: str
    period: str
    limit_usd: float
    soft_limit_usd: float | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def of(cls, budget: Budget) -> BudgetOut:
        return cls(**_budget_fields(budget))


def _budget_fields(budget: Budget) -> dict[str, Any]:
    return {
        "id": budget.id,
        "scope": budget.scope,
        "scope_id": budget.scope_id,
        "period": budget.period,
        "limit_usd": budget.limit_usd,
        "soft_limit_usd": budget.soft_limit_usd,
        "created_at": _utc(budget.created_at),
        "updated_at": _utc(budget.updated_at),
    }


class BudgetStatusOut(BudgetOut):
    period_start: dt.datetime
    period_end: dt.datetime
    spent_usd: float = Field(description="Spent in the current period (usage records and settled requests).")
    reserved_usd: float = Field(
        description="Held by requests in flight: on every worker with Redis, else on the answering one."
    )
    remaining_usd: float = Field(description="limit_usd - spent_usd - reserved_usd, at least 0.")

    @classmethod
    def with_spend(
        cls, budget: Budget, start: dt.datetime, end: dt.datetime, spent: float, reserved: float
    ) -> BudgetStatusOut:
        return cls(
            **_budget_fields(budget),
            period_start=_utc(start) or start,
            period_end=_utc(end) or end,
            spent_usd=round(spent, 10),
            reserved_usd=round(reserved, 10),
            remaining_usd=round(max(0.0, budget.limit_usd - spent - reserved), 10),
        )


class BudgetEventOut(BaseModel):
    id: int
    object: Literal["budget_event"] = "budget_event"
    created_at: dt.datetime
    scope: str
    scope_id: str
    period: str
    period_start: dt.datetime
    kind: str = Field(description="`soft` (alert) or `hard` (limit reached, requests refused).")
    limit_usd: float
    spent_usd: float

    @classmethod
    def of(cls, event: BudgetEvent) -> BudgetEventOut:
        return cls(
            id=event.id,
            created_at=_utc(event.created_at) or event.created_at,
            scope=event.scope,
            scope_id=event.scope_id,
            period=event.period,
            period_start=_utc(event.period_start) or event.period_start,
            kind=event.kind,
            limit_usd=event.limit_usd,
            spent_usd=event.spent_usd,
        )


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True


# --- usage ---------------------------------------------------------------------------------------


def _group_by(value: str) -> str:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUP_BY_CHOICES]
    if unknown:
        raise ValueError(f"cannot group by {unknown[0]!r}; choose from {', '.join(GROUP_BY_CHOICES)}")
    return ",".join(dict.fromkeys(names))


class UsageQuery(Query):
    group_by: Annotated[str, AfterValidator(_group_by)] = Field(
        "team,model",
        description=f"Comma-separated, in order, from {', '.join(GROUP_BY_CHOICES)}; empty: one total row.",
    )
    since: dt.datetime | None = Field(
        None,
        description="Inclusive; ISO date or datetime, UTC unless an offset is given. Default: "
        "the start of this month.",
    )
    until: dt.datetime | None = Field(None, description="Exclusive; default: the start of next month.")
    team_id: Ident | None = None
    key_id: Ident | None = None
    org_id: Ident | None = None
    model: Short | None = None

    @model_validator(mode="after")
    def _range(self) -> UsageQuery:
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None and value.tzinfo is not None:
                try:
                    setattr(self, name, value.astimezone(dt.UTC).replace(tzinfo=None))
                except OverflowError:
                    raise ValueError(f"{name} is out of range") from None
        return self  # the order of since and until is checked with the defaults filled in

    def groups(self) -> list[str]:
        return [name for name in self.group_by.split(",") if name]


class UsageReport(BaseModel):
    object: Literal["list"] = "list"
    group_by: list[str]
    since: dt.datetime
    until: dt.datetime
    data: list[dict[str, Any]] = Field(
        description="One row per group: its group columns, then requests, input_tokens, "
        "output_tokens, cached_input_tokens and cost_usd."
    )


class CsvOut(BaseModel):
    """A CSV download; the endpoint sends `text` as `text/csv`, not this model as JSON."""

    filename: str
    text: str


# --- misc ----------------------------------------------------------------------------------------


class WhoAmI(BaseModel):
    kind: Literal["admin_key", "user"]
    role: Role
    team_id: str | None
    user: UserOut | None = None
    permissions: list[str] = Field(description="Operations this caller may perform (`resource:action`).")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail


class OrgList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OrgOut]


class TeamList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TeamOut]


class ProjectList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ProjectOut]


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[KeyOut]


class UserList(BaseModel):
    object: Literal["list"] = "list"
    data: list[UserOut]


class BudgetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BudgetOut]


class BudgetEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[BudgetEventOut]
