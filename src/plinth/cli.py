"""The `plinth` command line."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from plinth import __version__
from plinth.admin import cli as admin_cli
from plinth.config import ConfigError, PlinthConfig, admin_key_problem, load_config
from plinth.governance import cli as governance_cli
from plinth.guardrails import cli as guardrails_cli
from plinth.knowledge import cli as knowledge_cli

app = typer.Typer(
    name="plinth",
    help="Plinth: a self-hosted generative-AI foundation (gateway, governance, guardrails, cost).",
    no_args_is_help=True,
    add_completion=False,
)
config_app = typer.Typer(help="Inspect and validate configuration.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(admin_cli.orgs_app, name="orgs")
app.add_typer(admin_cli.teams_app, name="teams")
app.add_typer(admin_cli.projects_app, name="projects")
app.add_typer(admin_cli.keys_app, name="keys")
app.add_typer(admin_cli.users_app, name="users")
app.add_typer(admin_cli.budgets_app, name="budgets")
app.add_typer(admin_cli.usage_app, name="usage")
app.add_typer(governance_cli.models_app, name="models")
app.add_typer(governance_cli.providers_app, name="providers")
app.add_typer(governance_cli.approvals_app, name="approvals")
app.add_typer(governance_cli.kill_app, name="kill")
app.add_typer(governance_cli.policy_app, name="policy")
app.add_typer(governance_cli.audit_app, name="audit")
app.add_typer(guardrails_cli.guardrails_app, name="guardrails")
app.add_typer(knowledge_cli.kb_app, name="kb")
db_app = typer.Typer(help="Database schema: migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar="PLINTH_CONFIG", help="Path to plinth.yaml (default: embedded)."),
]


def _load(config_path: Path | None) -> PlinthConfig:
    try:
        return load_config(config_path)
    except ConfigError as exc:
        err.print(f"[red]Configuration error[/red]\n{exc}", highlight=False, markup=True)
        raise typer.Exit(2) from None


def _check_deployments(settings: PlinthConfig) -> None:
    """Build every provider once, so a bad deployment fails here and not in a worker."""
    from plinth.governance.policy import PolicyError, PolicySource, load_policies
    from plinth.guardrails.engine import validate as validate_guardrails
    from plinth.providers.http import HttpClient
    from plinth.routing import Router

    try:
        Router(settings, HttpClient())
        load_policies(PolicySource(settings.governance.policies))  # a bad policy file stops here too
        validate_guardrails(settings.guardrails)  # every guardrail profile, scanner options included
    except (ConfigError, PolicyError) as exc:
        err.print(f"[red]Configuration error[/red]\n{exc}", highlight=False)
        raise typer.Exit(2) from None


def _migrate(settings: PlinthConfig) -> None:
    from plinth.storage import Database

    database = Database(settings.storage.url.get_secret_value())
    try:
        database.migrate()
    except Exception as exc:  # a database that cannot be reached or upgraded: say so, no traceback
        err.print(f"[red]Database error[/red]: {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(2) from None
    finally:
        database.dispose()


def _check_limits(settings: PlinthConfig, workers: int) -> None:
    """Refuse several workers counting limits in their own memory: the limits would not hold."""
    from plinth.limits import exactness_problem
    from plinth.storage import Database

    database = Database(settings.storage.url.get_secret_value())
    try:
        problem = exactness_problem(settings, workers, database)
    finally:
        database.dispose()
    if problem is not None:
        err.print(f"[red]Refusing to start:[/red] {problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)


def _admin_key(dev: bool) -> str:
    key = os.environ.get("PLINTH_ADMIN_KEY")
    problem = admin_key_problem(key)
    if problem is None:
        assert key is not None
        return key
    if not dev:
        err.print(
            f"[red]Refusing to start:[/red] {problem}.\n"
            "Set a strong key, e.g. `export PLINTH_ADMIN_KEY=$(openssl rand -hex 32)`, "
            "or pass --dev on a development machine.",
            highlight=False,
        )
        raise typer.Exit(2)
    if key:
        err.print(f"[yellow]--dev:[/yellow] {problem}; starting anyway.", highlight=False)
        return key
    generated = "sk-plinth-dev-" + secrets.token_hex(24)
    # Shown once, on the terminal only (not through logging), so a developer can use it.
    err.print(
        f"[yellow]--dev:[/yellow] no PLINTH_ADMIN_KEY; this run's admin key is {generated}", highlight=False
    )
    return generated


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(envvar="PLINTH_HOST", help="Interface to bind.")] = None,
    port: Annotated[
        int | None, typer.Option(envvar="PLINTH_PORT", help="TCP port.", min=1, max=65535)
    ] = None,
    workers: Annotated[
        int | None, typer.Option(envvar="PLINTH_WORKERS", help="Worker processes.", min=1)
    ] = None,
    dev: Annotated[
        bool, typer.Option("--dev", help="Development mode: allow a missing or weak admin key.")
    ] = False,
    log_level: Annotated[
        str, typer.Option(envvar="PLINTH_LOG_LEVEL", help="debug, info, warning, error.")
    ] = "info",
) -> None:
    """Run the gateway."""
    import uvicorn

    settings = _load(config)
    _check_deployments(settings)
    admin_key = _admin_key(dev)
    server = settings.server
    bind_host = host or server.host
    bind_port = port or server.port
    n_workers = workers or server.workers
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    common = {
        "host": bind_host,
        "port": bind_port,
        "log_level": log_level.lower(),
        "access_log": False,
        "loop": "uvloop" if sys.platform != "win32" else "asyncio",
        "http": "httptools",
        "timeout_graceful_shutdown": int(server.shutdown_timeout_s),
        "server_header": False,
        # Nothing reads the client address yet; X-Forwarded-* handling would only cost time.
        "proxy_headers": False,
    }
    _migrate(settings)  # once, before any worker starts
    _check_limits(settings, n_workers)
    err.print(
        f"Plinth {__version__} on http://{bind_host}:{bind_port} ({n_workers} worker(s))", highlight=False
    )
    if n_workers == 1:
        from plinth.gateway.app import AppSettings, create_app

        app_settings = AppSettings(settings, admin_key, dev, migrate=False)
        uvicorn.run(create_app(app_settings), **common)  # type: ignore[arg-type]
        return
    # Several processes: each worker rebuilds the app from the environment.
    metrics_dir = tempfile.mkdtemp(prefix="plinth-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    os.environ["PLINTH_ADMIN_KEY"] = admin_key
    os.environ["PLINTH_DEV"] = "1" if dev else "0"
    if config is not None:
        os.environ["PLINTH_CONFIG"] = str(config.resolve())
    try:
        uvicorn.run(
            "plinth.gateway.app:app_from_environment",
            factory=True,
            workers=n_workers,
            **common,  # type: ignore[arg-type]
        )
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


@config_app.command("check")
def config_check(config: ConfigOption = None) -> None:
    """Validate a configuration file and summarise it."""
    settings = _load(config)
    _check_deployments(settings)
    console = Console()
    console.print(f"[green]OK[/green] {config or '(embedded default)'}", highlight=False)
    for model in settings.models:
        deployments = ", ".join(f"{d.provider}:{d.model}" for d in model.deployments)
        console.print(
            f"  {model.name} ({model.type}, {model.routing.strategy}) -> {deployments}", highlight=False
        )
    console.print(f"  {len(settings.keys)} static key(s)", highlight=False)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None) -> None:
    """Apply pending migrations (`plinth serve` also does this at start-up)."""
    settings = _load(config)
    _migrate(settings)
    Console().print("[green]Database schema is current.[/green]")


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
