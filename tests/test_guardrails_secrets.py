"""The `secrets` scanner: vendor credential formats, private keys, connection strings, entropy."""

from __future__ import annotations

import dataclasses

import pytest

from plinth.guardrails.secrets import PATTERNS, SecretsScanner, entropy, longest_run
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


def test_the_run_length_gate_never_hides_a_match() -> None:
    """Rules are skipped when the text has no run of token characters as long as any match of the
    rule holds; on every example here the gated scanner finds exactly what the ungated one does."""
    ungated = SecretsScanner()
    ungated._use([dataclasses.replace(p, min_run=0, needs=()) for p in PATTERNS])
    texts = [
        "AKIA" + "J7QW3RTY5UIO2PLM",
        "aws_secret_access_key = " + ("wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"),
        "ghp_" + A36,
        "github_pat_" + "A" * 70,
        "glpat-" + "x7Yz" * 5,
        "xoxb-" + "1234567890",
        "https://hooks.slack.com/services/" + "T0/B0/" + "x" * 14,
        "sk_" + "test_" + "4eC39HqLyjWDarjt",
        "sk-" + "ant-" + "a" * 20,
        "sk-" + "a" * 20,
        "hf_" + "a" * 30,
        "SG." + "a" * 22 + "." + "b" * 43,
        "SK" + "0" * 32,
        "dapi" + "a" * 32,
        "key-" + "a" * 32,
        "ya29." + "a" * 20,
        '{"type": "service_account"}',
        "AccountKey=" + "a" * 86 + "==",
        "abc1Q~" + "a" * 31,
        "?sv=1&sig=" + "a" * 40,
        "Authorization: Bearer " + "aZ3x" * 5,
        "BASIC " + "dXNlcjpwYXNzd29yZDEyMzQ1Ng==",
        "rk_" + "live_" + "4eC39HqLyjWDarjt",
        'token: "9fA0c3Lq8ZpW"',
        "api_key => " + "9fA0c3Lq8ZpW",
        "naïve café token=" + "9fA0c3Lq8ZpW",
        "-----BEGIN PRIVATE KEY-----",
        "pwd=abc;",
        "x://u:pw1@h",
        "Say hello in five words.",
    ]
    found = 0
    for text in texts:
        gated = SecretsScanner().scan(text, CTX)
        assert gated == ungated.scan(text, CTX), text
        found += bool(gated)
    assert found >= len(texts) - 2  # the shortest match of nearly every rule is among them
    assert longest_run("Say hello in five words.") == 6  # "words."


def test_longest_run_is_exact_on_ascii_and_never_short_otherwise() -> None:
    import random

    from plinth.guardrails.secrets import _RUN

    rng = random.Random(9)
    alphabet = [chr(c) for c in range(128)] + list("éß€中\u00a0\u2003😀")
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        exact = max(map(len, _RUN.findall(text)), default=0)
        if text.isascii():
            assert longest_run(text) == exact, text
        else:
            assert longest_run(text) >= exact, text
