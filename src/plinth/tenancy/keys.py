"""Who is calling: API keys resolved to principals, with no I/O on the request path.

Keys are compared by SHA-256 digest, so no store holds a usable key. The database store keeps every
active key in memory and follows the change counter (see `service.py`) from a background task, so a
revoked key stops working on every worker and replica within one poll interval.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from plinth.config.schema import StaticKeyConfig

if TYPE_CHECKING:
    from plinth.tenancy.models import ApiKey, Team
    from plinth.tenancy.service import TenancyService

log = logging.getLogger("plinth.tenancy")


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Ceilings of one key or team (enforced by plinth.limits); None: unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrency: int | None = None

    @classmethod
    def of(cls, row: ApiKey | Team) -> RateLimits | None:
        """The row's limits, or None when it has none (so the gateway can skip limiting at once)."""
        if row.rpm_limit is None and row.tpm_limit is None and row.max_concurrency is None:
            return None
        return cls(row.rpm_limit, row.tpm_limit, row.max_concurrency)


@dataclass(frozen=True, slots=True)
class Principal:
    """The identity a request runs as, with what policy, limits and metering need to know."""

    name: str
    is_admin: bool = False
    allowed_models: frozenset[str] | None = None  # None: every model
    key_id: str | None = None
    team_id: str | None = None
    project_id: str | None = None
    org_id: str | None = None
    environment: str | None = None
    data_class: str = "internal"
    tags: tuple[str, ...] = field(default=())
    expires_at: float | None = None  # Unix time
    team_name: str | None = None
    limits: RateLimits | None = None  # the key's own
    team_limits: RateLimits | None = None  # the team's, shared by all its keys
    cache: str | None = None  # "exact" or "semantic": this key's requests use the response cache

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
            limits = entry.limits
            self._by_digest[digest.lower()] = Principal(
                name=entry.name,
                allowed_models=models,
                cache=entry.cache,
                limits=RateLimits(limits.rpm, limits.tpm, limits.max_concurrency) if limits else None,
            )

    def authenticate(self, presented: str) -> Principal | None:
        digest = key_digest(presented)
        if self._admin_digest is not None and hmac.compare_digest(digest, self._admin_digest):
            return self._admin
        return self._by_digest.get(digest)


def principal_for(key: ApiKey, team: Team) -> Principal:
    # Stored naive in UTC; keep the microseconds (timetuple() would drop them: up to 1 s early).
    expires = key.expires_at.replace(tzinfo=dt.UTC).timestamp() if key.expires_at is not None else None
    return Principal(
        name=key.name,
        allowed_models=frozenset(key.allowed_models) if key.allowed_models is not None else None,
        key_id=key.id,
        team_id=key.team_id,
        project_id=key.project_id,
        org_id=team.org_id,
        environment=key.environment,
        data_class=key.data_class,
        tags=tuple(key.tags or ()),
        expires_at=float(expires) if expires is not None else None,
        team_name=team.name,
        limits=RateLimits.of(key),
        team_limits=RateLimits.of(team),
        cache=_cache_mode(key.extra),
    )


def _cache_mode(metadata: dict[str, Any] | None) -> str | None:
    """Key metadata `{"cache": "exact"|"semantic"}` opts the key into response caching."""
    mode = (metadata or {}).get("cache")
    return mode if mode in ("exact", "semantic") else None


class DatabaseKeyStore:
    """Virtual keys from the database, cached in memory and kept fresh by polling the change counter."""

    def __init__(self, service: TenancyService) -> None:
        self._service = service
        self._by_digest: dict[str, Principal] = {}
        self._digest_by_id: dict[str, str] = {}
        self._seq = 0

    def authenticate(self, presented: str) -> Principal | None:
        principal = self._by_digest.get(key_digest(presented))
        if principal is None:
            return None
        if principal.expires_at is not None and principal.expires_at <= time.time():
            return None
        return principal

    def refresh(self) -> int:
        """Apply every key change since the last refresh; returns how many keys changed. Blocking."""
        changed = self._service.keys_changed_since(self._seq)
        for key, team in changed:
            old = self._digest_by_id.pop(key.id, None)
            if old is not None:
                self._by_digest.pop(old, None)
            if key.revoked_at is None:
                self._by_digest[key.key_hash] = principal_for(key, team)
                self._digest_by_id[key.id] = key.key_hash
            self._seq = max(self._seq, key.change_seq)
        return len(changed)

    async def follow(self, interval_s: float) -> None:
        """Refresh forever (until cancelled); a failed poll is logged and retried next interval."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await asyncio.to_thread(self.refresh)
            except Exception:
                log.exception("could not refresh API keys from the database; keeping the cached ones")


class ChainedKeyStore:
    """Try several stores in order (config keys first, then database keys)."""

    def __init__(self, *stores: KeyStore) -> None:
        self._stores = stores

    def authenticate(self, presented: str) -> Principal | None:
        for store in self._stores:
            principal = store.authenticate(presented)
            if principal is not None:
                return principal
        return None
