"""Encryption at rest for chunk text and vectors: AES-256-GCM with a data key per team.

Each team's random data key is stored wrapped (AES-GCM) by the master key from PLINTH_MASTER_KEY
(32 bytes, base64 or hex). Ciphertexts are bound to their knowledge base through the associated
data, so a row copied into another base does not decrypt. Not protected: the BM25 index (FTS5
terms, and the sorted term bag it is built from), document sources and metadata.

Files waiting in an ingestion job (an upload's bytes, a URL with its query string) are sealed with
the same team key, bound to the job id and file name (`seal_staged`), until they are processed.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENV = "PLINTH_MASTER_KEY"
PREFIX = "enc1:"


class CryptoError(Exception):
    pass


def master_key_from_env() -> bytes | None:
    value = os.environ.get(ENV)
    return parse_master_key(value) if value else None


def parse_master_key(value: str) -> bytes:
    value = value.strip()
    try:
        key = bytes.fromhex(value) if len(value) == 64 else base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise CryptoError(f"{ENV} must be 32 bytes as base64 or 64 hex digits") from None
    if len(key) != 32:
        raise CryptoError(f"{ENV} must be 32 bytes as base64 or 64 hex digits")
    return key


def wrap(master: bytes, data_key: bytes, team_id: str) -> bytes:
    nonce = secrets.token_bytes(12)
    return nonce + AESGCM(master).encrypt(nonce, data_key, team_id.encode())


def unwrap(master: bytes, wrapped: bytes, team_id: str) -> bytes:
    try:
        return AESGCM(master).decrypt(wrapped[:12], wrapped[12:], team_id.encode())
    except InvalidTag:
        raise CryptoError(f"the data key of team {team_id} does not open with this {ENV}") from None


class TeamCipher:
    def __init__(self, data_key: bytes) -> None:
        self._aead = AESGCM(data_key)

    def seal(self, data: bytes, kb_id: str) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, data, kb_id.encode())

    def open(self, sealed: bytes, kb_id: str) -> bytes:
        try:
            return self._aead.decrypt(sealed[:12], sealed[12:], kb_id.encode())
        except InvalidTag:
            raise CryptoError(f"a chunk of knowledge base {kb_id} failed authentication") from None

    def seal_text(self, text: str, kb_id: str) -> str:
        return PREFIX + base64.b64encode(self.seal(text.encode(), kb_id)).decode()

    def open_text(self, stored: str, kb_id: str) -> str:
        if not stored.startswith(PREFIX):
            return stored
        return self.open(base64.b64decode(stored[len(PREFIX) :]), kb_id).decode()

    def seal_staged(self, data: bytes, job_id: str, source: str) -> bytes:
        """A file waiting in ingestion job `job_id` (kb_job_files.data): the associated data binds
        it to the job and the file name, so staged bytes moved to another job or file fail to open."""
        return self.seal(data, _staged_ad(job_id, source))

    def open_staged(self, sealed: bytes, job_id: str, source: str) -> bytes:
        try:
            return self.open(sealed, _staged_ad(job_id, source))
        except CryptoError:
            raise CryptoError(f"staged file {source!r} of job {job_id} failed authentication") from None


def _staged_ad(job_id: str, source: str) -> str:
    return f"kb_job_files\x00{job_id}\x00{source}"
