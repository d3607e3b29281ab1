"""Governance decisions through the hot-path surface: classification x region x model status x
environment, rerouting, built-in rules, policy loading, indexing and hot reload."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path
from typing import Any

import cedarpy
import pytest

from plinth.config import load_config, parse_config
from plinth.gateway.errors import GatewayError
from plinth.governance.config import Level
from plinth.governance.engine import DATA_CLASS_HEADER, Governance, Resource
from plinth.governance.policy import SCHEMA, PolicyError, PolicySource, load_policies, parse_policies
from plinth.governance.policytest import run_file
from plinth.providers.http import HttpClient
from plinth.routing import Router
from plinth.tenancy.keys import Principal
from plinth.tenancy.models import DataClass

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def key(**attrs: Any) -> Principal:
    attrs.setdefault("name", "app")
    return Principal(**attrs)


def deployment(name: str, provider: str = "openai", **extra: Any) -> dict[str, Any]:
    base_url = "https://example-eu.openai.azure.com" if provider == "azure" else "http://127.0.0.1:9/v1"
    return {
        "name": name,
        "provider": provider,
        "model": "m",
        "api_key": "sk-x",
        "base_url": base_url,
        **extra,
    }


RESIDENCY = """
@id("all-keys") permit (principal, action, resource);
@id("eu-stays-in-eu")
forbid (principal, action, resource is Plinth::Deployment)
when { context.caller_region like "eu-*" && context.data_class_rank >= 2 }
unless { resource.regions.contains("eu-west-1") };
@id("no-deprecated-in-prod")
forbid (principal, action, resource is Plinth::Deployment)
when { principal.environment == "prod" && resource.model_status == "deprecated" };
"""


def governed(tmp_path: Path, policies: str = RESIDENCY, **governance: Any) -> tuple[Governance, Any]:
    (tmp_path / "policies").mkdir(exist_ok=True)
    (tmp_path / "policies" / "main.cedar").write_text(policies)
    config = parse_config(
        {
            "models": [
                {"name": "chat", "deployments": [deployment("chat-us"), deployment("chat-eu", "azure")]},
                {"name": "old", "deployments": [deployment("old-us")]},
                {"name": "new", "deployments": [deployment("new-us")]},
                {"name": "free", "deployments": [deployment("free-us")]},
            ],
            "governance": {
                "policies": str(tmp_path / "policies"),
                "models": [
                    {
                        "name": "chat",
                        "data_class": "restricted",
                        "deployments": [
                            {"name": "chat-us", "provider": "openai", "regions": ["us-east-1"], "data_class": "confidential"},
                            {"name": "chat-eu", "provider": "azure-eu", "regions": ["eu-west-1"]},
                        ],
                    },
                    {"name": "old", "status": "deprecated", "data_class": "confidential"},
                    {"name": "new", "status": "proposed"},
                ],
                "providers": [
                    {"name": "openai", "reviewer": "sec", "expires_at": "2099-01-01", "data_class": "confidential"},
                    {"name": "azure-eu", "reviewer": "sec", "expires_at": "2099-01-01", "data_class": "restricted",
                     "allowed_regions": ["eu-west-1"]},
                ],
                **governance,
            },
        }
    )  # fmt: skip
    return Governance(config), config


CHAT = ("chat-us", "chat-eu")
# (data class, caller region, model, key environment) -> (outcome, deployments left, a deciding id)
TABLE = [
    ("internal", "us-east-1", "chat", "prod", "allow", ("chat-us", "chat-eu"), "all-keys"),
    ("internal", "eu-west-1", "chat", "prod", "allow", ("chat-us", "chat-eu"), "all-keys"),
    ("confidential", "us-east-1", "chat", "prod", "allow", ("chat-us", "chat-eu"), "all-keys"),
    ("confidential", "eu-west-1", "chat", "prod", "reroute", ("chat-eu",), "eu-stays-in-eu"),
    ("restricted", "us-east-1", "chat", "prod", "reroute", ("chat-eu",), "plinth:data-class-ceiling"),
    ("restricted", "eu-west-1", "chat", "dev", "reroute", ("chat-eu",), "plinth:data-class-ceiling"),
    ("public", None, "chat", "dev", "allow", ("chat-us", "chat-eu"), "all-keys"),
    ("internal", None, "old", "dev", "allow", ("old-us",), "all-keys"),
    ("internal", None, "old", "prod", "deny", (), "no-deprecated-in-prod"),
    ("restricted", None, "old", "dev", "deny", (), "plinth:data-class-ceiling"),
    ("internal", None, "new", "dev", "deny", (), "plinth:model-status"),
    ("internal", None, "new", "prod", "deny", (), "plinth:model-status"),
    ("internal", None, "free", "prod", "allow", ("free-us",), "all-keys"),  # uncatalogued: as before
]


@pytest.mark.parametrize(("level", "region", "model", "env", "outcome", "left", "rule"), TABLE)
def test_decision_table(
    tmp_path: Path, level: str, region: str | None, model: str, env: str, outcome: str, left: tuple[str, ...],
    rule: str,
) -> None:  # fmt: skip
    gov, config = governed(tmp_path)
    names = [d.name for m in config.models if m.name == model for d in m.deployments]
    principal = key(environment=env, key_id="key_1", team_id="team_1")
    decision = gov.decide(principal, "invoke", model, names, gov.request_class(principal, level), region)
    assert (decision.outcome, decision.deployments) == (outcome, left)
    assert rule in decision.policy_ids
    if outcome == "deny":
        err = decision.error()
        assert err.status == 403 and err.code == "policy_denied"
        assert rule in err.message and rule in err.headers["x-plinth-policy"]
    else:
        assert decision.message is None and all(decision.permits(n) for n in left)


def test_reroute_names_the_excluded_deployment_and_rule(tmp_path: Path) -> None:
    gov, _ = governed(tmp_path)
    decision = gov.decide(key(), "invoke", "chat", CHAT, Level.CONFIDENTIAL, "eu-central-1")
    assert decision.rerouted and decision.deployments == ("chat-eu",)
    assert [(e.deployment, e.rule) for e in decision.excluded] == [("chat-us", "eu-stays-in-eu")]
    # When the compliant deployment is gone too, the refusal names each reason.
    refused = gov.decide(key(), "invoke", "chat", ("chat-us",), Level.CONFIDENTIAL, "eu-central-1")
    assert not refused.allowed and refused.rule == "eu-stays-in-eu"
    assert "chat-us" in (refused.message or "") and "eu-stays-in-eu" in (refused.message or "")


def test_examples_decision_table_passes() -> None:
    results = run_file(EXAMPLES / "policies" / "tests.yaml")
    assert len(results) >= 15
    assert [r.case.name for r in results if not r.passed] == []
    outcomes = {r.decision.outcome for r in results}
    assert outcomes == {"allow", "reroute", "deny"}


def test_request_class_is_raised_never_lowered(tmp_path: Path) -> None:
    gov, _ = governed(tmp_path)
    confidential_key = key(data_class="confidential")
    assert gov.request_class(confidential_key) is Level.CONFIDENTIAL
    assert gov.request_class(confidential_key, "public") is Level.CONFIDENTIAL
    assert gov.request_class(key(), " Restricted ") is Level.RESTRICTED
    assert gov.request_class(key(), None, "confidential") is Level.CONFIDENTIAL  # e.g. PII found
    assert gov.request_class(key(data_class="public"), "internal", Level.PUBLIC) is Level.INTERNAL
    with pytest.raises(GatewayError) as bad:
        gov.request_class(key(), "secret")
    assert bad.value.status == 400 and bad.value.param == DATA_CLASS_HEADER and "secret" in bad.value.message


def test_caller_region(tmp_path: Path) -> None:
    gov, _ = governed(tmp_path, default_region="us-east-1")
    assert gov.caller_region(None) == "us-east-1" and gov.caller_region("eu-west-1") == "eu-west-1"
    with pytest.raises(GatewayError) as bad:
        gov.caller_region("eu west; DROP")
    assert bad.value.status == 400 and bad.value.code == "invalid_region"


def test_levels_match_tenancy() -> None:
    assert [level.value for level in Level] == [d.value for d in DataClass]


def test_allowed_models_and_team_scoped_policies(tmp_path: Path) -> None:
    policies = """
    @id("team-a-only") permit (principal in Plinth::Team::"team_a", action == Plinth::Action::"invoke", resource);
    @id("key-9-embeds") permit (principal == Plinth::Key::"key_9", action == Plinth::Action::"embed", resource);
    @id("org-x-no-eu") forbid (principal in Plinth::Org::"org_x", action, resource in Plinth::Provider::"azure-eu");
    """
    gov, _ = governed(tmp_path, policies)
    team_a = key(key_id="key_1", team_id="team_a", org_id="org_y")
    assert gov.decide(team_a, "invoke", "chat", CHAT, Level.INTERNAL).deployments == CHAT
    assert gov.decide(team_a, "embed", "chat", CHAT, Level.INTERNAL).rule == "plinth:default-deny"
    other = key(key_id="key_2", team_id="team_b")
    assert not gov.decide(other, "invoke", "chat", CHAT, Level.INTERNAL).allowed
    assert gov.decide(key(key_id="key_9"), "embed", "chat", CHAT, Level.INTERNAL).allowed
    org_x = key(key_id="key_3", team_id="team_a", org_id="org_x")
    decision = gov.decide(org_x, "invoke", "chat", CHAT, Level.INTERNAL)
    assert decision.deployments == ("chat-us",) and "org-x-no-eu" in decision.policy_ids
    limited = key(allowed_models=frozenset({"old"}), team_id="team_a")
    assert gov.decide(limited, "invoke", "chat", CHAT, Level.INTERNAL).rule == "plinth:allowed-models"


def test_provider_review_expiry_and_regions(tmp_path: Path) -> None:
    gov, _ = governed(
        tmp_path,
        providers=[
            {"name": "openai", "reviewer": "sec", "expires_at": "2020-01-01"},  # expired
            {"name": "azure-eu", "reviewer": "sec", "expires_at": "2099-01-01", "data_class": "restricted",
             "allowed_regions": ["eu-central-1"]},  # chat-eu runs in eu-west-1: outside
        ],
    )  # fmt: skip
    decision = gov.decide(key(), "invoke", "chat", CHAT, Level.INTERNAL)
    assert not decision.allowed
    assert {e.rule for e in decision.excluded} == {"plinth:provider-review", "plinth:provider-region"}
    assert "expired on 2020-01-01" in (decision.message or "")


def test_require_catalog_refuses_uncatalogued(tmp_path: Path) -> None:
    gov, _ = governed(tmp_path, require_catalog=True)
    assert gov.decide(key(), "invoke", "free", ["free-us"], Level.INTERNAL).rule == "plinth:not-catalogued"
    assert gov.decide(key(), "invoke", "chat", CHAT, Level.INTERNAL).allowed


def test_default_policy_keeps_todays_behaviour() -> None:
    config = load_config(None, env={})  # the embedded default: no governance section at all
    gov = Governance(config)
    assert gov.policies.loaded.builtin
    routes = Router(config, HttpClient()).all_routes()
    for route in routes:
        names = [d.name for d in route.deployments]
        action = "embed" if route.config.type == "embedding" else "invoke"
        decision = gov.decide(key(), action, route.name, names, Level.RESTRICTED)
        assert decision.allowed and decision.deployments == tuple(names)
        assert decision.policy_ids == ("plinth-default-models",)
    assert gov.visible_models(key(), routes) == routes
    kb = Resource("KnowledgeBase", "kb_1", team="team_a")
    assert gov.check(key(team_id="team_a"), "retrieve", kb, Level.INTERNAL).allowed
    assert gov.check(key(team_id="team_b"), "retrieve", kb, Level.INTERNAL).rule == "plinth:default-deny"
    assert (
        gov.check(key(team_id="team_a"), "retrieve", kb, Level.RESTRICTED).rule == "plinth:data-class-ceiling"
    )


def test_visible_models(tmp_path: Path) -> None:
    gov, config = governed(tmp_path)
    routes = Router(config, HttpClient()).all_routes()
    visible = {r.name for r in gov.visible_models(key(environment="prod"), routes)}
    assert visible == {"chat", "free"}  # "old" is deprecated (prod), "new" only proposed
    assert {r.name for r in gov.visible_models(key(environment="dev"), routes)} == {"chat", "free", "old"}
    restricted_key = key(environment="dev", data_class="restricted")
    assert {r.name for r in gov.visible_models(restricted_key, routes)} == {"chat"}
    assert {r.name for r in gov.visible_models(key(allowed_models=frozenset({"free"})), routes)} == {"free"}


def test_decisions_are_memoised_per_principal_object(tmp_path: Path) -> None:
    gov, _ = governed(tmp_path)
    principal = key(environment="prod")
    first = gov.decide(principal, "invoke", "old", ["old-us"], Level.INTERNAL)
    assert gov.decide(principal, "invoke", "old", ["old-us"], Level.INTERNAL) is first
    # A changed key is a new Principal object: decided again, with its new attributes.
    assert gov.decide(key(environment="dev"), "invoke", "old", ["old-us"], Level.INTERNAL).allowed


# --- policy files ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("permit (principal, action, resource);", "no @id"),
        ('@id("a") permit (principal, action, resource)', "cannot parse"),
        ('@id("a") permit (principal, action, resource) when { resource.nope == 1 };', "does not match"),
        ('@id("a") permit (principal, action == Plinth::Action::"fly", resource);', "does not match"),
        (
            '@id("a") permit (principal, action, resource);\n@id("a") forbid (principal, action, resource);',
            "also used",
        ),
        ('@id("plinth:x") permit (principal, action, resource);', "reserved"),
        ('@id("t") permit (principal == ?principal, action, resource);', "templates"),
    ],
)
def test_bad_policies_are_refused_with_the_file_named(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policies([("team.cedar", text)])
    assert "team.cedar" in str(err.value) and message in str(err.value)


def test_missing_or_empty_policy_path(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="no such file"):
        load_policies(PolicySource(str(tmp_path / "nowhere")))
    (tmp_path / "empty.cedar").write_text("// nothing yet\n")
    with pytest.raises(PolicyError, match="holds no policies"):
        load_policies(PolicySource(str(tmp_path / "empty.cedar")))


def test_policy_files_hot_reload(tmp_path: Path) -> None:
    gov, _ = governed(tmp_path)
    assert gov.decide(key(), "invoke", "chat", CHAT, Level.INTERNAL).allowed
    policy_file = tmp_path / "policies" / "main.cedar"
    policy_file.write_text('@id("nobody") forbid (principal, action, resource);\n' + RESIDENCY)
    os.utime(policy_file, ns=(time.time_ns(), time.time_ns() + 10_000_000))
    assert gov.refresh(force_policies=True)
    refused = gov.decide(key(), "invoke", "chat", CHAT, Level.INTERNAL)
    assert refused.rule == "nobody" and refused.policy_set == gov.policies.loaded.digest
    # A broken edit keeps the last good policies and says why.
    policy_file.write_text('@id("oops") permit (principal, action, resource) when { resource.nope };')
    os.utime(policy_file, ns=(time.time_ns(), time.time_ns() + 20_000_000))
    assert not gov.refresh(force_policies=True)
    assert gov.policy_error is not None and "nope" in gov.policy_error
    assert gov.decide(key(), "invoke", "chat", CHAT, Level.INTERNAL).rule == "nobody"


def test_indexed_evaluation_matches_plain_cedar(tmp_path: Path) -> None:
    """Scope indexing must never change a decision: compare with one unindexed Cedar evaluation."""
    rng = random.Random(7)
    rules = []
    for i in range(60):
        effect = rng.choice(["permit", "permit", "forbid"])
        principal = rng.choice(
            ["principal", 'principal in Plinth::Team::"team_a"', 'principal == Plinth::Key::"key_1"',
             'principal in Plinth::Org::"org_1"', 'principal in Plinth::Team::"team_z"']
        )  # fmt: skip
        action = rng.choice(
            ["action", 'action == Plinth::Action::"invoke"', 'action == Plinth::Action::"embed"']
        )
        resource = rng.choice(
            ["resource", 'resource in Plinth::Model::"chat"', 'resource == Plinth::Deployment::"chat-eu"',
             'resource in Plinth::Provider::"openai"', "resource is Plinth::Deployment", 'resource in Plinth::Model::"x"']
        )  # fmt: skip
        condition = rng.choice(
            ["true", "context.data_class_rank >= 2", 'principal.environment == "prod"', 'context.caller_region like "eu-*"',
             "resource.data_class_rank < context.data_class_rank",
             'context.model == "chat" && context.data_class_rank > 1',
             'principal.environment == "prod" && "other" == context.model',
             '["chat", "x"].contains(context.model) && resource.data_class_rank > 2',
             # principal guards (policies narrowed by the key's attributes before evaluation)
             'principal.team == "team_a"', 'context.data_class_rank >= 1 && principal.team == "team_b"',
             '["prod", "staging"].contains(principal.environment) && context.caller_region like "us-*"',
             'principal.admin == false && principal.data_class_rank == 1',
             'principal.team == "team_a" && principal.team == "team_b"',
             # context read whole or by `has`: the attributes passed to Cedar must still suffice
             'context has caller_region && context.caller_region == ""',
             'context == context && context.entity_types.isEmpty()']
        )  # fmt: skip
        rules.append(f'@id("r{i}") {effect} ({principal}, {action}, {resource}) when {{ {condition} }};')
    text = "\n".join(rules)
    gov, _ = governed(tmp_path, text)
    plain = cedarpy.PolicySet.from_str(text)
    for _ in range(400):
        principal = key(
            key_id=rng.choice(["key_1", "key_2"]), team_id=rng.choice(["team_a", "team_b", None]),
            org_id=rng.choice(["org_1", None]), environment=rng.choice(["prod", "dev", "staging"]),
            data_class=rng.choice(["internal", "confidential"]),
        )  # fmt: skip
        action = rng.choice(["invoke", "embed"])
        level = rng.choice(list(Level))
        region = rng.choice(["eu-west-1", "us-east-1", None])
        decision = gov.decide(principal, action, "chat", CHAT, level, region)
        view = gov.snapshot.group(gov.snapshot.models["chat"], CHAT)
        who = gov._principal(principal)
        context = {"data_class": level.value, "data_class_rank": level.rank, "caller_region": region or "",
                   "entity_types": [], "model": "chat"}  # fmt: skip
        for name in CHAT:
            member = view.members[name]
            if level.rank > member.ceiling.rank:
                continue  # excluded by the built-in ceiling before any policy runs
            request = {"principal": who.uid, "action": {"type": "Plinth::Action", "id": action},
                       "resource": member.target.uid, "context": context}  # fmt: skip
            expected = cedarpy.is_authorized(request, plain, f"[{who.entities},{view.entities}]")
            assert decision.permits(name) == expected.allowed, (principal, action, level, region, name)
            if not expected.allowed and expected.diagnostics.reasons:
                excluded = next(e for e in decision.excluded if e.deployment == name)
                ids = set(expected.diagnostics.id_annotations_by_reason.values())
                assert set(excluded.policy_ids) == ids


def test_schema_is_valid_cedar() -> None:
    assert "namespace Plinth" in SCHEMA
    cedarpy.Schema.from_str(SCHEMA)
    loaded = load_policies(PolicySource(str(EXAMPLES / "policies")))
    assert {p.id for p in loaded.policies} >= {"eu-confidential-stays-in-eu", "models-for-every-key"}
    assert json.dumps([p.file for p in loaded.policies])
