"""Reversible placeholders: `<EMAIL_ADDRESS_3f9a1c>` goes upstream, the real value comes back.

The tag is a keyed hash (HMAC-SHA256) of the session id, the type and the normalized value, so the
same value always gets the same placeholder within a session, on every worker and replica that
shares `guardrails.pseudonym_key`, with no shared state at all. The mapping back (placeholder →
value) lives only in the `Pseudonymizer` of one request, in this process's memory: it is never
written, logged or sent anywhere, and it is dropped with the request. Later turns need no stored
mapping: the client sends the restored history back, and the same values get the same tags again.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re

TAG_CHARS = 6  # 24 bits: collisions inside one request are detected and lengthened
PLACEHOLDER = re.compile(r"<([A-Z][A-Z0-9_]{0,63})_([0-9a-f]{6,16})>")
_SEPARATORS = re.compile(r"[\s\-.()/]+")


def normalize(kind: str, value: str) -> str:
    """What counts as "the same value": case and separators do not matter for identifiers."""
    v = value.strip().casefold()
    if any(c.isdigit() for c in v):
        v = _SEPARATORS.sub("", v)
    return v


def random_key() -> bytes:
    return os.urandom(32)


class Pseudonymizer:
    """One request's placeholders. Not shared between requests, so no lock is needed."""

    __slots__ = ("_key", "_session", "values")

    def __init__(self, key: bytes, session: str) -> None:
        self._key = key
        self._session = session.encode("utf-8", "replace")
        self.values: dict[str, str] = {}  # placeholder -> original text

    def tag(self, kind: str, value: str, size: int = TAG_CHARS) -> str:
        msg = b"\0".join((self._session, kind.encode(), normalize(kind, value).encode("utf-8", "replace")))
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:size]

    def placeholder(self, kind: str, value: str, *, restorable: bool = True) -> str:
        """The placeholder for `value`; with `restorable` it is restored in the answer."""
        kind = kind if PLACEHOLDER.fullmatch(f"<{kind}_000000>") else "PII"
        norm = normalize(kind, value)
        size = TAG_CHARS
        while True:
            text = f"<{kind}_{self.tag(kind, value, size)}>"
            known = self.values.get(text)
            if known is None or normalize(kind, known) == norm or size >= 16:
                break
            size += 4  # two values share a short tag in this request: lengthen (deterministically)
        if restorable and known is None:
            self.values[text] = value
        return text

    def restore(self, text: str) -> str:
        if not self.values or "<" not in text:
            return text
        return PLACEHOLDER.sub(lambda m: self.values.get(m.group(0), m.group(0)), text)


__all__ = ["PLACEHOLDER", "Pseudonymizer", "normalize", "random_key"]
