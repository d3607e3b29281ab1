"""The governance part of the admin API: model hub, providers, approvals, kill switches, policy, audit.

`GovernanceAdmin` is an `AdminExtension`: its operations join the one route table (authentication,
permissions, error shapes and the OpenAPI document come with it). It is also an `AdminObserver`:
every other admin call that changes something (keys, teams, budgets, ...) is recorded in the
audit trail after it ran, with who, what and the outcome; governance's own changes are recorded
inside their transactions by `GovernanceService`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel

from plinth.admin.api import Call, Operation
from plinth.gateway.errors import GatewayError
from plinth.governance import audit
from plinth.governance import schemas as g
from plinth.governance.config import ProviderStatus
from plinth.governance.policy import PolicyError, PolicyIndex, PolicySource, load_policies
from plinth.governance.service import (
    DEPLOYMENT_LIFECYCLE,
    MODEL_LIFECYCLE,
    FourEyes,
    GovernanceService,
)
from plinth.governance.snapshot import routed_deployments
from plinth.storage import Database, utcnow

if TYPE_CHECKING:
    from plinth.config.schema import PlinthConfig
    from plinth.governance.engine import Governance

MAX_DETAIL_BYTES = 4000


class GovernanceAdmin:
    """Admin operations of the governance part, bound to one database and configuration."""

    def __init__(
        self, database: Database, config: PlinthConfig, governance: Governance | None = None
    ) -> None:
        self.db = database
        self.settings = config.governance
        self.governance = governance
        self.service = GovernanceService(
            database,
            config.governance,
            routed_deployments(config),
            frozenset(key.name for key in config.keys),
        )
        self.log = audit.AuditLog(database)
        self._own: set[Callable[[Call], BaseModel]] = set()

    # --- model hub -------------------------------------------------------------------------------

    def _list_models(self, call: Call) -> g.ModelList:
        """The model catalog: API-created and file-declared entries, with lifecycle and model card."""
        return g.ModelList(data=[g.ModelOut.of(row) for row in self.service.list_models()])

    def _get_model(self, call: Call) -> g.ModelOut:
        """One catalog model."""
        return g.ModelOut.of(self.service.get_model(call.path["name"]))

    def _create_model(self, call: Call) -> g.ModelOut:
        """Add a model to the catalog as `proposed`; it serves once a second person approves it."""
        body = call.body_as(g.ModelCreate)
        row = self.service.create_model(call.actor.label, body.columns(), request_id=call.request_id)
        return g.ModelOut.of(row)

    def _update_model(self, call: Call) -> g.ModelOut:
        """Change a model's facts (card, owner, ceiling, ...); lifecycle changes go through approvals."""
        fields = call.body_as(g.ModelPatch).columns(only_set=True)
        row = self.service.update_model(
            call.actor.label, call.path["name"], fields, request_id=call.request_id
        )
        return g.ModelOut.of(row)

    def _model_lifecycle(self, call: Call) -> g.ApprovalOut:
        """Ask to move a model to another lifecycle status; another person approves it."""
        body = call.body_as(g.LifecycleRequest)
        row = self.service.request_lifecycle(
            call.actor.label,
            MODEL_LIFECYCLE,
            call.path["name"],
            body.status,
            body.reason,
            request_id=call.request_id,
        )
        return g.ApprovalOut.of(row)

    def _list_deployments(self, call: Call) -> g.DeploymentList:
        """Catalog deployments (provider, regions, ceiling, status), optionally of one model."""
        rows = self.service.list_deployments(call.query_as(g.DeploymentQuery).model)
        return g.DeploymentList(data=[g.DeploymentOut.of(row) for row in rows])

    def _get_deployment(self, call: Call) -> g.DeploymentOut:
        """One catalog deployment."""
        return g.DeploymentOut.of(self.service.get_deployment(call.path["name"]))

    def _create_deployment(self, call: Call) -> g.DeploymentOut:
        """Add a deployment entry as `proposed`: a new place data may go needs a second person."""
        body = call.body_as(g.DeploymentCreate)
        row = self.service.create_deployment(call.actor.label, body.columns(), request_id=call.request_id)
        return g.DeploymentOut.of(row)

    def _update_deployment(self, call: Call) -> g.DeploymentOut:
        """Change a deployment's provider, regions, ceiling or owner."""
        fields = call.body_as(g.DeploymentPatch).columns(only_set=True)
        row = self.service.update_deployment(
            call.actor.label, call.path["name"], fields, request_id=call.request_id
        )
        return g.DeploymentOut.of(row)

    def _deployment_lifecycle(self, call: Call) -> g.ApprovalOut:
        """Ask to move a deployment to another lifecycle status; another person approves it."""
        body = call.body_as(g.LifecycleRequest)
        row = self.service.request_lifecycle(
            call.actor.label, DEPLOYMENT_LIFECYCLE, call.path["name"], body.status, body.reason,
            request_id=call.request_id,
        )  # fmt: skip
        return g.ApprovalOut.of(row)

    # --- providers -------------------------------------------------------------------------------

    def _list_providers(self, call: Call) -> g.ProviderList:
        """Provider due-diligence records; `valid` tells whether each may receive traffic now."""
        now = utcnow()
        return g.ProviderList(data=[g.ProviderOut.of(row, now) for row in self.service.list_providers()])

    def _get_provider(self, call: Call) -> g.ProviderOut:
        """One provider's due-diligence record."""
        return g.ProviderOut.of(self.service.get_provider(call.path["name"]), utcnow())

    def _set_provider(self, call: Call) -> g.ProviderOut:
        """Create or update a provider's due-diligence facts (a new record starts pending)."""
        body = call.body_as(g.ProviderSet)
        row = self.service.set_provider(
            call.actor.label, call.path["name"], body.columns(), request_id=call.request_id
        )
        return g.ProviderOut.of(row, utcnow())

    def _review_provider(self, call: Call) -> g.ApprovalOut:
        """Ask to approve a provider until a date (or reject it); another person decides."""
        body = call.body_as(g.ProviderReviewRequest)
        row = self.service.request_provider_review(
            call.actor.label,
            call.path["name"],
            ProviderStatus(body.decision),
            body.expiry(utcnow()),
            body.reason,
            request_id=call.request_id,
        )
        return g.ApprovalOut.of(row)

    # --- approvals -------------------------------------------------------------------------------

    def _list_approvals(self, call: Call) -> g.ApprovalList:
        """Approval requests, newest first, optionally in one state."""
        query = call.query_as(g.ApprovalQuery)
        rows = self.service.list_approvals(query.state, query.limit)
        return g.ApprovalList(data=[g.ApprovalOut.of(row) for row in rows])

    def _get_approval(self, call: Call) -> g.ApprovalOut:
        """One approval request."""
        return g.ApprovalOut.of(self.service.get_approval(call.path["approval_id"]))

    def _decide(self, call: Call, approve: bool) -> g.ApprovalOut:
        note = call.body_as(g.ApprovalDecision).note if call.body is not None else None
        try:
            row = self.service.decide_approval(
                call.actor.label, call.path["approval_id"], approve, note, request_id=call.request_id
            )
        except FourEyes as exc:
            raise GatewayError(403, f"{exc}.", code="four_eyes") from None
        return g.ApprovalOut.of(row)

    def _approve_request(self, call: Call) -> g.ApprovalOut:
        """Approve and apply a pending request. Never by the person who asked (four eyes)."""
        return self._decide(call, True)

    def _reject_request(self, call: Call) -> g.ApprovalOut:
        """Reject a pending request (someone other than the person who asked)."""
        return self._decide(call, False)

    def _cancel_request(self, call: Call) -> g.ApprovalOut:
        """Withdraw your own pending request."""
        try:
            row = self.service.cancel_approval(
                call.actor.label, call.path["approval_id"], request_id=call.request_id
            )
        except FourEyes as exc:
            raise GatewayError(403, f"{exc}.", code="four_eyes") from None
        return g.ApprovalOut.of(row)

    # --- kill switches ---------------------------------------------------------------------------

    def _list_kill_switches(self, call: Call) -> g.KillList:
        """Active kill switches (all with `all=true`), newest first."""
        rows = self.service.list_kills(active=not call.query_as(g.KillQuery).all)
        return g.KillList(data=[g.KillOut.of(row) for row in rows])

    def _create_kill_switch(self, call: Call) -> g.KillOut:
        """Disable a model, deployment, provider, key or team at once, on every worker and replica
        (within `governance.refresh_s`)."""
        body = call.body_as(g.KillCreate)
        row = self.service.kill(
            call.actor.label, body.target_type, body.target, body.reason, request_id=call.request_id
        )
        return g.KillOut.of(row)

    def _lift_kill_switch(self, call: Call) -> g.KillOut:
        """Lift a kill switch."""
        body = call.body_as(g.KillLift)
        row = self.service.lift(
            call.actor.label, call.path["kill_id"], body.reason, request_id=call.request_id
        )
        return g.KillOut.of(row)

    # --- policy and audit ------------------------------------------------------------------------

    def _show_policy(self, call: Call) -> g.PolicySetOut:
        """The loaded policy set: ids, effects and files, and the last reload's error if any."""
        if self.governance is not None:
            index, error = self.governance.policies, self.governance.policy_error
        else:
            try:
                index, error = PolicyIndex(load_policies(PolicySource(self.settings.policies))), None
            except PolicyError as exc:
                raise GatewayError(
                    400, f"The policy files cannot be loaded: {exc}", code="invalid_policy"
                ) from None
        loaded = index.loaded
        return g.PolicySetOut(
            digest=loaded.digest,
            builtin=loaded.builtin,
            files=list(loaded.files),
            policies=[
                g.PolicyOut(
                    id=p.id, effect=p.effect, file=p.file, actions=sorted(p.actions) if p.actions else None
                )
                for p in loaded.policies
            ],
            reload_error=error,
        )

    def _audit_records(self, call: Call) -> g.AuditList:
        """Audit records after `after_seq`, oldest first; page with `next_after_seq`."""
        query = call.query_as(g.AuditQuery)
        records = audit.records_after(
            self.db, query.after_seq, query.limit, kind=query.kind, request_id=query.request_id
        )
        after = records[-1]["seq"] if records else query.after_seq
        return g.AuditList(data=[g.AuditRecordOut(**r) for r in records], next_after_seq=after)

    def _audit_verify(self, call: Call) -> g.AuditVerifyOut:
        """Walk the whole hash chain: names the first record edited, removed or moved, if any."""
        return g.AuditVerifyOut(**self.log.verify().as_dict())

    # --- the extension hooks ---------------------------------------------------------------------

    def operations(self) -> list[Operation]:
        ops = [
            Operation("GET", "/models", self._list_models, g.ModelList, "List catalog models", "models",
                      "models:read", "read the model catalog"),
            Operation("POST", "/models", self._create_model, g.ModelOut, "Add a catalog model", "models",
                      "models:write", "edit the model catalog", 201, g.ModelCreate, errors=(409,)),
            Operation("POST", "/models/{name:path}/lifecycle", self._model_lifecycle, g.ApprovalOut,
                      "Request a model lifecycle change", "models", "models:write", "edit the model catalog",
                      201, g.LifecycleRequest, errors=(404, 409)),
            Operation("GET", "/models/{name:path}", self._get_model, g.ModelOut, "Show a catalog model",
                      "models", "models:read", "read the model catalog", errors=(404,)),
            Operation("PATCH", "/models/{name:path}", self._update_model, g.ModelOut, "Change a catalog model",
                      "models", "models:write", "edit the model catalog", body=g.ModelPatch, errors=(404, 409)),
            Operation("GET", "/deployments", self._list_deployments, g.DeploymentList, "List catalog deployments",
                      "models", "models:read", "read the model catalog", query=g.DeploymentQuery),
            Operation("POST", "/deployments", self._create_deployment, g.DeploymentOut,
                      "Add a catalog deployment", "models", "models:write", "edit the model catalog", 201,
                      g.DeploymentCreate, errors=(404, 409)),
            Operation("POST", "/deployments/{name:path}/lifecycle", self._deployment_lifecycle, g.ApprovalOut,
                      "Request a deployment lifecycle change", "models", "models:write",
                      "edit the model catalog", 201, g.LifecycleRequest, errors=(404, 409)),
            Operation("GET", "/deployments/{name:path}", self._get_deployment, g.DeploymentOut,
                      "Show a catalog deployment", "models", "models:read", "read the model catalog",
                      errors=(404,)),
            Operation("PATCH", "/deployments/{name:path}", self._update_deployment, g.DeploymentOut,
                      "Change a catalog deployment", "models", "models:write", "edit the model catalog",
                      body=g.DeploymentPatch, errors=(404, 409)),
            Operation("GET", "/providers", self._list_providers, g.ProviderList, "List provider reviews",
                      "providers", "providers:read", "read provider reviews"),
            Operation("GET", "/providers/{name}", self._get_provider, g.ProviderOut, "Show a provider review",
                      "providers", "providers:read", "read provider reviews", errors=(404,)),
            Operation("PUT", "/providers/{name}", self._set_provider, g.ProviderOut,
                      "Create or update a provider's due-diligence record", "providers", "providers:write",
                      "edit provider reviews", body=g.ProviderSet, errors=(409,)),
            Operation("POST", "/providers/{name}/review", self._review_provider, g.ApprovalOut,
                      "Request a provider approval or rejection", "providers", "providers:write",
                      "edit provider reviews", 201, g.ProviderReviewRequest, errors=(404, 409)),
            Operation("GET", "/approvals", self._list_approvals, g.ApprovalList, "List approval requests",
                      "approvals", "approvals:read", "read approval requests", query=g.ApprovalQuery),
            Operation("GET", "/approvals/{approval_id}", self._get_approval, g.ApprovalOut,
                      "Show an approval request", "approvals", "approvals:read", "read approval requests",
                      errors=(404,)),
            Operation("POST", "/approvals/{approval_id}/approve", self._approve_request, g.ApprovalOut,
                      "Approve a request (four eyes)", "approvals", "approvals:write", "approve changes",
                      body=g.ApprovalDecision, body_optional=True, errors=(404, 409)),
            Operation("POST", "/approvals/{approval_id}/reject", self._reject_request, g.ApprovalOut,
                      "Reject a request", "approvals", "approvals:write", "reject changes",
                      body=g.ApprovalDecision, body_optional=True, errors=(404, 409)),
            Operation("POST", "/approvals/{approval_id}/cancel", self._cancel_request, g.ApprovalOut,
                      "Withdraw your own request", "approvals", "approvals:read", "withdraw requests",
                      errors=(404, 409)),
            Operation("GET", "/kill-switches", self._list_kill_switches, g.KillList, "List kill switches", "kill",
                      "kill:read", "read kill switches", query=g.KillQuery),
            Operation("POST", "/kill-switches", self._create_kill_switch, g.KillOut, "Disable something at once", "kill",
                      "kill:write", "use kill switches", 201, g.KillCreate, errors=(404, 409)),
            Operation("POST", "/kill-switches/{kill_id}/lift", self._lift_kill_switch, g.KillOut, "Lift a kill switch",
                      "kill", "kill:write", "use kill switches", body=g.KillLift, errors=(404, 409)),
            Operation("GET", "/policy", self._show_policy, g.PolicySetOut, "Show the loaded policies", "policy",
                      "policy:read", "read policies"),
            Operation("GET", "/audit/records", self._audit_records, g.AuditList, "List audit records", "audit",
                      "audit:read", "read the audit trail", query=g.AuditQuery),
            Operation("GET", "/audit/verify", self._audit_verify, g.AuditVerifyOut, "Verify the audit chain",
                      "audit", "audit:read", "read the audit trail"),
        ]  # fmt: skip
        self._own = {op.handler for op in ops}
        return ops

    def observe(
        self, operation: Operation, call: Call, result: BaseModel | None, error: GatewayError | None
    ) -> None:
        """Record an admin call that changes something (blocking; runs in the handler's thread).

        Governance's own successful changes are already recorded in their transactions."""
        if operation.method == "GET" or (error is None and operation.handler in self._own):
            return
        target = next(iter(call.path.values()), None) or getattr(result, "id", None)
        detail: dict[str, Any] = {"operation": operation.operation_id, "path": operation.path}
        if call.path:
            detail["path_params"] = dict(call.path)
        if call.body is not None:
            body = call.body.model_dump(mode="json", exclude_unset=True)
            if len(orjson.dumps(body)) <= MAX_DETAIL_BYTES:
                detail["body"] = body
            else:
                detail["body_fields"] = sorted(body)
        if error is not None:
            detail["status"] = error.status
        self.log.record_admin_action(
            call.actor.label,
            operation.operation_id,
            target=str(target) if target is not None else None,
            outcome="ok" if error is None else "refused" if error.status in (401, 403) else "error",
            reason=error.message if error is not None else None,
            request_id=call.request_id,
            detail=detail,
        )
