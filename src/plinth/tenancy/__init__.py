"""Tenancy: identities, API keys and (later) organizations, teams, projects, limits and budgets."""

from plinth.tenancy.keys import KeyStore, Principal, StaticKeyStore, key_digest

__all__ = ["KeyStore", "Principal", "StaticKeyStore", "key_digest"]
