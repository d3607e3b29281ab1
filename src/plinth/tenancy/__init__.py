"""Tenancy: organizations, teams, projects, virtual API keys and users with roles."""

from plinth.tenancy.keys import (
    ChainedKeyStore,
    DatabaseKeyStore,
    KeyStore,
    Principal,
    RateLimits,
    StaticKeyStore,
    key_digest,
)

__all__ = [
    "ChainedKeyStore",
    "DatabaseKeyStore",
    "KeyStore",
    "Principal",
    "RateLimits",
    "StaticKeyStore",
    "key_digest",
]
