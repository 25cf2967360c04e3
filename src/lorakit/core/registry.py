"""Lazy lookup of catalog entries by (axis, name)."""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

from lorakit.core.catalog import AXES, CATALOG, Entry


class UnknownMethodError(KeyError):
    """An axis or method name that the catalog does not know."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def _normalize(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def entries(axis: str | None = None) -> list[Entry]:
    """Catalog entries, optionally of one axis."""
    if axis is not None and axis not in AXES:
        raise UnknownMethodError(f"unknown axis {axis!r}; known axes: {', '.join(AXES)}")
    return [e for e in CATALOG if axis is None or e.axis == axis]


def names(axis: str) -> list[str]:
    return [e.name for e in entries(axis)]


def entry(axis: str, name: str) -> Entry:
    wanted = _normalize(name)
    for e in entries(axis):
        if _normalize(e.name) == wanted:
            return e
    known = ", ".join(names(axis)) or "(none yet)"
    raise UnknownMethodError(f"unknown {axis} {name!r}; known {axis}s: {known}")


@cache
def _import(target: str) -> Any:
    module, _, obj = target.partition(":")
    return getattr(importlib.import_module(module), obj)


def get(axis: str, name: str) -> Any:
    """The class registered under (axis, name), imported on first use."""
    return _import(entry(axis, name).target)
