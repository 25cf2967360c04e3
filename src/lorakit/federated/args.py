"""An aggregator's frozen ``Args`` from loosely typed values (``--method-arg k=v``, Flower run config).

Command lines and Flower's run config deliver strings, or TOML scalars that may be an int where a
float is meant. The conversion to each field's declared type is the core's (``core.spec.parse_kv``,
shared with ``--form-arg``/``--init-arg``/``--strategy-arg``); this module only adds what the
federated entry points need around it: dashes accepted for underscores (Flower's key style) and the
splitting of repeated ``k=v`` options before the aggregator, and so the field types, is known.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from lorakit.core.spec import build_args, parse_kv


def split_kv(items: list[str] | None, option: str) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{k: v}``; values stay strings (:func:`parse_args` types them later)."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{option} expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


def parse_args(args_cls: type, values: Mapping[str, Any], *, owner: str) -> Any:
    """``args_cls`` built from ``values``, each converted to its field's type.

    Raises ValueError naming the problem: an unknown key (with the known ones), a value that does not
    fit its field (with the field and its type), or the dataclass' own check (``__post_init__``).
    """
    typed = parse_kv(args_cls, {str(k).replace("-", "_"): v for k, v in values.items()}, owner=owner)
    try:
        return build_args(args_cls, typed, owner=owner)
    except TypeError as e:  # a dataclass check that raised TypeError: still a bad argument
        raise ValueError(f"{owner}: {e}") from None


def args_dict(args: Any) -> dict[str, Any]:
    """The fields of a built ``Args`` as a plain dict (for summaries and logs)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
