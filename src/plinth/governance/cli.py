"""`plinth models|providers|approvals|kill|policy|audit …`: governance from the command line.

Like the rest of the admin CLI, catalog, provider, approval and kill-switch commands talk to a running
gateway over HTTP, so permission checks and the audit trail happen in one place. `policy check` and
`policy test` work on local files (no server); `audit verify` and `audit export` use the API, or
the database directly with `--db`, and `audit verify --export DIR` checks an export offline.
Exit codes: 1 when the API refuses, a test fails or the chain is broken; 2 for unusable input.
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from plinth.admin.cli import (
    DEFAULT_URL,
    AdminClient,
    DataClassChoice,
    JsonOption,
    TokenOption,
    UrlOption,
    _fail,
    _print_json,
    _segment,
    _show,
)

models_app = typer.Typer(help="The model hub: catalog models, deployments, lifecycle.", no_args_is_help=True)
deployments_app = typer.Typer(help="Catalog deployments (provider, regions, ceiling).", no_args_is_help=True)
models_app.add_typer(deployments_app, name="deployments")
providers_app = typer.Typer(help="Provider due-diligence records and their review.", no_args_is_help=True)
approvals_app = typer.Typer(help="Four-eyes approval requests.", no_args_is_help=True)
kill_app = typer.Typer(help="Kill switches: disable something at once, everywhere.", no_args_is_help=True)
policy_app = typer.Typer(help="Cedar policies: check, test, inspect.", no_args_is_help=True)
audit_app = typer.Typer(help="The hash-chained audit trail: verify, export, list.", no_args_is_help=True)

_err = Console(stderr=True, highlight=False)


class LifecycleChoice(StrEnum):
    proposed = "proposed"
    approved = "approved"
    deprecated = "deprecated"
    retired = "retired"


ReasonOption = Annotated[str, typer.Option("--reason", help="Why (kept in the audit trail).")]
NoteOption = Annotated[str | None, typer.Option("--note", help="A note kept with the decision.")]

MODEL_COLUMNS = [
    ("name", "Name"),
    ("status", "Status"),
    ("data_class", "Ceiling"),
    ("owner", "Owner"),
    ("context_window", "Context"),
    ("capabilities", "Capabilities"),
    ("source", "Source"),
]
MODEL_DETAIL = [
    *MODEL_COLUMNS,
    ("description", "Description"),
    ("prices", "Prices (USD/Mtok)"),
    ("card_text", "Model card"),
    ("card_links", "Links"),
    ("updated_at", "Updated (UTC)"),
]
DEPLOYMENT_COLUMNS = [
    ("name", "Name"),
    ("model", "Model"),
    ("provider", "Provider"),
    ("regions", "Regions"),
    ("data_class", "Ceiling"),
    ("status", "Status"),
    ("source", "Source"),
]
PROVIDER_COLUMNS = [
    ("name", "Name"),
    ("status", "Status"),
    ("valid", "Valid"),
    ("expires_at", "Expires (UTC)"),
    ("data_class", "Ceiling"),
    ("allowed_regions", "Regions"),
    ("certifications", "Certifications"),
    ("source", "Source"),
]
PROVIDER_DETAIL = [
    *PROVIDER_COLUMNS,
    ("display_name", "Display name"),
    ("data_retention_days", "Retention (days)"),
    ("training_opt_out", "Training opt-out"),
    ("reviewer", "Reviewer"),
    ("reviewed_at", "Reviewed (UTC)"),
    ("notes", "Notes"),
]
APPROVAL_COLUMNS = [
    ("id", "ID"),
    ("kind", "Kind"),
    ("target", "Target"),
    ("change", "Change"),
    ("state", "State"),
    ("requested_by", "Requested by"),
    ("decided_by", "Decided by"),
    ("requested_at", "Requested (UTC)"),
]
APPROVAL_DETAIL = [
    *APPROVAL_COLUMNS,
    ("reason", "Reason"),
    ("decided_at", "Decided (UTC)"),
    ("decision_note", "Note"),
]
KILL_COLUMNS = [
    ("id", "ID"),
    ("target_type", "Type"),
    ("target", "Target"),
    ("active", "Active"),
    ("reason", "Reason"),
    ("created_by", "By"),
    ("created_at", "When (UTC)"),
    ("lifted_at", "Lifted (UTC)"),
]
AUDIT_COLUMNS = [
    ("seq", "Seq"),
    ("created_at", "When (UTC)"),
    ("kind", "Kind"),
    ("actor", "Actor"),
    ("action", "Action"),
    ("target", "Target"),
    ("outcome", "Outcome"),
    ("policy_ids", "Policies"),
]


def _client(url: str, token: str | None) -> AdminClient:
    return AdminClient(url, token)


def _given(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not None}


def _card(text: str | None, file: Path | None) -> str | None:
    if text is not None and file is not None:
        raise typer.BadParameter("give --card or --card-file, not both", param_hint="--card")
    if file is None:
        return text
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise typer.BadParameter(f"cannot read {file}: {exc}", param_hint="--card-file") from None


# --- models ---------------------------------------------------------------------------------------

OwnerOption = Annotated[str | None, typer.Option("--owner", help="Owning team or person.")]
CeilingOption = Annotated[
    DataClassChoice | None, typer.Option("--data-class", help="Ceiling: the most sensitive data allowed.")
]


@models_app.command("list")
def models_list(url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """List catalog models."""
    _show(_client(url, token).call("GET", "/models"), MODEL_COLUMNS, as_json)


@models_app.command("show")
def models_show(
    name: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Show one catalog model with its model card."""
    _show(_client(url, token).call("GET", f"/models/{_segment(name)}"), MODEL_DETAIL, as_json)


def _model_body(
    owner: str | None,
    description: str | None,
    data_class: DataClassChoice | None,
    context_window: int | None,
    capability: list[str] | None,
    input_price: float | None,
    output_price: float | None,
    card: str | None,
    link: list[str] | None,
) -> dict[str, Any]:
    body = _given(
        owner=owner,
        description=description,
        data_class=data_class.value if data_class else None,
        context_window=context_window,
        capabilities=capability,
        card_text=card,
        card_links=link,
    )
    if input_price is not None or output_price is not None:
        body["prices"] = _given(input_per_mtok=input_price, output_per_mtok=output_price)
    return body


DescriptionOption = Annotated[str | None, typer.Option("--description", help="One line about the model.")]
ContextOption = Annotated[int | None, typer.Option("--context-window", min=1, help="Tokens.")]
CapabilityOption = Annotated[
    list[str] | None, typer.Option("--capability", help="e.g. chat, tools (repeat).")
]
InputPriceOption = Annotated[
    float | None, typer.Option("--input-price", min=0, help="USD per million input tokens.")
]
OutputPriceOption = Annotated[
    float | None, typer.Option("--output-price", min=0, help="USD per million output tokens.")
]
CardOption = Annotated[str | None, typer.Option("--card", help="Model card text (Markdown).")]
CardFileOption = Annotated[Path | None, typer.Option("--card-file", help="Read the model card from a file.")]
LinkOption = Annotated[list[str] | None, typer.Option("--link", help="Model card link (repeat).")]


@models_app.command("create")
def models_create(
    name: str,
    owner: OwnerOption = None,
    description: DescriptionOption = None,
    data_class: CeilingOption = None,
    context_window: ContextOption = None,
    capability: CapabilityOption = None,
    input_price: InputPriceOption = None,
    output_price: OutputPriceOption = None,
    card: CardOption = None,
    card_file: CardFileOption = None,
    link: LinkOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a model to the catalog (status: proposed until someone else approves it)."""
    body = {"name": name} | _model_body(
        owner, description, data_class, context_window, capability, input_price, output_price,
        _card(card, card_file), link,
    )  # fmt: skip
    _show(_client(url, token).call("POST", "/models", body=body), MODEL_DETAIL, as_json)


@models_app.command("update")
def models_update(
    name: str,
    owner: OwnerOption = None,
    description: DescriptionOption = None,
    data_class: CeilingOption = None,
    context_window: ContextOption = None,
    capability: CapabilityOption = None,
    input_price: InputPriceOption = None,
    output_price: OutputPriceOption = None,
    card: CardOption = None,
    card_file: CardFileOption = None,
    link: LinkOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a catalog model's facts (options left out stay as they are)."""
    body = _model_body(
        owner, description, data_class, context_window, capability, input_price, output_price,
        _card(card, card_file), link,
    )  # fmt: skip
    if not body:
        raise typer.BadParameter("give at least one option to change")
    _show(_client(url, token).call("PATCH", f"/models/{_segment(name)}", body=body), MODEL_DETAIL, as_json)


@models_app.command("lifecycle")
def models_lifecycle(
    name: str,
    status: LifecycleChoice,
    reason: ReasonOption,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Request a lifecycle change (proposed → approved → deprecated → retired); another person approves."""
    body = {"status": status.value, "reason": reason}
    data = _client(url, token).call("POST", f"/models/{_segment(name)}/lifecycle", body=body)
    _show(data, APPROVAL_DETAIL, as_json)
    if not as_json:
        _err.print(f"Waiting for approval: plinth approvals approve {data['id']} (by someone else)")


# --- deployments ----------------------------------------------------------------------------------

RegionOption = Annotated[list[str] | None, typer.Option("--region", help="Region it runs in (repeat).")]


@deployments_app.command("list")
def deployments_list(
    model: Annotated[str | None, typer.Option("--model", help="Only this model's deployments.")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List catalog deployments."""
    _show(_client(url, token).call("GET", "/deployments", model=model), DEPLOYMENT_COLUMNS, as_json)


@deployments_app.command("show")
def deployments_show(
    name: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Show one catalog deployment."""
    _show(_client(url, token).call("GET", f"/deployments/{_segment(name)}"), DEPLOYMENT_COLUMNS, as_json)


@deployments_app.command("create")
def deployments_create(
    name: str,
    model: Annotated[str, typer.Option("--model", help="The catalog model it serves.")],
    provider: Annotated[str, typer.Option("--provider", help="The provider review it falls under.")],
    region: RegionOption = None,
    data_class: CeilingOption = None,
    owner: OwnerOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Add a deployment entry (proposed until someone else approves it)."""
    body = {"name": name, "model": model, "provider": provider} | _given(
        regions=region, data_class=data_class.value if data_class else None, owner=owner
    )
    _show(_client(url, token).call("POST", "/deployments", body=body), DEPLOYMENT_COLUMNS, as_json)


@deployments_app.command("update")
def deployments_update(
    name: str,
    provider: Annotated[str | None, typer.Option("--provider", help="The provider review.")] = None,
    region: RegionOption = None,
    data_class: CeilingOption = None,
    owner: OwnerOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a deployment's provider, regions, ceiling or owner."""
    body = _given(
        provider=provider, regions=region, data_class=data_class.value if data_class else None, owner=owner
    )
    if not body:
        raise typer.BadParameter("give at least one option to change")
    data = _client(url, token).call("PATCH", f"/deployments/{_segment(name)}", body=body)
    _show(data, DEPLOYMENT_COLUMNS, as_json)


@deployments_app.command("lifecycle")
def deployments_lifecycle(
    name: str,
    status: LifecycleChoice,
    reason: ReasonOption,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Request a deployment lifecycle change; another person approves."""
    body = {"status": status.value, "reason": reason}
    data = _client(url, token).call("POST", f"/deployments/{_segment(name)}/lifecycle", body=body)
    _show(data, APPROVAL_DETAIL, as_json)


# --- providers ------------------------------------------------------------------------------------


@providers_app.command("list")
def providers_list(
    url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """List provider due-diligence records."""
    _show(_client(url, token).call("GET", "/providers"), PROVIDER_COLUMNS, as_json)


@providers_app.command("show")
def providers_show(
    name: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Show one provider's due-diligence record."""
    _show(_client(url, token).call("GET", f"/providers/{_segment(name)}"), PROVIDER_DETAIL, as_json)


@providers_app.command("set")
def providers_set(
    name: str,
    display_name: Annotated[str | None, typer.Option("--display-name")] = None,
    retention_days: Annotated[
        int | None, typer.Option("--retention-days", min=0, help="How long prompts are kept.")
    ] = None,
    training_opt_out: Annotated[
        bool, typer.Option("--training-opt-out/--no-training-opt-out", help="Excluded from training.")
    ] = False,
    cert: Annotated[list[str] | None, typer.Option("--cert", help="Certification (repeat).")] = None,
    region: Annotated[list[str] | None, typer.Option("--region", help="Allowed region (repeat).")] = None,
    data_class: CeilingOption = None,
    notes: Annotated[str | None, typer.Option("--notes")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create or replace a provider's due-diligence facts (approval is `providers review`)."""
    body: dict[str, Any] = {"training_opt_out": training_opt_out} | _given(
        display_name=display_name,
        data_retention_days=retention_days,
        certifications=cert,
        allowed_regions=region,
        data_class=data_class.value if data_class else None,
        notes=notes,
    )
    _show(
        _client(url, token).call("PUT", f"/providers/{_segment(name)}", body=body), PROVIDER_DETAIL, as_json
    )


@providers_app.command("review")
def providers_review(
    name: str,
    reason: ReasonOption,
    valid_days: Annotated[int | None, typer.Option("--valid-days", min=1, max=1098)] = None,
    expires_at: Annotated[dt.datetime | None, typer.Option("--expires-at", help="UTC date/time.")] = None,
    reject: Annotated[bool, typer.Option("--reject", help="Request a rejection instead.")] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Request a provider's approval until a date (or its rejection); another person decides."""
    body: dict[str, Any] = {"decision": "rejected" if reject else "approved", "reason": reason}
    if not reject:
        if (valid_days is None) == (expires_at is None):
            raise typer.BadParameter("give --valid-days or --expires-at", param_hint="--valid-days")
        body |= _given(valid_days=valid_days, expires_at=expires_at.isoformat() if expires_at else None)
    data = _client(url, token).call("POST", f"/providers/{_segment(name)}/review", body=body)
    _show(data, APPROVAL_DETAIL, as_json)


# --- approvals ------------------------------------------------------------------------------------


class StateChoice(StrEnum):
    pending = "pending"
    approved = "approved"
    rejected = "rejected"
    cancelled = "cancelled"


@approvals_app.command("list")
def approvals_list(
    state: Annotated[StateChoice | None, typer.Option("--state", help="Only requests in this state.")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List approval requests, newest first."""
    data = _client(url, token).call("GET", "/approvals", state=state.value if state else None)
    _show(data, APPROVAL_COLUMNS, as_json)


@approvals_app.command("show")
def approvals_show(
    approval_id: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Show one approval request."""
    _show(_client(url, token).call("GET", f"/approvals/{_segment(approval_id)}"), APPROVAL_DETAIL, as_json)


def _decide(
    action: str, approval_id: str, note: str | None, url: str, token: str | None, as_json: bool
) -> None:
    body = _given(note=note) or None
    data = _client(url, token).call("POST", f"/approvals/{_segment(approval_id)}/{action}", body=body)
    _show(data, APPROVAL_DETAIL, as_json)


@approvals_app.command("approve")
def approvals_approve(
    approval_id: str,
    note: NoteOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Approve and apply a request (not your own: four eyes)."""
    _decide("approve", approval_id, note, url, token, as_json)


@approvals_app.command("reject")
def approvals_reject(
    approval_id: str,
    note: NoteOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Reject a request."""
    _decide("reject", approval_id, note, url, token, as_json)


@approvals_app.command("cancel")
def approvals_cancel(
    approval_id: str, url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Withdraw your own request."""
    _decide("cancel", approval_id, None, url, token, as_json)


# --- kill switches --------------------------------------------------------------------------------


def _kill(target_type: str, target: str, reason: str, url: str, token: str | None, as_json: bool) -> None:
    body = {"target_type": target_type, "target": target, "reason": reason}
    _show(_client(url, token).call("POST", "/kill-switches", body=body), KILL_COLUMNS, as_json)


KillTargetArg = Annotated[str, typer.Argument(help="Model alias, deployment, provider, key id or team id.")]


@kill_app.command("model")
def kill_model(
    target: KillTargetArg, reason: ReasonOption, url: UrlOption = DEFAULT_URL, token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:  # fmt: skip
    """Disable a model alias at once, on every worker and replica."""
    _kill("model", target, reason, url, token, as_json)


@kill_app.command("deployment")
def kill_deployment(
    target: KillTargetArg, reason: ReasonOption, url: UrlOption = DEFAULT_URL, token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:  # fmt: skip
    """Disable one deployment at once (its model reroutes to the others)."""
    _kill("deployment", target, reason, url, token, as_json)


@kill_app.command("provider")
def kill_provider(
    target: KillTargetArg, reason: ReasonOption, url: UrlOption = DEFAULT_URL, token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:  # fmt: skip
    """Disable every deployment of a provider at once."""
    _kill("provider", target, reason, url, token, as_json)


@kill_app.command("key")
def kill_key(
    target: KillTargetArg, reason: ReasonOption, url: UrlOption = DEFAULT_URL, token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:  # fmt: skip
    """Disable a key at once (key id, or the name of a key from plinth.yaml); reversible, unlike revoke."""
    _kill("key", target, reason, url, token, as_json)


@kill_app.command("team")
def kill_team(
    target: KillTargetArg, reason: ReasonOption, url: UrlOption = DEFAULT_URL, token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:  # fmt: skip
    """Disable every key of a team at once."""
    _kill("team", target, reason, url, token, as_json)


@kill_app.command("list")
def kill_list(
    show_all: Annotated[bool, typer.Option("--all", help="Include lifted kill switches.")] = False,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List active kill switches."""
    _show(_client(url, token).call("GET", "/kill-switches", all=show_all or None), KILL_COLUMNS, as_json)


@kill_app.command("lift")
def kill_lift(
    kill_id: str,
    reason: ReasonOption,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Lift a kill switch."""
    data = _client(url, token).call(
        "POST", f"/kill-switches/{_segment(kill_id)}/lift", body={"reason": reason}
    )
    _show(data, KILL_COLUMNS, as_json)


# --- policy ---------------------------------------------------------------------------------------

ConfigFileOption = Annotated[
    Path | None, typer.Option("--config", "-c", envvar="PLINTH_CONFIG", help="plinth.yaml to read.")
]
PoliciesOption = Annotated[Path | None, typer.Option("--policies", help="A .cedar file or a folder of them.")]


@policy_app.command("check")
def policy_check(
    config: ConfigFileOption = None, policies: PoliciesOption = None, as_json: JsonOption = False
) -> None:
    """Parse and validate policy files against the Plinth schema (`--policies`, else the config's)."""
    from plinth.config import ConfigError, load_config
    from plinth.governance.policy import PolicyError, PolicySource, load_policies

    path: str | None
    if policies is not None:
        path = str(policies)
    else:
        try:
            path = load_config(config).governance.policies
        except ConfigError as exc:
            _fail(f"configuration: {exc}", 2)
    try:
        loaded = load_policies(PolicySource(path))
    except PolicyError as exc:
        _fail(str(exc), 2)
    rows = [{"id": p.id, "effect": p.effect, "file": p.file} for p in loaded.policies]
    if as_json:
        _print_json({"digest": loaded.digest, "files": list(loaded.files), "policies": rows})
        return
    table = Table()
    for header in ("ID", "Effect", "File"):
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(row["id"], row["effect"], row["file"])
    Console().print(table)
    Console(highlight=False).print(
        f"[green]OK[/green] {len(rows)} policies in {len(loaded.files)} file(s), sha256 {loaded.digest[:16]}"
    )


@policy_app.command("test")
def policy_test(
    cases: Annotated[Path, typer.Argument(help="A YAML file of example requests and expected decisions.")],
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="Overrides the file's `config`.")
    ] = None,
    policies: PoliciesOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run example requests through the policies and built-in rules; exit 1 if any decision differs."""
    from plinth.governance.policy import PolicyError
    from plinth.governance.policytest import CaseError, run_file

    try:
        results = run_file(cases, config=config, policies=policies)
    except (CaseError, PolicyError) as exc:
        _fail(str(exc), 2)
    failed = [r for r in results if not r.passed]
    if as_json:
        _print_json(
            [
                {
                    "name": r.case.name,
                    "passed": r.passed,
                    "outcome": r.decision.outcome,
                    "deployments": list(r.decision.deployments),
                    "policy_ids": list(r.decision.policy_ids),
                    "problems": list(r.problems),
                }
                for r in results
            ]
        )
    else:
        table = Table()
        for header in ("", "Case", "Decision", "Deployments", "Decided by"):
            table.add_column(header, overflow="fold")
        for r in results:
            mark = "[green]pass[/green]" if r.passed else "[red]FAIL[/red]"
            name = r.case.name if r.passed else f"{r.case.name}\n[red]{'; '.join(r.problems)}[/red]"
            table.add_row(
                mark, name, r.decision.outcome, ", ".join(r.decision.deployments) or "-",
                ", ".join(r.decision.policy_ids),
            )  # fmt: skip
        Console().print(table)
        Console(highlight=False).print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


@policy_app.command("schema")
def policy_schema() -> None:
    """Print the Cedar schema policies are validated against."""
    from plinth.governance.policy import SCHEMA

    typer.echo(SCHEMA, nl=False)


@policy_app.command("show")
def policy_show(url: UrlOption = DEFAULT_URL, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """The policies a running gateway has loaded (and its last reload error, if any)."""
    data = _client(url, token).call("GET", "/policy")
    if as_json:
        _print_json(data)
        return
    _show(
        {"data": data["policies"]},
        [("id", "ID"), ("effect", "Effect"), ("actions", "Actions"), ("file", "File")],
        False,
    )
    Console(highlight=False).print(
        f"sha256 {data['digest'][:16]}" + (" (built-in)" if data["builtin"] else "")
    )
    if data.get("reload_error"):
        _err.print(
            f"[red]Last reload failed (previous policies in use):[/red] {data['reload_error']}", markup=True
        )


# --- audit ----------------------------------------------------------------------------------------

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar="PLINTH_DATABASE_URL",
        help="Read the database directly (SQLAlchemy URL).",
        show_envvar=False,
    ),
]


def _database(url: str) -> Any:
    from plinth.storage import Database

    try:
        return Database(url)
    except Exception as exc:  # a malformed URL or a missing driver: one line, exit 2
        _fail(f"cannot open the database: {type(exc).__name__}: {exc}", 2)


def _report(result: dict[str, Any], as_json: bool, where: str) -> None:
    if as_json:
        _print_json(result)
    elif result["ok"]:
        Console(highlight=False).print(
            f"[green]OK[/green] {result['records']} audit record(s) verified in {where}; chain intact "
            f"(head {result['head_seq']})."
        )
    if not result["ok"]:
        if not as_json:
            for problem in result["problems"]:
                _err.print(f"  {problem}")
        _fail(f"the audit chain is broken from record {result['first_bad_seq']} ({where})", 1)


@audit_app.command("verify")
def audit_verify(
    export: Annotated[Path | None, typer.Option("--export", help="Check an export folder offline.")] = None,
    db: DbOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Check that no audit record was edited, removed or reordered (exit 1 if one was)."""
    from plinth.governance import audit

    if export is not None:
        _report(audit.verify_export(export).as_dict(), as_json, str(export))
    elif db is not None:
        database = _database(db)
        try:
            result = audit.verify(database).as_dict()
        except Exception as exc:  # unreachable, or no audit tables: one line, not a traceback
            _fail(f"cannot read the audit trail: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", 2)
        finally:
            database.dispose()
        _report(result, as_json, "the database")
    else:
        _report(_client(url, token).call("GET", "/audit/verify"), as_json, url)


@audit_app.command("export")
def audit_export(
    out: Annotated[Path, typer.Option("--out", help="An empty folder for the JSONL segments and manifest.")],
    after_seq: Annotated[int, typer.Option("--after-seq", min=0, help="Only records after this one.")] = 0,
    segment_records: Annotated[
        int, typer.Option("--segment-records", min=1, help="Records per file.")
    ] = 10_000,
    db: DbOption = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
) -> None:
    """Write audit records as read-only JSONL segments with a manifest of sha256 hashes."""
    from plinth.governance import audit

    if db is not None:
        database = _database(db)
        pages: Any = audit.db_pages(database, after_seq)
    else:
        client = _client(url, token)
        database = None

        def api_pages() -> Any:
            after = after_seq
            while True:
                data = client.call("GET", "/audit/records", after_seq=after, limit=5000)
                if not data["data"]:
                    return
                yield data["data"]
                after = data["next_after_seq"]

        pages = api_pages()
    try:
        manifest = audit.export_records(pages, out, segment_records=segment_records)
    except (FileExistsError, OSError) as exc:
        _fail(str(exc), 2)
    finally:
        if database is not None:
            database.dispose()
    Console(highlight=False).print(
        f"[green]Exported[/green] {manifest['records']} record(s) in {len(manifest['segments'])} segment(s) to {out}; "
        f"manifest sha256 {manifest['manifest_sha256']} (store it apart from the files)."
    )


@audit_app.command("list")
def audit_list(
    after_seq: Annotated[int, typer.Option("--after-seq", min=0)] = 0,
    limit: Annotated[int, typer.Option("--limit", min=1, max=5000)] = 100,
    kind: Annotated[str | None, typer.Option("--kind", help="admin or decision.")] = None,
    request_id: Annotated[str | None, typer.Option("--request-id")] = None,
    url: UrlOption = DEFAULT_URL,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List audit records, oldest first."""
    data = _client(url, token).call(
        "GET", "/audit/records", after_seq=after_seq, limit=limit, kind=kind, request_id=request_id
    )
    _show({"data": data["data"]}, AUDIT_COLUMNS, as_json)
