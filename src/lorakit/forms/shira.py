"""SHiRA: Sparse High Rank Adapters.

Bhardwaj, Kang, Huang, et al. "Sparse High Rank Adapters", NeurIPS 2024, arXiv 2406.13175.
Official implementation: PEFT 0.21.2 ``tuners/shira`` (``ShiraConfig``, ``mask_functions.py``).

Form (the paper's update, Sec. 3):  W_new = W + α·S,  S sparse with support on a fixed mask M,

    ΔW = α·S,   S[i, j] = s_e for (i, j) = (rows_e, cols_e), e < k,   0 elsewhere,

the k values s trainable and zero at init (so the output equals the base output), the indices
frozen. Budget k = r·(m + n) per layer, the parameter count of a rank-r LoRA (PEFT's sizing; with
the default r = 32 that is 1.56% of a 4096×4096 layer, the paper's "1–2% of the weights").
α = 1 while training (paper; PEFT ``scaling``), adjustable at inference with ``set_scale`` (not saved,
as in PEFT).

Masks (which k entries train):
- ``mask="random"`` (SHiRA-Rand, PEFT's only built-in mask): k entries uniformly at random. With
  ``random_seed`` set the mask is PEFT's ``random_mask`` bit for bit (a fresh generator seeded with
  ``random_seed`` for every layer, so equally-shaped layers share a mask); with ``random_seed=None``
  it draws from torch's global RNG (seeded by ``attach(seed=...)``), so every layer gets its own.
  (PEFT with ``random_seed=None`` uses an unseeded fresh generator, i.e. torch's fixed default seed.)
- ``mask="wm"`` (SHiRA-WM): the k entries of largest |W|.
- SHiRA-Grad (top-k accumulated |∇W| on calibration data) and SHiRA-SNIP (top-k |W ⊙ ∇W|) need
  data and gradients of the frozen base weights: they are the inits ``shira_grad`` and
  ``shira_snip`` (``lorakit.inits.shira_masks``), which call :meth:`Shira.select_top` per layer.
The paper trains SHiRA by masking the gradient of the dense weight; PEFT (and lorakit) store the
values and the indices instead, which is the same update with k instead of m·n trainable numbers.

Fast path: ``apply`` never builds the dense S. It multiplies by S held in CSR form (structure
precomputed once per mask) and has its own backward: ∂x = g·S (CSR of Sᵀ) and ∂s = (gᵀx) sampled at
the mask (``torch.sparse.sampled_addmm``), O(k) memory. Measured here (CPU, 1 thread, 256 tokens,
~1.5% density) against building the dense S and multiplying: forward 0.26 vs 6.5 ms and
forward+backward 1.6 vs 23 ms at 576×576; forward 25 vs 91 ms and forward+backward 84 vs 367 ms at
2048×2048. Devices other than CPU/CUDA and non-fp32/fp64 values fall back to the dense product.

Merge is a scatter of k values (SHiRA's point: switching adapters in the fused mode touches 1–2% of
the weights, no GEMM; ``bench/shira_switch`` measures it against LoRA fusion). The entries a merge
overwrites are recorded, so unmerge writes them back bit-exactly (W + s − s is not W in floating
point); if the weight at the mask no longer holds what the merge wrote (another adapter changed it
since), unmerge subtracts instead. ``merge_into_``/``unmerge_from_`` do the same in place on a weight
for fast adapter switching (``exact=False``: a bare scatter-add, one pass per adapter); the layer's
merge/unmerge use them through the generic ``Form.merge_into`` hook, directly on the base weight's
storage: no dense (out, in) tensor is allocated (no ΔW, no copy of W). Measured (CPU, 1 thread, r=32,
fp32, median of 400, interleaved, shared machine): merge of a 576×576 layer 0.25–0.28 ms (former
clone-scatter-copy path) → 0.15–0.17 ms, unmerge 0.22–0.26 → 0.11 ms; 1536×576: merge 0.58–0.70 →
0.44–0.51 ms, unmerge 0.47–0.64 → 0.20 ms; the generic W + ΔW path takes 0.4–0.9 and 1.0–1.3 ms.
The merged value is computed in the form's dtype and rounded once to the base dtype (as the dense
path W.to(fp32) + ΔW → base dtype), so a bf16 base holds the same bits either way.

PEFT files: tensors ``shira_weight`` (k,) and ``shira_indices`` (2, k) (PEFT writes int32; lorakit
writes int64, PEFT casts on load; float indices from Windows-saved files are accepted). Indices are
kept sorted row-major (values permuted with them), which PEFT's mask order already is.

Pitfalls handled: indices are int64 at use; duplicate or out-of-range indices are refused (a COO
sum would silently add duplicates); k > m·n is refused (as PEFT); per-layer masks by default.
GPT-2 ``Conv1D`` (weight stored (in, out)): indices, ΔW and the fast path are in the (out, in) layout;
merges write through the transposed view (entry (i, j) is storage element j·out + i), so the form
declares CONV1D_OK. PEFT's SHiRA only wraps ``nn.Linear`` (``peft_conv1d = False``): PEFT export of
an adapter on Conv1D layers is refused (no adapter_config.json; lorakit's own files still load).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.caps import Cap
from lorakit.forms.base import Form, init_skipped

# torch warns once per process that CSR support is "beta"; the ops used here are covered by tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

MASKS = ("random", "wm")
DATA_MASKS = {"grad": "shira_grad", "snip": "shira_snip"}


@dataclass(frozen=True)
class ShiraArgs:
    r: int = 32
    mask: str = "random"
    random_seed: int | None = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"shira: r must be >= 1 (k = r·(in + out) entries), got {self.r}")
        if self.mask in DATA_MASKS:
            raise ValueError(f"shira: mask {self.mask!r} needs calibration data: keep mask='random' and use "
                             f"init {DATA_MASKS[self.mask]!r} with batches (lorakit.inits.initialize)")
        if self.mask not in MASKS:
            raise ValueError(f"shira: unknown mask {self.mask!r}; known: {list(MASKS)} "
                             f"(+ inits {sorted(DATA_MASKS.values())})")


def num_entries(in_features: int, out_features: int, r: int) -> int:
    return r * (in_features + out_features)


def random_flat_indices(numel: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """k distinct uniform indices in [0, numel) in O(k log k) (no permutation of all numel)."""
    if generator is not None or 4 * k >= numel:
        return torch.randperm(numel, generator=generator)[:k]
    chosen = torch.empty(0, dtype=torch.long)
    while chosen.numel() < k:
        draws = torch.randint(numel, (k + k // 8 + 16,), generator=generator)
        chosen = torch.unique(torch.cat([chosen, draws]))
    # a uniformly random k-subset of the distinct draws (exchangeable draws: every k-set equally likely)
    return chosen[torch.randperm(chosen.numel(), generator=generator)[:k]]


class _SparseDelta(torch.autograd.Function):
    """y = x · Sᵀ with S (m×n) in CSR form; gradients for x and the k values only."""

    @staticmethod
    def forward(ctx, x, values, crow, cols, crow_t, rows_t, perm_t, m: int, n: int):  # noqa: D102
        s = torch.sparse_csr_tensor(crow, cols, values, (m, n), check_invariants=False)
        ctx.save_for_backward(x, values, crow, cols, crow_t, rows_t, perm_t)
        ctx.shape = (m, n)
        return (s @ x.T).T

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, values, crow, cols, crow_t, rows_t, perm_t = ctx.saved_tensors
        m, n = ctx.shape
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            s_t = torch.sparse_csr_tensor(crow_t, rows_t, values[perm_t], (n, m), check_invariants=False)
            grad_x = (s_t @ grad.T).T
        if ctx.needs_input_grad[1]:
            zeros = torch.zeros_like(values)
            pattern = torch.sparse_csr_tensor(crow, cols, zeros, (m, n), check_invariants=False)
            grad_values = torch.sparse.sampled_addmm(pattern, grad.T.contiguous(), x, beta=0.0).values()
        return grad_x, grad_values, None, None, None, None, None, None, None


class Shira(Form):
    """SHiRA: ΔW = α·S, S sparse on a fixed mask (see the module docstring)."""

    name = "shira"
    Args = ShiraArgs
    caps = Cap.MERGEABLE | Cap.IDENTITY_AT_INIT | Cap.CONV1D_OK | Cap.SPARSE_MASK
    caps |= Cap.QUANTIZED_OK  # hardware; not bf16: sparse CSR addmm has no bf16 CPU kernel
    peft_type = "SHIRA"
    peft_conv1d = False  # PEFT 0.21.2 ShiraModel: "only `torch.nn.Linear` is supported"

    def __init__(self, base_layer: nn.Module, args: ShiraArgs) -> None:
        super().__init__(base_layer, args)
        m, n = self.out_features, self.in_features
        k = num_entries(n, m, args.r)
        if k > m * n:
            raise ValueError(f"shira: r={args.r} gives k = r·(in+out) = {k} entries, more than the "
                             f"{m}×{n} = {m * n} weights of the layer")
        device = base_layer.weight.device
        self.shira_weight = nn.Parameter(torch.zeros(k, device=device))
        self.register_buffer("shira_indices", torch.zeros(2, k, dtype=torch.long, device=device))
        for name in ("_flat", "_crow", "_crow_t", "_rows_t", "_perm_t"):
            self.register_buffer(name, torch.empty(0, dtype=torch.long, device=device), persistent=False)
        self.scale = 1.0
        self._merged: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (original, written, scale)
        if not init_skipped():  # a load sets the file's mask (load_tensors)
            with torch.no_grad():
                self.set_indices(self._initial_mask())

    # -- masks -----------------------------------------------------------------------------
    def _initial_mask(self) -> torch.Tensor:
        m, n = self.out_features, self.in_features
        k = self.shira_weight.numel()
        if self.args.mask == "wm":
            return self.top_indices(self.base_weight.detach().abs())
        gen = None
        if self.args.random_seed is not None:
            gen = torch.Generator().manual_seed(self.args.random_seed)
        flat = random_flat_indices(m * n, k, gen).to(self.shira_indices.device)
        return torch.stack([flat // n, flat % n])

    def top_indices(self, scores: torch.Tensor) -> torch.Tensor:
        """(2, k) indices of the k largest entries of ``scores`` (out, in)."""
        if tuple(scores.shape) != (self.out_features, self.in_features):
            raise ValueError(f"shira: scores of shape {tuple(scores.shape)}, expected "
                             f"{(self.out_features, self.in_features)} (out, in)")
        flat = torch.topk(scores.reshape(-1).float(), self.shira_weight.numel(), sorted=False).indices
        return torch.stack([flat // self.in_features, flat % self.in_features])

    @torch.no_grad()
    def select_top(self, scores: torch.Tensor) -> None:
        """Mask = the k entries with the largest ``scores`` (out, in); values reset to 0."""
        self.set_indices(self.top_indices(scores.to(self.shira_indices.device)))
        self.shira_weight.zero_()

    @torch.no_grad()
    def set_indices(self, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Install a mask ((2, k) row/col indices); ``values`` (k,) come with it if given."""
        m, n = self.out_features, self.in_features
        k = self.shira_weight.numel()
        indices = indices.to(self.shira_indices.device)
        if indices.is_floating_point() and not torch.equal(indices, indices.round()):
            raise ValueError("shira: shira_indices hold non-integer values")
        indices = indices.long()
        if tuple(indices.shape) != (2, k):
            raise ValueError(f"shira: indices of shape {tuple(indices.shape)}, expected (2, {k})")
        rows, cols = indices
        if k and (rows.min() < 0 or cols.min() < 0 or rows.max() >= m or cols.max() >= n):
            raise ValueError(f"shira: indices out of range for a {m}×{n} (out×in) weight")
        flat = rows * n + cols
        order = torch.argsort(flat)
        flat = flat[order]
        if k > 1 and bool((flat[1:] == flat[:-1]).any()):
            raise ValueError("shira: duplicate (row, col) entries in shira_indices")
        self.shira_indices.copy_(indices[:, order])
        if values is not None:
            self.shira_weight.copy_(values.to(self.shira_weight)[order])
        rows, cols = self.shira_indices
        self._flat = rows * n + cols
        self._crow = F.pad(torch.bincount(rows, minlength=m).cumsum(0), (1, 0))
        self._crow_t = F.pad(torch.bincount(cols, minlength=n).cumsum(0), (1, 0))
        self._perm_t = torch.argsort(cols * m + rows)
        self._rows_t = rows[self._perm_t]
        self._merged = None

    # -- semantics -------------------------------------------------------------------------
    def set_scale(self, scale: float) -> None:
        """α at inference (PEFT ``set_scale``); not saved. Unmerge uses the α of the merge."""
        self.scale = float(scale)

    def delta_weight(self) -> torch.Tensor:
        rows, cols = self.shira_indices
        dense = self.shira_weight.new_zeros(self.out_features, self.in_features)
        return dense.index_put((rows, cols), self.shira_weight * self.scale)

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        values = self.shira_weight * self.scale
        if x.device.type not in ("cpu", "cuda") or values.dtype not in (torch.float32, torch.float64):
            return base_out + F.linear(x, self.delta_weight())
        flat = x.reshape(-1, self.in_features)
        if flat.dtype != values.dtype:
            flat = flat.to(values.dtype)
        out = _SparseDelta.apply(flat, values, self._crow, self.shira_indices[1], self._crow_t, self._rows_t,
                                 self._perm_t, self.out_features, self.in_features)
        return base_out + out.reshape(*x.shape[:-1], self.out_features).to(base_out.dtype)

    def _flat_view(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(1-D view of the storage, flat indices of the mask in it) for a contiguous (out, in) weight or
        the transposed view of a contiguous (in, out) one (Conv1D); None for other layouts."""
        if weight.is_contiguous():
            return weight.view(-1), self._flat
        if weight.T.is_contiguous():  # (out, in) view of an (in, out) storage: (i, j) sits at j·out + i
            rows, cols = self.shira_indices
            return weight.T.view(-1), cols * self.out_features + rows
        return None

    def _gather(self, weight: torch.Tensor) -> torch.Tensor:
        flat = self._flat_view(weight)
        if flat is not None:
            return flat[0].index_select(0, flat[1])
        rows, cols = self.shira_indices
        return weight[rows, cols]

    def _scatter(self, weight: torch.Tensor, values: torch.Tensor) -> None:
        flat = self._flat_view(weight)
        if flat is not None:
            flat[0].scatter_(0, flat[1], values)  # (faster than index_copy_ on CPU)
        else:
            rows, cols = self.shira_indices
            weight[rows, cols] = values

    @torch.no_grad()
    def merge_into_(self, weight: torch.Tensor, exact: bool = True) -> torch.Tensor:
        """W[mask] += α·s in place on an (out, in) weight (or view).

        ``exact`` records the k entries it overwrites so that :meth:`unmerge_from_` restores them
        bit for bit; ``exact=False`` is a bare scatter-add (one pass fewer, unmerge subtracts).
        """
        if not exact:
            self._merged = (None, None, self.scale)
            self._add(weight, 1.0)
            return weight
        original = self._gather(weight)
        values = self.shira_weight * self.scale
        # the sum in the form's dtype, rounded once to the weight's (a bf16 base gets what W.float() + ΔW
        # rounds to, as the dense path)
        written = (original.to(values.dtype) + values).to(weight.dtype)
        self._scatter(weight, written)
        # what the base layer will hold after the write (a bf16 base rounds what an fp32 merge wrote)
        stored_dtype = self._base_layer.weight.dtype
        stored = written if stored_dtype == weight.dtype else written.to(stored_dtype).to(weight.dtype)
        self._merged = (original, stored, self.scale)
        return weight

    @torch.no_grad()
    def unmerge_from_(self, weight: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`merge_into_` in place: the recorded entries back (bit-exact), else W[mask] −= α·s."""
        merged = self._merged
        exact = merged is not None and merged[0] is not None and merged[0].dtype == weight.dtype
        if exact and torch.equal(self._gather(weight), merged[1]):
            self._scatter(weight, merged[0])
            return weight
        self._add(weight, -(merged[2] if merged is not None else self.scale))
        return weight

    def _add(self, weight: torch.Tensor, scale: float) -> None:
        """W[mask] += scale·s (one read-modify-write pass)."""
        values = (self.shira_weight * scale).to(weight.dtype)
        flat = self._flat_view(weight)
        if flat is not None:
            flat[0].index_add_(0, flat[1], values)
        else:
            rows, cols = self.shira_indices
            weight.index_put_((rows, cols), values, accumulate=True)

    def merge_into(self, weight: torch.Tensor, sign: float) -> bool:
        """The layer's merge/unmerge hook: the exact in-place scatter (:meth:`merge_into_`, or
        :meth:`unmerge_from_` for ``sign`` < 0) on the base weight itself."""
        if sign > 0:
            self.merge_into_(weight)
        else:
            self.unmerge_from_(weight)
        return True

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.merge_into_(weight.clone())

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.unmerge_from_(weight.clone())

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.shira_weight)

    # -- bookkeeping -----------------------------------------------------------------------
    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: ShiraArgs) -> int:
        return num_entries(in_features, out_features, args.r)

    @classmethod
    def examples(cls) -> list[ShiraArgs]:
        return [ShiraArgs(r=2), ShiraArgs(r=1, mask="wm"), ShiraArgs(r=3, random_seed=7)]

    def save_tensors(self) -> dict[str, torch.Tensor]:
        return {"shira_weight": self.shira_weight.detach(), "shira_indices": self.shira_indices}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        expected = {"shira_weight", "shira_indices"}
        if set(tensors) != expected:
            raise ValueError(f"shira: tensors {sorted(tensors)}, expected {sorted(expected)}")
        k = self.shira_weight.numel()
        shape = tuple(tensors["shira_weight"].shape)
        if shape != (k,):
            raise ValueError(f"shira: shira_weight of shape {shape}, expected ({k},)")
        self.set_indices(tensors["shira_indices"], tensors["shira_weight"])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # a plain load_state_dict (e.g. of a whole model) must also rebuild the CSR structure
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "shira_indices" in state_dict:
            self.set_indices(self.shira_indices.clone(), self.shira_weight.detach().clone())

    @classmethod
    def peft_config(cls, args: ShiraArgs) -> dict[str, Any]:
        # The mask travels as shira_indices; PEFT only uses mask_type/random_seed to build a mask
        # that the file then replaces, so "random" is right for every lorakit mask.
        return {"r": args.r, "mask_type": "random", "random_seed": args.random_seed, "init_weights": True}

    @classmethod
    def args_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        seed = config.get("random_seed")
        return {"r": int(config.get("r", 32)), "random_seed": None if seed is None else int(seed)}
