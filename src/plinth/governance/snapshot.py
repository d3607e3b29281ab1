"""What the hot path knows about the catalog, providers and kill switches: one immutable snapshot.

Built from the configuration (routed deployments, file-declared catalog) and the database (entries
made through the admin API, active kill switches), and swapped whole when anything changes, so a
decision never sees half an update. File-declared entries win over database ones of the same name.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cedarpy
import orjson
from sqlalchemy import select

from plinth.governance.config import (
    GovernanceConfig,
    Level,
    Lifecycle,
    ProviderStatus,
)
from plinth.governance.models import CatalogDeployment, CatalogModel, KillSwitch, ProviderReview
from plinth.governance.policy import NAMESPACE, Group, PolicyIndex, Target

if TYPE_CHECKING:
    from plinth.config.schema import PlinthConfig
    from plinth.storage import Database

UNCATALOGUED = "uncatalogued"
KILL_TARGETS = ("model", "deployment", "provider", "key", "team")


def level_of(value: str | None, default: Level = Level.INTERNAL) -> Level:
    try:
        return Level(value) if value else default
    except ValueError:
        return default


def _ts(day_or_time: dt.date | dt.datetime | None) -> float | None:
    """Expiry as Unix time; a date means its first instant (UTC)."""
    if day_or_time is None:
        return None
    if not isinstance(day_or_time, dt.datetime):
        day_or_time = dt.datetime(day_or_time.year, day_or_time.month, day_or_time.day)
    return day_or_time.replace(tzinfo=dt.UTC).timestamp()


@dataclass(frozen=True, slots=True)
class ModelFacts:
    name: str
    catalogued: bool
    status: str
    ceiling: Level
    owner: str = ""
    capabilities: tuple[str, ...] = ()
    context_window: int | None = None
    source: str = "api"


@dataclass(frozen=True, slots=True)
class ProviderFacts:
    name: str
    catalogued: bool
    status: str
    expires_ts: float | None
    regions: frozenset[str]
    ceiling: Level
    training_opt_out: bool = False
    retention_days: int = -1
    certifications: tuple[str, ...] = ()
    source: str = "api"

    def review_problem(self, now: float) -> str | None:
        """Why this provider may not receive traffic now (None: it may)."""
        if not self.catalogued:
            return None
        if self.status != ProviderStatus.APPROVED:
            return f"provider '{self.name}' is not approved (review {self.status})"
        if self.expires_ts is None or self.expires_ts <= now:
            when = dt.datetime.fromtimestamp(self.expires_ts or 0, dt.UTC).strftime("%Y-%m-%d")
            return f"provider '{self.name}' review expired on {when}"
        return None


@dataclass(frozen=True, slots=True)
class DeploymentFacts:
    """A catalog deployment entry (API or file)."""

    name: str
    model: str
    provider: str
    regions: frozenset[str]
    ceiling: Level | None
    status: str
    owner: str = ""
    source: str = "api"


@dataclass(frozen=True, slots=True)
class Routed:
    """A deployment of the running configuration, named as the router names it."""

    name: str
    alias: str
    provider_type: str
    region: str | None


@dataclass(frozen=True, slots=True)
class Member:
    """One deployment as a decision sees it: effective facts and its Cedar resource uid."""

    name: str
    provider: ProviderFacts
    regions: frozenset[str]
    ceiling: Level  # min of deployment, model and provider ceilings
    status: str
    catalogued: bool
    target: Target  # its Cedar uid, and itself in its model and provider for scope matching


@dataclass(slots=True)
class GroupView:
    model: ModelFacts
    members: dict[str, Member]
    group: Group
    entities: str  # Cedar JSON of the members, their model and providers, without brackets
    _parsed: cedarpy.Entities | None = None

    def base(self) -> cedarpy.Entities:
        if self._parsed is None:
            self._parsed = cedarpy.Entities.from_json_str(f"[{self.entities}]")
        return self._parsed


@dataclass(slots=True)
class Snapshot:
    config: GovernanceConfig
    policies: PolicyIndex
    models: dict[str, ModelFacts]
    deployments: dict[str, DeploymentFacts]
    providers: dict[str, ProviderFacts]
    routed: dict[str, Routed]
    kills: dict[str, dict[str, str]]  # target type -> target -> kill switch id
    version: int = 0
    _groups: dict[tuple[str, tuple[str, ...]], GroupView] = field(default_factory=dict)

    def model(self, name: str) -> ModelFacts | None:
        return self.models.get(name)

    def provider(self, name: str) -> ProviderFacts:
        found = self.providers.get(name)
        if found is not None:
            return found
        return ProviderFacts(
            name, False, UNCATALOGUED, None, frozenset(), self.config.uncatalogued_data_class
        )

    def killed(self, target_type: str, target: str | None) -> str | None:
        if target is None:
            return None
        return self.kills.get(target_type, {}).get(target)

    def next_expiry(self, now: float) -> float:
        upcoming = [p.expires_ts for p in self.providers.values() if p.expires_ts and p.expires_ts > now]
        return min(upcoming, default=float("inf"))

    def group(self, model: ModelFacts, names: tuple[str, ...]) -> GroupView:
        key = (model.name, names)
        view = self._groups.get(key)
        if view is None:
            view = self._build_group(model, names)
            if len(self._groups) > 10_000:
                self._groups.clear()
            self._groups[key] = view
        return view

    def _build_group(self, model: ModelFacts, names: tuple[str, ...]) -> GroupView:
        members: dict[str, Member] = {}
        uids: set[tuple[str, str]] = set()
        ancestors: set[tuple[str, str]] = {("Model", model.name)}
        entities: dict[tuple[str, str], bytes] = {}
        entities[("Model", model.name)] = _entity(
            "Model",
            model.name,
            {
                "status": model.status,
                "owner": model.owner,
                "data_class_rank": model.ceiling.rank,
                "capabilities": list(model.capabilities),
                "catalogued": model.catalogued,
            },
        )
        for name in names:
            entry = self.deployments.get(name)
            routed = self.routed.get(name)
            if entry is not None:
                provider_name = entry.provider
                regions = entry.regions
                own_ceiling = entry.ceiling or model.ceiling
                status = entry.status
            else:
                provider_name = routed.provider_type if routed is not None else "unknown"
                regions = frozenset({routed.region}) if routed is not None and routed.region else frozenset()
                own_ceiling = model.ceiling
                status = model.status
            provider = self.provider(provider_name)
            ceiling = min(own_ceiling, model.ceiling, provider.ceiling, key=lambda level: level.rank)
            uid = {"type": f"{NAMESPACE}::Deployment", "id": name}
            own = Group(
                f"deployment:{model.name}:{name}",
                frozenset({"Deployment"}),
                frozenset({("Deployment", name)}),
                frozenset({("Model", model.name), ("Provider", provider.name)}),
            )
            members[name] = Member(
                name, provider, regions, ceiling, status, entry is not None, Target(uid, own)
            )
            uids.add(("Deployment", name))
            ancestors.add(("Provider", provider.name))
            entities[("Deployment", name)] = _entity(
                "Deployment",
                name,
                {
                    "model": {"__entity": {"type": f"{NAMESPACE}::Model", "id": model.name}},
                    "provider": {"__entity": {"type": f"{NAMESPACE}::Provider", "id": provider.name}},
                    "regions": sorted(regions),
                    "data_class_rank": ceiling.rank,
                    "status": status,
                    "model_status": model.status,
                    "catalogued": entry is not None,
                },
                [("Model", model.name), ("Provider", provider.name)],
            )
            entities[("Provider", provider.name)] = _entity(
                "Provider",
                provider.name,
                {
                    "status": provider.status,
                    "regions": sorted(provider.regions),
                    "data_class_rank": provider.ceiling.rank,
                    "training_opt_out": provider.training_opt_out,
                    "retention_days": provider.retention_days,
                    "certifications": list(provider.certifications),
                    "catalogued": provider.catalogued,
                },
            )
        group = Group(f"model:{model.name}", frozenset({"Deployment"}), frozenset(uids), frozenset(ancestors))
        return GroupView(model, members, group, b",".join(entities.values()).decode())


def _entity(
    kind: str, ident: str, attrs: dict[str, object], parents: list[tuple[str, str]] | None = None
) -> bytes:
    return orjson.dumps(
        {
            "uid": {"type": f"{NAMESPACE}::{kind}", "id": ident},
            "attrs": attrs,
            "parents": [{"type": f"{NAMESPACE}::{k}", "id": i} for k, i in parents or []],
        }
    )


# --- building -------------------------------------------------------------------------------------


@dataclass(slots=True)
class DatabaseState:
    models: list[CatalogModel]
    deployments: list[CatalogDeployment]
    providers: list[ProviderReview]
    kills: list[KillSwitch]


def load_database_state(db: Database) -> DatabaseState:
    with db.session() as session:
        return DatabaseState(
            list(session.scalars(select(CatalogModel))),
            list(session.scalars(select(CatalogDeployment))),
            list(session.scalars(select(ProviderReview))),
            list(session.scalars(select(KillSwitch).where(KillSwitch.lifted_at.is_(None)))),
        )


def routed_deployments(config: PlinthConfig) -> dict[str, Routed]:
    """Every routed deployment under the name the router gives it (see plinth.routing.router)."""
    routed: dict[str, Routed] = {}
    for model in config.models:
        for i, dep in enumerate(model.deployments):
            name = dep.name or f"{model.name}/{dep.provider}/{i}"
            routed[name] = Routed(name, model.name, str(dep.provider), dep.region)
    return routed


def build_snapshot(
    config: GovernanceConfig,
    routed: dict[str, Routed],
    policies: PolicyIndex,
    state: DatabaseState | None,
    version: int = 0,
) -> Snapshot:
    models: dict[str, ModelFacts] = {}
    deployments: dict[str, DeploymentFacts] = {}
    providers: dict[str, ProviderFacts] = {}
    kills: dict[str, dict[str, str]] = {kind: {} for kind in KILL_TARGETS}
    if state is not None:
        for row in state.models:
            models[row.name] = ModelFacts(
                row.name,
                True,
                row.status,
                level_of(row.data_class),
                row.owner or "",
                tuple(row.capabilities or ()),
                row.context_window,
                row.source,
            )
        for dep in state.deployments:
            deployments[dep.name] = DeploymentFacts(
                dep.name,
                dep.model,
                dep.provider,
                frozenset(dep.regions or ()),
                level_of(dep.data_class),
                dep.status,
                dep.owner or "",
                dep.source,
            )
        for review in state.providers:
            providers[review.name] = ProviderFacts(
                review.name,
                True,
                review.status,
                _ts(review.expires_at),
                frozenset(review.allowed_regions or ()),
                level_of(review.data_class),
                review.training_opt_out,
                review.data_retention_days if review.data_retention_days is not None else -1,
                tuple(review.certifications or ()),
                review.source,
            )
        for kill in state.kills:
            kills.setdefault(kill.target_type, {})[kill.target] = kill.id
    for model in config.models:
        models[model.name] = ModelFacts(
            model.name,
            True,
            model.status.value,
            model.data_class,
            model.owner or "",
            tuple(model.capabilities),
            model.context_window,
            "config",
        )
        for dep_cfg in model.deployments:
            provider_name = dep_cfg.provider or (
                routed[dep_cfg.name].provider_type if dep_cfg.name in routed else "unknown"
            )
            deployments[dep_cfg.name] = DeploymentFacts(
                dep_cfg.name,
                model.name,
                provider_name,
                frozenset(dep_cfg.regions),
                dep_cfg.data_class,
                dep_cfg.status.value,
                dep_cfg.owner or "",
                "config",
            )
    for review_cfg in config.providers:
        providers[review_cfg.name] = ProviderFacts(
            review_cfg.name,
            True,
            review_cfg.status.value,
            _ts(review_cfg.expires_at),
            frozenset(review_cfg.allowed_regions),
            review_cfg.data_class,
            review_cfg.training_opt_out,
            review_cfg.data_retention_days if review_cfg.data_retention_days is not None else -1,
            tuple(review_cfg.certifications),
            "config",
        )
    return Snapshot(config, policies, models, deployments, providers, routed, kills, version)


def uncatalogued_model(name: str, config: GovernanceConfig) -> ModelFacts:
    """Stands in for a model nobody catalogued (refused earlier when the catalog is required)."""
    return ModelFacts(name, False, Lifecycle.APPROVED.value, config.uncatalogued_data_class)
