"""Enterprise identifiers declared in configuration: employee ids, contract numbers, case references.

Each one is a regex, an optional validator by name, optional context words and a classification.
Those in `guardrails.identifiers` are fixed for the process; those in `guardrails.identifiers_file`
are re-read when the file's mtime changes (checked at most once per `RELOAD_CHECK_S`, from the scan
itself: no thread). A file that fails to parse or validate is logged and the previous set stays.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from plinth.guardrails.config import IdentifierConfig
from plinth.guardrails.pii.patterns import Pattern, Words, resolve_overlaps, run_patterns
from plinth.guardrails.pii.validators import validator_named
from plinth.guardrails.types import Finding, ScanContext

log = logging.getLogger("plinth.guardrails")

RELOAD_CHECK_S = 1.0
_LIST = TypeAdapter(list[IdentifierConfig])


def compile_identifier(ident: IdentifierConfig) -> Pattern:
    with_context = ident.score
    without = ident.score if not ident.context else (ident.score_without_context or 0.0)
    if ident.context and ident.score_without_context is None:
        without = 0.0  # context words given and no score without them: they are required
    return Pattern(
        type=ident.type or ident.name.upper().replace("-", "_").replace(".", "_").replace(":", "_"),
        rule=f"identifiers.{ident.name}",
        regex=re.compile(ident.pattern, re.IGNORECASE if ident.ignore_case else 0),
        score=without,
        validator=validator_named(ident.validator) if ident.validator else None,
        context=Words(*ident.context) if ident.context else None,
        needs_digit=False,
        context_score=with_context,
        data_class=ident.data_class,
    )


def load_file(path: str) -> list[IdentifierConfig]:
    """Parse an identifiers file: a YAML list, or a mapping with an `identifiers` list."""
    with open(path, encoding="utf-8") as fh:
        data: Any = yaml.safe_load(fh)
    if isinstance(data, dict):
        data = data.get("identifiers")
    if data is None:
        return []
    try:
        return _LIST.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"[{'.'.join(str(p) for p in e['loc'])}] {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False)
        )
        raise ValueError(f"{path}: {problems}") from None


class IdentifiersScanner:
    """Configured identifiers plus the hot-reloaded file's; thread-safe (the pattern tuple is swapped
    whole, so a scan sees either the old set or the new one)."""

    name = "identifiers"

    def __init__(self, identifiers: Sequence[IdentifierConfig] = (), path: str | None = None) -> None:
        self._fixed = tuple(compile_identifier(i) for i in identifiers)
        self._path = path
        self._mtime: float | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self._patterns: tuple[Pattern, ...] = self._fixed
        self.load_error: str | None = None
        if path is not None:
            self.reload(force=True)

    @property
    def patterns(self) -> tuple[Pattern, ...]:
        return self._patterns

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file if its mtime changed; True when the set changed."""
        if self._path is None:
            return False
        with self._lock:
            self._checked = time.monotonic()
            try:
                mtime = os.stat(self._path).st_mtime_ns / 1e9
            except OSError as exc:
                if force or self._mtime is not None:
                    log.error(
                        "identifiers file %s unreadable (%s); keeping the previous set", self._path, exc
                    )
                self.load_error = f"{self._path}: {exc.strerror or exc}"
                return False
            if not force and mtime == self._mtime:
                return False
            self._mtime = mtime
            try:
                loaded = tuple(compile_identifier(i) for i in load_file(self._path))
            except (OSError, ValueError, yaml.YAMLError) as exc:
                self.load_error = str(exc)
                log.error("identifiers file not loaded, keeping the previous set: %s", exc)
                return False
            self.load_error = None
            self._patterns = self._fixed + loaded
            log.info("loaded %d identifiers from %s", len(loaded), self._path)
            return True

    def scan(self, text: str, ctx: ScanContext) -> list[Finding]:
        if self._path is not None and time.monotonic() - self._checked >= RELOAD_CHECK_S:
            self.reload()
        patterns = self._patterns
        if not patterns:
            return []
        return resolve_overlaps(run_patterns(patterns, text, self.name))


__all__ = ["IdentifiersScanner", "compile_identifier", "load_file"]
