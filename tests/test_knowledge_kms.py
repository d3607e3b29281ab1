"""KMS plug-in seam for knowledge-base encryption: a real `plinth.kms` entry point wraps the team keys."""

from __future__ import annotations

import json
import secrets
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import select

from plinth.knowledge.crypto import MAGIC, CryptoError, LocalMasterKey, master_key_from_env
from plinth.knowledge.embedders import HashingEmbedder
from plinth.knowledge.models import KbTeamKey
from plinth.knowledge.store import KnowledgeError, KnowledgeStore
from plinth.storage import Database

PLUGIN = "toy_kms_plugin"
KMS_KEY = bytes(range(100, 132))
TOKEN = "s3cr3t-vault-token"  # an option value that must never show up in an error

# A stand-in for an AWS KMS / Vault transit module: its key lives "in the KMS" (here: its options),
# and every unwrap is recorded so the test can see the team id arrives as the context.
PLUGIN_SOURCE = """
import secrets
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

CALLS = []


class ToyKms:
    name = "toykms"

    def __init__(self, options):
        self._aead = AESGCM(bytes.fromhex(options["key_hex"]))
        self._token = options["token"]

    def wrap(self, data_key, context):
        CALLS.append(("wrap", context))
        if self._token.startswith("stale"):
            raise PermissionError("token expired")
        nonce = secrets.token_bytes(12)
        return b"v1" + nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, blob, context):
        CALLS.append(("unwrap", context))
        if self._token.startswith("stale"):
            raise PermissionError("token expired")
        # a careless SDK error that echoes the credential it was given
        try:
            return self._aead.decrypt(blob[2:14], blob[14:], context)
        except Exception:
            raise RuntimeError("decrypt denied for token " + self._token) from None


def factory(options):
    return ToyKms(options)


def broken(options):
    raise ConnectionError("cannot reach https://vault.internal with token " + options["token"])
"""


@pytest.fixture
def toy_kms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """Installs the plug-in through a real dist-info entry point on sys.path (group plinth.kms)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / f"{PLUGIN}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    info = site / f"{PLUGIN}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        f"[plinth.kms]\ntoykms = {PLUGIN}:factory\nbrokenkms = {PLUGIN}:broken\n"
    )
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("PLINTH_MASTER_KEY", raising=False)
    monkeypatch.setenv("PLINTH_KMS", "toykms")
    monkeypatch.setenv("PLINTH_KMS_OPTIONS", json.dumps({"key_hex": KMS_KEY.hex(), "token": TOKEN}))
    import importlib

    module = importlib.import_module(PLUGIN)
    yield module
    sys.modules.pop(PLUGIN, None)


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text)
    return folder


def test_plugin_wraps_team_keys_and_a_local_key_cannot_open_them(
    toy_kms: object, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database(database_url)
    db.migrate()
    wrapper = master_key_from_env()
    assert wrapper is not None and wrapper.name == "toykms"
    store = KnowledgeStore(db, HashingEmbedder(), master_key=wrapper)
    base = store.create_base("team_a", "vault")
    assert base.settings["encrypted"] is True
    store.ingest_folder(base.id, write(tmp_path / "docs", "plan.txt", "Project Falcon launches in March."))
    assert store.search(base.id, "when does falcon launch")[0].text == "Project Falcon launches in March."
    with db.session() as s:
        blob = s.scalars(select(KbTeamKey.wrapped_key)).one()
    assert blob.startswith(MAGIC + b"toykms\x00v1")  # the wrapper's name is recorded with the key
    assert ("wrap", b"team_a") in toy_kms.CALLS  # type: ignore[attr-defined]

    # a fresh process, wrapper loaded again from the environment, reads the base (plug-in unwraps)
    fresh = KnowledgeStore(db, HashingEmbedder(), master_key=master_key_from_env())
    assert fresh.search(base.id, "falcon")[0].text == "Project Falcon launches in March."
    assert ("unwrap", b"team_a") in toy_kms.CALLS  # type: ignore[attr-defined]

    # the local master key instead: a clear error naming the wrapper to use
    with pytest.raises(
        KnowledgeError, match=r"wrapped by the 'toykms' key wrapper, not 'local'.*PLINTH_KMS=toykms"
    ):
        KnowledgeStore(db, HashingEmbedder(), master_key=secrets.token_bytes(32)).search(base.id, "falcon")

    # the same plug-in with another KMS key: its own error, with the credential masked
    monkeypatch.setenv("PLINTH_KMS_OPTIONS", json.dumps({"key_hex": "00" * 32, "token": TOKEN}))
    with pytest.raises(KnowledgeError, match="could not unwrap the data key of team team_a") as info:
        KnowledgeStore(db, HashingEmbedder(), master_key=master_key_from_env()).search(base.id, "falcon")
    assert TOKEN not in str(info.value) and "decrypt denied for token ***" in str(info.value)
    monkeypatch.setenv("PLINTH_KMS_OPTIONS", json.dumps({"key_hex": KMS_KEY.hex(), "token": "stale-token-1"}))
    with pytest.raises(KnowledgeError, match="PermissionError: token expired"):
        KnowledgeStore(db, HashingEmbedder(), master_key=master_key_from_env()).search(base.id, "falcon")
    stale = KnowledgeStore(db, HashingEmbedder(), master_key=master_key_from_env())
    other = stale.create_base("team_b", "b")
    with pytest.raises(KnowledgeError, match="'toykms' could not wrap a data key: PermissionError"):
        stale.ingest_folder(other.id, write(tmp_path / "docs_b", "b.txt", "Team B text."))
    with db.session() as s:
        assert s.get(KbTeamKey, "team_b") is None  # nothing half-written
    db.dispose()


def test_keys_written_by_the_env_master_key_still_open(
    toy_kms: object, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A team key wrapped the way Plinth always did (bare nonce + AES-GCM, team id as associated
    data) opens through the env path unchanged; the plug-in refuses it with a clear error."""
    master = bytes(range(32))
    data_key = secrets.token_bytes(32)
    nonce = secrets.token_bytes(12)
    db = Database(database_url)
    db.migrate()
    with db.session() as s:  # written by hand, as the pre-seam code stored it
        s.add(
            KbTeamKey(
                team_id="team_a", wrapped_key=nonce + AESGCM(master).encrypt(nonce, data_key, b"team_a")
            )
        )
    monkeypatch.delenv("PLINTH_KMS")
    monkeypatch.setenv("PLINTH_MASTER_KEY", master.hex())
    local = master_key_from_env()
    assert isinstance(local, LocalMasterKey)
    store = KnowledgeStore(db, HashingEmbedder(), master_key=local)
    base = store.create_base("team_a", "old")
    store.ingest_folder(base.id, write(tmp_path / "docs", "note.txt", "The vault code is kept offsite."))
    assert store.cipher(base.id) is not None
    with db.session() as s:
        assert (
            s.scalars(select(KbTeamKey.wrapped_key)).one()[:12] == nonce
        )  # the old key was used, not replaced
    assert (
        KnowledgeStore(db, HashingEmbedder(), master_key=master)
        .search(base.id, "vault")[0]
        .text.startswith("The vault code")
    )
    # new local keys keep the old on-disk shape: 12-byte nonce + 32-byte key + 16-byte tag
    other = store.create_base("team_b", "new")
    store.ingest_folder(other.id, write(tmp_path / "docs_b", "b.txt", "Team B text."))
    with db.session() as s:
        blob = s.get(KbTeamKey, "team_b")
        assert blob is not None and len(blob.wrapped_key) == 60
        assert AESGCM(master).decrypt(blob.wrapped_key[:12], blob.wrapped_key[12:], b"team_b")

    monkeypatch.setenv("PLINTH_KMS", "toykms")
    with pytest.raises(
        KnowledgeError, match=r"wrapped by the 'local' key wrapper, not 'toykms'.*PLINTH_MASTER_KEY"
    ):
        KnowledgeStore(db, HashingEmbedder(), master_key=master_key_from_env()).search(base.id, "vault")
    db.dispose()


def test_plugin_selection_errors_are_clear_and_keep_secrets_out(
    toy_kms: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PLINTH_KMS", "awskms")
    with pytest.raises(
        CryptoError, match=r"unknown PLINTH_KMS plug-in 'awskms' \(installed .*brokenkms, .*toykms"
    ):
        master_key_from_env()
    monkeypatch.setenv("PLINTH_KMS", "brokenkms")
    with pytest.raises(CryptoError, match="'brokenkms' failed to start: ConnectionError") as info:
        master_key_from_env()
    assert TOKEN not in str(info.value) and "with token ***" in str(info.value)
    monkeypatch.setenv("PLINTH_KMS", "toykms")
    monkeypatch.setenv("PLINTH_KMS_OPTIONS", "{not json")
    with pytest.raises(CryptoError, match="PLINTH_KMS_OPTIONS must be a JSON object"):
        master_key_from_env()
    monkeypatch.setenv("PLINTH_KMS_OPTIONS", json.dumps({"token": TOKEN}))  # key_hex missing
    with pytest.raises(CryptoError, match="failed to start: KeyError: 'key_hex'") as info:
        master_key_from_env()
    assert TOKEN not in str(info.value)
    monkeypatch.setenv("PLINTH_KMS", "local")
    with pytest.raises(CryptoError, match="PLINTH_KMS=local needs PLINTH_MASTER_KEY"):
        master_key_from_env()
