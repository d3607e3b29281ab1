"""Scanners by name: the built-ins, the detectors package's, and plug-ins from the `plinth.guardrails`
entry-point group.

A plug-in package declares, in its pyproject.toml:

    [project.entry-points."plinth.guardrails"]
    my_scanner = "my_package.module:factory"

where `factory(options: dict) -> Scanner`. Plug-ins are looked up only when a profile names a scanner
that is not built in, so an installed but unused plug-in costs nothing.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from importlib import metadata
from typing import Any

from plinth.guardrails.types import Scanner

log = logging.getLogger("plinth.guardrails")

ENTRY_POINT_GROUP = "plinth.guardrails"

ScannerFactory = Callable[[dict[str, Any]], Scanner]


class UnknownScanner(ValueError):
    pass


def _pii(options: dict[str, Any]) -> Scanner:
    from plinth.guardrails.pii import PiiScanner

    return PiiScanner(options)


def _secrets(options: dict[str, Any]) -> Scanner:
    from plinth.guardrails.secrets import SecretsScanner

    return SecretsScanner(options)


def _builtin() -> dict[str, ScannerFactory]:
    """The one place built-in scanners are registered (the identifiers scanner is per configuration:
    the engine registers it on its own registry)."""
    factories: dict[str, ScannerFactory] = {"pii": _pii, "secrets": _secrets}
    try:
        from plinth.guardrails import detectors
    except ImportError as exc:  # pragma: no cover - the package ships with plinth
        log.warning("guardrail detectors unavailable: %s", exc)
        return factories
    factories.update(getattr(detectors, "BUILTIN_SCANNERS", {}))
    return factories


class Registry:
    """Name → factory. `child()` gives a registry with extra names for one engine (its configured
    identifiers) without touching the process-wide one."""

    def __init__(self, factories: dict[str, ScannerFactory] | None = None, parent: Registry | None = None):
        self._factories = dict(factories or {})
        self._parent = parent
        self._lock = threading.Lock()

    def register(self, name: str, factory: ScannerFactory) -> None:
        with self._lock:
            self._factories[name] = factory

    def child(self, factories: dict[str, ScannerFactory]) -> Registry:
        return Registry(factories, parent=self)

    def factory(self, name: str) -> ScannerFactory:
        found = self._factories.get(name)
        if found is not None:
            return found
        if self._parent is not None:
            return self._parent.factory(name)
        plugin = _entry_point(name)
        if plugin is None:
            raise UnknownScanner(f"unknown scanner '{name}' (known: {', '.join(self.names())})")
        self.register(name, plugin)
        return plugin

    def names(self) -> list[str]:
        names = set(self._factories)
        if self._parent is not None:
            names.update(self._parent.names())
        return sorted(names)

    def create(self, name: str, options: dict[str, Any] | None = None) -> Scanner:
        scanner = self.factory(name)(dict(options or {}))
        if not callable(getattr(scanner, "scan", None)):
            raise TypeError(f"scanner '{name}': its factory returned an object without a scan() method")
        return scanner


def _entry_point(name: str) -> ScannerFactory | None:
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            loaded = ep.load()
            if not callable(loaded):
                raise TypeError(f"entry point {ENTRY_POINT_GROUP}:{name} is not callable")
            factory: ScannerFactory = loaded
            return factory
    return None


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry(_builtin())
        return _default


def register_scanner(name: str, factory: ScannerFactory) -> None:
    """Add a scanner to the process-wide registry (tests, embedding applications)."""
    default_registry().register(name, factory)


__all__ = [
    "ENTRY_POINT_GROUP",
    "Registry",
    "ScannerFactory",
    "UnknownScanner",
    "default_registry",
    "register_scanner",
]
