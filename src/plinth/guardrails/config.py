"""The `guardrails:` section of `plinth.yaml`: profiles, who gets which, enterprise identifiers.

Only pydantic and the standard library are imported here: `plinth.config.schema` imports this
module, so anything heavier would load with every configuration read. Regexes and validator names
are checked here, so a bad identifier fails `plinth config check`, not the first request.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

ActionName = Literal["allow", "flag", "mask", "pseudonymize", "block"]
SourceName = Literal["user", "system", "assistant", "tool"]
DataClass = Literal["public", "internal", "confidential", "restricted"]
BUILTIN_PROFILES = ("internal", "standard", "strict")  # defined in plinth.guardrails.profiles
Name = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScannerRef(_Strict):
    """A scanner by registry name, with its options (`pii`, `secrets`, `identifiers`, plug-ins...)."""

    name: Name
    options: dict[str, Any] = Field(default_factory=dict)


def _scanner_refs(value: Any) -> Any:
    # `scanners: [pii, {name: secrets, options: {...}}]`: a bare name is a scanner with no options.
    if isinstance(value, list):
        return [{"name": v} if isinstance(v, str) else v for v in value]
    return value


class StageConfig(_Strict):
    """The scanners of one stage (input or output) and what each finding leads to.

    `actions` keys are a finding type (`CREDIT_CARD`), a rule id (`pii.credit_card`) or a glob over
    rule ids (`secrets.*`, `*`); the most specific match wins (rule, type, longest glob)."""

    scanners: list[ScannerRef] | None = None  # None: inherit (from `extends`)
    actions: dict[str, ActionName] | None = None  # merged over the inherited actions
    # Input only: which messages are scanned; assistant turns are scanned so that values the
    # gateway restored in earlier answers are pseudonymized again when the history comes back.
    sources: list[SourceName] | None = None

    @field_validator("scanners", mode="before")
    @classmethod
    def _refs(cls, v: Any) -> Any:
        return _scanner_refs(v)


class ProfileConfig(_Strict):
    """A named set of input and output scanners with their actions."""

    extends: Name | None = None  # a built-in or earlier-declared profile to start from
    input: StageConfig = StageConfig()
    output: StageConfig = StageConfig()
    min_score: Annotated[float, Field(ge=0, le=1)] | None = None  # findings scored lower are ignored


class SelectRule(_Strict):
    """Which requests get `profile`. Every field given must match; lists match any of their items.
    Rules are tried in order; the first match wins."""

    profile: Name
    keys: list[str] | None = None  # key names or ids
    teams: list[str] | None = None  # team names or ids
    tags: list[str] | None = None  # any of the key's tags
    models: list[str] | None = None  # model aliases; a trailing '*' matches a prefix

    @model_validator(mode="after")
    def _something(self) -> SelectRule:
        if self.keys is None and self.teams is None and self.tags is None and self.models is None:
            raise ValueError("a select rule needs at least one of keys, teams, tags, models")
        return self


class IdentifierConfig(_Strict):
    """An identifier of the organization (employee id, contract number...) found by regex, optionally
    checked by a validator and raised by context words nearby."""

    name: Name  # rule id becomes `identifiers.<name>`
    type: Annotated[str, Field(pattern=r"^[A-Z][A-Z0-9_]{0,63}$")] | None = None  # default: NAME upper-cased
    pattern: Annotated[str, Field(min_length=1, max_length=2000)]
    validator: str | None = None  # luhn, mod97, iban, credit_card, us_ssn, ... (docs/guardrails.md)
    context: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(default_factory=list)
    score: Annotated[float, Field(ge=0, le=1)] = 0.9
    # Score when none of the context words is near (0: the context is required).
    score_without_context: Annotated[float, Field(ge=0, le=1)] | None = None
    data_class: DataClass | None = "confidential"
    ignore_case: bool = False

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            compiled = re.compile(v)
        except re.error as exc:
            raise ValueError(f"invalid regular expression: {exc}") from None
        if compiled.match(""):
            raise ValueError("the pattern matches the empty string")
        return v

    @field_validator("validator")
    @classmethod
    def _known_validator(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from plinth.guardrails.pii.validators import VALIDATORS  # stdlib-only module

        if v not in VALIDATORS:
            raise ValueError(f"unknown validator '{v}' (known: {', '.join(sorted(VALIDATORS))})")
        return v


class StreamConfig(_Strict):
    """How streamed answers are scanned: text is held back until it can be scanned with context."""

    window_chars: Annotated[int, Field(ge=16, le=4096)] = 96  # scan when this much text waits
    holdback_chars: Annotated[int, Field(ge=8, le=1024)] = 32  # always kept for the next window
    # Longest text held back while an identifier-like run has no end (then it is scanned as is).
    max_holdback_chars: Annotated[int, Field(ge=64, le=65536)] = 4096

    @model_validator(mode="after")
    def _order(self) -> StreamConfig:
        if not self.holdback_chars < self.window_chars <= self.max_holdback_chars:
            raise ValueError("need holdback_chars < window_chars <= max_holdback_chars")
        return self


class NerConfig(_Strict):
    """Optional named-entity backend for names, places and organizations (nothing is downloaded:
    the model must already be installed or on disk)."""

    backend: Literal["spacy", "gliner", "transformers"]
    model: Annotated[str, Field(min_length=1)]  # package name or local path
    labels: list[str] | None = None  # GLiNER: entity labels to ask for
    threshold: Annotated[float, Field(ge=0, le=1)] = 0.5


class GuardrailsConfig(_Strict):
    """Scanner profiles and their selection (docs/guardrails.md). Off unless a profile applies."""

    enabled: bool = True
    # Profile for requests no `select` rule matches; None: those requests are not scanned.
    default_profile: Name | None = None
    select: list[SelectRule] = Field(default_factory=list)
    profiles: dict[Name, ProfileConfig] = Field(default_factory=dict)
    identifiers: list[IdentifierConfig] = Field(default_factory=list)
    # A YAML file with a list of identifiers (same fields), re-read when its mtime changes.
    identifiers_file: str | None = None
    ner: NerConfig | None = None
    stream: StreamConfig = StreamConfig()
    # Key for pseudonym tags; set the same value on every worker and replica so a session keeps its
    # placeholders across them. None: a random key per process.
    pseudonym_key: SecretStr | None = None
    # Record findings (without values) in the guardrail_events table.
    record_events: bool = True
    # Canary tokens planted in your applications' system prompts: an answer that repeats one (even
    # encoded or spelled out) is a `leak` finding. Secrets: never logged or shown.
    canaries: list[SecretStr] = Field(default_factory=list)
    # Append a random canary to each request's system prompt (requests with one), checked on output.
    plant_canary: bool = False
    # Texts whose findings are kept for the conversation history clients resend every turn (an
    # LRU by digest, no values kept: plinth.guardrails.verdicts); 0 scans the history every time.
    history_cache: Annotated[int, Field(ge=0, le=1_000_000)] = 4096

    @field_validator("pseudonym_key")
    @classmethod
    def _empty_is_none(cls, v: SecretStr | None) -> SecretStr | None:
        return v if v is None or v.get_secret_value() else None

    @field_validator("canaries")
    @classmethod
    def _canaries(cls, v: list[SecretStr]) -> list[SecretStr]:
        for i, canary in enumerate(v):
            if len(canary.get_secret_value().strip()) < 4:
                raise ValueError(f"canaries[{i}]: a canary needs at least 4 characters")
        return v

    @model_validator(mode="after")
    def _profiles_exist(self) -> GuardrailsConfig:
        known = set(BUILTIN_PROFILES)
        for name, profile in self.profiles.items():
            if profile.extends is not None and profile.extends not in known:
                raise ValueError(f"profile '{name}' extends unknown profile '{profile.extends}'")
            known.add(name)
        wanted: list[tuple[str, str | None]] = [("default_profile", self.default_profile)] + [
            (f"select[{i}]", rule.profile) for i, rule in enumerate(self.select)
        ]
        for where, wanted_name in wanted:
            if wanted_name is not None and wanted_name not in known:
                raise ValueError(
                    f"{where}: unknown profile '{wanted_name}' (known: {', '.join(sorted(known))})"
                )
        return self

    @model_validator(mode="after")
    def _unique_identifiers(self) -> GuardrailsConfig:
        seen: set[str] = set()
        for ident in self.identifiers:
            if ident.name in seen:
                raise ValueError(f"identifier '{ident.name}' is declared twice")
            seen.add(ident.name)
        return self


__all__ = [
    "ActionName",
    "GuardrailsConfig",
    "IdentifierConfig",
    "NerConfig",
    "ProfileConfig",
    "ScannerRef",
    "SelectRule",
    "StageConfig",
    "StreamConfig",
]
