"""One batched-delta interface over stacked adapters, a pure-torch reference, and a backend registry.

Semantics (every backend of an op computes exactly this; the reference also supports autograd, so
several jobs or an ensemble can train through it in one batch):

``stacked`` — E adapters stacked with the scale folded in, A: [E, r, in], B: [E, out, r] (ranks
zero-padded to r: exact), input x: [N, ..., in]; per position the weights w: [N, ..., E]
(``AdapterContext.mixing_weights``: given weights, or one-hot from ids, zero for id < 0):

    mode "delta":   y[..., o] = Σ_e w[..., e] · Σ_r B[e, o, r] · (A[e, r, :] · x[..., :])
    mode "factors": y = (Σ_e w_e B_e)(Σ_e w_e A_e) x, one weight vector per row (w: [N, E]),
                    RecLoRA's official code

with an optional stacked bias b: [E, out] added as Σ_e w_e b_e, and an optional per-adapter scale
s: [E] (for stacks whose scale is kept apart from B, e.g. trainable experts) that multiplies the B side:
w_e → w_e·s_e in "delta", Σ_e w_e s_e B_e in "factors", Σ_e w_e s_e b_e for the bias.
``ids`` per row (no weights) take the gather path: each row reads only its adapter,
y[n] = B[id_n] A[id_n] x[n] (rows with id < 0 get 0).

``paged`` — the serving bank's paged layout (``lorakit.serving.kernels``): registered there.

Backends register per op with an availability test and a priority; ``backend="auto"`` picks the
highest-priority available one for the inputs, a name picks that one (an error if unknown or not
available here). No caller branches on backend names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


class BackendError(ValueError):
    """An unknown kernel backend, or inputs no backend takes."""


class BackendUnavailableError(BackendError, RuntimeError):
    """A known backend that cannot run here (e.g. Triton without CUDA)."""


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    fn: Callable[..., torch.Tensor]
    available: Callable[..., bool]
    priority: int = 0


_BACKENDS: dict[str, dict[str, Backend]] = {}


def register_backend(op: str, name: str, fn: Callable[..., torch.Tensor], *,
                     available: Callable[..., bool] = lambda *a, **k: True, priority: int = 0) -> None:
    """Register ``fn`` as backend ``name`` of ``op`` (same call signature as the op's reference)."""
    _BACKENDS.setdefault(op, {})[name] = Backend(op, name, fn, available, priority)


def backends(op: str) -> list[str]:
    return sorted(_BACKENDS.get(op, {}))


def choose_backend(op: str, backend: str, *args: Any, **kwargs: Any) -> Backend:
    """The backend that runs ``op`` on these inputs: ``auto`` = highest priority among the available."""
    table = _BACKENDS.get(op)
    if not table:
        raise BackendError(f"no backend registered for op {op!r}")
    if backend != "auto":
        chosen = table.get(backend)
        if chosen is None:
            raise BackendError(f"unknown {op} backend {backend!r}; known: {', '.join(sorted(table))} (or 'auto')")
        if not chosen.available(*args, **kwargs):
            raise BackendUnavailableError(f"{op} backend {backend!r} is not available for these inputs on this "
                                          "machine")
        return chosen
    ready = [b for b in table.values() if b.available(*args, **kwargs)]
    if not ready:
        raise BackendError(f"no available {op} backend for these inputs; registered: {', '.join(sorted(table))}")
    return max(ready, key=lambda b: b.priority)


def stacked_delta_reference(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, weights: torch.Tensor | None = None,
                            ids: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                            scale: torch.Tensor | None = None, mode: str = "delta") -> torch.Tensor:
    """The reference of op ``stacked`` (see the module docstring); differentiable in x, A, B, weights, bias."""
    x = x.to(A.dtype)
    if weights is None:
        if ids is None:
            raise BackendError("stacked delta needs weights or ids")
        if ids.dim() != 1 or ids.shape[0] != x.shape[0]:
            raise BackendError(f"gather path needs one id per row, shape [{x.shape[0]}], got {tuple(ids.shape)}")
        sel = ids.clamp_min(0)
        keep = (ids >= 0).to(A.dtype)
        if scale is not None:
            keep = keep * scale.to(A.dtype).index_select(0, sel)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        a, b = A.index_select(0, sel), B.index_select(0, sel)
        y = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), b.transpose(1, 2)) * keep[:, None, None]
        y = y.reshape(*x.shape[:-1], B.shape[1])
        if bias is not None:
            y = y + (bias.index_select(0, sel) * keep[:, None]).reshape(x.shape[0], *([1] * (x.dim() - 2)), -1)
        return y
    g = weights.to(A.dtype)
    gs = g if scale is None else g * scale.to(A.dtype)
    if mode == "delta":
        gs = gs.expand(*x.shape[:-1], gs.shape[-1])
        h = torch.einsum("...i,eri->...er", x, A) * gs[..., None]
        y = torch.einsum("...er,eor->...o", h, B)
        if bias is not None:
            y = y + gs @ bias
        return y
    if mode == "factors":
        if g.dim() != 2 or g.shape[0] != x.shape[0]:
            raise BackendError(f"factor mixing needs one weight vector per row, shape [rows={x.shape[0]}, E], got "
                               f"{tuple(g.shape)}")
        A_u = torch.einsum("be,eri->bri", g, A)
        B_u = torch.einsum("be,eor->bor", gs, B)
        flat = x.reshape(x.shape[0], -1, x.shape[-1])
        y = torch.bmm(torch.bmm(flat, A_u.transpose(1, 2)), B_u.transpose(1, 2)).reshape(*x.shape[:-1], -1)
        if bias is not None:
            y = y + (gs @ bias).reshape(g.shape[0], *([1] * (x.dim() - 2)), -1)
        return y
    raise BackendError(f"unknown mix mode {mode!r}; known: delta, factors")


def stacked_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, *, weights: torch.Tensor | None = None,
                  ids: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, mode: str = "delta", backend: str = "auto") -> torch.Tensor:
    """Op ``stacked`` through the registry (see the module docstring for the semantics)."""
    kwargs = {"weights": weights, "ids": ids, "bias": bias, "scale": scale, "mode": mode}
    return choose_backend("stacked", backend, x, A, B, **kwargs).fn(x, A, B, **kwargs)


register_backend("stacked", "torch", stacked_delta_reference, priority=0)
