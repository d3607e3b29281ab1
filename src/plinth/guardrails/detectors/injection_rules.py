"""Hand-written patterns of common prompt-injection and jailbreak phrasing (English, German, a little
French, Spanish and Croatian), matched on folded text.

Why rules beside the classifier: they are exact where the classifier is statistical. A phrase like
"ignore all previous instructions" is an attack in any context, and a rule names it in the event
("injection.rule.ignore_instructions") where a score would not. They were written from the well-known
attack families (instruction override, prompt extraction, persona switch, role-tag smuggling,
obfuscation), not fitted to the benchmark rows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from plinth.guardrails.detectors.text import fold

_OVERRIDE = r"(?:ignore|disregard|forget|override|bypass|overlook|abandon|neglect)"
_QUALIFIER = r"(?:(?:all|any|every|each|the|your|my|these|those|of|previous|prior|above|earlier|preceding|foregoing|initial|original|system|former|old|given|current)\s+)+"
_ORDERS = r"(?:instructions?|directions?|directives?|rules?|prompts?|context|orders?|tasks?|assignments?|guidelines?|commands?|constraints?|restrictions?|programming|guardrails?|polic(?:y|ies)|documents?)"
_DE_ORDERS = (
    r"(?:anweisung\w*|instruktion\w*|aufgabe\w*|auftr[aä]g\w*|befehl\w*|regeln|vorgaben|kontext|alles)"
)


STRONG = 0.95  # a rule that names an attack: reported with this confidence
# A phrasing that attacks use but ordinary requests use too ("pretend you are a customer"): reported
# below the profiles' default `min_score` (0.5), so it blocks nothing alone but still adds to the
# session's risk, where a run of such turns counts.
WEAK = 0.45


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    pattern: re.Pattern[str]
    why: str
    score: float  # STRONG or WEAK
    # Substrings of which every match contains at least one (in `keyword_text` form, where a run
    # of whitespace is one space); empty: none. A rule whose keywords are all absent is not run: on
    # a 2 KB prompt the thirteen patterns cost 2.3 ms, the substring checks a few microseconds
    # (measured, docs/guardrails.md).
    needs: tuple[str, ...] = ()
    # For a rule no keyword can gate: a cheap test of `cleaned` that every text it matches passes.
    gate: Callable[[str], bool] | None = None

    def search(self, cleaned: str) -> re.Match[str] | None:
        """The first match in `cleaned`, once one of `needs` is known to be in its `keyword_text`
        (`rule_matches` checks every rule's keywords in one pass: see `keywords_of`)."""
        if self.gate is not None and not self.gate(cleaned):
            return None
        return self.pattern.search(cleaned)


def keywords_of(rules: tuple[Rule, ...]) -> tuple[str, ...]:
    """Every keyword of `rules`, once: `rule_matches` looks each up once per text rather than once
    per rule (a one-line prompt: 18 -> 10 µs, measured), then runs only the rules with one present."""
    return tuple(dict.fromkeys(need for rule in rules for need in rule.needs))


def keyword_text(cleaned: str) -> str:
    """`cleaned` as the keyword checks see it: folded as the classifier sees text (case folded, runs
    of whitespace made one space), and dotless i made i (the one character left after NFKC that the
    patterns' IGNORECASE matches to an ASCII letter it does not fold to;
    tests/test_guardrails_injection_speed.py checks every code point)."""
    return fold(cleaned).replace("\u0131", "i")


def _letters_spaced_out(cleaned: str) -> bool:
    """Whether `cleaned` has seven one-character words in a row: the letters inside a match of
    `spaced_letters` each stand between two single whitespace characters. The pattern itself tries
    every position of the text (160 microseconds on 2 KB, measured); this takes a quarter of that."""
    run = 0
    for word in cleaned.split():
        if len(word) == 1:
            run += 1
            if run == 7:
                return True
        else:
            run = 0
    return False


def _rule(
    rule_id: str,
    pattern: str,
    why: str,
    needs: tuple[str, ...] = (),
    gate: Callable[[str], bool] | None = None,
    score: float = STRONG,
) -> Rule:
    return Rule(rule_id, re.compile(pattern, re.IGNORECASE | re.MULTILINE), why, score, needs, gate)


RULES: tuple[Rule, ...] = (
    _rule(
        "ignore_instructions",
        rf"\b{_OVERRIDE}(?:ing)?\s+{_QUALIFIER}?{_ORDERS}\b",
        "tells the model to drop the instructions it was given",
        ("ignor", "disregard", "forget", "overrid", "bypass", "overlook", "abandon", "neglect"),
    ),
    _rule(
        "forget_everything",
        r"\b(?:forget|ignore|disregard)\s+(?:about\s+)?(?:everything|all\s+(?:of\s+)?(?:that|this|the\s+above)"
        r"|what\s+(?:i|we|you)\s+(?:said|told|discussed|wrote))",
        "wipes the conversation so far",
        ("forget", "ignor", "disregard"),
    ),
    _rule(
        "new_task",
        r"\b(?:focus|concentrate)\s+(?:only\s+)?on\s+(?:your|the|a|this)\s+new\s+(?:task|assignment|instructions?)"
        r"|\bnew\s+(?:task|instructions?|assignment)\s*:",
        "replaces the task with the attacker's",
        ("new task", "new instruction", "new assignment"),
    ),
    _rule(
        "reveal_prompt",
        r"\b(?:show|print|reveal|repeat|output|display|tell|give|leak|disclose|write\s+out|spell\s+out|return)\s+"
        r"(?:me\s+)?(?:all\s+)?(?:of\s+)?(?:your|the)\s+(?:entire\s+|full\s+|complete\s+|exact\s+)?"
        r"(?:system\s+|initial\s+|original\s+|hidden\s+|secret\s+|previous\s+)?"
        r"(?:prompts?(?:\s+text)?|instructions|directives|configuration|pre-?prompt)\b",
        "asks for the system prompt or configuration",
        ("prompt", "instructions", "directives", "configuration"),
    ),
    _rule(
        "persona_switch",
        r"\b(?:you\s+are\s+now|you\s+will\s+now\s+act\s+as)\b",
        "switches the assistant to another persona",
        ("you are now", "you will now"),
    ),
    _rule(
        "role_play",
        r"\b(?:from\s+now\s+on,?\s+you(?:\s+are|'re|\s+will)|pretend\s+(?:that\s+)?(?:you\s+are|to\s+be)"
        r"|act\s+as\s+if\s+you|roleplay\s+as|stay\s+in\s+(?:your\s+)?(?:role|character))\b",
        "asks the assistant to play a role (weak alone: role play is also an ordinary request)",
        ("you", "pretend", "roleplay", "stay"),
        score=WEAK,
    ),
    _rule(
        "jailbreak_terms",
        r"(?-i:\bDAN\b)(?=\s*(?:mode|prompt|jailbreak|\(|,|:))|\b(?:act\s+as|you\s+are|become|called)\s+(?-i:DAN)\b|\b(?:do\s+anything\s+now|developer\s+mode|jailbreak(?:ed|ing)?|god\s*mode|unfiltered\s+mode"
        r"|no\s+(?:restrictions|limitations|filters)|without\s+(?:any\s+)?(?:restrictions|limitations|filters|censorship))\b",
        "names a known jailbreak",
        (
            "dan",
            "anything",
            "developer",
            "jailbreak",
            "god",
            "unfiltered",
            "restrictions",
            "limitations",
            "filters",
            "censorship",
        ),
    ),
    _rule(
        "role_tags",
        r"<\|im_(?:start|end|sep)\|>|<\|(?:system|endoftext)\|>|\[/?INST\]|<<SYS>>"
        r"|^\s*#{2,}\s*(?:system|instruction)\b|^\s*(?:system|assistant)\s*:",
        "smuggles chat-template role markers",
        ("<|", "inst]", "<<sys", "#", "system", "assistant"),
    ),
    _rule(
        "spaced_letters",
        r"(?:\b[^\W\d_]\s){8,}[^\W\d_]\b",
        "spells words out letter by letter to slip past filters",
        gate=_letters_spaced_out,
    ),
    _rule(
        "de_ignore",
        r"\b(?:ignorier\w*|vergiss|vergesse\w*|vergessen\s+sie|missachte\w*|[uü]bergehe\w*)\b\s+(?:\w+\s+){0,3}"
        + _DE_ORDERS
        + r"|\b(?:alle|die|deine|obigen|vorherigen|bisherigen)\s+(?:\w+\s+){0,2}"
        + _DE_ORDERS
        + r"\s+(?:\w+\s+)?(?:ignorieren|vergessen|missachten)\b",
        "German: drop the instructions",
        ("ignorier", "vergiss", "vergess", "missacht", "bergehe"),
    ),
    _rule(
        "de_new_task",
        r"\bneue[nr]?\s+(?:aufgabe|anweisung|instruktion|auftrag)\b"
        r"|\bkonzentriere\s+dich\s+(?:jetzt\s+|nun\s+)?auf\s+(?:deine|die)\s+neue",
        "German: a new task",
        ("neue",),
    ),
    _rule(
        "de_reveal",
        r"\b(?:zeige?|gib|nenne|verrate|wiederhole)\s+(?:mir\s+)?(?:alle\s+)?(?:deine[n]?|die)\s+(?:\w+\s+)?"
        r"(?:prompt\w*|anweisungen|instruktionen|systemprompt\w*)",
        "German: reveal the prompt",
        ("prompt", "anweisungen", "instruktionen"),
    ),
    _rule(
        "de_persona",
        r"\b(?:du\s+bist\s+(?:jetzt|nun|ab\s+sofort|ab\s+jetzt)|stell\s+dir\s+vor,?\s+du\s+bist|tu\s+so,?\s+als"
        r"|ab\s+(?:jetzt|sofort)\s+(?:bist|wirst)\s+du|abweichend\s+(?:zu|von)\s+(?:den\s+)?(?:vorherigen|bisherigen))\b",
        "German: persona switch or override",
        ("du bist", "bist du", "wirst du", "tu so", "abweichend"),
    ),
    _rule(
        "other_ignore",
        r"\b(?:oubli(?:e|ez)|ignorez|olvida|ignora|olvide|zaboravi)\b\s+(?:\w+\s+){0,3}"
        r"(?:instructions?|instrucciones|consignes|instrukcije|reglas|r[eè]gles|sve)\b",
        "French, Spanish, Croatian: drop the instructions",
        ("oubli", "ignorez", "olvid", "ignora", "zaboravi"),
    ),
)
RULE_KEYWORDS = keywords_of(RULES)
