"""Argument checks shared by the ``Args`` dataclasses of every axis (one wording for every method)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def check_common(owner: str, args: Any, rank_name: str = "rank r") -> None:
    """``r >= 1`` and ``0 <= dropout < 1`` for the Args fields that exist."""
    r = getattr(args, "r", None)
    if r is not None and r < 1:
        raise ValueError(f"{owner}: {rank_name} must be >= 1, got {r}")
    dropout = getattr(args, "dropout", None)
    if dropout is not None and not 0.0 <= dropout < 1.0:
        raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout}")


def check_choice(owner: str, field: str, value: Any, known: Sequence[Any]) -> None:
    if value not in known:
        raise ValueError(f"{owner}: {field} must be one of {tuple(known)}, got {value!r}")


def check_min(owner: str, field: str, value: Any, low: float) -> None:
    if value is not None and value < low:
        raise ValueError(f"{owner}: {field} must be >= {low}, got {value}")


def check_peft_bias(config: dict[str, Any]) -> None:
    """PEFT's ``bias`` option trains the base biases, which lorakit adapters never do."""
    if config.get("bias", "none") != "none":
        raise ValueError(f"PEFT option bias={config['bias']!r} (trained base biases) is not supported")


def check_k(owner: str, k: int | None) -> None:
    """An optional output rank (merges): a positive integer or None."""
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 1):
        raise ValueError(f"{owner}: k (output rank) must be a positive integer or None, got {k!r}")


def check_density(owner: str, density: float) -> None:
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"{owner}: density must be in (0, 1], got {density!r}")


def check_fields(owner: str, args: Any, *, choices: dict[str, Sequence[Any]] | None = None,
                 at_least: dict[str, float] | None = None, positive: Sequence[str] = (),
                 unit: Sequence[str] = ()) -> None:
    """Declarative checks of an ``Args`` instance (fields whose value is None are skipped):
    ``choices`` field -> allowed values, ``at_least`` field -> lower bound, ``positive`` fields > 0,
    ``unit`` fields in [0, 1]."""
    for field, known in (choices or {}).items():
        check_choice(owner, field, getattr(args, field), known)
    for field, low in (at_least or {}).items():
        check_min(owner, field, getattr(args, field), low)
    for field in positive:
        value = getattr(args, field)
        if value is not None and not value > 0:
            raise ValueError(f"{owner}: {field} must be > 0, got {value}")
    for field in unit:
        value = getattr(args, field)
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{owner}: {field} must be in [0, 1], got {value}")
