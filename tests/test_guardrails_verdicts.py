"""Findings reused for conversation history (`plinth.guardrails.verdicts`): what is reused, what is
always scanned again, and that reuse never changes what a request gets."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from plinth.gateway.errors import GatewayError
from plinth.guardrails.config import GuardrailsConfig
from plinth.guardrails.engine import Guardrails
from plinth.guardrails.registry import Registry, ScannerFactory, default_registry
from plinth.guardrails.types import Finding, ScanContext, Source, Stage
from plinth.providers.types import ChatRequest, Message, TextPart

EMAIL = "maria.keller@example.org"


class Counting:
    """A plug-in scanner that counts the texts it scans and flags the word 'secret'."""

    def __init__(self, name: str, cacheable: bool) -> None:
        self.name = name
        self.cacheable = cacheable
        self.scanned: list[str] = []

    def scan(self, text: str, ctx: ScanContext) -> list[Finding]:
        self.scanned.append(text)
        at = text.find("secret")
        return [] if at < 0 else [Finding("WORD", at, at + 6, 0.9, self.name, f"{self.name}.word")]


def engine_with(*scanners: Counting, **config: Any) -> Guardrails:
    def factory(scanner: Counting) -> ScannerFactory:
        return lambda _options: scanner

    registry = Registry({s.name: factory(s) for s in scanners}, parent=default_registry())
    profile = {"input": {"scanners": [s.name for s in scanners], "actions": {"*": "flag"}}}
    return Guardrails(
        GuardrailsConfig.model_validate({"default_profile": "p", "profiles": {"p": profile}, **config}),
        registry=registry,
    )


def turn(g: Guardrails, *texts: str, roles: tuple[str, ...] | None = None) -> ChatRequest:
    """A request carrying `texts` as the conversation so far (user and assistant alternating)."""
    roles = roles or tuple("user" if i % 2 == 0 else "assistant" for i in range(len(texts)))
    messages = [Message(r, [TextPart(t)]) for r, t in zip(roles, texts, strict=True)]  # type: ignore[arg-type]
    chat = ChatRequest(model="m", messages=messages)
    g.check_input(chat, None, "m", "req", "sess")
    return chat


def test_history_is_not_scanned_again_by_cacheable_scanners() -> None:
    cached, always = Counting("cached", cacheable=True), Counting("always", cacheable=False)
    g = engine_with(cached, always)
    turn(g, "first question")  # one-shot so far: scanned, not kept
    turn(g, "first question", "first answer", "second question")  # a conversation: all kept
    turn(g, "first question", "first answer", "second question", "second answer", "third question")
    turn(g, "first question", "first answer", "second question", "second answer", "third question")
    # The cacheable scanner saw each text once after turn 2 (the newest message of each turn again).
    assert cached.scanned == [
        "first question",
        "first question", "first answer", "second question",
        "second answer", "third question",
        "third question",
    ]  # fmt: skip
    # The other scanner saw every message of every request.
    assert len(always.scanned) == 1 + 3 + 5 + 5
    assert g.verdicts is not None and g.verdicts.hits == 3 + 4


def test_lookups_are_counted_for_prometheus() -> None:
    from prometheus_client import REGISTRY

    def count(result: str) -> float:
        value = REGISTRY.get_sample_value("plinth_guardrail_history_lookups_total", {"result": result})
        return value or 0.0

    hits, misses = count("hit"), count("miss")
    g = engine_with(Counting("cached", cacheable=True))
    turn(g, "one", "two", "three")  # one and two looked up: misses
    turn(g, "one", "two", "three", "four", "five")  # one, two, three: hits; four: miss
    assert (count("hit") - hits, count("miss") - misses) == (3, 3)


def test_the_newest_message_is_always_scanned_and_one_shot_requests_are_not_kept() -> None:
    """A repeated prompt is scanned each time: a benchmark must measure the scan, not the cache.
    A request with one message is not a conversation: nothing of it is kept."""
    cached = Counting("cached", cacheable=True)
    g = engine_with(cached)
    for _ in range(3):
        turn(g, "the same prompt")
    assert cached.scanned == ["the same prompt"] * 3
    assert g.verdicts is not None and len(g.verdicts) == 0


def test_reused_findings_act_exactly_like_fresh_ones() -> None:
    """The standard profile pseudonymizes an e-mail address in history: the same placeholder with
    and without the cache, and the finding is counted in the verdict either way."""
    history = (f"Write to {EMAIL} about the refund.", "Done, I drafted it.", "Now summarise it.")
    results = []
    for entries in (4096, 0):
        g = Guardrails(
            GuardrailsConfig.model_validate(
                {"default_profile": "standard", "history_cache": entries, "pseudonym_key": "k" * 32}
            )
        )
        turn(g, history[0])  # the first turn: scanned, kept
        chat = ChatRequest(model="m", messages=[
            Message("user", [TextPart(history[0])]),
            Message("assistant", [TextPart(history[1])]),
            Message("user", [TextPart(history[2])]),
        ])  # fmt: skip
        guard = g.check_input(chat, None, "m", "req", "sess")
        assert guard is not None
        results.append((chat.messages[0].text(), sorted(h.finding.rule for h in guard.input.hits)))
        assert (g.verdicts is not None) == (entries > 0)
    assert results[0] == results[1]
    assert EMAIL not in results[0][0] and results[0][1] == ["pii.email"]


def test_a_kill_switch_rule_applies_to_history_at_once(tmp_path: Path) -> None:
    """Hot-reloaded rules are not cacheable: a rule added now blocks a message sent turns ago."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: []\n", encoding="utf-8")
    g = Guardrails(
        GuardrailsConfig.model_validate(
            {
                "default_profile": "p",
                "profiles": {
                    "p": {
                        "extends": "standard",
                        "input": {
                            "scanners": [
                                "secrets", "pii", "injection",
                                {"name": "kill_switch", "options": {"path": str(rules), "check_interval_s": 0.01}},
                            ],
                        },
                    }
                },
            }
        )
    )  # fmt: skip
    turn(g, "Tell me about project falcon.")
    turn(g, "Tell me about project falcon.", "It is a secret project.", "More please.")
    tmp = rules.with_suffix(".tmp")
    tmp.write_text("rules:\n  - id: falcon\n    words: ['project falcon']\n", encoding="utf-8")
    os.replace(tmp, rules)
    deadline = time.monotonic() + 2.0
    while True:
        try:
            turn(g, "Tell me about project falcon.", "It is a secret project.", "More please.")
        except GatewayError as err:
            assert "kill_switch.falcon" in err.message and "messages[0]" in err.message
            break
        assert time.monotonic() < deadline, "the new rule did not reach the history"
        time.sleep(0.02)


def test_the_same_text_from_another_source_is_scanned_again() -> None:
    """Scanners may treat tool output differently (the injection threshold does): a verdict is
    kept per source."""
    cached = Counting("cached", cacheable=True)
    g = engine_with(cached)
    turn(g, "shared text", roles=("user",))
    turn(g, "shared text", "reply", "next", roles=("tool", "assistant", "user"))
    assert cached.scanned.count("shared text") == 2


def test_the_cache_is_bounded_and_keeps_no_text() -> None:
    cached = Counting("cached", cacheable=True)
    g = engine_with(cached, history_cache=3)
    assert g.verdicts is not None and g.verdicts.max_entries == 3
    for i in range(10):
        turn(g, f"a secret number {i}", "noted", "and the next one?")
    assert len(g.verdicts) == 3
    keys = list(g.verdicts._entries)
    assert all(isinstance(k[3], bytes) and len(k[3]) == 16 for k in keys)  # digests, not texts
    assert not any("secret" in repr(k) for k in keys)


@pytest.mark.parametrize("bad", [-1, 2_000_000])
def test_history_cache_setting_is_checked(bad: int) -> None:
    with pytest.raises(ValueError, match="history_cache"):
        GuardrailsConfig.model_validate({"history_cache": bad})


def test_answers_are_not_kept_at_the_output_stage() -> None:
    """An answer returns as input-stage history (another stage plan): output verdicts would only
    crowd the history out of the cache."""
    g = Guardrails(GuardrailsConfig(default_profile="standard"))
    chat = ChatRequest(model="m", messages=[
        Message("user", [TextPart("hello")]),
        Message("assistant", [TextPart("hi")]),
        Message("user", [TextPart("how are you?")]),
    ])  # fmt: skip
    guard = g.check_input(chat, None, "m", "req", "sess")
    assert guard is not None and g.verdicts is not None and len(g.verdicts) == 3
    for i in range(5):
        guard.scan_text(f"answer window {i}", Stage.OUTPUT, Source.ASSISTANT, "choices[0]")
    assert len(g.verdicts) == 3
