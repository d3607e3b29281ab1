"""Load `plinth.yaml`: read, substitute `${VAR}` references, validate, and explain what is wrong."""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import SecretStr, ValidationError

from plinth.config.schema import DeploymentConfig, ModelConfig, PlinthConfig

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
MIN_ADMIN_KEY_LENGTH = 32


class ConfigError(Exception):
    """A configuration problem, with a message fit to show the operator as it is."""


def _location(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _substitute(node: Any, env: Mapping[str, str], path: tuple[str | int, ...]) -> Any:
    if isinstance(node, str):

        def replace(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{_location(path)}: environment variable {name} is not set "
                f"(use ${{{name}:-default}} to give a default)"
            )

        return _ENV_REF.sub(replace, node)
    if isinstance(node, dict):
        return {k: _substitute(v, env, (*path, str(k))) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, env, (*path, i)) for i, v in enumerate(node)]
    return node


def _format_validation_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: {exc.error_count()} problem(s)"]
    for err in exc.errors(include_url=False, include_input=False):
        loc = _location(tuple(p for p in err["loc"] if not str(p).startswith("function-")))
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/configuration.md)"
        lines.append(f"  - {loc}: {msg}")
    return "\n".join(lines)


def parse_config(data: Any, *, source: str = "config", env: Mapping[str, str] | None = None) -> PlinthConfig:
    """Validate an already-parsed YAML document."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections, got {type(data).__name__}")
    data = _substitute(data, os.environ if env is None else env, ())
    try:
        return PlinthConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None


def load_config(path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None) -> PlinthConfig:
    """Load the file at `path`, or build the embedded default when no file is given."""
    environ = os.environ if env is None else env
    config = default_config(environ) if path is None else _load_file(Path(path), environ)
    database_url = environ.get("PLINTH_DATABASE_URL")
    if database_url:
        storage = config.storage.model_copy(update={"url": SecretStr(database_url)})
        config = config.model_copy(update={"storage": storage})
    return config


def _load_file(file: Path, environ: Mapping[str, str]) -> PlinthConfig:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such configuration file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}: invalid YAML{where}: {problem}") from None
    return parse_config(data, source=str(file), env=environ)


# Providers the embedded default routes to when their key is in the environment.
_DEFAULT_PROVIDER_KEYS = (
    ("openai", "OPENAI_API_KEY"),
    ("anthropic", "ANTHROPIC_API_KEY"),
    ("gemini", "GEMINI_API_KEY"),
)


def default_config(env: Mapping[str, str]) -> PlinthConfig:
    """The embedded default: wildcard routes to every provider whose credentials are in the environment.

    `openai/gpt-4o-mini` goes to OpenAI, `anthropic/claude-...` to Anthropic and so on; the local
    embedding model is always there.
    """
    models = [
        ModelConfig(
            name=f"{provider}/*",
            type="any",
            deployments=[DeploymentConfig(provider=provider, model="*", api_key=SecretStr(env[variable]))],
        )
        for provider, variable in _DEFAULT_PROVIDER_KEYS
        if env.get(variable)
    ]
    models.append(
        ModelConfig(
            name="all-minilm-l6-v2",
            type="embedding",
            deployments=[DeploymentConfig(provider="local", model="all-MiniLM-L6-v2")],
        )
    )
    return PlinthConfig(models=models)


def admin_key_problem(key: str | None) -> str | None:
    """Why an admin key is unacceptable, or None when it is fine."""
    if not key:
        return "PLINTH_ADMIN_KEY is not set"
    if len(key) < MIN_ADMIN_KEY_LENGTH:
        return f"PLINTH_ADMIN_KEY is too short ({len(key)} characters; at least {MIN_ADMIN_KEY_LENGTH})"
    counts = Counter(key)
    entropy_bits = -sum(c / len(key) * math.log2(c / len(key)) for c in counts.values()) * len(key)
    if len(counts) < 10 or entropy_bits < 128:
        return "PLINTH_ADMIN_KEY is too predictable (use e.g. `openssl rand -hex 32`)"
    return None
