"""`plinth guardrails sessions|clear`: session-risk blocks from the command line.

Like the rest of the admin CLI these talk to a running gateway over HTTP (the blocks live in its
memory or its Redis), so permission checks and the audit trail happen in one place.
Exit codes: 1 when the API refuses (or there is nothing to clear), 2 for unusable input.
"""

from __future__ import annotations

from typing import Annotated

import typer

from plinth.admin.cli import (
    DEFAULT_URL,
    AdminClient,
    JsonOption,
    TokenOption,
    UrlOption,
    _fail,
    _segment,
    _show,
)

guardrails_app = typer.Typer(help="Guardrails: session-risk blocks (list, clear).", no_args_is_help=True)

BLOCK_COLUMNS = [
    ("scope", "Scope"),
    ("key", "Session / user"),
    ("score", "Score"),
    ("remaining_s", "Remaining (s)"),
    ("until", "Until (UTC)"),
]
CLEARED_COLUMNS = [("scope", "Scope"), ("key", "Session / user"), ("cleared", "Cleared")]


@guardrails_app.command("sessions")
def sessions(url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """List the sessions and users that session risk blocks now."""
    _show(AdminClient(url, token).call("GET", "/guardrails/sessions/blocked"), BLOCK_COLUMNS, as_json)


@guardrails_app.command("clear")
def clear(
    session: Annotated[
        str | None, typer.Option("--session", help="Session id (x-plinth-session-id).")
    ] = None,
    user: Annotated[
        str | None, typer.Option("--user", help="API key id (or name of a plinth.yaml key).")
    ] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Lift a session's or a user's block and forget its score."""
    if (session is None) == (user is None):
        _fail("give exactly one of --session or --user.", 2)
    path = (
        f"/guardrails/sessions/{_segment(session)}/clear"
        if session is not None
        else f"/guardrails/users/{_segment(user or '')}/clear"
    )
    _show(AdminClient(url, token).call("POST", path), CLEARED_COLUMNS, as_json)


__all__ = ["guardrails_app"]
