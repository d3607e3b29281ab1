"""Find the provider class for a `provider:` name: built-ins first, then plugins.

Third-party providers register under the `plinth.providers` entry-point group, naming a `Provider`
subclass (`myprovider = "my_package.module:MyProvider"`). Built-ins are imported lazily so that a
deployment of one kind never pays for another's imports (the local model pulls in torch).
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from plinth.providers.base import Provider

_BUILTIN: dict[str, str] = {
    "openai": "plinth.providers.openai:OpenAIProvider",
    "openai_compatible": "plinth.providers.openai:OpenAICompatibleProvider",
    "azure": "plinth.providers.openai:AzureOpenAIProvider",
    "anthropic": "plinth.providers.anthropic:AnthropicProvider",
    "bedrock": "plinth.providers.bedrock:BedrockProvider",
    "gemini": "plinth.providers.gemini:GeminiProvider",
    "local": "plinth.providers.local:LocalEmbeddingProvider",
}


class UnknownProvider(LookupError):
    pass


def _load(target: str) -> type[Provider]:
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, Provider)):
        raise UnknownProvider(f"{target} is not a plinth Provider subclass")
    return cls


def provider_class(name: str) -> type[Provider]:
    if name in _BUILTIN:
        return _load(_BUILTIN[name])
    for ep in entry_points(group="plinth.providers"):
        if ep.name == name:
            return _load(ep.value)
    known = ", ".join(sorted(_BUILTIN))
    raise UnknownProvider(f"unknown provider '{name}' (built-in: {known}; or install a plugin)")
