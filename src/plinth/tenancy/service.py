"""Tenancy operations: the one place that writes organizations, teams, projects, keys and users.

The admin API and the CLI both call these; later the audit trail hooks in here too. Every write
that the gateway caches bumps the change counter in the same transaction, so workers see it on
their next poll.
"""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from plinth.storage import Base, Database, utcnow
from plinth.tenancy.keys import key_digest
from plinth.tenancy.models import (
    ApiKey,
    ChangeCounter,
    DataClass,
    Organization,
    Project,
    Role,
    Team,
    User,
)

KEY_PREFIX = "sk-plinth-"
USER_TOKEN_PREFIX = "pt-"
VISIBLE_CHARS = 8  # random characters kept in the visible prefix

M = TypeVar("M", bound=Base)


class TenancyError(Exception):
    status = 400


class NotFound(TenancyError):
    status = 404


class Conflict(TenancyError):
    status = 409


def new_secret(prefix: str) -> tuple[str, str]:
    """A fresh secret and the prefix of it that may be shown (e.g. `sk-plinth-AbC12xYz`)."""
    secret = prefix + secrets.token_urlsafe(32)
    return secret, secret[: len(prefix) + VISIBLE_CHARS]


@dataclass(frozen=True, slots=True)
class CreatedKey:
    key: ApiKey
    secret: str  # shown once, never stored


@dataclass(frozen=True, slots=True)
class CreatedUser:
    user: User
    token: str  # shown once, never stored


def bump_change_counter(session: Session) -> int:
    """Advance the change counter inside the caller's transaction and return the new value.

    The UPDATE comes first so that the write lock is taken before the value is read: two writers
    can never hand out the same number (on SQLite a read-then-write would not lock)."""
    bumped = session.execute(
        update(ChangeCounter).where(ChangeCounter.id == 1).values(seq=ChangeCounter.seq + 1)
    )
    if getattr(bumped, "rowcount", 0) == 0:  # the very first change on this database
        session.add(ChangeCounter(id=1, seq=1))
        session.flush()
        return 1
    seq = session.scalar(select(ChangeCounter.seq).where(ChangeCounter.id == 1))
    assert seq is not None
    return seq


def current_change_seq(db: Database) -> int:
    """The latest change number: caches compare it with what they last loaded."""
    with db.session() as session:
        counter = session.get(ChangeCounter, 1)
        return counter.seq if counter is not None else 0


def _get(session: Session, model: type[M], ident: str, what: str) -> M:
    row = session.get(model, ident)
    if row is None:
        raise NotFound(f"{what} '{ident}' does not exist")
    return row


class TenancyService:
    def __init__(self, db: Database) -> None:
        self.db = db

    def _commit(self, session: Session, what: str) -> None:
        try:
            session.flush()
        except IntegrityError:
            raise Conflict(f"{what} already exists") from None

    # --- organizations, teams, projects ----------------------------------------------------

    def create_org(self, name: str) -> Organization:
        with self.db.session() as session:
            org = Organization(name=_name(name, "organization"))
            session.add(org)
            self._commit(session, f"organization '{name}'")
            return org

    def list_orgs(self) -> list[Organization]:
        with self.db.session() as session:
            return list(session.scalars(select(Organization).order_by(Organization.name)))

    def create_team(
        self,
        org_id: str,
        name: str,
        *,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        max_concurrency: int | None = None,
    ) -> Team:
        limits = _limits(rpm_limit, tpm_limit, max_concurrency)
        with self.db.session() as session:
            _get(session, Organization, org_id, "organization")
            team = Team(org_id=org_id, name=_name(name, "team"), **limits)
            session.add(team)
            self._commit(session, f"team '{name}' in organization {org_id}")
            return team

    def list_teams(self, org_id: str | None = None) -> list[Team]:
        with self.db.session() as session:
            query = select(Team).order_by(Team.name)
            if org_id is not None:
                query = query.where(Team.org_id == org_id)
            return list(session.scalars(query))

    def get_team(self, team_id: str) -> Team:
        with self.db.session() as session:
            return _get(session, Team, team_id, "team")

    def set_team_limits(
        self, team_id: str, *, rpm_limit: int | None, tpm_limit: int | None, max_concurrency: int | None
    ) -> Team:
        """Replace the team's limits (None: unlimited). Its keys are re-stamped so every worker
        reloads them, with the new team limits, on its next poll."""
        limits = _limits(rpm_limit, tpm_limit, max_concurrency)
        with self.db.session() as session:
            team = _get(session, Team, team_id, "team")
            for attr, value in limits.items():
                setattr(team, attr, value)
            seq = bump_change_counter(session)
            session.execute(update(ApiKey).where(ApiKey.team_id == team_id).values(change_seq=seq))
            return team

    def create_project(self, team_id: str, name: str) -> Project:
        with self.db.session() as session:
            _get(session, Team, team_id, "team")
            project = Project(team_id=team_id, name=_name(name, "project"))
            session.add(project)
            self._commit(session, f"project '{name}' in team {team_id}")
            return project

    def list_projects(self, team_id: str | None = None) -> list[Project]:
        with self.db.session() as session:
            query = select(Project).order_by(Project.name)
            if team_id is not None:
                query = query.where(Project.team_id == team_id)
            return list(session.scalars(query))

    # --- keys ------------------------------------------------------------------------------

    def create_key(
        self,
        team_id: str,
        name: str,
        *,
        project_id: str | None = None,
        allowed_models: list[str] | None = None,
        expires_at: dt.datetime | None = None,
        environment: str | None = None,
        data_class: str = DataClass.INTERNAL.value,
        tags: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        created_by: str | None = None,
        rotated_from: str | None = None,
        rpm_limit: int | None = None,
        tpm_limit: int | None = None,
        max_concurrency: int | None = None,
    ) -> CreatedKey:
        limits = _limits(rpm_limit, tpm_limit, max_concurrency)
        if data_class not in DataClass.__members__.values():
            levels = ", ".join(d.value for d in DataClass)
            raise TenancyError(f"data_class must be one of {levels}, not '{data_class}'")
        if expires_at is not None and expires_at <= utcnow():
            raise TenancyError("expires_at must be in the future")
        with self.db.session() as session:
            created = self._insert_key(
                session,
                team_id,
                name,
                project_id=project_id,
                allowed_models=allowed_models,
                expires_at=expires_at,
                environment=environment,
                data_class=data_class,
                tags=tags,
                extra=metadata,
                created_by=created_by,
                rotated_from=rotated_from,
                change_seq=bump_change_counter(session),
                **limits,
            )
            self._commit(session, f"key '{name}'")
            return created

    def _insert_key(
        self, session: Session, team_id: str, name: str, *, project_id: str | None, **fields: Any
    ) -> CreatedKey:
        """Add a key with a fresh secret inside the caller's transaction (shared by create and rotate)."""
        secret, prefix = new_secret(KEY_PREFIX)
        _get(session, Team, team_id, "team")
        if project_id is not None and _get(session, Project, project_id, "project").team_id != team_id:
            raise TenancyError(f"project '{project_id}' does not belong to team '{team_id}'")
        key = ApiKey(
            team_id=team_id,
            project_id=project_id,
            name=_name(name, "key"),
            prefix=prefix,
            key_hash=key_digest(secret),
            **{**fields, "tags": fields.get("tags") or [], "extra": fields.get("extra") or {}},
        )
        session.add(key)
        return CreatedKey(key, secret)

    def list_keys(self, team_id: str | None = None, *, include_revoked: bool = False) -> list[ApiKey]:
        with self.db.session() as session:
            query = select(ApiKey).order_by(ApiKey.created_at)
            if team_id is not None:
                query = query.where(ApiKey.team_id == team_id)
            if not include_revoked:
                query = query.where(ApiKey.revoked_at.is_(None))
            return list(session.scalars(query))

    def get_key(self, key_id: str) -> ApiKey:
        with self.db.session() as session:
            return _get(session, ApiKey, key_id, "key")

    def set_key_limits(
        self, key_id: str, *, rpm_limit: int | None, tpm_limit: int | None, max_concurrency: int | None
    ) -> ApiKey:
        """Replace the key's own limits (None: unlimited); workers pick them up on their next poll."""
        limits = _limits(rpm_limit, tpm_limit, max_concurrency)
        with self.db.session() as session:
            key = _get(session, ApiKey, key_id, "key")
            for attr, value in limits.items():
                setattr(key, attr, value)
            key.change_seq = bump_change_counter(session)
            return key

    def revoke_key(self, key_id: str, reason: str | None = None) -> ApiKey:
        with self.db.session() as session:
            key = _get(session, ApiKey, key_id, "key")
            if key.revoked_at is None:
                key.revoked_at = utcnow()
                key.revoked_reason = reason
                key.change_seq = bump_change_counter(session)
            return key

    def rotate_key(self, key_id: str, *, created_by: str | None = None) -> CreatedKey:
        """Issue a new secret with the same settings and revoke the old one in one transaction,
        so a failure can never leave both keys working or neither (the old row is locked, so two
        concurrent rotations cannot both succeed)."""
        with self.db.session() as session:
            # Write first, read after: the counter update takes the write lock (SQLite) or the row
            # lock (PostgreSQL), so the old key is read after any concurrent rotation committed.
            seq = bump_change_counter(session)
            old = session.get(ApiKey, key_id, with_for_update=True)
            if old is None:
                raise NotFound(f"key '{key_id}' does not exist")
            if old.revoked_at is not None:
                raise TenancyError(f"key '{key_id}' is revoked; create a new key instead")
            now = utcnow()
            created = self._insert_key(
                session,
                old.team_id,
                old.name,
                project_id=old.project_id,
                allowed_models=old.allowed_models,
                expires_at=old.expires_at if old.expires_at and old.expires_at > now else None,
                environment=old.environment,
                data_class=old.data_class,
                tags=list(old.tags or []),
                extra=dict(old.extra or {}),
                created_by=created_by,
                rotated_from=old.id,
                change_seq=seq,
                rpm_limit=old.rpm_limit,
                tpm_limit=old.tpm_limit,
                max_concurrency=old.max_concurrency,
            )
            self._commit(session, f"key '{old.name}'")
            old.revoked_at = now
            old.revoked_reason = f"rotated to {created.key.id}"
            old.change_seq = seq
            return created

    # --- users -----------------------------------------------------------------------------

    def create_user(
        self, email: str, role: str, *, team_id: str | None = None, name: str | None = None
    ) -> CreatedUser:
        if role not in Role.__members__.values():
            raise TenancyError(f"role must be one of {', '.join(r.value for r in Role)}, not '{role}'")
        if role in (Role.TEAM_ADMIN, Role.DEVELOPER) and team_id is None:
            raise TenancyError(f"a {role} belongs to a team: give team_id")
        token, prefix = new_secret(USER_TOKEN_PREFIX)
        with self.db.session() as session:
            if team_id is not None:
                _get(session, Team, team_id, "team")
            user = User(
                email=_name(email, "email"),
                name=name,
                role=role,
                team_id=team_id,
                token_prefix=prefix,
                token_hash=key_digest(token),
                change_seq=bump_change_counter(session),
            )
            session.add(user)
            self._commit(session, f"user '{email}'")
            return CreatedUser(user, token)

    def list_users(self) -> list[User]:
        with self.db.session() as session:
            return list(session.scalars(select(User).order_by(User.email)))

    def user_by_token(self, token: str) -> User | None:
        with self.db.session() as session:
            user = session.scalar(select(User).where(User.token_hash == key_digest(token)))
            return user if user is not None and user.disabled_at is None else None

    # --- change feed for caches ------------------------------------------------------------

    def current_seq(self) -> int:
        return current_change_seq(self.db)

    def keys_changed_since(self, seq: int) -> list[tuple[ApiKey, Team]]:
        """Keys written after `seq`, each with its team (organization id, name and limits)."""
        with self.db.session() as session:
            rows = session.execute(
                select(ApiKey, Team)
                .join(Team, Team.id == ApiKey.team_id)
                .where(ApiKey.change_seq > seq)
                .order_by(ApiKey.change_seq)
            )
            return [(key, team) for key, team in rows]


def _limits(rpm: int | None, tpm: int | None, concurrency: int | None) -> dict[str, int | None]:
    """Validated limit columns: each None (unlimited) or a positive whole number."""
    limits = {"rpm_limit": rpm, "tpm_limit": tpm, "max_concurrency": concurrency}
    for name, value in limits.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise TenancyError(f"{name} must be a whole number of at least 1, or null for no limit")
    return limits


def _name(value: str, what: str) -> str:
    value = value.strip()
    if not value:
        raise TenancyError(f"{what} name must not be empty")
    if len(value) > 200:
        raise TenancyError(f"{what} name is longer than 200 characters")
    return value
