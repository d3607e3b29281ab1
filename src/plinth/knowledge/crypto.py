"""Encryption at rest for chunk text and vectors: AES-256-GCM with a data key per team.

Each team's random data key is stored wrapped by a `KeyWrapper`: the built-in `LocalMasterKey`
(AES-GCM with the master key from PLINTH_MASTER_KEY, 32 bytes, base64 or hex), or a KMS plug-in from
the entry point group `plinth.kms` chosen by PLINTH_KMS (options: PLINTH_KMS_OPTIONS, JSON), so with
a real KMS the master key never enters this process. A plug-in's wrapped keys carry its name, so
opening them with another wrapper is a clear error; the local scheme's bytes are unchanged.
Ciphertexts are bound to their knowledge base through the associated data, so a row copied into another base does not decrypt. Not protected: the BM25 index (FTS5
terms, and the sorted term bag it is built from), document sources and metadata.

Files waiting in an ingestion job (an upload's bytes, a URL with its query string) are sealed with
the same team key, bound to the job id and file name (`seal_staged`), until they are processed.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any, Protocol, runtime_checkable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

ENV = "PLINTH_MASTER_KEY"
KMS_ENV = "PLINTH_KMS"
KMS_OPTIONS_ENV = "PLINTH_KMS_OPTIONS"
KMS_GROUP = "plinth.kms"
PREFIX = "enc1:"
# A plug-in's wrapped key: MAGIC + name + NUL + its blob. Local wrapped keys are a bare 12-byte random
# nonce + ciphertext (as before this seam existed), so they start with MAGIC only by a 2**-96 chance.
MAGIC = b"plinth-kms1:"


class CryptoError(Exception):
    pass


@runtime_checkable
class KeyWrapper(Protocol):
    """Wraps the teams' data keys (a KMS plug-in, or LocalMasterKey). `context` is the team id: a
    wrapper must bind the blob to it (e.g. as AEAD associated data or a KMS encryption context)."""

    name: str  # recorded with each wrapped key: a key opened by another wrapper fails clearly

    def wrap(self, data_key: bytes, context: bytes) -> bytes: ...

    def unwrap(self, blob: bytes, context: bytes) -> bytes: ...


KmsFactory = Callable[[dict[str, Any]], KeyWrapper]
MasterKey = bytes | KeyWrapper  # what KnowledgeStore takes: raw bytes mean LocalMasterKey(bytes)


class LocalMasterKey:
    """The built-in wrapper: AES-256-GCM with a 32-byte master key held in this process."""

    name = "local"

    def __init__(self, master: bytes) -> None:
        self._aead = AESGCM(master)

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        nonce = secrets.token_bytes(12)
        return nonce + self._aead.encrypt(nonce, data_key, context)

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        try:
            return self._aead.decrypt(blob[:12], blob[12:], context)
        except InvalidTag:
            raise CryptoError(
                f"the data key of team {context.decode()} does not open with this {ENV}"
            ) from None


def as_wrapper(key: MasterKey) -> KeyWrapper:
    return LocalMasterKey(key) if isinstance(key, bytes) else key


def master_key_from_env() -> KeyWrapper | None:
    """The wrapper the environment selects: PLINTH_KMS's plug-in, else PLINTH_MASTER_KEY, else None."""
    name = os.environ.get(KMS_ENV, "").strip()
    if name and name != LocalMasterKey.name:  # "local" is the built-in, never a plug-in
        return load_kms(name, os.environ.get(KMS_OPTIONS_ENV) or "{}")
    value = os.environ.get(ENV)
    if name and not value:
        raise CryptoError(f"{KMS_ENV}=local needs {ENV}")
    return LocalMasterKey(parse_master_key(value)) if value else None


def load_kms(name: str, options_json: str) -> KeyWrapper:
    """Build the `plinth.kms` plug-in `name` with `factory(options)`. Option values never appear in
    errors: a plug-in's own message is shown with them masked."""
    try:
        options = json.loads(options_json)
    except ValueError:
        raise CryptoError(f"{KMS_OPTIONS_ENV} must be a JSON object") from None
    if not isinstance(options, dict):
        raise CryptoError(f"{KMS_OPTIONS_ENV} must be a JSON object")
    eps = {ep.name: ep for ep in metadata.entry_points(group=KMS_GROUP)}
    ep = eps.get(name)
    if ep is None:
        installed = ", ".join(sorted(eps)) or "none"
        raise CryptoError(f"unknown {KMS_ENV} plug-in {name!r} (installed {KMS_GROUP} plug-ins: {installed})")
    try:
        factory: KmsFactory = ep.load()
        wrapper = factory(options)
    except Exception as exc:
        raise CryptoError(f"{KMS_ENV} plug-in {name!r} failed to start: {_masked(exc, options)}") from None
    if not isinstance(wrapper, KeyWrapper):
        raise CryptoError(f"{KMS_ENV} plug-in {name!r} returned no KeyWrapper (name, wrap, unwrap)")
    return _Guarded(name, wrapper, options)


class _Guarded:
    """A plug-in with its failures turned into CryptoError, option values masked in the message. Its
    entry point name is what is recorded with the keys, so the error for a wrong wrapper says which
    PLINTH_KMS to set."""

    def __init__(self, name: str, inner: KeyWrapper, options: Mapping[str, Any]) -> None:
        self.inner, self.name, self._options = inner, name, options

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        try:
            return self.inner.wrap(data_key, context)
        except Exception as exc:
            raise CryptoError(
                f"KMS plug-in {self.name!r} could not wrap a data key: {_masked(exc, self._options)}"
            ) from None

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        try:
            return self.inner.unwrap(blob, context)
        except Exception as exc:
            raise CryptoError(
                f"KMS plug-in {self.name!r} could not unwrap the data key of team {context.decode()}: "
                f"{_masked(exc, self._options)}"
            ) from None


def _masked(exc: Exception, options: Mapping[str, Any]) -> str:
    text = f"{type(exc).__name__}: {exc}"
    for value in _leaves(options):
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _leaves(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        return [s for v in value.values() for s in _leaves(v)]
    if isinstance(value, list):
        return [s for v in value for s in _leaves(v)]
    return [str(value)] if isinstance(value, str | int | float) and not isinstance(value, bool) else []


def parse_master_key(value: str) -> bytes:
    value = value.strip()
    try:
        key = bytes.fromhex(value) if len(value) == 64 else base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise CryptoError(f"{ENV} must be 32 bytes as base64 or 64 hex digits") from None
    if len(key) != 32:
        raise CryptoError(f"{ENV} must be 32 bytes as base64 or 64 hex digits")
    return key


def wrap(master: MasterKey, data_key: bytes, team_id: str) -> bytes:
    """A team's data key as stored in kb_team_keys: local blobs bare, a plug-in's tagged by name."""
    wrapper = as_wrapper(master)
    blob = wrapper.wrap(data_key, team_id.encode())
    if wrapper.name == LocalMasterKey.name:
        return blob
    return MAGIC + wrapper.name.encode() + b"\0" + blob


def unwrap(master: MasterKey, wrapped: bytes, team_id: str) -> bytes:
    wrapper = as_wrapper(master)
    stored_by = LocalMasterKey.name
    if wrapped.startswith(MAGIC) and b"\0" in wrapped:
        name, _, wrapped = wrapped[len(MAGIC) :].partition(b"\0")
        stored_by = name.decode(errors="replace")
    if stored_by != wrapper.name:
        how = f"{ENV} ({KMS_ENV} unset)" if stored_by == LocalMasterKey.name else f"{KMS_ENV}={stored_by}"
        raise CryptoError(
            f"the data key of team {team_id} was wrapped by the {stored_by!r} key wrapper, "
            f"not {wrapper.name!r}: open it with {how}"
        )
    data_key = wrapper.unwrap(wrapped, team_id.encode())
    if len(data_key) != 32:
        raise CryptoError(
            f"key wrapper {wrapper.name!r} returned a data key of the wrong size for team {team_id}"
        )
    return data_key


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
