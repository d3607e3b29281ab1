"""Policy as code: Cedar policies from files, validated against Plinth's schema, parsed once, indexed.

Cedar evaluates every policy of a set on every request (about 1 µs each), so one set of 200 rules
would cost 200 µs per deployment. Policies are therefore indexed by their *scope* at load time:
for one request only the policies whose action, resource and principal constraints can match are
evaluated. The principal dimension is split into buckets (any key, this key, its team, its
organization), each evaluated as its own small set; the results combine exactly as Cedar would
combine them in one set: allowed when some permit matched and no forbid did.

Two more narrowings, both exact: a policy whose `when` has a top-level conjunct pinning a key
attribute (`principal.team == "t1" && ...`, `["prod", "staging"].contains(principal.environment)`)
is only evaluated for keys with such a value, and Cedar gets only the `context` attributes the
evaluated policies read (Cedar parses the context on every request, about 10 µs per attribute).

Every policy needs an `@id("...")` annotation, unique across files: decisions carry these ids.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cedarpy
import orjson
from cedarpy import pst

# The extension's own entry point (see _authorize_batch); None with a cedarpy that lacks it.
_NATIVE_AUTHORIZE: Any = getattr(getattr(cedarpy, "_internal", None), "is_authorized_batch", None)

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
    # `when { principal.team == "x" && ... }`: it can match keys with these attribute values only.
    principal_guards: tuple[Guard, ...] = ()
    # The context attributes its conditions read (None: the context as a whole).
    context_attrs: frozenset[str] | None = frozenset()


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


def _nodes(node: object, *, prune: Callable[[object], bool] = lambda _: False) -> Iterator[object]:
    """Every node of a policy's syntax tree, depth first; the children of nodes for which `prune`
    is true are skipped."""
    stack: list[object] = [node]
    while stack:
        value = stack.pop()
        yield value
        if prune(value):
            continue
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, tuple | list):
            stack.extend(value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            stack.extend(getattr(value, f.name) for f in dataclasses.fields(value))


def _mentions_resource(node: object) -> bool:
    return any(isinstance(value, pst.Var) and value.name == "resource" for value in _nodes(node))


def _reads_context_attribute(value: object) -> bool:
    return (
        isinstance(value, pst.GetAttr | pst.HasAttr)
        and isinstance(value.base, pst.Var)
        and value.base.name == "context"
    )


def _context_attrs(node: object) -> frozenset[str] | None:
    """The `context` attributes a policy reads (`context.x`, `context has x`); None when it uses
    `context` in any other way, so needs all of it."""
    names: set[str] = set()
    for value in _nodes(node, prune=_reads_context_attribute):
        if isinstance(value, pst.GetAttr) and _reads_context_attribute(value):
            names.add(value.attr)
        elif isinstance(value, pst.HasAttr) and _reads_context_attribute(value):
            names.add(value.attrs[0])
        elif isinstance(value, pst.Var) and value.name == "context":
            return None
    return frozenset(names)


Guard = tuple[str, frozenset[object]]  # a principal attribute and the values a policy admits


def _attribute_of(expr: object, var: str) -> str | None:
    """`x` when `expr` is `<var>.x`."""
    if isinstance(expr, pst.GetAttr) and isinstance(expr.base, pst.Var) and expr.base.name == var:
        return expr.attr
    return None


def _literal(expr: object) -> tuple[bool, object]:
    if isinstance(expr, pst.StringLit | pst.LongLit | pst.BoolLit):
        return True, expr.value
    return False, None


def _equality_guards(clauses: tuple[pst.Clause, ...]) -> dict[tuple[str, str], frozenset[object]]:
    """What a policy's `when` conditions pin `context.<attr>` or `principal.<attr>` to (`==` or
    `[...].contains`), read from their top-level conjuncts: when such a conjunct is false the policy
    cannot match, so it need not be evaluated for requests with other values. Keyed by
    (variable, attribute)."""
    guards: dict[tuple[str, str], frozenset[object]] = {}

    def pin(var: str, attr: str, values: frozenset[object]) -> None:
        key = (var, attr)
        guards[key] = guards[key] & values if key in guards else values

    for clause in clauses:
        if not isinstance(clause, pst.When):
            continue
        stack: list[object] = [clause.expr]
        while stack:
            expr = stack.pop()
            if not isinstance(expr, pst.BinaryOp):
                continue
            if expr.op == "and":
                stack.extend((expr.left, expr.right))
            elif expr.op == "eq":
                for one, other in ((expr.left, expr.right), (expr.right, expr.left)):
                    is_literal, value = _literal(other)
                    for var in ("context", "principal"):
                        attr = _attribute_of(one, var)
                        if attr is not None and is_literal:
                            pin(var, attr, frozenset({value}))
            elif expr.op == "contains" and isinstance(expr.left, pst.Set):
                literals = [_literal(e) for e in expr.left.elements]
                if all(ok for ok, _ in literals):
                    for var in ("context", "principal"):
                        attr = _attribute_of(expr.right, var)
                        if attr is not None:
                            pin(var, attr, frozenset(value for _, value in literals))
    return guards


def _strings(values: frozenset[object] | None) -> frozenset[str] | None:
    return None if values is None else frozenset(v for v in values if isinstance(v, str))


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
        guards = _equality_guards(node.clauses)
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
            models=_strings(guards.get(("context", "model"))),
            principal_guards=tuple(
                (attr, values) for (var, attr), values in sorted(guards.items()) if var == "principal"
            ),
            context_attrs=_context_attrs(node.clauses),
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


@dataclass(frozen=True, slots=True)
class _CompiledSet:
    policies: cedarpy.PolicySet
    # The context attributes its policies read (None: all). Cedar parses the request context on
    # every request, at about 10 µs per attribute: the attributes no policy reads are left out.
    context_attrs: frozenset[str] | None


Outcome = tuple[bool, list[str], list[str]]  # allowed, policy ids (the reasons), errors


def _authorize_batch(
    requests: list[dict[str, object]], policies: cedarpy.PolicySet, entities: str | cedarpy.Entities
) -> list[Outcome]:
    """`cedarpy.is_authorized_batch`, reading its results with orjson into plain tuples.

    Measured with bench/policy_bench.py: cedarpy's wrapper parses each result with `json` into an
    AuthzResult; reading the extension's JSON directly takes 7-10% off a full evaluation. The
    public function is used when the extension's entry point is not there (another cedarpy)."""
    if _NATIVE_AUTHORIZE is None:
        return [
            (r.allowed, r.diagnostics.reasons, r.diagnostics.errors)
            for r in cedarpy.is_authorized_batch(requests, policies, entities)
        ]
    handle = entities._inner if isinstance(entities, cedarpy.Entities) else entities
    out: list[Outcome] = []
    for text in _NATIVE_AUTHORIZE(requests, policies, handle, None, False):
        result = orjson.loads(text)
        diagnostics = result.get("diagnostics") or {}
        out.append(
            (result["decision"] == "Allow", diagnostics.get("reason") or [], diagnostics.get("errors") or [])
        )
    return out


class PolicyIndex:
    """The loaded policies, evaluated by scope-indexed subsets (see the module docstring)."""

    def __init__(self, loaded: LoadedPolicies) -> None:
        self.loaded = loaded
        self._policies = [p for p in loaded.policies if p.bucket is not None]
        # The principal attributes some policy is pinned to (`principal.team == "x"`, see Policy).
        self.guarded_attributes = tuple(
            sorted({attr for p in self._policies for attr, _ in p.principal_guards})
        )
        # (action, group key, bucket, shared, model) -> ids of the policies in scope, and whether
        # some of them have principal guards; (those ids, the principal's guarded values) -> the
        # ids those guards admit; ids -> set.
        self._ids: dict[tuple[str, str, Bucket, bool, str], tuple[tuple[str, ...], bool]] = {}
        self._narrowed: dict[tuple[tuple[str, ...], tuple[object, ...]], tuple[str, ...]] = {}
        self._sets: dict[tuple[str, ...], _CompiledSet] = {}
        self._by_id = {p.id: p for p in self._policies}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.loaded.policies)

    def _applicable(
        self,
        action: str,
        group: Group,
        bucket: Bucket,
        shared: bool,
        model: str,
        facts: tuple[object, ...] = (),
    ) -> tuple[str, ...]:
        """Ids of the policies that can match: resource-independent ones (`shared`, the same for
        every resource of a type) or those whose resource scope matches this resource; in both
        cases only those whose `context.model` guard (if any) admits `model` and whose principal
        guards admit `facts` (the principal's values of `guarded_attributes`; missing: none)."""
        key = (action, ",".join(sorted(group.types)) if shared else group.key, bucket, shared, model)
        found = self._ids.get(key)
        if found is None:
            ids = tuple(
                p.id
                for p in self._policies
                if p.bucket == bucket
                and p.independent is shared
                and (p.actions is None or action in p.actions)
                and (p.models is None or model in p.models)
                and _resource_matches(p.resource, group)
            )
            found = ids, any(self._by_id[i].principal_guards for i in ids)
            if len(self._ids) >= 100_000:  # bounded: keys grow with the models asked for
                self._ids.clear()
            self._ids[key] = found
        ids, guarded = found
        if not guarded:
            return ids
        narrowed = self._narrowed.get((ids, facts))
        if narrowed is None:
            known = dict(zip(self.guarded_attributes, facts, strict=False))
            narrowed = tuple(
                i
                for i in ids
                if all(a in known and known[a] in values for a, values in self._by_id[i].principal_guards)
            )
            if len(self._narrowed) >= 100_000:
                self._narrowed.clear()
            self._narrowed[(ids, facts)] = narrowed
        return narrowed

    def _set(self, ids: tuple[str, ...]) -> _CompiledSet:
        found = self._sets.get(ids)
        if found is None:
            with self._lock:
                found = self._sets.get(ids)
                if found is None:
                    nodes = {i: self._by_id[i].node for i in ids}
                    tree = pst.PolicySet(templates={}, static_policies=nodes, template_links=())
                    reads = [self._by_id[i].context_attrs for i in ids]
                    needed = None if None in reads else frozenset(a for r in reads if r for a in r)
                    found = _CompiledSet(cedarpy.PolicySet.from_pst(tree), needed)
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

    def principal_facts(self, attributes: Mapping[str, object]) -> tuple[object, ...]:
        """A principal's values of `guarded_attributes`, for `evaluate`."""
        return tuple(attributes.get(attr) for attr in self.guarded_attributes)

    def evaluate(
        self,
        action: str,
        buckets: Sequence[Bucket],
        principal: dict[str, str],
        targets: Sequence[Target],
        entities: str | cedarpy.Entities,
        context: Mapping[str, object],
        model: str = "",
        facts: tuple[object, ...] = (),
    ) -> list[Verdict]:
        """One verdict per target (all of one entity type). `entities`: Cedar JSON or a parsed
        handle; `context`: the request context (JSON-serialisable values); `facts`: the
        principal's values of `guarded_attributes` (see `principal_facts`).

        Per principal bucket, the resource-independent policies are evaluated once, and the others
        once per distinct set of applicable policies (deployments sharing one are batched)."""
        n = len(targets)
        permits: list[list[str]] = [[] for _ in targets]
        forbids: list[list[str]] = [[] for _ in targets]
        errors: list[list[str]] = [[] for _ in targets]
        action_uid = {"type": f"{NAMESPACE}::Action", "id": action}
        encoded: dict[frozenset[str] | None, str] = {}

        def authorize(compiled: _CompiledSet, which: Sequence[int]) -> list[Outcome]:
            attrs = compiled.context_attrs
            text = encoded.get(attrs)
            if text is None:
                subset = context if attrs is None else {k: v for k, v in context.items() if k in attrs}
                text = encoded[attrs] = orjson.dumps(subset).decode()
            requests: list[dict[str, object]] = [
                {"principal": principal, "action": action_uid, "resource": targets[i].uid, "context": text}
                for i in which
            ]
            return _authorize_batch(requests, compiled.policies, entities)

        def note(result: Outcome, which: Iterable[int]) -> None:
            allowed, reasons, problems = result
            for i in which:
                if allowed:
                    permits[i].extend(reasons)
                elif reasons:  # a Deny that names policies: forbids matched
                    forbids[i].extend(reasons)
                if problems:
                    errors[i].extend(problems)

        for bucket in buckets:
            shared = self._applicable(action, targets[0].group, bucket, True, model, facts)
            folded: tuple[str, ...] = ()
            if len(shared) * (n - 1) <= FOLD_EVALUATIONS:
                folded = shared  # cheaper to evaluate again per deployment than in a call of its own
            else:
                note(authorize(self._set(shared), (0,))[0], range(n))
            by_ids: dict[tuple[str, ...], list[int]] = {}
            for i, target in enumerate(targets):
                ids = folded + self._applicable(action, target.group, bucket, False, model, facts)
                if ids:
                    by_ids.setdefault(ids, []).append(i)
            for ids, which in by_ids.items():
                for i, result in zip(which, authorize(self._set(ids), which), strict=True):
                    note(result, (i,))
        return [
            Verdict(
                bool(permits[i]) and not forbids[i], tuple(permits[i]), tuple(forbids[i]), tuple(errors[i])
            )
            for i in range(n)
        ]
