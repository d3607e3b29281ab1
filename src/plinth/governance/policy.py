"""Policy as code: Cedar policies from files, validated against Plinth's schema, parsed once, indexed.

Cedar evaluates every policy of a set on every request (about 1 µs each), so one set of 200 rules
would cost 200 µs per deployment. Policies are therefore indexed by their *scope* at load time:
for one request only the policies whose action, resource and principal constraints can match are
evaluated. The principal dimension is split into buckets (any key, this key, its team, its
organization), each evaluated as its own small set; the results combine exactly as Cedar would
combine them in one set: allowed when some permit matched and no forbid did.

Every policy needs an `@id("...")` annotation, unique across files: decisions carry these ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cedarpy
from cedarpy import pst

NAMESPACE = "Plinth"
# A Cedar call costs about as much as 20-30 policy evaluations (building the request dominates):
# resource-independent policies are evaluated once in a call of their own only above this many
# repeated evaluations, else along with each deployment's own policies.
FOLD_EVALUATIONS = 24

SCHEMA = """\
// Plinth's Cedar schema: what policies may refer to. `plinth policy schema` prints it.
namespace Plinth {
  entity Org = { name: String };
  entity Team in [Org] = { name: String };
  // A virtual API key (or a key from plinth.yaml, or the admin key). Its tags are `labels`:
  // principal.labels.contains("pci") for a key tagged "pci".
  entity Key in [Team] = {
    name: String,
    admin: Bool,
    environment: String,      // "" when the key has none
    data_class: String,       // the key's declared classification
    data_class_rank: Long,    // public 0, internal 1, confidential 2, restricted 3
    team: String,             // team id, "" for keys from plinth.yaml
    team_name: String,
    org: String,
    project: String,
    labels: Set<String>,      // the key's tags
  };
  entity Provider = {
    status: String,           // approved, pending, rejected, or "uncatalogued"
    regions: Set<String>,     // allowed regions; empty: any
    data_class_rank: Long,
    training_opt_out: Bool,
    retention_days: Long,     // -1 when unknown
    certifications: Set<String>,
    catalogued: Bool,
  };
  entity Model = {
    status: String,           // proposed, approved, deprecated, retired
    owner: String,
    data_class_rank: Long,
    capabilities: Set<String>,
    catalogued: Bool,
  };
  entity Deployment in [Model, Provider] = {
    model: Model,             // resource.model.owner, resource.provider.certifications...
    provider: Provider,
    regions: Set<String>,
    data_class_rank: Long,    // the effective ceiling (deployment, model and provider)
    status: String,
    model_status: String,
    catalogued: Bool,
  };
  entity KnowledgeBase = { team: String, data_class_rank: Long };
  entity Tool = { team: String, data_class_rank: Long };
  type Request = {
    data_class: String,       // the request's classification (key, header, guardrail findings)
    data_class_rank: Long,
    caller_region: String,    // "" when unknown
    entity_types: Set<String>, // entity types the guardrails found, e.g. "EMAIL", "IBAN"
    model: String,            // the model name the client asked for
  };
  action invoke, embed appliesTo { principal: [Key], resource: [Deployment], context: Request };
  action ingest, retrieve appliesTo { principal: [Key], resource: [KnowledgeBase], context: Request };
  action use_tool appliesTo { principal: [Key], resource: [Tool], context: Request };
}
"""

DEFAULT_POLICIES = """\
// Built-in policy, used when governance.policies names no files: it keeps Plinth's behaviour
// without governance. Keys still only reach the models of their own allow-list, and the
// built-in guards (lifecycle, provider review, classification ceiling, kill switches) apply.
@id("plinth-default-models")
permit (
  principal,
  action in [Plinth::Action::"invoke", Plinth::Action::"embed"],
  resource
);

@id("plinth-default-team-resources")
permit (
  principal,
  action in [Plinth::Action::"ingest", Plinth::Action::"retrieve", Plinth::Action::"use_tool"],
  resource
)
when { resource.team == principal.team };
"""

_PARSED_SCHEMA: cedarpy.Schema | None = None


def schema() -> cedarpy.Schema:
    global _PARSED_SCHEMA
    if _PARSED_SCHEMA is None:
        _PARSED_SCHEMA = cedarpy.Schema.from_str(SCHEMA)
    return _PARSED_SCHEMA


class PolicyError(Exception):
    """Policy files that cannot be used; the message names the file and what is wrong."""


Uid = tuple[str, str]  # (entity type without namespace, id)
Bucket = tuple[str, str]  # ("*", "") or ("Key"|"Team"|"Org", id)
ANY_KEY: Bucket = ("*", "")


@dataclass(frozen=True, slots=True)
class Policy:
    id: str
    effect: str  # "permit" or "forbid"
    file: str
    actions: frozenset[str] | None  # None: any action
    bucket: Bucket | None  # None: can never match a key principal
    resource: pst.PrincipalOrResourceConstraint
    node: pst.Template
    # Its scope and conditions never look at the resource: one evaluation serves every deployment.
    independent: bool = False
    # `when { context.model == "x" && ... }`: it can match requests for these models only (None: any).
    models: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Group:
    """The resources one decision looks at, with their ancestors, for scope matching.

    For model calls: the deployments of one model alias (each in its Model and Provider)."""

    key: str
    types: frozenset[str]
    uids: frozenset[Uid]
    ancestors: frozenset[Uid]


@dataclass(frozen=True, slots=True)
class Target:
    """One resource to decide on: its Cedar uid and, for scope matching, itself with its ancestors."""

    uid: dict[str, str]
    group: Group


@dataclass(frozen=True, slots=True)
class Verdict:
    allowed: bool
    permits: tuple[str, ...]
    forbids: tuple[str, ...]
    errors: tuple[str, ...] = ()


@dataclass(slots=True)
class PolicySource:
    """Where policies come from and what was read, to notice edits (by modification time)."""

    path: str | None
    stamps: dict[str, tuple[int, int]] = field(default_factory=dict)

    def files(self) -> list[Path]:
        if self.path is None:
            return []
        root = Path(self.path).expanduser()
        if root.is_dir():
            return sorted(p for p in root.rglob("*.cedar") if p.is_file())
        return [root] if root.exists() else []

    def current_stamps(self) -> dict[str, tuple[int, int]]:
        stamps: dict[str, tuple[int, int]] = {}
        for file in self.files():
            try:
                st = file.stat()
            except OSError:
                continue
            stamps[str(file)] = (st.st_mtime_ns, st.st_size)
        return stamps

    def changed(self) -> bool:
        return self.path is not None and self.current_stamps() != self.stamps


def _type_name(entity_type: pst.EntityType) -> str:
    return entity_type.basename if entity_type.namespace == (NAMESPACE,) else str(entity_type)


def _uid(entity: pst.EntityOrSlot) -> Uid:
    if isinstance(entity, pst.Slot):
        raise PolicyError("templates (?principal, ?resource) are not supported")
    return (_type_name(entity.type), entity.id)


def _actions(constraint: pst.ActionConstraint) -> frozenset[str] | None:
    if isinstance(constraint, pst.ActionEq):
        return frozenset({constraint.entity.id})
    if isinstance(constraint, pst.ActionIn):
        return frozenset(entity.id for entity in constraint.entities)
    return None


def _bucket(constraint: pst.PrincipalOrResourceConstraint) -> Bucket | None:
    """Which principals a policy can apply to. Principals are always keys (see the schema)."""
    if isinstance(constraint, pst.ScopeAny):
        return ANY_KEY
    if isinstance(constraint, pst.ScopeIs):
        return ANY_KEY if _type_name(constraint.entity_type) == "Key" else None
    if isinstance(constraint, pst.ScopeIsIn) and _type_name(constraint.entity_type) != "Key":
        return None
    if isinstance(constraint, pst.ScopeEq):
        kind, ident = _uid(constraint.entity)
        return ("Key", ident) if kind == "Key" else None
    if isinstance(constraint, pst.ScopeIn | pst.ScopeIsIn):
        kind, ident = _uid(constraint.entity)
        return (kind, ident) if kind in ("Key", "Team", "Org") else None
    return ANY_KEY  # a constraint kind added by a newer Cedar: evaluate it everywhere (safe)


def _resource_matches(constraint: pst.PrincipalOrResourceConstraint, group: Group) -> bool:
    if isinstance(constraint, pst.ScopeAny):
        return True
    if isinstance(constraint, pst.ScopeIs):
        return _type_name(constraint.entity_type) in group.types
    if isinstance(constraint, pst.ScopeEq):
        return _uid(constraint.entity) in group.uids
    if isinstance(constraint, pst.ScopeIn):
        uid = _uid(constraint.entity)
        return uid in group.uids or uid in group.ancestors
    if isinstance(constraint, pst.ScopeIsIn):
        uid = _uid(constraint.entity)
        in_group = uid in group.uids or uid in group.ancestors
        return _type_name(constraint.entity_type) in group.types and in_group
    return True


def _mentions_resource(node: object) -> bool:
    stack: list[object] = [node]
    while stack:
        value = stack.pop()
        if isinstance(value, pst.Var):
            if value.name == "resource":
                return True
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, tuple | list):
            stack.extend(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            stack.extend(getattr(value, f.name) for f in dataclasses.fields(value))
    return False


def _is_context_model(expr: object) -> bool:
    return (
        isinstance(expr, pst.GetAttr)
        and expr.attr == "model"
        and isinstance(expr.base, pst.Var)
        and expr.base.name == "context"
    )


def _model_guard(clauses: tuple[pst.Clause, ...]) -> frozenset[str] | None:
    """The models a policy's `when` conditions pin `context.model` to (`==` or `[...].contains`),
    read from their top-level conjuncts: when such a conjunct is false the policy cannot match,
    so it need not be evaluated for other models. None: no such conjunct."""
    allowed: frozenset[str] | None = None
    for clause in clauses:
        if not isinstance(clause, pst.When):
            continue
        stack: list[object] = [clause.expr]
        while stack:
            expr = stack.pop()
            found: frozenset[str] | None = None
            if isinstance(expr, pst.BinaryOp) and expr.op == "and":
                stack.extend((expr.left, expr.right))
            elif isinstance(expr, pst.BinaryOp) and expr.op == "eq":
                for one, other in ((expr.left, expr.right), (expr.right, expr.left)):
                    if _is_context_model(one) and isinstance(other, pst.StringLit):
                        found = frozenset({other.value})
            elif (
                isinstance(expr, pst.BinaryOp)
                and expr.op == "contains"
                and _is_context_model(expr.right)
                and isinstance(expr.left, pst.Set)
                and all(isinstance(e, pst.StringLit) for e in expr.left.elements)
            ):
                found = frozenset(e.value for e in expr.left.elements if isinstance(e, pst.StringLit))
            if found is not None:
                allowed = found if allowed is None else allowed & found
    return allowed


def _parse_file(name: str, text: str, known: dict[str, Policy]) -> list[Policy]:
    try:
        tree = cedarpy.policies_to_pst(text)
    except ValueError as exc:
        raise PolicyError(f"{name}: cannot parse: {_one_line(exc)}") from None
    if tree.templates:
        raise PolicyError(f"{name}: templates (?principal, ?resource) are not supported")
    result = cedarpy.validate_policies(text, schema())
    if not result.validation_passed:
        ids = result.id_annotations_by_policy_id
        problems = "; ".join(
            f"policy '{ids.get(err.policy_id, err.policy_id)}': {err.error}" if err.policy_id else err.error
            for err in result.errors[:5]
        )
        raise PolicyError(f"{name}: does not match the Plinth schema: {problems}")
    policies = []
    for position, node in enumerate(tree.static_policies.values()):
        ident = node.annotations.get("id", "").strip()
        if not ident:
            raise PolicyError(f'{name}: policy #{position + 1} has no @id("...") annotation')
        if ident.startswith("plinth:"):
            raise PolicyError(f"{name}: policy id '{ident}' is reserved (ids starting 'plinth:')")
        if ident in known:
            raise PolicyError(f"{name}: policy id '{ident}' is also used in {known[ident].file}")
        policy = Policy(
            id=ident,
            effect=node.effect,
            file=name,
            actions=_actions(node.action),
            bucket=_bucket(node.principal),
            resource=node.resource,
            node=dataclasses.replace(node, id=ident),
            independent=isinstance(node.resource, pst.ScopeAny | pst.ScopeIs)
            and not _mentions_resource(node.clauses),
            models=_model_guard(node.clauses),
        )
        known[ident] = policy
        policies.append(policy)
    return policies


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())[:500]


@dataclass(frozen=True, slots=True)
class LoadedPolicies:
    policies: tuple[Policy, ...]
    digest: str  # sha256 of the sources: which policy set decided
    files: tuple[str, ...]
    builtin: bool


def parse_policies(sources: Sequence[tuple[str, str]], *, builtin: bool = False) -> LoadedPolicies:
    """Parse and validate (name, text) sources into one policy set; raises PolicyError."""
    known: dict[str, Policy] = {}
    policies: list[Policy] = []
    digest = hashlib.sha256()
    for name, text in sources:
        policies.extend(_parse_file(name, text, known))
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    return LoadedPolicies(tuple(policies), digest.hexdigest(), tuple(n for n, _ in sources), builtin)


def load_policies(source: PolicySource) -> LoadedPolicies:
    """Read the files of `source` (and remember their stamps); the built-in policy when none."""
    if source.path is None:
        return parse_policies([("(built-in default policy)", DEFAULT_POLICIES)], builtin=True)
    stamps = source.current_stamps()
    files = source.files()
    if not files:
        raise PolicyError(f"{source.path}: no such file, or no .cedar files in that directory")
    sources = []
    for file in files:
        try:
            sources.append((str(file), file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"{file}: cannot read: {exc}") from None
    loaded = parse_policies(sources)
    if not loaded.policies:
        raise PolicyError(f"{source.path}: holds no policies (everything would be denied)")
    source.stamps = stamps
    return loaded


class PolicyIndex:
    """The loaded policies, evaluated by scope-indexed subsets (see the module docstring)."""

    def __init__(self, loaded: LoadedPolicies) -> None:
        self.loaded = loaded
        self._policies = [p for p in loaded.policies if p.bucket is not None]
        # (action, group key, bucket, shared, model) -> ids of the policies to evaluate; ids -> set.
        self._ids: dict[tuple[str, str, Bucket, bool, str], tuple[str, ...]] = {}
        self._sets: dict[tuple[str, ...], cedarpy.PolicySet] = {}
        self._by_id = {p.id: p for p in self._policies}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.loaded.policies)

    def _applicable(
        self, action: str, group: Group, bucket: Bucket, shared: bool, model: str
    ) -> tuple[str, ...]:
        """Ids of the policies that can match: resource-independent ones (`shared`, the same for
        every resource of a type) or those whose resource scope matches this resource; in both
        cases only those whose `context.model` guard (if any) admits `model`."""
        key = (action, ",".join(sorted(group.types)) if shared else group.key, bucket, shared, model)
        ids = self._ids.get(key)
        if ids is None:
            ids = tuple(
                p.id
                for p in self._policies
                if p.bucket == bucket
                and p.independent is shared
                and (p.actions is None or action in p.actions)
                and (p.models is None or model in p.models)
                and _resource_matches(p.resource, group)
            )
            if len(self._ids) >= 100_000:  # bounded: keys grow with the models asked for
                self._ids.clear()
            self._ids[key] = ids
        return ids

    def _set(self, ids: tuple[str, ...]) -> cedarpy.PolicySet:
        found = self._sets.get(ids)
        if found is None:
            with self._lock:
                found = self._sets.get(ids)
                if found is None:
                    nodes = {i: self._by_id[i].node for i in ids}
                    tree = pst.PolicySet(templates={}, static_policies=nodes, template_links=())
                    found = cedarpy.PolicySet.from_pst(tree)
                    self._sets[ids] = found
        return found

    def prepare(self, actions: Iterable[str], groups: Iterable[tuple[Group, str]]) -> None:
        """Build the any-key sets of these (resource, model) pairs ahead of traffic (the rest build
        on first use)."""
        for group, model in groups:
            for action in actions:
                for shared in (True, False):
                    ids = self._applicable(action, group, ANY_KEY, shared, model)
                    if ids:
                        self._set(ids)

    def evaluate(
        self,
        action: str,
        buckets: Sequence[Bucket],
        principal: dict[str, str],
        targets: Sequence[Target],
        entities: str | cedarpy.Entities,
        context: str,
        model: str = "",
    ) -> list[Verdict]:
        """One verdict per target (all of one entity type). `entities`: Cedar JSON or a parsed
        handle; `context`: a JSON object as text.

        Per principal bucket, the resource-independent policies are evaluated once, and the others
        once per distinct set of applicable policies (deployments sharing one are batched)."""
        n = len(targets)
        permits: list[list[str]] = [[] for _ in targets]
        forbids: list[list[str]] = [[] for _ in targets]
        errors: list[list[str]] = [[] for _ in targets]
        action_uid = {"type": f"{NAMESPACE}::Action", "id": action}
        requests = [
            {"principal": principal, "action": action_uid, "resource": t.uid, "context": context}
            for t in targets
        ]

        def note(result: cedarpy.AuthzResult, which: Iterable[int]) -> None:
            reasons = result.diagnostics.reasons
            for i in which:
                if result.allowed:
                    permits[i].extend(reasons)
                elif reasons:  # a Deny that names policies: forbids matched
                    forbids[i].extend(reasons)
                if result.diagnostics.errors:
                    errors[i].extend(result.diagnostics.errors)

        for bucket in buckets:
            shared = self._applicable(action, targets[0].group, bucket, True, model)
            folded: tuple[str, ...] = ()
            if len(shared) * (n - 1) <= FOLD_EVALUATIONS:
                folded = shared  # cheaper to evaluate again per deployment than in a call of its own
            else:
                note(cedarpy.is_authorized_batch(requests[:1], self._set(shared), entities)[0], range(n))
            by_ids: dict[tuple[str, ...], list[int]] = {}
            for i, target in enumerate(targets):
                ids = folded + self._applicable(action, target.group, bucket, False, model)
                if ids:
                    by_ids.setdefault(ids, []).append(i)
            for ids, which in by_ids.items():
                results = cedarpy.is_authorized_batch([requests[i] for i in which], self._set(ids), entities)
                for i, result in zip(which, results, strict=True):
                    note(result, (i,))
        return [
            Verdict(
                bool(permits[i]) and not forbids[i], tuple(permits[i]), tuple(forbids[i]), tuple(errors[i])
            )
            for i in range(n)
        ]
