"""Who may do what on the admin API.

Two kinds of credential are admin credentials: the platform admin key (`PLINTH_ADMIN_KEY`) and a
user's personal token (`pt-…`), which acts with that user's role. Virtual API keys are data-plane
credentials and are refused here with 403, so a leaked application key can never mint more keys.

Permissions are `resource:action` strings per role; team admins and developers are further confined
to their own team (checked by the handlers through `Actor.check_team`).
"""

from __future__ import annotations

from dataclasses import dataclass

from plinth.gateway.errors import GatewayError
from plinth.tenancy.models import Role, User

RESOURCES = ("orgs", "teams", "projects", "keys", "users", "budgets", "usage")

READ_ALL = frozenset(f"{resource}:read" for resource in RESOURCES)
# Governance (plinth.governance.api): everyone reads the model hub and provider reviews; auditors
# read everything, including policies and the audit trail; only platform admins change anything.
# Approving needs `approvals:write` and is never allowed to the person who asked (four eyes).
GOVERNANCE_CATALOG = frozenset({"models:read", "providers:read"})
GOVERNANCE_READ = GOVERNANCE_CATALOG | {"approvals:read", "kill:read", "policy:read", "audit:read"}
GOVERNANCE_WRITE = frozenset({"models:write", "providers:write", "approvals:write", "kill:write"})
# Guardrails (plinth.guardrails.api): session-risk blocks are not team-scoped (a session or key id of
# any team), so platform admins read and clear them, auditors read them, team roles neither.
GUARDRAILS_READ = frozenset({"guardrails:read"})
GUARDRAILS_WRITE = frozenset({"guardrails:write"})
PERMISSIONS: dict[Role, frozenset[str]] = {
    # `usage` is read-only (usage records are written by the gateway); `limits:write` is the limits
    # of keys (a team's own limits need `teams:write`, so a team admin cannot raise its own cap).
    Role.PLATFORM_ADMIN: READ_ALL
    | {f"{resource}:write" for resource in RESOURCES if resource != "usage"}
    | {"limits:write"}
    | GOVERNANCE_READ
    | GOVERNANCE_WRITE
    | GUARDRAILS_READ
    | GUARDRAILS_WRITE,
    Role.AUDITOR: READ_ALL | GOVERNANCE_READ | GUARDRAILS_READ,
    # Team admins may create users, but only developers of their own team (see the users handler).
    Role.TEAM_ADMIN: GOVERNANCE_CATALOG
    | frozenset(
        {
            "teams:read",
            "projects:read",
            "projects:write",
            "keys:read",
            "keys:write",
            "limits:write",
            "users:read",
            "users:write",
            "budgets:read",
            "budgets:write",
            "usage:read",
        }
    ),
    # Reading their team includes its projects, so a developer can pick one for a new key; they see
    # their team's spend and budgets but cannot change limits or budgets.
    Role.DEVELOPER: GOVERNANCE_CATALOG
    | frozenset({"teams:read", "projects:read", "keys:read", "keys:write", "budgets:read", "usage:read"}),
}

# Roles whose every action is confined to their own team.
TEAM_SCOPED = frozenset({Role.TEAM_ADMIN, Role.DEVELOPER})

VIRTUAL_KEY_REFUSED = (
    "This is a virtual API key: it calls models (/v1/...), it is not an admin credential. "
    "Use the platform admin key or a user token (pt-...) on /api/."
)


@dataclass(frozen=True, slots=True)
class Actor:
    """The caller of one admin request."""

    kind: str  # "admin_key" or "user"
    role: Role
    team_id: str | None = None
    user: User | None = None

    @property
    def label(self) -> str:
        """How the actor is recorded in `created_by`."""
        return self.user.email if self.user is not None else "admin"

    @property
    def team_scoped(self) -> bool:
        return self.role in TEAM_SCOPED

    def permissions(self) -> list[str]:
        return sorted(PERMISSIONS[self.role])

    def require(self, permission: str, doing: str, param: str | None = None) -> None:
        """Refuse with 403 unless the role holds `permission`; `doing` names it for the message."""
        if permission not in PERMISSIONS[self.role]:
            raise GatewayError(
                403,
                f"Role '{self.role.value}' may not {doing}.",
                param=param,
                code="insufficient_permissions",
            )

    def check_team(self, team_id: str) -> None:
        """Team admins and developers act on their own team only."""
        if self.team_scoped and team_id != self.team_id:
            raise GatewayError(
                403,
                f"Role '{self.role.value}' may act only on its own team ({self.team_id}), not '{team_id}'.",
                code="other_team",
            )

    def team_or_own(self, team_id: str | None, param: str = "team_id") -> str:
        """The team a request is about: the one given, else the caller's own; checked either way."""
        if team_id is None:
            if self.team_id is None:
                raise GatewayError(400, f"'{param}' is required.", param=param, code="missing_field")
            team_id = self.team_id
        self.check_team(team_id)
        return team_id


ADMIN_ACTOR = Actor(kind="admin_key", role=Role.PLATFORM_ADMIN)
