"""The per-forward adapter context: which adapter each row or token uses, mixing weights, free extras.

Every caller that wants more than "the active adapters for every row" writes one
:class:`AdapterContext` for the duration of a forward (``with use_context(ctx): model(...)``) and
every :class:`~lorakit.core.layer.AdaptedLayer` reads it:

- a mixed batch (``mixed_batch``) writes ``names`` (the adapters) and per-row ``ids`` into them;
- per-row or per-token mixing writes ``names`` and ``weights`` [..., E] (E = len(names)):
  y = W0·x + Σ_e w_e · ΔW_e·x;
- the serving engine writes bank slot ids and its per-step row ``plan``;
- routers' gates compute their weights from the layer input and may read ``extras`` (task ids);
- diffusion pipelines put the timestep and region masks into ``extras``.

``ids`` and ``weights`` address the layer's own adapters (``names``), or, with ``target`` set, the delta
source installed under that key (``core.sources.add_source``: a stacked bank's entries); an id < 0
means "no adapter" (the base output). The serving engine's slot ids travel with its ``plan``.
The context lives in a ``ContextVar``, so threads and nested calls see their own. Gradient checkpointing
re-runs forwards during backward, outside the ``with`` block: do not combine a context with checkpointed
recomputation.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_CURRENT: contextvars.ContextVar[AdapterContext | None] = contextvars.ContextVar("lorakit_adapter_context",
                                                                                   default=None)


class ContextError(ValueError):
    """A malformed adapter context (ids/weights that do not match the names or the batch)."""


@dataclass
class AdapterContext:
    """What the adapted layers read during one forward (see the module docstring)."""

    names: tuple[str | None, ...] | None = None
    target: str | None = None  # a source key: ids/weights address that source's entries instead of names
    ids: torch.Tensor | None = None  # [N] per row or [N, T] per token, long; < 0 = base only
    weights: torch.Tensor | None = None  # [..., E] over ``names`` (or a source's entries)
    extras: dict[str, Any] = field(default_factory=dict)
    plan: Any = None  # a per-forward batch layout computed once by the caller (the serving RowPlan)
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.names is not None:
            self.names = tuple(self.names)
            if self.target is not None:
                raise ContextError("a context addresses either adapter names or a source (target), not both")
        if self.ids is not None:
            self.ids = torch.as_tensor(self.ids).long()
            if self.ids.dim() not in (1, 2):
                raise ContextError(f"ids must be [rows] or [rows, tokens], got shape {tuple(self.ids.shape)}")
            if self.names is not None and self.ids.numel() and int(self.ids.max()) >= len(self.names):
                raise ContextError(f"id {int(self.ids.max())} out of range for {len(self.names)} name(s)")
        if self.weights is not None:
            self.weights = torch.as_tensor(self.weights)
            if not self.weights.is_floating_point():
                raise ContextError(f"mixing weights must be floating point, got {self.weights.dtype}")
            if self.names is not None and self.weights.shape[-1] != len(self.names):
                raise ContextError(f"mixing weights have {self.weights.shape[-1]} entries in their last dim for "
                                   f"{len(self.names)} adapter name(s) {list(self.names)}")
            if not torch.isfinite(self.weights).all():
                raise ContextError("mixing weights must be finite")

    def row_groups(self) -> list[tuple[str, torch.Tensor]]:
        """(adapter name, row indices) for per-row ``ids`` over ``names``; computed once per forward."""
        groups = self._cache.get("row_groups")
        if groups is None:
            if self.ids is None or self.ids.dim() != 1 or self.names is None:
                raise ContextError("row groups need per-row ids ([rows]) over adapter names")
            groups = []
            for i, name in enumerate(self.names):
                if name is None:
                    continue
                rows = (self.ids == i).nonzero().flatten()
                if rows.numel():
                    groups.append((name, rows))
            self._cache["row_groups"] = groups
        return groups

    def row_segments(self) -> list[tuple[str | None, int, int]] | None:
        """(adapter name or None, start, stop) runs of per-row ``ids`` over ``names`` when every adapter's
        rows are one contiguous run (rows sorted by adapter, as the multi-job trainer packs them), else
        None. Computed once per forward; the layers then slice instead of gathering and scattering."""
        if "row_segments" not in self._cache:
            segs: list[tuple[str | None, int, int]] | None = None
            if self.ids is not None and self.ids.dim() == 1 and self.names is not None and self.ids.numel():
                ids = self.ids.tolist()
                segs, seen = [], set()
                start = 0
                for i in range(1, len(ids) + 1):
                    if i == len(ids) or ids[i] != ids[start]:
                        key = ids[start] if ids[start] >= 0 else -1
                        if key >= 0 and key in seen:
                            segs = None
                            break
                        seen.add(key)
                        segs.append((self.names[key] if key >= 0 else None, start, i))
                        start = i
            self._cache["row_segments"] = segs
        return self._cache["row_segments"]

    def mixing_weights(self, x: torch.Tensor, num: int) -> torch.Tensor | None:
        """Weights [..., num] broadcast to the leading dims of ``x`` (one-hot from ``ids`` when no
        ``weights`` were given; rows/tokens with id < 0 get all zeros), or None."""
        if self.weights is not None:
            w = self.weights.to(device=x.device)
        elif self.ids is not None:
            ids = self.ids.to(x.device)
            w = torch.nn.functional.one_hot(ids.clamp_min(0), num).to(x.dtype) * (ids >= 0)[..., None].to(x.dtype)
        else:
            return None
        if w.shape[-1] != num:
            raise ContextError(f"mixing weights have {w.shape[-1]} entries, this source holds {num}")
        lead = x.shape[:-1]
        while w.dim() - 1 < len(lead):
            w = w[..., None, :]
        try:
            return w.expand(*lead, num)
        except RuntimeError as e:
            given = self.weights if self.weights is not None else self.ids
            raise ContextError(f"mixing weights/ids of shape {tuple(given.shape)} do not match a layer input of "
                               f"shape {tuple(x.shape)}") from e


def current_context() -> AdapterContext | None:
    """The context of the forward being run, or None (every row uses the active adapters)."""
    return _CURRENT.get()


@contextlib.contextmanager
def use_context(ctx: AdapterContext | None) -> Iterator[AdapterContext | None]:
    """Run the forwards inside with ``ctx`` (None: no context)."""
    token = _CURRENT.set(ctx)
    try:
        yield ctx
    finally:
        _CURRENT.reset(token)


@contextlib.contextmanager
def mixing(names: Sequence[str | None], weights: torch.Tensor | Sequence[Sequence[float]], **extras: Any
           ) -> Iterator[AdapterContext]:
    """Per-row ([rows, E]) or per-token ([rows, tokens, E]) weights over the adapters ``names``:
    y = W0·x + Σ_e w_e · ΔW_e·x in every adapted layer (adapters a layer lacks add nothing)."""
    ctx = AdapterContext(names=tuple(names), weights=torch.as_tensor(weights, dtype=torch.float32), extras=extras)
    with use_context(ctx):
        yield ctx
