"""Reading scanner options from profile configuration, with errors that name the bad option."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any


class ScannerOptionError(ValueError):
    """A scanner's options are wrong; the message names the scanner and the option."""


def check_keys(scanner: str, options: Mapping[str, Any], allowed: Iterable[str]) -> None:
    known = set(allowed)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ScannerOptionError(
            f"{scanner}: unknown option {unknown[0]!r} (known: {', '.join(sorted(known)) or 'none'})"
        )


def number(
    scanner: str, options: Mapping[str, Any], name: str, default: float, lo: float, hi: float
) -> float:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ScannerOptionError(f"{scanner}: {name!r} must be a number, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ScannerOptionError(f"{scanner}: {name!r} must be between {lo:g} and {hi:g}, got {value:g}")
    return float(value)


def optional_number(
    scanner: str, options: Mapping[str, Any], name: str, lo: float, hi: float
) -> float | None:
    if options.get(name) is None:
        return None
    return number(scanner, options, name, 0.0, lo, hi)


def boolean(scanner: str, options: Mapping[str, Any], name: str, default: bool) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise ScannerOptionError(f"{scanner}: {name!r} must be true or false, got {value!r}")
    return value


def string(scanner: str, options: Mapping[str, Any], name: str, default: str | None = None) -> str:
    value = options.get(name, default)
    if not isinstance(value, str) or not value.strip():
        raise ScannerOptionError(f"{scanner}: {name!r} must be a non-empty string")
    return value


def string_list(scanner: str, options: Mapping[str, Any], name: str) -> list[str]:
    value = options.get(name, [])
    if isinstance(value, str) or not isinstance(value, list):
        raise ScannerOptionError(f"{scanner}: {name!r} must be a list of strings")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise ScannerOptionError(f"{scanner}: {name}[{i}] must be a non-empty string")
    return list(value)
