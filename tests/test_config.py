"""Configuration: validation errors that name the key, secret references, the admin-key rule, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from plinth.cli import app
from plinth.config import ConfigError, admin_key_problem, load_config, parse_config

STRONG_KEY = "4b1f0c9e2d7a6385f1e0b9c8d7a6e5f4c3b2a1908f7e6d5c"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "plinth.yaml"
    path.write_text(text)
    return path


def test_valid_file_with_env_references(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
server: {port: 8080, workers: 2}
models:
  - name: gpt-4o-mini
    routing: {strategy: weighted, retries: 1}
    deployments:
      - {provider: openai, model: gpt-4o-mini, api_key: "${OPENAI_KEY}", weight: 2}
      - {provider: azure, model: gpt4o, base_url: "https://x.openai.azure.com", api_key: "${AZ_KEY:-none}"}
""",
    )
    config = load_config(path, env={"OPENAI_KEY": "sk-live-abc"})
    deployment = config.models[0].deployments[0]
    assert deployment.api_key is not None and deployment.api_key.get_secret_value() == "sk-live-abc"
    assert "sk-live-abc" not in repr(config)  # secrets never print
    assert config.models[0].deployments[1].api_key.get_secret_value() == "none"  # type: ignore[union-attr]
    assert config.server.port == 8080 and config.models[0].routing.strategy == "weighted"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            "models:\n  - name: m\n    deployments:\n      - {provider: openai, modle: x}\n",
            [
                "models[0].deployments[0].modle",
                "unknown key",
                "models[0].deployments[0].model",
                "Field required",
            ],
        ),
        ("server: {port: 99999}\n", ["server.port", "less than or equal to 65535"]),
        (
            "models:\n  - name: m\n    routing: {strategy: fastest}\n    deployments: [{provider: openai, model: x}]\n",
            ["models[0].routing.strategy", "'priority'"],
        ),
        ("models:\n  - name: m\n    deployments: []\n", ["models[0].deployments", "at least 1"]),
        (
            "models:\n  - {name: m, deployments: [{provider: openai, model: x, api_key: '${MISSING_VAR}'}]}\n",
            ["models[0].deployments[0].api_key", "MISSING_VAR is not set"],
        ),
        ("models: [\n", ["invalid YAML", "line"]),
        ("- just\n- a list\n", ["top level must be a mapping"]),
        ("keys:\n  - {name: k}\n", ["keys[0]", "exactly one of 'key' or 'key_sha256'"]),
    ],
)
def test_errors_name_the_bad_key(tmp_path: Path, text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.yaml")


def test_secret_values_never_appear_in_errors(tmp_path: Path) -> None:
    text = "models:\n  - {name: m, deployments: [{provider: openai, model: x, api_key: sk-very-secret, port: 1}]}\n"
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env={})
    assert "sk-very-secret" not in str(info.value)


def test_embedded_default_detects_provider_keys() -> None:
    config = load_config(None, env={"OPENAI_API_KEY": "sk-x", "ANTHROPIC_API_KEY": "sk-ant-x"})
    assert [m.name for m in config.models] == ["openai/*", "anthropic/*", "all-minilm-l6-v2"]
    assert [m.name for m in load_config(None, env={}).models] == ["all-minilm-l6-v2"]


def test_duplicate_model_names_rejected() -> None:
    model = {"name": "m", "deployments": [{"provider": "openai", "model": "x"}]}
    with pytest.raises(ConfigError, match="declared twice"):
        parse_config({"models": [model, model]})


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        (None, "not set"),
        ("short", "too short"),
        ("a" * 40, "predictable"),
        ("ab" * 20, "predictable"),
        (STRONG_KEY, None),
    ],
)
def test_admin_key_strength(key: str | None, problem: str | None) -> None:
    found = admin_key_problem(key)
    assert (found is None) if problem is None else (found is not None and problem in found)


def test_cli_config_check(tmp_path: Path) -> None:
    runner = CliRunner()
    good = write(tmp_path, "models:\n  - {name: m, deployments: [{provider: openai, model: x}]}\n")
    result = runner.invoke(app, ["config", "check", "--config", str(good)])
    assert result.exit_code == 0 and "m (chat, priority) -> openai:x" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {prot: 1}\n")
    result = runner.invoke(app, ["config", "check", "--config", str(bad)])
    assert result.exit_code == 2 and "server.prot" in result.output


def _serve(*args: str, admin_key: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PLINTH_ADMIN_KEY"}
    if admin_key is not None:
        env["PLINTH_ADMIN_KEY"] = admin_key
    return subprocess.run(
        [sys.executable, "-m", "plinth", "serve", *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_serve_refuses_missing_or_weak_admin_key() -> None:
    missing = _serve("--port", "1", admin_key=None)
    assert missing.returncode == 2 and "PLINTH_ADMIN_KEY is not set" in missing.stderr
    weak = _serve("--port", "1", admin_key="password")
    assert weak.returncode == 2 and "too short" in weak.stderr and "password" not in weak.stderr


def test_serve_reports_config_errors_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - {name: m, deployments: [{provider: openai}]}\n")
    result = _serve("--config", str(bad), admin_key=STRONG_KEY)
    assert result.returncode == 2
    assert "models[0].deployments[0].model" in result.stderr and "Traceback" not in result.stderr


def test_unknown_provider_and_incomplete_deployments_are_config_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    for text, fragment in [
        ("models:\n  - {name: m, deployments: [{provider: nope, model: x}]}\n", "unknown provider 'nope'"),
        (
            "models:\n  - {name: m, deployments: [{provider: openai, model: x}, {provider: azure, model: y}]}\n",
            "models[0].deployments[1]: an azure deployment needs base_url",
        ),
    ]:
        path = write(tmp_path, text)
        result = runner.invoke(app, ["config", "check", "--config", str(path)])
        assert result.exit_code == 2 and fragment in result.output, result.output


def test_db_upgrade_creates_the_schema_and_reports_unreachable_databases(tmp_path: Path) -> None:
    runner = CliRunner()
    good = write(tmp_path, f"storage: {{url: 'sqlite:///{tmp_path}/state/plinth.db'}}\n")
    result = runner.invoke(app, ["db", "upgrade", "--config", str(good)])
    assert result.exit_code == 0 and "current" in result.output
    assert (tmp_path / "state" / "plinth.db").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage: {url: 'postgresql+psycopg://nobody:secret-pw@127.0.0.1:1/x'}\n")
    result = runner.invoke(app, ["db", "upgrade", "--config", str(bad)])
    assert result.exit_code == 2 and "Database error" in result.output
    assert "secret-pw" not in result.output
