"""The hot-path surface of governance: classify a request, decide where it may go, list models.

`Governance` is built once per worker. Every call here is synchronous, in memory and free of I/O:
it reads an immutable `Snapshot` that a background task replaces when the database's change counter
moves (catalog, provider reviews, kill switches: within `governance.refresh_s`) or a policy file's
modification time changes (within `governance.policy_reload_s`).

A decision runs the built-in guards first (allowed models, kill switches, lifecycle, provider
review, region, classification ceiling), then the Cedar policies for the deployments still in the
running. Deployments that fail are dropped, so the request is rerouted to a compliant deployment of
the same alias, or refused with a 403 naming the rule when none is left. Decisions are memoised per
(principal, action, model, deployments, class, region, entity types) until the snapshot changes or a
provider review expires.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import cedarpy
import orjson

from plinth.gateway.errors import GatewayError
from plinth.governance.config import SERVING, GovernanceConfig, Level
from plinth.governance.policy import (
    ANY_KEY,
    NAMESPACE,
    Bucket,
    Group,
    PolicyError,
    PolicyIndex,
    PolicySource,
    Target,
    Verdict,
    load_policies,
)
from plinth.governance.snapshot import (
    DatabaseState,
    GroupView,
    Member,
    ModelFacts,
    Routed,
    Snapshot,
    build_snapshot,
    level_of,
    load_database_state,
    routed_deployments,
    uncatalogued_model,
)

if TYPE_CHECKING:
    from plinth.config.schema import PlinthConfig
    from plinth.governance.audit import AuditLog
    from plinth.routing import ModelRoute
    from plinth.storage import Database
    from plinth.tenancy.keys import Principal

log = logging.getLogger("plinth.governance")

DATA_CLASS_HEADER = "x-plinth-data-class"
REGION_HEADER = "x-plinth-region"
MODEL_ACTIONS = ("invoke", "embed")

# Built-in rules: decisions name them like policy ids.
ALLOWED_MODELS = "plinth:allowed-models"
KILL_SWITCH = "plinth:kill-switch"
MODEL_STATUS = "plinth:model-status"
NOT_CATALOGUED = "plinth:not-catalogued"
DEPLOYMENT_STATUS = "plinth:deployment-status"
PROVIDER_REVIEW = "plinth:provider-review"
PROVIDER_REGION = "plinth:provider-region"
CEILING = "plinth:data-class-ceiling"
DEFAULT_DENY = "plinth:default-deny"
NO_DEPLOYMENT = "plinth:no-deployment"


@dataclass(frozen=True, slots=True)
class Exclusion:
    """Why one deployment may not take the request."""

    deployment: str
    rule: str
    policy_ids: tuple[str, ...]
    why: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome for one request: where it may go, or why not, and the ids that decided."""

    allowed: bool
    action: str
    model: str
    data_class: Level
    deployments: tuple[str, ...]  # compliant deployments, in the order given to `decide`
    policy_ids: tuple[str, ...]  # policies and built-in rules that decided
    excluded: tuple[Exclusion, ...] = ()
    rule: str | None = None  # refusals: the rule named in the message
    message: str | None = None  # refusals: the 403 message
    policy_set: str = ""  # sha256 of the policy sources that decided

    @property
    def rerouted(self) -> bool:
        """Allowed, but some deployments were not compliant (traffic goes to the others)."""
        return self.allowed and bool(self.excluded)

    @property
    def outcome(self) -> str:
        return "deny" if not self.allowed else "reroute" if self.excluded else "allow"

    def permits(self, deployment: str) -> bool:
        return deployment in self.deployments

    def error(self) -> GatewayError:
        """The 403 to answer a refusal with (OpenAI/Anthropic shape via the gateway's renderer)."""
        return GatewayError(
            403,
            self.message or "Refused by governance policy.",
            code="policy_denied",
            headers={"x-plinth-policy": ",".join(self.policy_ids)[:500]},
        )


@dataclass(frozen=True, slots=True)
class Resource:
    """A non-model resource for `check`: a knowledge base or a tool, with its owning team."""

    type: str  # "KnowledgeBase" or "Tool"
    id: str
    team: str
    data_class: Level = Level.INTERNAL


def parse_level(value: str, what: str = DATA_CLASS_HEADER) -> Level:
    try:
        return Level(value.strip().lower())
    except ValueError:
        levels = ", ".join(level.value for level in Level)
        raise GatewayError(
            400, f"Invalid {what} '{value[:40]}': use one of {levels}.", param=what, code="invalid_data_class"
        ) from None


def _highest(*levels: Level) -> Level:
    return max(levels, key=lambda level: level.rank)


@dataclass(frozen=True, slots=True)
class _PrincipalView:
    principal: Principal
    uid: dict[str, str]
    buckets: tuple[Bucket, ...]
    entities: str
    attrs: dict[str, object]  # the key entity's Cedar attributes
    # Parsed Cedar entities of this principal with one model's deployments, per group view: parsing
    # them is the largest cost of an evaluation, and both sides change only with a new snapshot.
    handles: dict[str, tuple[GroupView, cedarpy.Entities]] = field(default_factory=dict)

    def entities_with(self, view: GroupView) -> cedarpy.Entities:
        found = self.handles.get(view.group.key)
        if found is not None and found[0] is view:
            return found[1]
        handle = view.base().with_added_json_str(f"[{self.entities}]")
        if len(self.handles) >= 1000:
            self.handles.clear()
        self.handles[view.group.key] = (view, handle)
        return handle


def _request_context(level: Level, region: str | None, types: Iterable[str], model: str) -> dict[str, object]:
    """The Cedar `context` of a request (the schema's `Request` type)."""
    return {
        "data_class": level.value,
        "data_class_rank": level.rank,
        "caller_region": region or "",
        "entity_types": sorted(set(types)),
        "model": model,
    }


def _principal_view(principal: Principal) -> _PrincipalView:
    ident = principal.key_id or principal.name
    uid = {"type": f"{NAMESPACE}::Key", "id": ident}
    buckets: list[Bucket] = [ANY_KEY, ("Key", ident)]
    parents = []
    extra = []
    if principal.team_id:
        buckets.append(("Team", principal.team_id))
        parents.append({"type": f"{NAMESPACE}::Team", "id": principal.team_id})
        team_parents = []
        if principal.org_id:
            buckets.append(("Org", principal.org_id))
            team_parents.append({"type": f"{NAMESPACE}::Org", "id": principal.org_id})
        extra.append(
            {"uid": parents[0], "attrs": {"name": principal.team_name or ""}, "parents": team_parents}
        )
    level = level_of(principal.data_class)
    attrs: dict[str, object] = {
        "name": principal.name,
        "admin": principal.is_admin,
        "environment": principal.environment or "",
        "data_class": level.value,
        "data_class_rank": level.rank,
        "team": principal.team_id or "",
        "team_name": principal.team_name or "",
        "org": principal.org_id or "",
        "project": principal.project_id or "",
        "labels": list(principal.tags),
    }
    key = {"uid": uid, "attrs": attrs, "parents": parents}
    entities = b",".join(orjson.dumps(e) for e in [key, *extra]).decode()
    return _PrincipalView(principal, uid, tuple(buckets), entities, attrs)


@dataclass(slots=True)
class _Memo:
    """A snapshot with the decisions memoised on it, replaced whole when anything changes."""

    snapshot: Snapshot
    decisions: dict[tuple[object, ...], tuple[Principal, Decision]] = field(default_factory=dict)
    until: float = 0.0  # the next provider-review expiry: decisions are re-taken from then on


class Governance:
    """Built once per worker from the configuration and the database; see the module docstring."""

    def __init__(
        self,
        config: PlinthConfig,
        database: Database | None = None,
        *,
        audit: AuditLog | None = None,
    ) -> None:
        self.settings: GovernanceConfig = config.governance
        self.database = database
        self.audit = audit
        self._routed: dict[str, Routed] = routed_deployments(config)
        self._source = PolicySource(self.settings.policies)
        self._index = PolicyIndex(load_policies(self._source))  # PolicyError: refuse to start
        self.policy_error: str | None = None  # the last reload's problem (old policies stay)
        self._seq = -1
        self._state: DatabaseState | None = None
        self._lock = threading.Lock()
        self._principals: dict[int, _PrincipalView] = {}
        self._last_policy_check = time.monotonic()
        self._memo = _Memo(self._build(0))
        self.refresh()

    # --- building and following changes ----------------------------------------------------------

    def _build(self, version: int) -> Snapshot:
        snapshot = build_snapshot(self.settings, self._routed, self._index, self._state, version)
        self._index.prepare(MODEL_ACTIONS, self._groups_of(snapshot))
        return snapshot

    def _groups_of(self, snapshot: Snapshot) -> Iterable[tuple[Group, str]]:
        aliases: dict[str, list[str]] = {}
        for routed in self._routed.values():
            aliases.setdefault(routed.alias, []).append(routed.name)
        for alias, names in aliases.items():
            model = snapshot.model(alias) or uncatalogued_model(alias, self.settings)
            for member in snapshot.group(model, tuple(names)).members.values():
                yield member.target.group, alias

    def _install(self, snapshot: Snapshot) -> None:
        self._memo = _Memo(snapshot)  # one assignment: a decision sees the old or the new, whole

    def refresh(self, *, force_policies: bool = False) -> bool:
        """Reload what changed (blocking: run it in a thread); True when a new snapshot was installed."""
        with self._lock:
            changed = False
            if self.database is not None:
                from plinth.tenancy.service import current_change_seq

                seq = current_change_seq(self.database)
                if seq != self._seq:
                    self._state = load_database_state(self.database)
                    self._seq = seq
                    changed = True
            now = time.monotonic()
            if force_policies or now - self._last_policy_check >= self.settings.policy_reload_s:
                self._last_policy_check = now
                if self._source.changed():
                    changed = self._reload_policies() or changed
            if changed:
                self._install(self._build(self.snapshot.version + 1))
            return changed

    def _reload_policies(self) -> bool:
        try:
            loaded = load_policies(self._source)
        except PolicyError as exc:
            # Keep deciding with the last good policies; say so loudly, once per change.
            self._source.stamps = self._source.current_stamps()
            self.policy_error = str(exc)
            log.error("policy reload failed, keeping the previous policies: %s", exc)
            return False
        self._index = PolicyIndex(loaded)
        self.policy_error = None
        log.info("loaded %d policies (%s)", len(self._index), loaded.digest[:12])
        return True

    async def follow(self) -> None:
        """Refresh forever (until cancelled); a failed poll is logged and retried next interval."""
        while True:
            await asyncio.sleep(self.settings.refresh_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                log.exception("could not refresh governance state; keeping the current snapshot")

    @property
    def snapshot(self) -> Snapshot:
        return self._memo.snapshot

    @property
    def policies(self) -> PolicyIndex:
        """The policies in force."""
        return self._memo.snapshot.policies

    # --- classification ---------------------------------------------------------------------------

    def request_class(
        self, principal: Principal, header_value: str | None = None, findings_class: Level | str | None = None
    ) -> Level:
        """The request's classification: the key's level, raised (never lowered) by the
        `x-plinth-data-class` header and by guardrail findings. A bad header is a 400."""
        level = level_of(principal.data_class)
        if header_value:
            level = _highest(level, parse_level(header_value))
        if findings_class is not None:
            level = _highest(level, level_of(str(findings_class), level))
        return level

    def caller_region(self, header_value: str | None = None) -> str | None:
        """The caller's region from `x-plinth-region`, else `governance.default_region`."""
        if not header_value:
            return self.settings.default_region
        value = header_value.strip()
        if not value or len(value) > 64 or not all(c.isalnum() or c in "._-" for c in value):
            raise GatewayError(
                400,
                f"Invalid {REGION_HEADER}: give a region name such as 'eu-west-1'.",
                param=REGION_HEADER,
                code="invalid_region",
            )
        return value

    # --- decisions --------------------------------------------------------------------------------

    def decide(
        self,
        principal: Principal,
        action: str,
        model: str,
        deployments: Sequence[str],
        data_class: Level,
        caller_region: str | None = None,
        entity_types: Iterable[str] = (),
        requested_model: str | None = None,
    ) -> Decision:
        """May `principal` do `action` on model alias `model`, and through which of `deployments`
        (names, in the router's order)? Pure and in memory; see the module docstring."""
        types = frozenset(entity_types)
        names = tuple(deployments)
        key = (id(principal), action, model, requested_model, names, data_class, caller_region, types)
        # Everything below uses this memo's snapshot, and memoises into this memo only: a refresh
        # that installs a new one meanwhile can never receive a decision taken on the old state.
        memo = self._memo
        now = time.time()
        if now >= memo.until:  # a provider review may have expired: decide everything afresh
            memo.decisions.clear()
            memo.until = memo.snapshot.next_expiry(now)
        hit = memo.decisions.get(key)
        if hit is not None and hit[0] is principal:
            return hit[1]
        decision = self._decide(
            memo.snapshot,
            principal,
            action,
            model,
            names,
            data_class,
            caller_region,
            types,
            now,
            requested_model,
        )
        if len(memo.decisions) >= 50_000:
            memo.decisions.clear()
        memo.decisions[key] = (principal, decision)
        return decision

    def _decide(
        self,
        snap: Snapshot,
        principal: Principal,
        action: str,
        alias: str,
        names: tuple[str, ...],
        level: Level,
        region: str | None,
        types: frozenset[str],
        now: float,
        requested: str | None,
    ) -> Decision:
        digest = snap.policies.loaded.digest

        def refuse(
            rule: str, message: str, ids: Sequence[str] = (), excluded: Sequence[Exclusion] = ()
        ) -> Decision:
            return Decision(
                False, action, alias, level, (), (*ids, rule) if rule not in ids else tuple(ids),
                tuple(excluded), rule, message, digest,
            )  # fmt: skip

        if not principal.may_use(alias):
            return refuse(
                ALLOWED_MODELS,
                f"API key '{principal.name}' may not use model '{alias}' (rule {ALLOWED_MODELS}).",
            )
        for kind, target in (("key", principal.key_id or principal.name), ("team", principal.team_id)):
            kill = snap.killed(kind, target)
            if kill is not None:
                return refuse(
                    KILL_SWITCH, f"This {kind} is disabled by kill switch {kill} (rule {KILL_SWITCH})."
                )
        facts = (snap.model(requested) if requested else None) or snap.model(alias)
        if facts is None:
            if self.settings.require_catalog:
                return refuse(
                    NOT_CATALOGUED, f"Model '{alias}' is not in the model catalog (rule {NOT_CATALOGUED})."
                )
            facts = uncatalogued_model(alias, self.settings)
        kill = snap.killed("model", facts.name) or snap.killed("model", alias)
        if kill is not None:
            return refuse(
                KILL_SWITCH, f"Model '{facts.name}' is disabled by kill switch {kill} (rule {KILL_SWITCH})."
            )
        if facts.status not in SERVING:
            return refuse(
                MODEL_STATUS,
                f"Model '{facts.name}' is {facts.status}; only approved or deprecated models receive traffic "
                f"(rule {MODEL_STATUS}).",
            )
        if not names:
            return refuse(NO_DEPLOYMENT, f"Model '{alias}' has no deployment (rule {NO_DEPLOYMENT}).")
        view = snap.group(facts, names)
        excluded: list[Exclusion] = []
        running: list[Member] = []
        for name in names:
            member = view.members[name]
            problem = self._guard(snap, member, level, now)
            if problem is not None:
                excluded.append(Exclusion(name, problem[0], (problem[0],), problem[1]))
            else:
                running.append(member)
        verdicts: list[Verdict] = []
        if running:
            verdicts = self._evaluate(
                snap.policies, principal, action, view, running, level, region, types, requested or alias
            )
        allowed: list[str] = []
        permit_ids: list[str] = []
        for member, verdict in zip(running, verdicts, strict=True):
            if verdict.allowed:
                allowed.append(member.name)
                permit_ids.extend(i for i in verdict.permits if i not in permit_ids)
            elif verdict.forbids:
                why = "forbidden by policy " + ", ".join(f"'{i}'" for i in verdict.forbids)
                excluded.append(Exclusion(member.name, verdict.forbids[0], verdict.forbids, why))
            else:
                excluded.append(Exclusion(member.name, DEFAULT_DENY, (DEFAULT_DENY,), "no policy permits it"))
        rule_ids: list[str] = []
        for exclusion in excluded:
            rule_ids.extend(i for i in exclusion.policy_ids if i not in rule_ids)
        if allowed:
            order = {name: i for i, name in enumerate(names)}
            excluded.sort(key=lambda e: order[e.deployment])
            ids = (*permit_ids, *(i for i in rule_ids if i not in permit_ids))
            return Decision(
                True, action, alias, level, tuple(allowed), ids, tuple(excluded), None, None, digest
            )
        return refuse(excluded[0].rule, self._refusal(alias, level, region, excluded), rule_ids, excluded)

    @staticmethod
    def _guard(snap: Snapshot, member: Member, level: Level, now: float) -> tuple[str, str] | None:
        """The built-in rule a deployment fails, with why; None when it passes them all."""
        kill = snap.killed("deployment", member.name) or snap.killed("provider", member.provider.name)
        if kill is not None:
            return KILL_SWITCH, f"disabled by kill switch {kill}"
        if member.status not in SERVING:
            return DEPLOYMENT_STATUS, f"deployment is {member.status}"
        provider = member.provider
        problem = provider.review_problem(now)
        if problem is None and not provider.catalogued and snap.config.require_catalog:
            problem = f"provider '{provider.name}' has no due-diligence review"
        if problem is not None:
            return PROVIDER_REVIEW, problem
        if provider.regions and not member.regions <= provider.regions:
            outside = ", ".join(sorted(member.regions - provider.regions)) or "an unknown region"
            return PROVIDER_REGION, f"runs in {outside}, outside provider '{provider.name}' allowed regions"
        if level.rank > member.ceiling.rank:
            return CEILING, f"classification ceiling is {member.ceiling.value}"
        return None

    def _evaluate(
        self,
        policies: PolicyIndex,
        principal: Principal,
        action: str,
        view: GroupView,
        running: list[Member],
        level: Level,
        region: str | None,
        types: frozenset[str],
        requested: str,
    ) -> list[Verdict]:
        who = self._principal(principal)
        context = _request_context(level, region, types, requested)
        targets = [m.target for m in running]
        return policies.evaluate(
            action,
            who.buckets,
            who.uid,
            targets,
            who.entities_with(view),
            context,
            requested,
            policies.principal_facts(who.attrs),
        )

    def _principal(self, principal: Principal) -> _PrincipalView:
        found = self._principals.get(id(principal))
        if found is None or found.principal is not principal:
            found = _principal_view(principal)
            if len(self._principals) >= 100_000:
                self._principals = {}
            self._principals[id(principal)] = found
        return found

    @staticmethod
    def _refusal(alias: str, level: Level, region: str | None, excluded: Sequence[Exclusion]) -> str:
        where = f" from region '{region}'" if region else ""
        rules = {e.rule for e in excluded}
        if len(rules) == 1:
            reasons = "; ".join(f"{e.deployment}: {e.why}" for e in excluded)
            rule = excluded[0].rule
            named = f"policy '{rule}'" if not rule.startswith("plinth:") else f"rule {rule}"
            return (
                f"No deployment of model '{alias}' may receive this {level.value} request{where} "
                f"({named}): {reasons}."
            )
        reasons = "; ".join(f"{e.deployment}: {e.why} ({_name(e.rule)})" for e in excluded)
        return f"No deployment of model '{alias}' may receive this {level.value} request{where}: {reasons}."

    def check(
        self,
        principal: Principal,
        action: str,
        resource: Resource,
        data_class: Level,
        caller_region: str | None = None,
        entity_types: Iterable[str] = (),
    ) -> Decision:
        """Policy decision on a knowledge base or tool (ingest, retrieve, use_tool). Kill switches of
        the key and team, and the resource's classification ceiling, apply as for models."""
        snap = self._memo.snapshot
        digest = snap.policies.loaded.digest
        label = f"{resource.type}:{resource.id}"

        def refuse(rule: str, message: str, ids: tuple[str, ...]) -> Decision:
            return Decision(False, action, label, data_class, (), ids, (), rule, message, digest)

        for kind, target in (("key", principal.key_id or principal.name), ("team", principal.team_id)):
            kill = snap.killed(kind, target)
            if kill is not None:
                msg = f"This {kind} is disabled by kill switch {kill} (rule {KILL_SWITCH})."
                return refuse(KILL_SWITCH, msg, (KILL_SWITCH,))
        if data_class.rank > resource.data_class.rank:
            msg = (
                f"{resource.type} '{resource.id}' may hold {resource.data_class.value} data at most, "
                f"not {data_class.value} (rule {CEILING})."
            )
            return refuse(CEILING, msg, (CEILING,))
        who = self._principal(principal)
        uid = {"type": f"{NAMESPACE}::{resource.type}", "id": resource.id}
        attrs: dict[str, object] = {"team": resource.team, "data_class_rank": resource.data_class.rank}
        entity = orjson.dumps({"uid": uid, "attrs": attrs, "parents": []}).decode()
        group = Group(
            label, frozenset({resource.type}), frozenset({(resource.type, resource.id)}), frozenset()
        )
        context = _request_context(data_class, caller_region, entity_types, "")
        targets = [Target(uid, group)]
        verdict = snap.policies.evaluate(
            action,
            who.buckets,
            who.uid,
            targets,
            f"[{who.entities},{entity}]",
            context,
            facts=snap.policies.principal_facts(who.attrs),
        )[0]
        if verdict.allowed:
            return Decision(
                True, action, label, data_class, (resource.id,), verdict.permits, (), None, None, digest
            )
        if verdict.forbids:
            msg = (
                f"{action} on {resource.type} '{resource.id}' is forbidden by policy '{verdict.forbids[0]}'."
            )
            return refuse(verdict.forbids[0], msg, verdict.forbids)
        msg = f"No policy permits {action} on {resource.type} '{resource.id}' (rule {DEFAULT_DENY})."
        return refuse(DEFAULT_DENY, msg, (DEFAULT_DENY,))

    # --- listing ---------------------------------------------------------------------------------

    def visible_models(self, principal: Principal, routes: Iterable[ModelRoute]) -> list[ModelRoute]:
        """The routes `GET /v1/models` should show this key: those it may call at its own
        classification from an unknown region (decided like a request, memoised like one)."""
        level = level_of(principal.data_class)
        visible = []
        for route in routes:
            action = "embed" if route.config.type == "embedding" else "invoke"
            names = tuple(d.name for d in route.deployments)
            if self.decide(principal, action, route.name, names, level).allowed:
                visible.append(route)
        return visible

    def model_facts(self, name: str) -> ModelFacts | None:
        """The catalog entry of a model, for listings (None when uncatalogued)."""
        return self.snapshot.model(name)


def _name(rule: str) -> str:
    return f"rule {rule}" if rule.startswith("plinth:") else f"policy '{rule}'"
