"""Governance writes: the model hub, provider reviews, four-eyes approvals and kill switches.

The one place these tables change. Every write bumps the shared change counter (so each worker's
`Governance` snapshot follows within `governance.refresh_s`) and appends its audit record in the
same transaction: a change without its record, or a record without its change, cannot happen.

Entries declared in `plinth.yaml` are listed beside database ones (source "config") but are
read-only here: they change with the file.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from plinth.governance import audit
from plinth.governance.config import (
    TRANSITIONS,
    GovernanceConfig,
    Lifecycle,
    ProviderStatus,
)
from plinth.governance.models import (
    ApprovalRequest,
    CatalogDeployment,
    CatalogModel,
    KillSwitch,
    ProviderReview,
)
from plinth.governance.snapshot import KILL_TARGETS, Routed
from plinth.storage import Base, Database, utcnow
from plinth.tenancy.models import ApiKey, Team, new_id
from plinth.tenancy.service import Conflict, NotFound, TenancyError, bump_change_counter

M = TypeVar("M", bound=Base)

MODEL_LIFECYCLE = "model_lifecycle"
DEPLOYMENT_LIFECYCLE = "deployment_lifecycle"
PROVIDER_REVIEW = "provider_review"
APPROVAL_KINDS = (MODEL_LIFECYCLE, DEPLOYMENT_LIFECYCLE, PROVIDER_REVIEW)
MAX_REVIEW_DAYS = 3 * 366


class GovernanceError(TenancyError):
    """A refused governance change (400 unless a subclass says otherwise)."""


class FourEyes(GovernanceError):
    """The same person may not both request and approve a change."""

    status = 403


def _get(session: Session, model: type[M], ident: str, what: str) -> M:
    row = session.get(model, ident)
    if row is None:
        raise NotFound(f"{what} '{ident}' does not exist")
    return row


def _changes(row: Base, fields: dict[str, Any]) -> dict[str, Any]:
    """Apply `fields` to `row`; return {field: [old, new]} of what really changed (for the audit)."""
    changed: dict[str, Any] = {}
    for name, value in fields.items():
        old = getattr(row, name)
        if old != value:
            changed[name] = [_plain(old), _plain(value)]
            setattr(row, name, value)
    return changed


def _plain(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


class GovernanceService:
    def __init__(self, db: Database, settings: GovernanceConfig, routed: dict[str, Routed] | None = None,
                 config_keys: frozenset[str] = frozenset()) -> None:  # fmt: skip
        self.db = db
        self.settings = settings
        self.routed = routed or {}
        self.config_keys = config_keys
        self._config_models = {m.name: m for m in settings.models}
        self._config_deployments = {d.name: (m.name, d) for m in settings.models for d in m.deployments}
        self._config_providers = {p.name: p for p in settings.providers}

    # --- helpers ---------------------------------------------------------------------------------

    def _write(self, fn: Callable[[Session], M], what: str) -> M:
        with self.db.session() as session:
            try:
                result = fn(session)
                session.flush()
            except IntegrityError:
                raise Conflict(f"{what} already exists") from None
            return result

    def _record(self, session: Session, actor: str, action: str, target: str, *, request_id: str | None,
                reason: str | None = None, detail: dict[str, Any] | None = None) -> None:  # fmt: skip
        entry = audit.Entry("admin", actor, action, "ok", target, reason, request_id, (), detail or {})
        audit.append(session, [entry])

    def _not_declared(self, kind: str, name: str, table: dict[str, Any]) -> None:
        if name in table:
            raise Conflict(f"{kind} '{name}' is declared in plinth.yaml (governance); change it there")

    # --- models ----------------------------------------------------------------------------------

    def list_models(self) -> list[CatalogModel]:
        with self.db.session() as session:
            rows = {row.name: row for row in session.scalars(select(CatalogModel))}
        for name, cfg in self._config_models.items():
            rows[name] = CatalogModel(
                name=name, owner=cfg.owner, description=cfg.description, status=cfg.status.value,
                data_class=cfg.data_class.value, context_window=cfg.context_window,
                capabilities=list(cfg.capabilities),
                prices=cfg.prices.model_dump(exclude_none=True) if cfg.prices else None,
                card_text=cfg.card.text, card_links=list(cfg.card.links), source="config",
            )  # fmt: skip
        return [rows[name] for name in sorted(rows)]

    def get_model(self, name: str) -> CatalogModel:
        for row in self.list_models():
            if row.name == name:
                return row
        raise NotFound(f"model '{name}' is not in the catalog")

    def create_model(
        self, actor: str, fields: dict[str, Any], *, request_id: str | None = None
    ) -> CatalogModel:
        """Add a model as `proposed`: it serves only once a second person approves it."""
        name = str(fields["name"])
        self._not_declared("model", name, self._config_models)

        def create(session: Session) -> CatalogModel:
            row = CatalogModel(**fields, status=Lifecycle.PROPOSED.value, source="api",
                               change_seq=bump_change_counter(session))  # fmt: skip
            session.add(row)
            session.flush()
            self._record(session, actor, "model.create", name, request_id=request_id, detail=_detail(fields))
            return row

        return self._write(create, f"model '{name}'")

    def update_model(self, actor: str, name: str, fields: dict[str, Any], *, request_id: str | None = None) -> CatalogModel:  # fmt: skip
        """Change a model's card, owner, ceiling or other facts (not its lifecycle: see approvals)."""
        self._not_declared("model", name, self._config_models)
        with self.db.session() as session:
            row = _get(session, CatalogModel, name, "model")
            changed = _changes(row, fields)
            if changed:
                row.updated_at = utcnow()
                row.change_seq = bump_change_counter(session)
                self._record(session, actor, "model.update", name, request_id=request_id, detail=changed)
            return row

    # --- deployments -----------------------------------------------------------------------------

    def list_deployments(self, model: str | None = None) -> list[CatalogDeployment]:
        with self.db.session() as session:
            rows = {row.name: row for row in session.scalars(select(CatalogDeployment))}
        for name, (model_name, cfg) in self._config_deployments.items():
            routed = self.routed.get(name)
            rows[name] = CatalogDeployment(
                name=name, model=model_name,
                provider=cfg.provider or (routed.provider_type if routed else "unknown"),
                regions=list(cfg.regions),
                data_class=(cfg.data_class or self._config_models[model_name].data_class).value,
                status=cfg.status.value, owner=cfg.owner, source="config",
            )  # fmt: skip
        found = [rows[n] for n in sorted(rows)]
        return [row for row in found if model is None or row.model == model]

    def get_deployment(self, name: str) -> CatalogDeployment:
        for row in self.list_deployments():
            if row.name == name:
                return row
        raise NotFound(f"deployment '{name}' is not in the catalog")

    def create_deployment(self, actor: str, fields: dict[str, Any], *, request_id: str | None = None) -> CatalogDeployment:  # fmt: skip
        """Add a deployment entry as `proposed` (a new place data may go needs a second person)."""
        name = str(fields["name"])
        self._not_declared("deployment", name, self._config_deployments)

        def create(session: Session) -> CatalogDeployment:
            model = _get(session, CatalogModel, str(fields["model"]), "model")
            row = CatalogDeployment(**{**fields, "data_class": fields.get("data_class") or model.data_class},
                                    status=Lifecycle.PROPOSED.value, source="api",
                                    change_seq=bump_change_counter(session))  # fmt: skip
            session.add(row)
            session.flush()
            self._record(session, actor, "deployment.create", name, request_id=request_id,
                         detail=_detail(fields))  # fmt: skip
            return row

        return self._write(create, f"deployment '{name}'")

    def update_deployment(self, actor: str, name: str, fields: dict[str, Any], *, request_id: str | None = None) -> CatalogDeployment:  # fmt: skip
        self._not_declared("deployment", name, self._config_deployments)
        with self.db.session() as session:
            row = _get(session, CatalogDeployment, name, "deployment")
            changed = _changes(row, fields)
            if changed:
                row.updated_at = utcnow()
                row.change_seq = bump_change_counter(session)
                self._record(session, actor, "deployment.update", name, request_id=request_id, detail=changed)
            return row

    # --- providers -------------------------------------------------------------------------------

    def list_providers(self) -> list[ProviderReview]:
        with self.db.session() as session:
            rows = {row.name: row for row in session.scalars(select(ProviderReview))}
        for name, cfg in self._config_providers.items():
            rows[name] = ProviderReview(
                name=name, display_name=cfg.display_name, status=cfg.status.value,
                data_retention_days=cfg.data_retention_days, training_opt_out=cfg.training_opt_out,
                certifications=list(cfg.certifications), allowed_regions=list(cfg.allowed_regions),
                data_class=cfg.data_class.value, reviewer=cfg.reviewer,
                reviewed_at=_midnight(cfg.reviewed_at), expires_at=_midnight(cfg.expires_at),
                notes=cfg.notes, source="config",
            )  # fmt: skip
        return [rows[n] for n in sorted(rows)]

    def get_provider(self, name: str) -> ProviderReview:
        for row in self.list_providers():
            if row.name == name:
                return row
        raise NotFound(f"provider '{name}' has no due-diligence record")

    def set_provider(self, actor: str, name: str, fields: dict[str, Any], *, request_id: str | None = None) -> ProviderReview:  # fmt: skip
        """Create or update a provider's due-diligence facts. A new record starts `pending`; an
        approved one stays approved (the audit trail keeps every change to its facts)."""
        self._not_declared("provider", name, self._config_providers)
        with self.db.session() as session:
            row = session.get(ProviderReview, name)
            seq = bump_change_counter(session)
            if row is None:
                row = ProviderReview(name=name, status=ProviderStatus.PENDING.value, source="api", **fields)
                row.change_seq = seq
                session.add(row)
                self._record(
                    session, actor, "provider.create", name, request_id=request_id, detail=_detail(fields)
                )
                return row
            changed = _changes(row, fields)
            if changed:
                row.updated_at = utcnow()
                row.change_seq = seq
                self._record(session, actor, "provider.update", name, request_id=request_id, detail=changed)
            return row

    # --- approvals -------------------------------------------------------------------------------

    def list_approvals(self, state: str | None = None, limit: int = 200) -> list[ApprovalRequest]:
        with self.db.session() as session:
            query = select(ApprovalRequest).order_by(ApprovalRequest.requested_at.desc()).limit(limit)
            if state is not None:
                query = query.where(ApprovalRequest.state == state)
            return list(session.scalars(query))

    def get_approval(self, approval_id: str) -> ApprovalRequest:
        with self.db.session() as session:
            return _get(session, ApprovalRequest, approval_id, "approval request")

    def request_lifecycle(self, actor: str, kind: str, target: str, status: Lifecycle, reason: str, *,
                          request_id: str | None = None) -> ApprovalRequest:  # fmt: skip
        """Ask for a model's or deployment's lifecycle change; a second person approves it."""
        table = self._config_models if kind == MODEL_LIFECYCLE else self._config_deployments
        what = "model" if kind == MODEL_LIFECYCLE else "deployment"
        self._not_declared(what, target, table)
        with self.db.session() as session:
            row = _lifecycle_row(session, kind == MODEL_LIFECYCLE, target)
            _check_transition(what, target, Lifecycle(row.status), status)
            return self._new_request(
                session, actor, kind, target, {"status": status.value}, reason, request_id
            )

    def request_provider_review(self, actor: str, name: str, decision: ProviderStatus, expires_at: dt.datetime | None,
                                reason: str, *, request_id: str | None = None) -> ApprovalRequest:  # fmt: skip
        """Ask for a provider's approval (until `expires_at`) or rejection; a second person decides."""
        self._not_declared("provider", name, self._config_providers)
        change: dict[str, Any] = {"status": decision.value}
        if decision is ProviderStatus.APPROVED:
            now = utcnow()
            if expires_at is None or expires_at <= now:
                raise GovernanceError("an approval needs an expiry in the future (expires_at or valid_days)")
            if expires_at > now + dt.timedelta(days=MAX_REVIEW_DAYS):
                raise GovernanceError(f"a review may last {MAX_REVIEW_DAYS} days at most")
            change["expires_at"] = expires_at.isoformat()
        elif decision is not ProviderStatus.REJECTED:
            raise GovernanceError("a provider review decides 'approved' or 'rejected'")
        with self.db.session() as session:
            _get(session, ProviderReview, name, "provider")
            return self._new_request(session, actor, PROVIDER_REVIEW, name, change, reason, request_id)

    def _new_request(self, session: Session, actor: str, kind: str, target: str, change: dict[str, Any],
                     reason: str, request_id: str | None) -> ApprovalRequest:  # fmt: skip
        pending = session.scalar(
            select(ApprovalRequest.id).where(
                ApprovalRequest.kind == kind,
                ApprovalRequest.target == target,
                ApprovalRequest.state == "pending",
            )
        )
        if pending is not None:
            raise Conflict(
                f"{target} already has a pending request ({pending}); approve, reject or cancel it first"
            )
        row = ApprovalRequest(id=new_id("apr"), kind=kind, target=target, change=change, reason=reason,
                              state="pending", requested_by=actor, requested_at=utcnow())  # fmt: skip
        session.add(row)
        session.flush()
        self._record(session, actor, "approval.request", row.id, request_id=request_id, reason=reason,
                     detail={"kind": kind, "target": target, "change": change})  # fmt: skip
        return row

    def decide_approval(self, actor: str, approval_id: str, approve: bool, note: str | None, *,
                        request_id: str | None = None) -> ApprovalRequest:  # fmt: skip
        """Approve (and apply) or reject a pending request; never by the person who asked."""
        with self.db.session() as session:
            seq = bump_change_counter(session)  # takes the write lock before reading the request
            row = session.get(ApprovalRequest, approval_id, with_for_update=True)
            if row is None:
                raise NotFound(f"approval request '{approval_id}' does not exist")
            if row.state != "pending":
                raise Conflict(f"approval request '{approval_id}' is already {row.state}")
            if row.requested_by == actor:
                raise FourEyes(
                    f"'{actor}' asked for this change and may not also decide it: another person with "
                    "the approvals:write permission must"
                )
            applied: dict[str, Any] = {}
            if approve:
                applied = self._apply(session, row, actor, seq)
            row.state = "approved" if approve else "rejected"
            row.decided_by = actor
            row.decided_at = utcnow()
            row.decision_note = note
            self._record(session, actor, "approval.approve" if approve else "approval.reject", row.id, request_id=request_id, reason=note,
                         detail={"kind": row.kind, "target": row.target, "requested_by": row.requested_by,
                                 "applied": applied})  # fmt: skip
            return row

    def cancel_approval(
        self, actor: str, approval_id: str, *, request_id: str | None = None
    ) -> ApprovalRequest:
        with self.db.session() as session:
            row = _get(session, ApprovalRequest, approval_id, "approval request")
            if row.state != "pending":
                raise Conflict(f"approval request '{approval_id}' is already {row.state}")
            if row.requested_by != actor:
                raise FourEyes(
                    f"only '{row.requested_by}', who asked, may cancel this request; others reject it"
                )
            row.state = "cancelled"
            row.decided_by = actor
            row.decided_at = utcnow()
            self._record(session, actor, "approval.cancel", row.id, request_id=request_id)
            return row

    def _apply(self, session: Session, request: ApprovalRequest, approver: str, seq: int) -> dict[str, Any]:
        """Carry out an approved change (re-checked: the target may have moved since the request)."""
        change = request.change
        target: CatalogModel | CatalogDeployment | ProviderReview
        if request.kind in (MODEL_LIFECYCLE, DEPLOYMENT_LIFECYCLE):
            is_model = request.kind == MODEL_LIFECYCLE
            what = "model" if is_model else "deployment"
            target = _lifecycle_row(session, is_model, request.target)
            status = Lifecycle(change["status"])
            _check_transition(what, request.target, Lifecycle(target.status), status)
            applied = _changes(target, {"status": status.value})
        elif request.kind == PROVIDER_REVIEW:
            target = _get(session, ProviderReview, request.target, "provider")
            fields: dict[str, Any] = {
                "status": change["status"],
                "reviewer": approver,
                "reviewed_at": utcnow(),
            }
            if "expires_at" in change:
                fields["expires_at"] = dt.datetime.fromisoformat(change["expires_at"])
            applied = _changes(target, fields)
        else:
            raise GovernanceError(f"unknown approval kind '{request.kind}'")
        target.updated_at = utcnow()
        target.change_seq = seq
        return applied

    # --- kill switches ---------------------------------------------------------------------------

    def list_kills(self, *, active: bool = True) -> list[KillSwitch]:
        with self.db.session() as session:
            query = select(KillSwitch).order_by(KillSwitch.created_at.desc())
            if active:
                query = query.where(KillSwitch.lifted_at.is_(None))
            return list(session.scalars(query))

    def kill(self, actor: str, target_type: str, target: str, reason: str, *, request_id: str | None = None) -> KillSwitch:  # fmt: skip
        """Disable a model, deployment, provider, key or team now; every worker stops it within
        `governance.refresh_s`. No second person is needed to stop something, only to approve."""
        if target_type not in KILL_TARGETS:
            raise GovernanceError(f"target_type must be one of {', '.join(KILL_TARGETS)}")
        with self.db.session() as session:
            self._check_target(session, target_type, target)
            active = session.scalar(
                select(KillSwitch.id).where(
                    KillSwitch.target_type == target_type,
                    KillSwitch.target == target,
                    KillSwitch.lifted_at.is_(None),
                )
            )
            if active is not None:
                raise Conflict(f"{target_type} '{target}' is already disabled by kill switch {active}")
            row = KillSwitch(id=new_id("kill"), target_type=target_type, target=target, reason=reason,
                             created_by=actor, created_at=utcnow(), change_seq=bump_change_counter(session))  # fmt: skip
            session.add(row)
            session.flush()
            self._record(session, actor, "kill.create", f"{target_type}:{target}", request_id=request_id,
                         reason=reason, detail={"kill_switch": row.id})  # fmt: skip
            return row

    def lift(self, actor: str, kill_id: str, reason: str, *, request_id: str | None = None) -> KillSwitch:
        with self.db.session() as session:
            row = _get(session, KillSwitch, kill_id, "kill switch")
            if row.lifted_at is not None:
                raise Conflict(f"kill switch '{kill_id}' was already lifted")
            row.lifted_at = utcnow()
            row.lifted_by = actor
            row.lift_reason = reason
            row.change_seq = bump_change_counter(session)
            self._record(session, actor, "kill.lift", f"{row.target_type}:{row.target}", request_id=request_id,
                         reason=reason, detail={"kill_switch": row.id})  # fmt: skip
            return row

    def _check_target(self, session: Session, target_type: str, target: str) -> None:
        """Refuse a kill switch that could never match anything (a typo would stop nothing)."""
        known: bool
        if target_type == "key":
            known = target in self.config_keys or session.get(ApiKey, target) is not None
        elif target_type == "team":
            known = session.get(Team, target) is not None
        elif target_type == "model":
            known = (
                target in self._config_models
                or any(r.alias == target for r in self.routed.values())
                or session.get(CatalogModel, target) is not None
            )
        elif target_type == "deployment":
            known = (
                target in self.routed
                or target in self._config_deployments
                or session.get(CatalogDeployment, target) is not None
            )
        else:
            known = (
                target in self._config_providers
                or any(r.provider_type == target for r in self.routed.values())
                or any(d.provider == target for _, d in self._config_deployments.values())
                or session.get(ProviderReview, target) is not None
                or session.scalar(select(CatalogDeployment.name).where(CatalogDeployment.provider == target))
                is not None
            )
        if not known:
            raise NotFound(f"{target_type} '{target}' is unknown to this gateway")


def _lifecycle_row(session: Session, is_model: bool, name: str) -> CatalogModel | CatalogDeployment:
    if is_model:
        return _get(session, CatalogModel, name, "model")
    return _get(session, CatalogDeployment, name, "deployment")


def _check_transition(what: str, name: str, current: Lifecycle, wanted: Lifecycle) -> None:
    if wanted not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[current])) or "none (retired is final)"
        raise GovernanceError(
            f"{what} '{name}' is {current.value}: it can become {allowed}, not {wanted.value}"
        )


def _midnight(day: dt.date | None) -> dt.datetime | None:
    return dt.datetime(day.year, day.month, day.day) if day is not None else None


def _detail(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields for an audit record: plain JSON values, long texts cut (model cards can be long)."""
    out: dict[str, Any] = {}
    for name, value in fields.items():
        value = _plain(value)
        if isinstance(value, str) and len(value) > 300:
            value = value[:300] + "…"
        out[name] = value
    return out
