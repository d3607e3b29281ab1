"""`plinth policy test`: example requests with their expected decisions, run through the real engine.

A test file (YAML) names a configuration (its models and `governance:` catalog), optionally other
policy files, and cases; each case is a request (key attributes, action, model, classification,
region, detected entity types) and what must happen: `allow`, `reroute` (allowed, but some
deployments were not compliant), or `deny`, optionally with the deployments left and the rule that
decided. Paths in the file are relative to the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from plinth.config import ConfigError, PlinthConfig, load_config
from plinth.governance.config import Level
from plinth.governance.engine import Decision, Governance
from plinth.tenancy.keys import Principal


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeySpec(_Strict):
    """The calling key's attributes (what a virtual key would carry)."""

    name: str = "test-key"
    key_id: str | None = None
    team: str | None = None
    team_name: str | None = None
    org: str | None = None
    environment: str | None = None
    data_class: Level = Level.INTERNAL
    labels: list[str] = Field(default_factory=list)
    models: list[str] | None = None  # allowed models; None: all

    def principal(self) -> Principal:
        return Principal(
            name=self.name,
            key_id=self.key_id,
            team_id=self.team,
            team_name=self.team_name,
            org_id=self.org,
            environment=self.environment,
            data_class=self.data_class.value,
            tags=tuple(self.labels),
            allowed_models=frozenset(self.models) if self.models is not None else None,
        )


class Case(_Strict):
    name: Annotated[str, Field(min_length=1)]
    key: KeySpec = KeySpec()
    action: Literal["invoke", "embed"] = "invoke"
    model: str
    deployments: list[str] | None = None  # default: the model's routed deployments, in config order
    data_class: Level | None = None  # as the x-plinth-data-class header
    findings: Level | None = None  # as guardrail findings
    caller_region: str | None = None
    entity_types: list[str] = Field(default_factory=list)
    expect: Literal["allow", "reroute", "deny"]
    expect_deployments: list[str] | None = None
    expect_rule: str | None = None  # must be among the decision's policy ids (for a deny: the rule named)


class CaseFile(_Strict):
    config: str | None = None
    policies: str | None = None
    cases: Annotated[list[Case], Field(min_length=1)]


@dataclass(frozen=True, slots=True)
class Result:
    case: Case
    decision: Decision
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


class CaseError(Exception):
    """A test file that cannot be used; the message says why."""


def load_case_file(path: Path) -> CaseFile:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CaseError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise CaseError(f"{path}: invalid YAML: {exc}") from None
    try:
        return CaseFile.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise CaseError(f"{path}: {where}: {first['msg']}") from None


def config_for(path: Path, cases: CaseFile, config: Path | None, policies: Path | None) -> PlinthConfig:
    """The configuration the cases run against (command-line paths win over the file's)."""
    base = path.parent
    config_path = config or (base / cases.config if cases.config else None)
    try:
        settings = load_config(config_path) if config_path is not None else PlinthConfig()
    except ConfigError as exc:
        raise CaseError(str(exc)) from None
    policy_path = policies or (base / cases.policies if cases.policies else None)
    if policy_path is not None:
        governance = settings.governance.model_copy(update={"policies": str(policy_path)})
        settings = settings.model_copy(update={"governance": governance})
    return settings


def run_case(governance: Governance, config: PlinthConfig, case: Case) -> Result:
    principal = case.key.principal()
    names = case.deployments
    if names is None:
        names = [
            dep.name or f"{model.name}/{dep.provider}/{i}"
            for model in config.models
            if model.name == case.model
            for i, dep in enumerate(model.deployments)
        ]
    level = governance.request_class(
        principal, case.data_class.value if case.data_class else None, case.findings
    )
    decision = governance.decide(
        principal, case.action, case.model, names, level, case.caller_region, case.entity_types
    )
    problems = []
    if decision.outcome != case.expect:
        problems.append(f"expected {case.expect}, got {decision.outcome}")
    if case.expect_deployments is not None and list(decision.deployments) != case.expect_deployments:
        problems.append(f"expected deployments {case.expect_deployments}, got {list(decision.deployments)}")
    if case.expect_rule is not None:
        if (
            case.expect == "deny"
            and decision.rule != case.expect_rule
            and case.expect_rule not in decision.policy_ids
        ):
            problems.append(f"expected rule '{case.expect_rule}', got '{decision.rule}'")
        elif case.expect_rule not in decision.policy_ids:
            problems.append(f"expected '{case.expect_rule}' among {list(decision.policy_ids)}")
    return Result(case, decision, tuple(problems))


def run_file(path: Path, *, config: Path | None = None, policies: Path | None = None) -> list[Result]:
    """Run every case of a test file; raises CaseError (or PolicyError) for unusable input."""
    cases = load_case_file(path)
    settings = config_for(path, cases, config, policies)
    governance = Governance(settings)
    return [run_case(governance, settings, case) for case in cases.cases]
