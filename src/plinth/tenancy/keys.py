"""Who is calling: API keys resolved to principals.

Keys are compared by SHA-256 digest, so the store never holds a usable key. Lookup is a dict hit per
request, with no I/O: the database-backed store of the tenancy issue keeps the same interface and
an in-memory cache invalidated on change.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Protocol

from plinth.config.schema import StaticKeyConfig


@dataclass(frozen=True, slots=True)
class Principal:
    """The identity a request runs as."""

    name: str
    is_admin: bool = False
    allowed_models: frozenset[str] | None = None  # None: every model

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore(Protocol):
    def authenticate(self, presented: str) -> Principal | None: ...


class StaticKeyStore:
    """The admin key plus the keys declared in the config file."""

    def __init__(self, admin_key: str | None, keys: list[StaticKeyConfig]) -> None:
        self._admin_digest = key_digest(admin_key) if admin_key else None
        self._admin = Principal(name="admin", is_admin=True)
        self._by_digest: dict[str, Principal] = {}
        for entry in keys:
            digest = key_digest(entry.key.get_secret_value()) if entry.key is not None else entry.key_sha256
            assert digest is not None
            models = frozenset(entry.models) if entry.models is not None else None
            self._by_digest[digest.lower()] = Principal(name=entry.name, allowed_models=models)

    def authenticate(self, presented: str) -> Principal | None:
        digest = key_digest(presented)
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return self._admin
        return self._by_digest.get(digest)
