"""The plugin registry: transports, backends and training strategies found through entry points.

Groups ``mesh.transports``, ``mesh.backends`` and ``mesh.strategies`` (the gym's algorithms). Built-ins register through the same
entry points as third-party plugins (see pyproject.toml). A plugin that fails to import is
reported with its error and skipped; it never stops the node. Names from peers are looked up
here only among installed entry points; nothing is imported by a name a peer sent.
Spec: specs/registry.md (R1-R5).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from mesh.errors import PluginError

log = logging.getLogger(__name__)

GROUPS = {"transport": "mesh.transports", "backend": "mesh.backends", "strategy": "mesh.strategies"}


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginInfo:
    """One entry point: ``kind`` (transport/backend), ``name``, ``target`` (module:attr),
    the distribution that ships it and its version, ``error`` if it failed to import, and
    ``unavailable``: why it imports but cannot run here (the plugin's own ``unavailable()``)."""

    kind: str
    name: str
    target: str
    distribution: str
    version: str
    error: str | None = None
    unavailable: str | None = None


def _entry_points(kind: str) -> list[EntryPoint]:
    if kind not in GROUPS:
        raise PluginError(f"unknown plugin kind {kind!r}; valid: {sorted(GROUPS)}")
    return sorted(entry_points(group=GROUPS[kind]), key=lambda ep: ep.name)


def _describe(kind: str, ep: EntryPoint, error: str | None, unavailable: str | None = None) -> PluginInfo:
    dist = ep.dist
    return PluginInfo(
        kind=kind,
        name=ep.name,
        target=ep.value,
        distribution=dist.metadata["Name"] if dist is not None else "?",
        version=dist.version if dist is not None else "?",
        error=error,
        unavailable=unavailable,
    )


def discover(kind: str | None = None) -> list[PluginInfo]:
    """Every registered plugin of ``kind`` (or of every kind), importing each to check it.

    A plugin whose import raises is returned with ``error`` set (and logged), not raised; one
    whose class has an ``unavailable()`` classmethod returning a reason (a library it needs is
    not installed) is returned with ``unavailable`` set.
    """
    kinds = [kind] if kind else sorted(GROUPS)
    found: list[PluginInfo] = []
    for k in kinds:
        for ep in _entry_points(k):
            error = unavailable = None
            try:
                check = getattr(ep.load(), "unavailable", None)
                unavailable = check() if callable(check) else None
            except Exception as exc:  # any import-time failure of a third-party plugin
                error = f"{type(exc).__name__}: {exc}"
                log.warning("plugin %s %r (%s) failed to load: %s", k, ep.name, ep.value, error)
            found.append(_describe(k, ep, error, unavailable))
    return found


def load(kind: str, name: str, *, expected: type | None = None) -> Any:
    """The class registered as ``name`` under ``kind``.

    ``expected``: the base class the plugin must subclass (``transports.base.Transport`` for
    a transport, ``backends.base.Backend`` for a backend). The caller passes it because this
    module is ground and must not import transports/ or backends/; None checks nothing.

    Raises:
        PluginError: when no such plugin is registered (listing the valid names), it fails
            to import (with its error), or it is not a subclass of ``expected`` (naming the
            distribution and the entry point).
    """
    eps = {ep.name: ep for ep in _entry_points(kind)}
    if name not in eps:
        raise PluginError(f"no {kind} named {name!r}; installed: {sorted(eps) or 'none'}")
    ep = eps[name]
    try:
        cls = ep.load()
    except Exception as exc:
        raise PluginError(f"{kind} {name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}") from exc
    if expected is not None and not (isinstance(cls, type) and issubclass(cls, expected)):
        # validated at load (pluggy-style): a wrong class would fail later, far from its cause
        info = _describe(kind, ep, None)
        got = cls.__qualname__ if isinstance(cls, type) else f"a {type(cls).__name__}, not a class"
        raise PluginError(
            f"{kind} {name!r} (entry point {ep.value} in group {GROUPS[kind]}, distribution "
            f"{info.distribution} {info.version}) is {got}; a {kind} must subclass "
            f"{expected.__module__}.{expected.__qualname__}")
    return cls


def names(kind: str) -> list[str]:
    """Names registered under ``kind`` (without importing them)."""
    return [ep.name for ep in _entry_points(kind)]
