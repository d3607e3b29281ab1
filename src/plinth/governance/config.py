"""The `governance:` section of `plinth.yaml`, and the vocabularies it shares with the database.

Only pydantic and the standard library are imported here: `plinth.config.schema` imports this
module, so anything heavier would load with every configuration read.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class Level(StrEnum):
    """Data classification, lowest to highest (the same values as plinth.tenancy.models.DataClass)."""

    PUBLIC = "public"
    INTERNAL = "internal"
    CONFIDENTIAL = "confidential"
    RESTRICTED = "restricted"

    @property
    def rank(self) -> int:
        return _RANKS[self]


_RANKS = {Level.PUBLIC: 0, Level.INTERNAL: 1, Level.CONFIDENTIAL: 2, Level.RESTRICTED: 3}


class Lifecycle(StrEnum):
    """Lifecycle of a model or deployment: only approved and deprecated ones receive traffic."""

    PROPOSED = "proposed"
    APPROVED = "approved"
    DEPRECATED = "deprecated"
    RETIRED = "retired"


SERVING = frozenset({Lifecycle.APPROVED, Lifecycle.DEPRECATED})
# Allowed lifecycle moves; retired is final.
TRANSITIONS: dict[Lifecycle, frozenset[Lifecycle]] = {
    Lifecycle.PROPOSED: frozenset({Lifecycle.APPROVED, Lifecycle.RETIRED}),
    Lifecycle.APPROVED: frozenset({Lifecycle.DEPRECATED, Lifecycle.RETIRED}),
    Lifecycle.DEPRECATED: frozenset({Lifecycle.APPROVED, Lifecycle.RETIRED}),
    Lifecycle.RETIRED: frozenset(),
}


class ProviderStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Text = Annotated[str, Field(min_length=1, max_length=200)]
Region = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class CatalogPrices(_Strict):
    """Informative list prices in USD per million tokens (billing uses `models[].price`)."""

    input_per_mtok: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    output_per_mtok: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    cached_input_per_mtok: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None


class ModelCard(_Strict):
    text: Annotated[str, Field(max_length=20_000)] | None = None
    links: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(default_factory=list)


class CatalogDeploymentConfig(_Strict):
    """Governance facts of one routed deployment, by its name in `models[].deployments`."""

    name: Annotated[str, Field(min_length=1, max_length=300)]
    provider: Text | None = None  # the provider review it falls under; default: its provider type
    regions: list[Region] = Field(default_factory=list)
    data_class: Level | None = None  # ceiling; default: the model's
    status: Lifecycle = Lifecycle.APPROVED
    owner: Text | None = None


class CatalogModelConfig(_Strict):
    """A model declared in the file (GitOps): the review happens in the change to this file, so
    the declared status applies as is; the admin API refuses to change file-declared entries."""

    name: Text
    owner: Text | None = None
    description: Annotated[str, Field(max_length=1000)] | None = None
    status: Lifecycle = Lifecycle.APPROVED
    data_class: Level = Level.INTERNAL  # ceiling: the most sensitive data this model may receive
    context_window: Annotated[int, Field(ge=1)] | None = None
    capabilities: list[Text] = Field(default_factory=list)
    prices: CatalogPrices | None = None
    card: ModelCard = ModelCard()
    deployments: list[CatalogDeploymentConfig] = Field(default_factory=list)


class ProviderReviewConfig(_Strict):
    """A provider's due-diligence record declared in the file."""

    name: Text
    display_name: Text | None = None
    status: ProviderStatus = ProviderStatus.APPROVED
    data_retention_days: Annotated[int, Field(ge=0)] | None = None  # None: unknown
    training_opt_out: bool = False
    certifications: list[Text] = Field(default_factory=list)
    allowed_regions: list[Region] = Field(default_factory=list)  # empty: any region
    data_class: Level = Level.INTERNAL  # ceiling
    reviewer: Text | None = None
    reviewed_at: dt.date | None = None
    expires_at: dt.date | None = None  # the review is void from this day (UTC) on
    notes: Annotated[str, Field(max_length=5000)] | None = None

    @model_validator(mode="after")
    def _approved_needs_review(self) -> ProviderReviewConfig:
        if self.status is ProviderStatus.APPROVED and (self.reviewer is None or self.expires_at is None):
            raise ValueError("an approved provider needs 'reviewer' and 'expires_at'")
        return self


class GovernanceConfig(_Strict):
    """Policy files, the catalog declared in the file, and how fast changes spread."""

    # A .cedar file or a directory of them; None: the built-in default policy (docs/governance.md).
    policies: str | None = None
    # How often each worker looks for changed policy files (mtime), and for catalog, provider and
    # kill-switch changes in the database (one small query): a kill switch holds within this time.
    policy_reload_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    refresh_s: Annotated[float, Field(gt=0, le=1)] = 0.25
    # Strict mode: models, deployments and providers absent from the catalog receive no traffic.
    # Off (the default), they serve as before, under their configured routes and the policies.
    require_catalog: bool = False
    # Ceiling of deployments nobody catalogued (only when require_catalog is off).
    uncatalogued_data_class: Level = Level.RESTRICTED
    # The caller's region when a request sends no `x-plinth-region` header.
    default_region: Region | None = None
    # Record every policy decision in the audit trail (admin actions are always recorded).
    audit_decisions: bool = True
    models: list[CatalogModelConfig] = Field(default_factory=list)
    providers: list[ProviderReviewConfig] = Field(default_factory=list)

    @field_validator("policies")
    @classmethod
    def _policies_not_blank(cls, v: str | None) -> str | None:
        return v if v is None or v.strip() else None

    @model_validator(mode="after")
    def _unique(self) -> GovernanceConfig:
        for what, names in (
            ("model", [m.name for m in self.models]),
            ("deployment", [d.name for m in self.models for d in m.deployments]),
            ("provider", [p.name for p in self.providers]),
        ):
            seen: set[str] = set()
            for name in names:
                if name in seen:
                    raise ValueError(f"governance {what} '{name}' is declared twice")
                seen.add(name)
        return self


Action = Literal["invoke", "embed", "ingest", "retrieve", "use_tool"]
ACTIONS: tuple[Action, ...] = ("invoke", "embed", "ingest", "retrieve", "use_tool")
