"""Request and response bodies of the governance admin API (same conventions as plinth.admin.schemas)."""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, model_validator

from plinth.admin.schemas import Query, Request, _printable, _utc
from plinth.governance.config import Level, Lifecycle, ProviderStatus
from plinth.governance.models import (
    ApprovalRequest,
    CatalogDeployment,
    CatalogModel,
    KillSwitch,
    ProviderReview,
)

Name = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_printable)]
LongName = Annotated[str, Field(min_length=1, max_length=300), AfterValidator(_printable)]
Reason = Annotated[str, Field(min_length=3, max_length=1000), AfterValidator(_printable)]
Note = Annotated[str, Field(max_length=1000), AfterValidator(_printable)]
Region = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
Link = Annotated[str, Field(min_length=1, max_length=500), AfterValidator(_printable)]
Price = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]
KillTarget = Literal["model", "deployment", "provider", "key", "team"]


def _at(value: dt.datetime | None) -> dt.datetime | None:
    return _utc(value)


def _naive_utc(value: dt.datetime | None) -> dt.datetime | None:
    if value is None or value.tzinfo is None:
        return value
    try:
        return value.astimezone(dt.UTC).replace(tzinfo=None)
    except OverflowError:
        raise ValueError("the date is out of range") from None


# --- models ----------------------------------------------------------------------------------------


class Prices(Request):
    """Informative list prices, USD per million tokens (billing uses the price catalog)."""

    input_per_mtok: Price | None = None
    output_per_mtok: Price | None = None
    cached_input_per_mtok: Price | None = None


class ModelFields(Request):
    owner: Name | None = None
    description: Annotated[str, Field(max_length=1000), AfterValidator(_printable)] | None = None
    data_class: Level = Field(Level.INTERNAL, description="Ceiling: the most sensitive data it may receive.")
    context_window: Annotated[int, Field(strict=True, ge=1, le=100_000_000)] | None = None
    capabilities: list[Name] = Field(default_factory=list, max_length=50)
    prices: Prices | None = None
    card_text: Annotated[str, Field(max_length=20_000)] | None = Field(
        None, description="Model card (Markdown)."
    )
    card_links: list[Link] = Field(default_factory=list, max_length=20)

    def columns(self, only_set: bool = False) -> dict[str, Any]:
        data = self.model_dump(exclude_unset=only_set)
        if "data_class" in data:
            data["data_class"] = Level(data["data_class"]).value
        if "prices" in data and data["prices"] is not None:
            data["prices"] = {k: v for k, v in data["prices"].items() if v is not None}
        return data


class ModelCreate(ModelFields):
    name: Name = Field(description="The model alias clients send as 'model'.")


class ModelPatch(ModelFields):
    @model_validator(mode="after")
    def _something(self) -> ModelPatch:
        if not self.model_fields_set:
            raise ValueError("give at least one field to change")
        return self


class ModelOut(BaseModel):
    name: str
    object: Literal["catalog_model"] = "catalog_model"
    owner: str | None
    description: str | None
    status: Lifecycle
    data_class: Level
    context_window: int | None
    capabilities: list[str]
    prices: dict[str, float] | None
    card_text: str | None
    card_links: list[str]
    source: Literal["api", "config"] = Field(description="config: declared in plinth.yaml (read-only here).")
    created_at: dt.datetime | None
    updated_at: dt.datetime | None

    @classmethod
    def of(cls, row: CatalogModel) -> ModelOut:
        return cls(
            name=row.name,
            owner=row.owner,
            description=row.description,
            status=Lifecycle(row.status),
            data_class=Level(row.data_class),
            context_window=row.context_window,
            capabilities=list(row.capabilities or []),
            prices=row.prices,
            card_text=row.card_text,
            card_links=list(row.card_links or []),
            source="config" if row.source == "config" else "api",
            created_at=_at(row.created_at),
            updated_at=_at(row.updated_at),
        )


class ModelList(BaseModel):
    data: list[ModelOut]


class LifecycleRequest(Request):
    status: Lifecycle
    reason: Reason


# --- deployments -----------------------------------------------------------------------------------


class DeploymentFields(Request):
    provider: Name | None = Field(None, description="The provider review it falls under.")
    regions: list[Region] = Field(default_factory=list, max_length=20)
    data_class: Level | None = Field(None, description="Ceiling; default: the model's.")
    owner: Name | None = None

    def columns(self, only_set: bool = False) -> dict[str, Any]:
        data = self.model_dump(exclude_unset=only_set)
        if data.get("data_class") is not None:
            data["data_class"] = Level(data["data_class"]).value
        return data


class DeploymentCreate(DeploymentFields):
    name: LongName = Field(description="The deployment's name in the routing configuration.")
    model: Name
    provider: Name = Field(description="The provider review it falls under (e.g. openai, azure-eu).")


class DeploymentPatch(DeploymentFields):
    @model_validator(mode="after")
    def _something(self) -> DeploymentPatch:
        if not self.model_fields_set:
            raise ValueError("give at least one field to change")
        if "data_class" in self.model_fields_set and self.data_class is None:
            raise ValueError("data_class cannot be null")
        if "provider" in self.model_fields_set and self.provider is None:
            raise ValueError("provider cannot be null")
        return self


class DeploymentQuery(Query):
    model: Name | None = None


class DeploymentOut(BaseModel):
    name: str
    object: Literal["catalog_deployment"] = "catalog_deployment"
    model: str
    provider: str
    regions: list[str]
    data_class: Level
    status: Lifecycle
    owner: str | None
    source: Literal["api", "config"]
    created_at: dt.datetime | None
    updated_at: dt.datetime | None

    @classmethod
    def of(cls, row: CatalogDeployment) -> DeploymentOut:
        return cls(
            name=row.name,
            model=row.model,
            provider=row.provider,
            regions=list(row.regions or []),
            data_class=Level(row.data_class),
            status=Lifecycle(row.status),
            owner=row.owner,
            source="config" if row.source == "config" else "api",
            created_at=_at(row.created_at),
            updated_at=_at(row.updated_at),
        )


class DeploymentList(BaseModel):
    data: list[DeploymentOut]


# --- providers -------------------------------------------------------------------------------------


class ProviderSet(Request):
    """A provider's due-diligence facts. Approval is a separate, four-eyes step."""

    display_name: Name | None = None
    data_retention_days: Annotated[int, Field(strict=True, ge=0, le=100_000)] | None = Field(
        None, description="How long the provider keeps prompts; null: unknown."
    )
    training_opt_out: bool = False
    certifications: list[Name] = Field(default_factory=list, max_length=50)
    allowed_regions: list[Region] = Field(default_factory=list, max_length=50, description="Empty: any.")
    data_class: Level = Field(Level.INTERNAL, description="Ceiling for data sent to this provider.")
    notes: Annotated[str, Field(max_length=5000)] | None = None

    def columns(self) -> dict[str, Any]:
        data = self.model_dump()
        data["data_class"] = Level(data["data_class"]).value
        return data


class ProviderReviewRequest(Request):
    decision: Literal["approved", "rejected"] = "approved"
    expires_at: dt.datetime | None = Field(None, description="When the approval lapses (ISO 8601, UTC).")
    valid_days: Annotated[int, Field(strict=True, ge=1, le=1098)] | None = None
    reason: Reason

    @model_validator(mode="after")
    def _expiry(self) -> ProviderReviewRequest:
        if self.expires_at is not None and self.valid_days is not None:
            raise ValueError("give expires_at or valid_days, not both")
        self.expires_at = _naive_utc(self.expires_at)
        return self

    def expiry(self, now: dt.datetime) -> dt.datetime | None:
        if self.valid_days is not None:
            return now + dt.timedelta(days=self.valid_days)
        return self.expires_at


class ProviderOut(BaseModel):
    name: str
    object: Literal["provider_review"] = "provider_review"
    display_name: str | None
    status: ProviderStatus
    valid: bool = Field(description="Approved and not expired: it may receive traffic.")
    data_retention_days: int | None
    training_opt_out: bool
    certifications: list[str]
    allowed_regions: list[str]
    data_class: Level
    reviewer: str | None
    reviewed_at: dt.datetime | None
    expires_at: dt.datetime | None
    notes: str | None
    source: Literal["api", "config"]

    @classmethod
    def of(cls, row: ProviderReview, now: dt.datetime) -> ProviderOut:
        valid = row.status == ProviderStatus.APPROVED and row.expires_at is not None and row.expires_at > now
        return cls(
            name=row.name,
            display_name=row.display_name,
            status=ProviderStatus(row.status),
            valid=valid,
            data_retention_days=row.data_retention_days,
            training_opt_out=bool(row.training_opt_out),
            certifications=list(row.certifications or []),
            allowed_regions=list(row.allowed_regions or []),
            data_class=Level(row.data_class),
            reviewer=row.reviewer,
            reviewed_at=_at(row.reviewed_at),
            expires_at=_at(row.expires_at),
            notes=row.notes,
            source="config" if row.source == "config" else "api",
        )


class ProviderList(BaseModel):
    data: list[ProviderOut]


# --- approvals -------------------------------------------------------------------------------------


class ApprovalQuery(Query):
    state: Literal["pending", "approved", "rejected", "cancelled"] | None = None
    limit: int = Field(200, ge=1, le=1000)


class ApprovalDecision(Request):
    note: Note | None = None


class ApprovalOut(BaseModel):
    id: str
    object: Literal["approval_request"] = "approval_request"
    kind: str
    target: str
    change: dict[str, Any]
    reason: str
    state: str
    requested_by: str
    requested_at: dt.datetime
    decided_by: str | None
    decided_at: dt.datetime | None
    decision_note: str | None

    @classmethod
    def of(cls, row: ApprovalRequest) -> ApprovalOut:
        return cls(
            id=row.id,
            kind=row.kind,
            target=row.target,
            change=dict(row.change or {}),
            reason=row.reason,
            state=row.state,
            requested_by=row.requested_by,
            requested_at=_at(row.requested_at) or row.requested_at,
            decided_by=row.decided_by,
            decided_at=_at(row.decided_at),
            decision_note=row.decision_note,
        )


class ApprovalList(BaseModel):
    data: list[ApprovalOut]


# --- kill switches ---------------------------------------------------------------------------------


class KillCreate(Request):
    target_type: KillTarget
    target: LongName = Field(description="Model alias, deployment name, provider name, key id or team id.")
    reason: Reason


class KillLift(Request):
    reason: Reason


class KillQuery(Query):
    all: bool = Field(False, description="Include lifted kill switches.")


class KillOut(BaseModel):
    id: str
    object: Literal["kill_switch"] = "kill_switch"
    target_type: str
    target: str
    reason: str
    active: bool
    created_by: str
    created_at: dt.datetime
    lifted_at: dt.datetime | None
    lifted_by: str | None
    lift_reason: str | None

    @classmethod
    def of(cls, row: KillSwitch) -> KillOut:
        return cls(
            id=row.id,
            target_type=row.target_type,
            target=row.target,
            reason=row.reason,
            active=row.lifted_at is None,
            created_by=row.created_by,
            created_at=_at(row.created_at) or row.created_at,
            lifted_at=_at(row.lifted_at),
            lifted_by=row.lifted_by,
            lift_reason=row.lift_reason,
        )


class KillList(BaseModel):
    data: list[KillOut]


# --- policy and audit ------------------------------------------------------------------------------


class PolicyOut(BaseModel):
    id: str
    effect: str
    file: str
    actions: list[str] | None


class PolicySetOut(BaseModel):
    digest: str = Field(
        description="sha256 of the policy sources (decisions record its first 16 characters)."
    )
    builtin: bool
    files: list[str]
    policies: list[PolicyOut]
    reload_error: str | None = Field(description="Why the last reload failed (the previous policies stay).")


class AuditQuery(Query):
    after_seq: int = Field(0, ge=0)
    limit: int = Field(100, ge=1, le=5000)
    kind: Literal["admin", "decision"] | None = None
    request_id: Annotated[str, Field(max_length=128)] | None = None


class AuditRecordOut(BaseModel):
    seq: int
    created_at: str
    kind: str
    actor: str
    action: str
    target: str | None
    outcome: str
    reason: str | None
    request_id: str | None
    policy_ids: list[str]
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class AuditList(BaseModel):
    data: list[AuditRecordOut]
    next_after_seq: int = Field(description="Pass as after_seq for the next page.")


class AuditVerifyOut(BaseModel):
    ok: bool
    records: int
    head_seq: int
    first_bad_seq: int | None
    problems: list[str]
