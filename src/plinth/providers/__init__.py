"""Providers: translators between Plinth's canonical model and each upstream API."""

from plinth.providers.base import ChatStream, Provider, ProviderError, UnsupportedOperation
from plinth.providers.registry import UnknownProvider, provider_class

__all__ = [
    "ChatStream",
    "Provider",
    "ProviderError",
    "UnknownProvider",
    "UnsupportedOperation",
    "provider_class",
]
