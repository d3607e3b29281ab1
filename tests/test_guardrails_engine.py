"""The engine: profiles and their inheritance, selection per key/team/tag/model, actions, verdicts,
enterprise identifiers (hot reload), plug-in scanners by entry point, configuration errors."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from plinth.config import ConfigError, parse_config
from plinth.gateway.errors import GatewayError
from plinth.guardrails import identifiers
from plinth.guardrails.config import GuardrailsConfig
from plinth.guardrails.engine import Guardrails
from plinth.guardrails.events import GuardrailEvent
from plinth.guardrails.profiles import ActionMap
from plinth.guardrails.registry import Registry, default_registry
from plinth.guardrails.types import Action, Finding, ScanContext, Source, Stage
from plinth.providers.types import ChatRequest, Message, TextPart, ToolCall
from plinth.tenancy import Principal

CARD = "4111 1111 1111 1111"


def build(**config: Any) -> Guardrails:
    g = Guardrails(GuardrailsConfig.model_validate(config))
    return g


def ask(
    g: Guardrails, text: str, principal: Principal | None = None, model: str = "m", role: str = "user"
) -> ChatRequest:
    chat = ChatRequest(model=model, messages=[Message(role, [TextPart(text)])])  # type: ignore[arg-type]
    g.check_input(chat, principal, model, "req-1", "sess-1")
    return chat


def test_no_profile_means_no_engine_at_all() -> None:
    assert Guardrails.from_config(GuardrailsConfig()) is None
    assert Guardrails.from_config(GuardrailsConfig(default_profile="standard", enabled=False)) is None


def test_selection_by_key_team_tag_and_model() -> None:
    g = build(
        default_profile="internal",
        select=[
            {"keys": ["payments-app"], "profile": "strict"},
            {"teams": ["research"], "models": ["local/*"], "profile": "internal"},
            {"tags": ["pci"], "profile": "strict"},
            {"models": ["gpt-4o"], "profile": "standard"},
        ],
    )
    by_key = Principal(name="payments-app", key_id="k1")
    research = Principal(name="r", team_id="t9", team_name="research")
    tagged = Principal(name="x", tags=("env:prod", "pci"))
    plain = Principal(name="y")

    def name(p: Principal, model: str) -> str | None:
        profile = g.profile_for(p, model)
        return profile.name if profile else None

    assert name(by_key, "gpt-4o") == "strict"
    assert name(research, "local/llama") == "internal"
    assert name(research, "gpt-4o") == "standard"  # team rule needs the model too
    assert name(tagged, "other") == "strict"
    assert name(plain, "gpt-4o") == "standard"
    assert name(plain, "other") == "internal"


def test_action_map_precedence() -> None:
    actions = ActionMap({"*": "flag", "pii.*": "mask", "CREDIT_CARD": "block", "pii.email": "allow"})
    card = Finding("CREDIT_CARD", 0, 1, 1.0, "pii", "pii.credit_card")
    email = Finding("EMAIL_ADDRESS", 0, 1, 1.0, "pii", "pii.email")
    phone = Finding("PHONE_NUMBER", 0, 1, 1.0, "pii", "pii.phone")
    secret = Finding("JWT", 0, 1, 1.0, "secrets", "secrets.jwt")
    assert [actions(f) for f in (card, email, phone, secret)] == [
        Action.BLOCK,
        Action.ALLOW,
        Action.MASK,
        Action.FLAG,
    ]


def test_profile_extends_and_overrides() -> None:
    g = build(
        default_profile="mine",
        profiles={
            "mine": {"extends": "standard", "input": {"actions": {"CREDIT_CARD": "mask"}}, "min_score": 0.8},
            "standard": {"input": {"actions": {"EMAIL_ADDRESS": "block"}}},  # changes the built-in
        },
    )
    chat = ask(g, f"card {CARD} tel +1 212 555 0187")
    text = chat.messages[0].text()
    assert "[CREDIT_CARD]" in text and "<PHONE_NUMBER_" in text
    with pytest.raises(GatewayError) as caught:
        ask(g, "mail me at a.b@example.com")
    assert "pii.email" in caught.value.message and "a.b@example.com" not in caught.value.message


def test_block_error_names_rule_and_place_not_value() -> None:
    g = build(default_profile="standard")
    key = "ghp_" + "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"
    chat = ChatRequest(
        model="m",
        messages=[
            Message("user", [TextPart("hello")]),
            Message("assistant", [], tool_calls=[ToolCall("c1", "deploy", f'{{"token": "{key}"}}')]),
        ],
    )
    with pytest.raises(GatewayError) as caught:
        g.check_input(chat, None, "m", "r", None)
    err = caught.value
    assert err.status == 400 and err.code == "guardrail_blocked"
    assert err.param == "messages[1].tool_calls[0].arguments"
    assert "secrets.github_token" in err.message and key not in err.message


def test_system_prompt_scanned_only_when_the_profile_says_so() -> None:
    standard, strict = build(default_profile="standard"), build(default_profile="strict")
    assert ask(standard, f"card {CARD}", role="system").messages[0].text() == f"card {CARD}"
    assert CARD not in ask(strict, f"card {CARD}", role="system").messages[0].text()


def test_verdict_data_classes_and_events_without_values() -> None:
    events: list[GuardrailEvent] = []

    class Sink:
        def record(self, event: GuardrailEvent) -> None:
            events.append(event)

    g = Guardrails(GuardrailsConfig(default_profile="standard"), events=Sink())
    chat = ChatRequest(model="m", messages=[Message("user", [TextPart(f"Mr. Jan Novak, card {CARD}")])])
    guard = g.check_input(chat, Principal(name="app", key_id="k1", team_id="t1"), "m", "req-9", None)
    assert guard is not None
    verdict = guard.input
    assert {"CREDIT_CARD", "PERSON"} <= verdict.entity_types
    assert verdict.detected_class == "restricted"  # the card, pseudonymized
    assert verdict.data_class == "confidential"  # the name still goes to the model (flagged)
    assert verdict.action is Action.PSEUDONYMIZE
    assert {(e.type, e.action, e.key_id, e.team_id, e.request_id) for e in events} >= {
        ("CREDIT_CARD", "pseudonymize", "k1", "t1", "req-9"),
        ("PERSON", "flag", "k1", "t1", "req-9"),
    }
    assert not any(CARD in repr(e) or "Novak" in repr(e) for e in events)


def test_identifiers_from_config_and_hot_reloaded_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(identifiers, "RELOAD_CHECK_S", 0.0)
    path = tmp_path / "ids.yaml"
    path.write_text(
        "identifiers:\n  - name: case_ref\n    pattern: 'CASE-\\d{6}'\n    data_class: restricted\n"
    )
    g = build(
        default_profile="standard",
        identifiers=[{"name": "employee_id", "pattern": r"\bE\d{5}\b", "context": ["employee", "staff"]}],
        identifiers_file=str(path),
        profiles={"standard": {"input": {"actions": {"identifiers.*": "mask"}}}},
    )
    assert (
        ask(g, "employee E12345 and CASE-123456").messages[0].text()
        == "employee [EMPLOYEE_ID] and [CASE_REF]"
    )
    assert ask(g, "order E12345").messages[0].text() == "order E12345"  # context word required
    path.write_text("- name: ticket\n  pattern: 'TKT-\\d{4}'\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert ask(g, "CASE-123456 TKT-0042").messages[0].text() == "CASE-123456 [TICKET]"
    path.write_text("- name: broken\n  pattern: '('\n")  # invalid: the previous set stays
    os.utime(path, (time.time() + 10, time.time() + 10))
    assert ask(g, "TKT-0042").messages[0].text() == "[TICKET]"
    assert g.identifiers.load_error is not None and "invalid regular expression" in g.identifiers.load_error


def test_plugin_scanner_from_an_entry_point(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "acme_guard.py"
    pkg.write_text(
        "from plinth.guardrails.types import Finding\n"
        "class Shout:\n"
        "    name = 'shout'\n"
        "    def __init__(self, options):\n"
        "        self.word = options.get('word', 'SECRET')\n"
        "    def scan(self, text, ctx):\n"
        "        i = text.find(self.word)\n"
        "        return [] if i < 0 else [Finding('CODEWORD', i, i + len(self.word), 1.0, 'shout', 'acme.codeword')]\n"
        "def factory(options):\n"
        "    return Shout(options)\n"
    )
    dist = tmp_path / "acme_guard-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-guard\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[plinth.guardrails]\nshout = acme_guard:factory\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    g = Guardrails(
        GuardrailsConfig.model_validate(
            {
                "default_profile": "p",
                "profiles": {
                    "p": {
                        "input": {
                            "scanners": [{"name": "shout", "options": {"word": "ZEBRA"}}],
                            "actions": {"acme.*": "block"},
                        }
                    }
                },
            }
        ),
        registry=Registry(parent=default_registry()),
    )
    with pytest.raises(GatewayError, match=r"acme\.codeword"):
        ask(g, "the ZEBRA flies")
    assert ask(g, "a horse").messages[0].text() == "a horse"
    sys.modules.pop("acme_guard", None)


def test_configuration_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown profile 'nope'"):
        parse_config({"guardrails": {"select": [{"keys": ["a"], "profile": "nope"}]}})
    with pytest.raises(ConfigError, match="invalid regular expression"):
        parse_config({"guardrails": {"identifiers": [{"name": "x", "pattern": "(["}]}})
    with pytest.raises(ConfigError, match="unknown validator"):
        parse_config({"guardrails": {"identifiers": [{"name": "x", "pattern": "X", "validator": "crc"}]}})
    with pytest.raises(ValueError, match="unknown scanner 'nosuch'"):
        build(default_profile="p", profiles={"p": {"input": {"scanners": ["nosuch"]}}})
    with pytest.raises(ValueError, match=r"scanner 'pii'.*unknown option"):
        build(
            default_profile="p",
            profiles={"p": {"input": {"scanners": [{"name": "pii", "options": {"x": 1}}]}}},
        )


def test_a_failing_scanner_fails_closed_without_leaking_text() -> None:
    class Broken:
        name = "broken"

        def scan(self, text: str, ctx: ScanContext) -> list[Finding]:
            raise RuntimeError(text)

    registry = Registry({"broken": lambda _o: Broken()}, parent=default_registry())
    g = Guardrails(
        GuardrailsConfig.model_validate(
            {"default_profile": "p", "profiles": {"p": {"input": {"scanners": ["broken"]}}}}
        ),
        registry=registry,
    )
    with pytest.raises(GatewayError) as caught:
        ask(g, f"card {CARD}")
    assert (
        caught.value.status == 500
        and caught.value.code == "guardrail_error"
        and CARD not in caught.value.message
    )


def test_output_pseudonyms_are_not_restored_and_stage_is_output() -> None:
    g = build(
        default_profile="standard",
        profiles={"standard": {"output": {"actions": {"EMAIL_ADDRESS": "pseudonymize"}}}},
    )
    chat = ChatRequest(model="m", messages=[Message("user", [TextPart("hi")])])
    guard = g.check_input(chat, None, "m", "r", None)
    assert guard is not None
    text, hits = guard.scan_text("write to x.y@example.com", Stage.OUTPUT, Source.ASSISTANT, "choices[0]")
    assert "<EMAIL_ADDRESS_" in text and guard.pseudonyms.restore(text) == text
    assert hits[0].finding.type == "EMAIL_ADDRESS"
