"""`plinth kb`: create, ingest a folder twice (second time nothing embedded), query, bad input."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from plinth.cli import app


def test_kb_cli_round_trip(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path}/plinth.db"
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Cats\n\nCats purr when they are content.\n")
    (docs / "b.txt").write_text("Dogs bark at the mail carrier.")
    (docs / "bad.pdf").write_bytes(b"%PDF-1.5 truncated")
    runner = CliRunner()
    common = ["--team", "team_a", "--db", db, "--embedder", "hashing"]
    refused = runner.invoke(app, ["kb", "create", "pets", *common], env={"PLINTH_MASTER_KEY": ""})
    assert refused.exit_code == 2 and "Neither PLINTH_MASTER_KEY nor PLINTH_KMS is set" in refused.stderr
    created = runner.invoke(
        app, ["kb", "create", "pets", *common, "--plaintext"], env={"PLINTH_MASTER_KEY": ""}
    )
    assert created.exit_code == 0 and created.stdout.startswith("kb_")
    first = runner.invoke(app, ["kb", "ingest", "pets", str(docs), *common])
    assert first.exit_code == 0, first.output
    assert "added 2" in first.stdout and "failed 1" in first.stdout and "bad.pdf" in first.stderr
    second = runner.invoke(app, ["kb", "ingest", "pets", str(docs), *common])
    assert "unchanged 2" in second.stdout and "0 chunks embedded" in second.stdout
    found = runner.invoke(app, ["kb", "query", "pets", "why do cats purr", *common, "--top-k", "1"])
    assert found.exit_code == 0 and "a.md" in found.stdout
    listed = runner.invoke(app, ["kb", "list", "--team", "team_a", "--db", db])
    assert "pets" in listed.stdout
    other_team = runner.invoke(app, ["kb", "show", "pets", "--team", "team_b", "--db", db])
    assert other_team.exit_code == 2 and "not found" in other_team.stderr
    wrong = runner.invoke(app, ["kb", "query", "pets", "cats", "--team", "team_a", "--db", db])
    assert wrong.exit_code == 2 and "--embedder" in wrong.stderr  # built with hashing, asked for local
    assert runner.invoke(app, ["kb", "delete", "pets", "--team", "team_a", "--db", db]).exit_code == 0
    assert "pets" not in runner.invoke(app, ["kb", "list", "--team", "team_a", "--db", db]).stdout
