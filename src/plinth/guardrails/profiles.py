"""Profiles: which scanners run on input and output, and what each finding leads to.

Three built-in profiles work with no configuration:

- `internal`: for trusted internal tools. Secrets are blocked on input and masked on output;
  personal data is only flagged (recorded).
- `standard`: secrets blocked; payment, bank and government identifiers pseudonymized, contact
  details pseudonymized; prompt injection blocked; on output, secrets and payment data masked.
- `strict`: as standard, but every personal-data finding is pseudonymized on input and masked on
  output, and the system prompt is scanned too.

A configured profile may `extend` one of these (or an earlier configured one) and override its
scanners, add or change actions, or change `min_score`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from plinth.guardrails.config import ActionName, ProfileConfig, ScannerRef, StageConfig
from plinth.guardrails.types import Action, Finding, ScanContext, Scanner, Source

# Scanners of the detectors package used by the built-in profiles when that package provides them.
OPTIONAL_SCANNERS = frozenset({"injection", "leak", "kill_switch", "topics", "session_risk", "grounding"})

_SECRETS_BLOCK: dict[str, ActionName] = {"secrets.*": "block"}
_GOV_IDS = (
    "US_SSN", "US_ITIN", "US_PASSPORT", "PASSPORT", "US_DRIVER_LICENSE", "US_BANK_NUMBER", "UK_NINO", "UK_NHS",
    "ES_NIF", "ES_NIE", "IT_FISCAL_CODE", "FR_NIR", "NL_BSN", "DE_TAX_ID", "PL_PESEL", "SE_PERSONNUMMER",
    "IN_AADHAAR", "IN_PAN", "BR_CPF", "CN_RESIDENT_ID", "CA_SIN",
)  # fmt: skip
_FINANCIAL = ("CREDIT_CARD", "IBAN_CODE")
_CONTACT = ("EMAIL_ADDRESS", "PHONE_NUMBER", "IP_ADDRESS", "DATE_OF_BIRTH")
_NAMED = ("PERSON", "STREET_ADDRESS", "LOCATION", "ORGANIZATION", "NRP", "AGE", "ZIP_CODE")
_LOW = ("URL", "DATE_TIME", "TITLE")  # recorded at most: not personal data on their own


def _map(action: ActionName, *types: str) -> dict[str, ActionName]:
    return dict.fromkeys(types, action)


_INPUT = [ScannerRef(name="secrets"), ScannerRef(name="pii"), ScannerRef(name="identifiers")]
_OUTPUT = [ScannerRef(name="secrets"), ScannerRef(name="pii"), ScannerRef(name="identifiers")]

BUILTIN: dict[str, ProfileConfig] = {
    "internal": ProfileConfig(
        input=StageConfig(
            scanners=_INPUT,
            actions={"*": "flag", **_SECRETS_BLOCK, **_map("allow", *_LOW)},
            sources=["user", "tool", "assistant"],
        ),
        output=StageConfig(
            scanners=_OUTPUT, actions={"*": "flag", "secrets.*": "mask", **_map("allow", *_LOW)}
        ),
        min_score=0.5,
    ),
    "standard": ProfileConfig(
        input=StageConfig(
            scanners=[*_INPUT, ScannerRef(name="injection"), ScannerRef(name="kill_switch")],
            actions={
                "*": "flag",
                **_SECRETS_BLOCK,
                **_map("pseudonymize", *_FINANCIAL, *_GOV_IDS, *_CONTACT),
                **_map("flag", *_NAMED),
                **_map("allow", *_LOW),
                "injection.*": "block",
                "PROMPT_INJECTION": "block",
                "kill_switch.*": "block",
            },
            sources=["user", "tool", "assistant"],
        ),
        output=StageConfig(
            scanners=[*_OUTPUT, ScannerRef(name="leak")],
            actions={
                "*": "flag",
                "secrets.*": "mask",
                **_map("mask", *_FINANCIAL, *_GOV_IDS),
                **_map("allow", *_LOW),
                "leak.*": "block",
            },
        ),
        min_score=0.5,
    ),
    "strict": ProfileConfig(
        input=StageConfig(
            scanners=[*_INPUT, ScannerRef(name="injection"), ScannerRef(name="kill_switch"), ScannerRef(name="topics")],
            actions={
                "*": "flag",
                **_SECRETS_BLOCK,
                **_map("pseudonymize", *_FINANCIAL, *_GOV_IDS, *_CONTACT, *_NAMED),
                **_map("allow", *_LOW),
                "injection.*": "block",
                "PROMPT_INJECTION": "block",
                "kill_switch.*": "block",
                "topics.*": "block",
            },
            sources=["user", "tool", "assistant", "system"],
        ),
        output=StageConfig(
            scanners=[*_OUTPUT, ScannerRef(name="leak"), ScannerRef(name="kill_switch")],
            actions={
                "*": "mask",
                "secrets.*": "mask",
                **_map("allow", *_LOW),
                "leak.*": "block",
                "kill_switch.*": "block",
            },
        ),
        min_score=0.4,
    ),
}  # fmt: skip

_ORDER = {a: i for i, a in enumerate(Action)}


class ActionMap:
    """Finding → action: exact rule id, then exact type, then the longest matching rule glob."""

    def __init__(self, actions: Mapping[str, str], default: Action = Action.FLAG) -> None:
        self._exact = {k: Action(v) for k, v in actions.items() if not any(c in k for c in "*?[")}
        self._globs = sorted(
            ((k, Action(v)) for k, v in actions.items() if any(c in k for c in "*?[")),
            key=lambda kv: -len(kv[0].replace("*", "")),
        )
        self._default = default
        self._cache: dict[tuple[str, str], Action] = {}

    def __call__(self, finding: Finding) -> Action:
        key = (finding.rule, finding.type)
        found = self._cache.get(key)
        if found is None:
            found = self._resolve(finding.rule, finding.type)
            if len(self._cache) < 4096:
                self._cache[key] = found
        return found

    def _resolve(self, rule: str, kind: str) -> Action:
        exact = self._exact.get(rule) or self._exact.get(kind)
        if exact is not None:
            return exact
        for pattern, action in self._globs:
            if pattern != "*" and (fnmatch.fnmatchcase(rule, pattern) or fnmatch.fnmatchcase(kind, pattern)):
                return action
        for pattern, action in self._globs:
            if pattern == "*":
                return action
        return self._default


def most_severe(actions: list[Action]) -> Action:
    return max(actions, key=_ORDER.__getitem__) if actions else Action.ALLOW


class FindingObserver(Protocol):
    """Told what every scanner of a stage found in a text (session risk accumulates it)."""

    def observe(self, text: str, ctx: ScanContext, findings: Sequence[Finding]) -> None: ...


@dataclass(frozen=True, slots=True)
class StagePlan:
    scanners: tuple[Scanner, ...]
    actions: ActionMap
    sources: frozenset[Source] = frozenset({Source.USER, Source.TOOL, Source.ASSISTANT})
    # Gets each scanned text's findings: the stage's own `session_risk` scanner, else the other
    # stage's, so one declared on input alone still hears about leaks in answers.
    observer: FindingObserver | None = None


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    input: StagePlan
    output: StagePlan
    min_score: float = 0.5
    scanner_names: tuple[str, ...] = field(default=())


def merged(name: str, configured: Mapping[str, ProfileConfig]) -> ProfileConfig:
    """A profile with everything it inherits resolved. A configured profile named like a built-in
    (and extending nothing else) changes that built-in rather than replacing it."""
    chain: list[ProfileConfig] = []
    seen: set[tuple[str, bool]] = set()
    current: str | None = name
    from_config = True
    while current is not None:
        if (current, from_config) in seen:
            raise ValueError(f"profile '{name}': 'extends' loops through '{current}'")
        seen.add((current, from_config))
        if from_config and current in configured:
            profile = configured[current]
            parent = profile.extends or (current if current in BUILTIN else None)
            from_config = parent != current
        elif current in BUILTIN:
            profile = BUILTIN[current]
            parent = profile.extends
            from_config = True
        else:
            raise ValueError(f"unknown profile '{current}'")
        chain.append(profile)
        current = parent
    result = chain[-1]
    for override in reversed(chain[:-1]):
        result = ProfileConfig(
            input=_merge_stage(result.input, override.input),
            output=_merge_stage(result.output, override.output),
            min_score=override.min_score if override.min_score is not None else result.min_score,
        )
    return result


def _merge_stage(base: StageConfig, override: StageConfig) -> StageConfig:
    return StageConfig(
        scanners=override.scanners if override.scanners is not None else base.scanners,
        actions={**(base.actions or {}), **(override.actions or {})},
        sources=override.sources if override.sources is not None else base.sources,
    )


__all__ = [
    "BUILTIN",
    "OPTIONAL_SCANNERS",
    "ActionMap",
    "FindingObserver",
    "Profile",
    "StagePlan",
    "merged",
    "most_severe",
]
