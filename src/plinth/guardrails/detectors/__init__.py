"""Built-in detectors: prompt injection, denied topics, kill-switch rules, leaks, grounding, session risk.

`BUILTIN_SCANNERS` maps scanner names to factories (`factory(options) -> Scanner`); the guardrails
registry merges it. Modules are imported when a profile first names their scanner, so a process that
never matches topics never imports the embedding model. See docs/guardrails.md for every option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from plinth.guardrails.types import Scanner


def _injection(options: dict[str, Any]) -> Scanner:
    from plinth.guardrails.detectors.injection import InjectionScanner

    return InjectionScanner.from_options(options)


def _topics(options: dict[str, Any]) -> Scanner:
    from plinth.guardrails.detectors.topics import DeniedTopicsScanner

    return DeniedTopicsScanner.from_options(options)


def _kill_switch(options: dict[str, Any]) -> Scanner:
    from plinth.guardrails.detectors.killswitch import KillSwitchScanner

    return KillSwitchScanner.from_options(options)


def _leak(options: dict[str, Any]) -> Scanner:
    from plinth.guardrails.detectors.leaks import LeakScanner

    return LeakScanner.from_options(options)


def _grounding(options: dict[str, Any]) -> Scanner:
    from plinth.guardrails.detectors.grounding import GroundingScanner

    return GroundingScanner.from_options(options)


def _session_risk(options: dict[str, Any]) -> Scanner:
    from plinth.guardrails.detectors.session_risk import SessionRiskScanner

    return SessionRiskScanner.from_options(options)


BUILTIN_SCANNERS: dict[str, Callable[[dict[str, Any]], Scanner]] = {
    "injection": _injection,
    "topics": _topics,
    "kill_switch": _kill_switch,
    "leak": _leak,
    "grounding": _grounding,
    "session_risk": _session_risk,
}

__all__ = ["BUILTIN_SCANNERS"]
