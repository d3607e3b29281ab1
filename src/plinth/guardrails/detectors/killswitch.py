"""Word and regex kill-switch rules from a file that is watched: edit it, and the next scan uses it.

Why a file and not the database: an operator stopping an abuse in progress needs one edit that works
now, on every worker of the machine, with nothing else running. Each worker stats the file at most
every `check_interval_s` (0.25 s by default) when it scans, and reloads it when its modification
time, size or inode changed (or, while the file is younger than two seconds, when its bytes changed:
some file systems keep whole-second times). A rule added takes effect within a second, without a
restart. A file that fails to load (bad YAML, bad regex) leaves the previous rules in force and is
reported in the log and in `last_error`; at start-up it is an error. A file that does not exist
(yet) means no rules: create it during an incident and it is picked up like an edit.

File format (YAML):

    rules:
      - id: project-falcon              # reported as kill_switch.project-falcon
        words: ["project falcon", "falcon-7"]   # whole words or phrases, any case, any spacing
      - id: card-dump
        regex: 'dump\\s+all\\s+(?:cards|accounts)'
        case_sensitive: false           # default false
        stages: [input]                 # default: input and output
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from plinth.guardrails.detectors import options as opt
from plinth.guardrails.detectors.text import clean, span_in_original
from plinth.guardrails.types import Finding, ScanContext, Stage

log = logging.getLogger("plinth.guardrails.killswitch")

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
_RULE_KEYS = {"id", "words", "regex", "case_sensitive", "stages"}
RACY_WINDOW_NS = 2_000_000_000


class RulesFileError(ValueError):
    """The rules file cannot be used; the message names the file and the rule."""


@dataclass(frozen=True, slots=True)
class KillRule:
    id: str
    pattern: re.Pattern[str]
    stages: frozenset[Stage]


def _word_pattern(word: str) -> str:
    parts = [re.escape(p) for p in word.split()]
    return r"(?<!\w)" + r"\s+".join(parts) + r"(?!\w)"


def parse_rules(data: Any, source: str) -> tuple[KillRule, ...]:
    """Validate the loaded YAML; errors name the rule by position and id."""
    if data is None:
        return ()
    if not isinstance(data, dict) or not isinstance(data.get("rules", []), list):
        raise RulesFileError(f"{source}: expected a mapping with a 'rules' list")
    unknown_top = sorted(set(data) - {"rules"})
    if unknown_top:
        raise RulesFileError(f"{source}: unknown key {unknown_top[0]!r} (expected 'rules')")
    rules: list[KillRule] = []
    seen: set[str] = set()
    for i, item in enumerate(data.get("rules") or []):
        where = f"{source}: rules[{i}]"
        if not isinstance(item, dict):
            raise RulesFileError(f"{where}: must be a mapping with 'id' and 'words' or 'regex'")
        unknown = sorted(set(item) - _RULE_KEYS)
        if unknown:
            raise RulesFileError(f"{where}: unknown key {unknown[0]!r}")
        rule_id = item.get("id")
        if not isinstance(rule_id, str) or not _ID.match(rule_id):
            raise RulesFileError(f"{where}: 'id' must be 1-64 letters, digits, '_', '.', ':' or '-'")
        if rule_id in seen:
            raise RulesFileError(f"{where}: duplicate id {rule_id!r}")
        seen.add(rule_id)
        where = f"{source}: rule {rule_id!r}"
        has_words, has_regex = "words" in item, "regex" in item
        if has_words == has_regex:
            raise RulesFileError(f"{where}: give exactly one of 'words' or 'regex'")
        case_sensitive = item.get("case_sensitive", False)
        if not isinstance(case_sensitive, bool):
            raise RulesFileError(f"{where}: 'case_sensitive' must be true or false")
        flags = 0 if case_sensitive else re.IGNORECASE
        if has_words:
            words = item["words"]
            if isinstance(words, str):
                words = [words]
            if (
                not isinstance(words, list)
                or not words
                or not all(isinstance(w, str) and w.strip() for w in words)
            ):
                raise RulesFileError(f"{where}: 'words' must be a non-empty list of non-empty strings")
            source_pattern = "|".join(_word_pattern(clean(w)) for w in words)
        else:
            source_pattern = item["regex"]
            if not isinstance(source_pattern, str) or not source_pattern:
                raise RulesFileError(f"{where}: 'regex' must be a non-empty string")
        try:
            pattern = re.compile(source_pattern, flags)
        except re.error as exc:
            raise RulesFileError(f"{where}: invalid regex: {exc}") from None
        if pattern.search("") is not None:
            raise RulesFileError(f"{where}: the pattern matches empty text, so it would match everything")
        stages_raw = item.get("stages", ["input", "output"])
        try:
            stages = frozenset(Stage(s) for s in stages_raw)
        except (TypeError, ValueError):
            raise RulesFileError(f"{where}: 'stages' must be a list of 'input' and/or 'output'") from None
        rules.append(KillRule(rule_id, pattern, stages))
    return tuple(rules)


class RulesFile:
    """The rules of one file, reloaded when the file changes. Thread-safe; shared per path."""

    def __init__(self, path: Path, check_interval_s: float = 0.25) -> None:
        self.path = path
        self.check_interval_s = check_interval_s
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._signature: tuple[int, int, int] | None = None
        self._digest = b""
        self.last_error: str | None = None
        self.reloads = 0
        self._rules = self._read_initial()

    def _read_initial(self) -> tuple[KillRule, ...]:
        self._next_check = time.monotonic() + self.check_interval_s
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            log.info("kill-switch rules file %s does not exist yet: no rules until it does", self.path)
            return ()
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise RulesFileError(f"kill_switch: cannot read rules file {self.path}: {exc.strerror}") from None
        rules = self._parse(raw)
        self._signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        self._digest = hashlib.sha256(raw).digest()
        return rules

    def _parse(self, raw: bytes) -> tuple[KillRule, ...]:
        try:
            data = yaml.safe_load(raw.decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise RulesFileError(f"{self.path}: not valid YAML{where}") from None
        return parse_rules(data, str(self.path))

    def rules(self) -> tuple[KillRule, ...]:
        """The current rules; stats the file when the check interval has passed."""
        now = time.monotonic()
        if now >= self._next_check and self._lock.acquire(blocking=False):
            try:
                self._next_check = now + self.check_interval_s
                self._maybe_reload()
            finally:
                self._lock.release()
        return self._rules

    def _maybe_reload(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self._signature is not None:  # it existed: keep its rules (editors replace files)
                self._fail(f"{self.path} disappeared; keeping the previous rules")
            return
        except OSError as exc:
            self._fail(f"cannot read {self.path}: {exc.strerror}; keeping the previous rules")
            return
        signature = (st.st_mtime_ns, st.st_size, st.st_ino)
        racy = time.time_ns() - st.st_mtime_ns < RACY_WINDOW_NS
        if signature == self._signature and not racy:
            return
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            self._fail(f"cannot read {self.path}: {exc.strerror}; keeping the previous rules")
            return
        digest = hashlib.sha256(raw).digest()
        self._signature = signature
        if digest == self._digest:
            return
        try:
            rules = self._parse(raw)
        except RulesFileError as exc:
            self._digest = digest  # report a broken file once, not at every check
            self._fail(f"{exc}; keeping the previous rules")
            return
        self._rules = rules
        self._digest = digest
        self.last_error = None
        self.reloads += 1
        log.info("kill-switch rules reloaded from %s: %d rules", self.path, len(rules))

    def _fail(self, message: str) -> None:
        if message != self.last_error:
            log.error("kill-switch rules: %s", message)
        self.last_error = message


_FILES: dict[tuple[Path, float], RulesFile] = {}
_FILES_LOCK = threading.Lock()


def rules_file(path: Path, check_interval_s: float = 0.25) -> RulesFile:
    """One watcher per file and interval in the process, however many profiles use it."""
    key = (path.resolve(), check_interval_s)
    with _FILES_LOCK:
        existing = _FILES.get(key)
        if existing is None:
            existing = _FILES[key] = RulesFile(key[0], check_interval_s)
        return existing


class KillSwitchScanner:
    """Scanner `kill_switch`: text matching an operator's word or regex rule, hot-reloaded.

    Without a `path` option (as in the built-in profiles) it has no rules and costs nothing."""

    name = "kill_switch"
    finding_type = "KILL_SWITCH"

    def __init__(self, rules: RulesFile | None) -> None:
        self.file = rules

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> KillSwitchScanner:
        opt.check_keys("kill_switch", options, ("path", "check_interval_s"))
        if options.get("path") is None:
            return cls(None)
        path = Path(opt.string("kill_switch", options, "path")).expanduser()
        interval = opt.number("kill_switch", options, "check_interval_s", 0.25, 0.01, 1.0)
        try:
            return cls(rules_file(path, interval))
        except RulesFileError as exc:
            raise opt.ScannerOptionError(str(exc)) from None

    def scan(self, text: str, ctx: ScanContext) -> list[Finding]:
        if self.file is None:
            return []
        rules = self.file.rules()
        if not rules or not text:
            return []
        cleaned = clean(text)
        findings: list[Finding] = []
        for rule in rules:
            if ctx.stage not in rule.stages:
                continue
            match = rule.pattern.search(cleaned)
            if match is not None:
                start, end = span_in_original(text, cleaned, match.start(), match.end())
                findings.append(
                    Finding(self.finding_type, start, end, 1.0, self.name, f"kill_switch.{rule.id}")
                )
        return findings
