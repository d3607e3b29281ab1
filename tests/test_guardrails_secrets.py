"""The `secrets` scanner: vendor credential formats, private keys, connection strings, entropy."""

from __future__ import annotations

import pytest

from plinth.guardrails.secrets import SecretsScanner, entropy
from plinth.guardrails.types import ScanContext, Stage

CTX = ScanContext(Stage.INPUT)

# Values are assembled at run time so that this file itself holds no credential-shaped literal.
A36 = "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5"


def _secrets(text: str) -> dict[str, str]:
    return {f.type: text[f.start : f.end] for f in SecretsScanner().scan(text, CTX)}


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("AWS_ACCESS_KEY", "AKIA" + "J7QW3RTY5UIO2PLM"),
        ("GCP_API_KEY", "AIza" + "SyD3x" + "9" * 30),
        ("GITHUB_TOKEN", "ghp_" + A36),
        ("GITLAB_TOKEN", "glpat-" + "x7Yz" * 5),
        ("SLACK_TOKEN", "xoxb-" + "1234567890-" + "abcdefABCDEF12"),
        ("STRIPE_KEY", "sk_" + "live_" + "4eC39HqLyjWDarjtT1zdp7dc"),
        ("OPENAI_API_KEY", "sk-" + "proj-" + A36),
        ("ANTHROPIC_API_KEY", "sk-" + "ant-api03-" + A36),
        ("HUGGINGFACE_TOKEN", "hf_" + A36[:34]),
        (
            "JWT",
            "eyJ"
            + "hbGciOiJIUzI1NiJ9"
            + ".eyJ"
            + "zdWIiOiIxMjM0In0"
            + ".dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
        ),
        ("SENDGRID_KEY", "SG." + "a" * 22 + "." + "b" * 43),
    ],
)
def test_vendor_formats(kind: str, value: str) -> None:
    assert _secrets(f"use {value} for the call") == {kind: value}


def test_private_key_block_and_an_unterminated_one() -> None:
    body = "MIIEowIBAAKCAQEA" + "q" * 64
    block = f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"
    assert _secrets(f"key:\n{block}\nthanks") == {"PRIVATE_KEY": block}
    partial = f"-----BEGIN PRIVATE KEY-----\n{body}"
    assert _secrets(partial)["PRIVATE_KEY"] == partial


def test_connection_strings_flag_the_password_only() -> None:
    pw = "s3cr3t-Passw0rd"
    assert _secrets(f"DATABASE_URL=postgresql://app:{pw}@db.internal:5432/app") == {"CONNECTION_STRING": pw}
    assert _secrets(f"Server=db;User Id=app;Password={pw};") == {"CONNECTION_STRING": pw}
    assert _secrets("postgresql://app@db.internal/app") == {}  # no password, nothing secret


def test_high_entropy_only_in_key_like_assignments() -> None:
    value = "9fA0c3Lq8ZpW2xYv7TnB"
    assert _secrets(f'api_key = "{value}"') == {"GENERIC_SECRET": value}
    assert _secrets(f"the build id is {value}") == {}  # no key-like name: not a secret by itself
    assert _secrets("password: changeme") == {}
    assert _secrets("password = see the wiki page") == {}
    assert entropy("aaaa") == 0.0 and entropy("abcd") == 2.0


def test_options() -> None:
    value = "AKIA" + "J7QW3RTY5UIO2PLM"
    assert SecretsScanner({"disable": ["AWS_ACCESS_KEY"]}).scan(value, CTX) == []
    with pytest.raises(ValueError, match="unknown option"):
        SecretsScanner({"bogus": 1})
