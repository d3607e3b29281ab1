"""Request and response bodies of the admin API.

They are pydantic models so one definition validates input, shapes output and feeds the OpenAPI
document. Response models copy only safe columns: key hashes and user token hashes have no field
here, so they cannot leak by accident; the one-time secrets live only on the `Created…` models.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from plinth.tenancy.models import ApiKey, DataClass, Organization, Project, Role, Team, User


def _printable(value: str) -> str:
    # NUL and other control characters are refused by PostgreSQL or break terminals; say so here.
    if any(ord(ch) < 32 for ch in value):
        raise ValueError("must not contain control characters")
    return value


Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]
Ident = Annotated[str, Field(min_length=1, max_length=40), AfterValidator(_printable)]
Short = Annotated[str, Field(min_length=1, max_length=100), AfterValidator(_printable)]


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


class TeamCreate(Request):
    org_id: Ident
    name: Name


class TeamQuery(Query):
    org_id: Ident | None = None


class TeamOut(BaseModel):
    id: str
    org_id: str
    name: str
    created_at: dt.datetime

    @classmethod
    def of(cls, team: Team) -> TeamOut:
        return cls(
            id=team.id,
            org_id=team.org_id,
            name=team.name,
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


class KeyCreate(Request):
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
