"""Findings of texts already scanned, reused for the conversation history a chat client resends.

Chat clients send the whole conversation on every turn, so without this the tenth turn scans the
nine messages before it again and the input check grows with the conversation
(`bench/guardrails_latency.py`: turn 10 of a chat with 2 KB prompts, 25 ms without this, 2 ms
with it). A text's findings are kept per stage plan and source under a 128-bit BLAKE2b digest of
the text; findings hold spans and rule ids, never values, so nothing sensitive is kept.

What is reused, and what is not:
- Only the findings of scanners that declare `cacheable = True`: their findings depend on nothing
  but the text, the stage and the source (built in: `secrets`, `pii`, `injection`, `topics`). The
  others run on every text every time: session risk (its state changes), the hot-reloaded
  kill-switch and identifier rules (an operator's new rule applies to the history at once), output
  checks that read the system prompt, and third-party scanners unless they opt in.
- The newest message of a request is always scanned. In real traffic it is new text, and a
  benchmark that repeats one prompt must measure the scan, not this cache. Its findings are kept
  for the next turns when the request is a conversation (more than one message scanned): a one-shot
  request is never resent, and keeping it would cost time and crowd conversations out.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from enum import Enum

from prometheus_client import Counter

from plinth.guardrails.types import Finding, ScanContext, Scanner

DEFAULT_ENTRIES = 4096
LOOKUPS = Counter(
    "plinth_guardrail_history_lookups",
    "Conversation-history texts looked up in the guardrails' verdict cache, by result (hit or miss).",
    ["result"],
)
_HIT, _MISS = LOOKUPS.labels("hit"), LOOKUPS.labels("miss")

CachedFindings = tuple[tuple[Finding, ...], ...]  # per cacheable scanner, in the plan's order
Key = tuple[int, str, str, bytes]


class VerdictUse(Enum):
    """How one scan uses the cache."""

    OFF = "off"  # a one-shot request's text: scanned, not kept
    KEEP = "keep"  # the newest message of a conversation: scanned, kept for the next turns
    REUSE = "reuse"  # history and retrieved passages: an earlier verdict if kept, else scanned and kept


def cacheable(scanner: Scanner) -> bool:
    """Whether `scanner` declared that its findings depend only on the text, stage and source."""
    return getattr(scanner, "cacheable", False) is True


class VerdictCache:
    """A bounded LRU of findings by (stage plan, stage, source, text digest); thread-safe."""

    def __init__(self, max_entries: int = DEFAULT_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Key, CachedFindings] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(plan_id: int, ctx: ScanContext, text: str) -> Key:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        return (plan_id, ctx.stage.value, ctx.source.value, digest)

    def get(self, key: Key) -> CachedFindings | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
            else:
                self._entries.move_to_end(key)
                self.hits += 1
        (_MISS if found is None else _HIT).inc()
        return found

    def put(self, key: Key, findings: Sequence[Sequence[Finding]]) -> None:
        value = tuple(tuple(f) for f in findings)
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


__all__ = ["DEFAULT_ENTRIES", "VerdictCache", "VerdictUse", "cacheable"]
