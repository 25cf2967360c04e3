"""Shared parts of the merge family, written once and composed by the methods (as mergekit does).

Notation: adapter n has, per module, ΔW_n = s_n·B_n·A_n with B_n ∈ R^{out×r_n}, A_n ∈ R^{r_n×in} and
s_n = α/r_n (α/√r_n with rsLoRA); w_n is its merge weight (default 1: a sum, i.e. task arithmetic;
pass 1/N for an average).

Parts (each a plain function of tensors):

- reading: :func:`gather` checks the inputs (same base, same modules and shapes, LoRA-like forms) and
  returns per module the factors with the scale FOLDED IN (``B ← s·B``), so ΔW = B·A from then on.
  An adapter whose init rewrote the base (it carries ``initial`` tensors B0, A0) is read as the exact
  equivalent for the original base, [B, −B0]·[A; A0] (rank 2r).
- pooling: :func:`pool` concatenates weighted factors, B = [w_1B_1 … w_NB_N], A = [A_1; …; A_N],
  so B·A = Σ_n w_n ΔW_n exactly (the concatenation–summation equivalence; rank Σr_n).
- sparsifying: :func:`sparsify` keeps a ``density`` fraction of a tensor's entries, by magnitude
  (top-k of |x|, TIES' trim) or at random (Bernoulli(density), DARE's drop), then optionally
  rescales: by 1/density (DARE) or to the original l1/l2/l∞ norm (mergekit's ``rescale``).
- sign consensus: :func:`ties_consensus` elects a sign per entry (sign of the weighted sum, or of the
  sign count) and takes the disjoint (weighted) mean of the entries that agree with it (TIES).
- SVD truncation: :func:`truncate_dense` / :func:`truncate_factors` give the best rank-k factors of
  a dense ΔW / of B·A (Eckart–Young), split evenly B = U_k·Σ_k^½, A = Σ_k^½·V_kᵀ, and the exact
  squared error Σ_{i>k} σ_i².
- :class:`Merger`: the base class. A method sets ``name``, ``Args`` (a frozen dataclass) and
  implements ``merge_module(inputs, weights, index) -> ModuleResult``; ``merge`` does the checks,
  the loop over modules (with a progress bar) and builds the output: a plain ``lora`` AdapterState
  with α = r (s = 1) per module, so it saves in the PEFT format.
- :class:`DenseMerger`: the dense-ΔW pipeline (sparsify → weight → consensus or sum → λ → SVD to
  rank k) that TIES, DARE and magnitude pruning configure.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from lorakit.core.caps import Cap
from lorakit.core.factors import FactorError, LoRAFactors, lora_state, state_factors
from lorakit.core.spec import NoArgs, build_args
from lorakit.core.state import ARCH_KEYS, AdapterState, BaseMismatchError
from lorakit.io.peft import load_state

RESCALES = ("none", "density", "l1", "l2", "linf")
CONSENSUS = ("sum", "count")


class MergeInputError(ValueError):
    """Adapters that cannot be merged together (none given, other modules, not LoRA-like, bad weights)."""


# -- reading and checking the inputs ---------------------------------------------------------------


def read_factors(state: AdapterState, label: str) -> dict[str, LoRAFactors]:
    """module path -> scale-folded factors of one adapter relative to the original base
    (``core.factors``); refuses forms that are not ΔW = s·B·A."""
    cls = state.form_class()
    if Cap.FACTORED_AB | Cap.MERGEABLE not in cls.caps:
        raise MergeInputError(
            f"{label}: form {cls.name!r} is not LoRA-like (ΔW = s·B·A with lora_A/lora_B, capability "
            f"FACTORED_AB); merge methods read such factors. Convert it first with `lorakit export` "
            f"(truncated SVD to a plain LoRA)")
    try:
        return state_factors(state, label=label)
    except FactorError as e:
        raise MergeInputError(str(e)) from e


def _has_fingerprint(base: dict[str, Any]) -> bool:
    return "weight_stats" in base or "weights_hash" in base


def check_bases(states: Sequence[AdapterState], labels: Sequence[str]) -> None:
    """Refuse adapters made for different base models (architecture or weights fingerprint)."""
    from lorakit.models import compare_fingerprints

    ref = next((i for i, s in enumerate(states) if _has_fingerprint(s.base)), 0)
    for i, state in enumerate(states):
        if i == ref:
            continue
        a, b = states[ref].base, state.base
        if _has_fingerprint(a) and _has_fingerprint(b):
            problems = compare_fingerprints(a, b)
        else:  # e.g. a folder written by PEFT: only what both sides say can be compared
            problems = [f"{k}: {a[k]!r} vs {b[k]!r}" for k in ARCH_KEYS
                        if a.get(k) is not None and b.get(k) is not None and a[k] != b[k]]
            if not problems and a.get("name_or_path") and b.get("name_or_path") and \
                    a["name_or_path"] != b["name_or_path"] and not (_has_fingerprint(a) or _has_fingerprint(b)):
                warnings.warn(f"{labels[i]} names base {b['name_or_path']!r}, {labels[ref]} names "
                              f"{a['name_or_path']!r}; merging assumes they are the same model", stacklevel=3)
        if problems:
            raise BaseMismatchError(f"{labels[i]} was made for another base model than {labels[ref]}: "
                                    + "; ".join(problems) + ". Merged adapters must share one base")


def gather(states: Sequence[AdapterState], labels: Sequence[str]) -> tuple[list[str], list[dict[str, LoRAFactors]]]:
    """Check the inputs and read them: (sorted module paths, per adapter {path: factors})."""
    if not states:
        raise MergeInputError("nothing to merge: give at least one adapter")
    check_bases(states, labels)
    factors = [read_factors(s, label) for s, label in zip(states, labels)]
    ref = factors[0]
    for f, label in zip(factors[1:], labels[1:]):
        missing, extra = sorted(set(ref) - set(f)), sorted(set(f) - set(ref))
        if missing or extra:
            parts = ([f"lacks {len(missing)} module(s) of {labels[0]}, e.g. {missing[:3]}"] if missing else []) + \
                    ([f"has {len(extra)} module(s) {labels[0]} lacks, e.g. {extra[:3]}"] if extra else [])
            raise MergeInputError(f"{label} adapts other modules than {labels[0]}: {'; '.join(parts)}. "
                                  "Merged adapters must share base and targets")
        for path, x in ref.items():
            y = f[path]
            if (x.B.shape[0], x.A.shape[1]) != (y.B.shape[0], y.A.shape[1]):
                raise BaseMismatchError(f"{label}: module {path} is (out, in) = {(y.B.shape[0], y.A.shape[1])}, "
                                        f"{labels[0]} has {(x.B.shape[0], x.A.shape[1])}: different base models")
    return sorted(ref), factors


def resolve_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """One finite weight per adapter; default 1.0 each (a sum)."""
    if weights is None:
        return [1.0] * n
    try:
        w = [float(x) for x in weights]
    except (TypeError, ValueError) as e:
        raise MergeInputError(f"weights must be numbers, got {weights!r}") from e
    if len(w) != n:
        raise MergeInputError(f"{len(w)} weight(s) given for {n} adapter(s); give exactly one weight per adapter")
    if not all(math.isfinite(x) for x in w):
        raise MergeInputError(f"weights must be finite, got {w}")
    return w


# -- the math parts -------------------------------------------------------------------------------


def merged_bias(inputs: Sequence[LoRAFactors], weights: Sequence[float]) -> torch.Tensor | None:
    """Σ_n w_n·s_n·bias_n (bias terms are linear, so every method combines them this way)."""
    biases = [(w, f.bias) for f, w in zip(inputs, weights) if f.bias is not None]
    if not biases:
        return None
    return sum((w * b for w, b in biases[1:]), biases[0][0] * biases[0][1])


def pool(inputs: Sequence[LoRAFactors], weights: Sequence[float]) -> LoRAFactors:
    """Concatenation of weighted factors: B = [w_1B_1 … w_NB_N], A = [A_1; …; A_N], so that
    B·A = Σ_n w_n·ΔW_n exactly (rank Σ r_n). Column i of B with row i of A is one MSU (rank-1 unit)."""
    B = torch.cat([w * f.B for f, w in zip(inputs, weights)], dim=1)
    A = torch.cat([f.A for f in inputs], dim=0)
    return LoRAFactors(B=B, A=A, bias=merged_bias(inputs, weights))


def magnitude_mask(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the int(density·numel) entries of largest |x| (TIES' trim; PEFT's magnitude prune)."""
    if density >= 1:
        return torch.ones_like(tensor, dtype=torch.bool)
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=torch.bool, device=tensor.device)
    if k > 0:
        mask[torch.topk(tensor.abs().flatten(), k, sorted=False).indices] = True
    return mask.view_as(tensor)


def random_mask(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Boolean mask keeping each entry with probability ``density`` (DARE's drop, p = 1 − density)."""
    if density >= 1:
        return torch.ones_like(tensor, dtype=torch.bool)
    return torch.bernoulli(torch.full(tensor.shape, density, dtype=torch.float32), generator=generator).bool()


def _norm(t: torch.Tensor, how: str) -> torch.Tensor:
    return {"l1": lambda: t.abs().sum(), "l2": lambda: t.norm(), "linf": lambda: t.abs().max()}[how]()


def sparsify(tensor: torch.Tensor, density: float, method: str, *, rescale: str = "none",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep a ``density`` fraction of ``tensor`` (``method`` "magnitude" or "random"), then rescale:
    "density" multiplies by 1/density (DARE, unbiased in expectation), "l1"/"l2"/"linf" restore the
    original norm (mergekit), "none" leaves the kept entries as they are."""
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if method == "magnitude":
        mask = magnitude_mask(tensor, density)
    elif method == "random":
        if generator is None:
            raise ValueError("random sparsification needs a seeded torch.Generator")
        mask = random_mask(tensor, density, generator)
    else:
        raise ValueError(f"unknown sparsification {method!r}; known: magnitude, random")
    kept = tensor * mask
    if rescale == "none" or density >= 1:
        return kept
    if rescale == "density":
        return kept / density
    if rescale not in RESCALES:
        raise ValueError(f"unknown rescale {rescale!r}; known: {', '.join(RESCALES)}")
    before, after = _norm(tensor, rescale), _norm(kept, rescale)
    return kept if before < 1e-12 or after < 1e-12 else kept * (before / after)


def elect_sign(weighted: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Per entry, +1 or −1: the sign of Σ_n w_nτ_n ("sum", the TIES paper) or of Σ_n sign(w_nτ_n)
    ("count"); zero elects +1."""
    if method == "sum":
        total = weighted.sum(dim=0)
    elif method == "count":
        total = weighted.sign().sum(dim=0)
    else:
        raise ValueError(f"unknown sign consensus {method!r}; known: {', '.join(CONSENSUS)}")
    return torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)


def ties_consensus(deltas: torch.Tensor, weights: torch.Tensor, method: str = "sum",
                   normalize: bool = True) -> torch.Tensor:
    """TIES elect + disjoint merge over ``deltas`` (N, ...): weighted τ'_n = w_nτ_n, elected sign γ,
    agreement mask m_n = [sign(τ'_n) = γ]; result Σ_n m_nτ'_n, divided by Σ_n m_nw_n when
    ``normalize`` (the disjoint mean; with equal weights exactly the TIES paper's mean over agreeing
    entries; entries nobody agrees with are 0)."""
    w = weights.to(deltas.dtype).view(-1, *([1] * (deltas.dim() - 1)))
    weighted = deltas * w
    agree = (weighted.sign() == elect_sign(weighted, method)).to(deltas.dtype)
    mixed = (weighted * agree).sum(dim=0)
    if normalize:
        divisor = (w * agree).sum(dim=0)
        mixed = mixed / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return mixed


@dataclass
class Truncation:
    B: torch.Tensor  # (out, k)
    A: torch.Tensor  # (k, in)
    err_sq: float  # ‖M − B·A‖_F² = Σ_{i>k} σ_i²
    norm_sq: float  # ‖M‖_F² = Σ σ_i²

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.err_sq / self.norm_sq) if self.norm_sq > 0 else 0.0


def _split(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor, k: int, shape: tuple[int, int]) -> Truncation:
    """Balanced rank-k factors from an SVD (zero-padded when fewer than k singular values exist)."""
    j = min(k, S.numel())
    root = S[:j].sqrt()
    B = torch.zeros(shape[0], k, dtype=torch.float32, device=U.device)
    A = torch.zeros(k, shape[1], dtype=torch.float32, device=U.device)
    B[:, :j] = (U[:, :j] * root).float()
    A[:j] = (root[:, None] * Vh[:j]).float()
    s2 = S.double().pow(2)
    return Truncation(B=B, A=A, err_sq=float(s2[j:].sum()), norm_sq=float(s2.sum()))


def truncate_dense(M: torch.Tensor, k: int) -> Truncation:
    """Best rank-k factors of a dense (out, in) matrix (Eckart–Young)."""
    if k < 1:
        raise ValueError(f"rank k must be >= 1, got {k}")
    U, S, Vh = torch.linalg.svd(M.float(), full_matrices=False)
    return _split(U, S, Vh, k, tuple(M.shape))


def truncate_factors(B: torch.Tensor, A: torch.Tensor, k: int) -> Truncation:
    """Best rank-k factors of B·A without forming it: B = Q_bR_b, Aᵀ = Q_aR_a, SVD of the small
    R_bR_aᵀ = UΣVᵀ, so B·A = (Q_bU)Σ(Q_aV)ᵀ (float64 inside)."""
    if k < 1:
        raise ValueError(f"rank k must be >= 1, got {k}")
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    return _split(Qb @ U, S, Vh @ Qa.T, k, (B.shape[0], A.shape[1]))


def module_generator(seed: int, index: int) -> torch.Generator:
    """The generator of module number ``index`` (sorted module order): seed·1_000_003 + index."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(index))


# -- the Merger base --------------------------------------------------------------------------------




@dataclass
class ModuleResult:
    """One merged module: factors of ΔW (scale 1), a bias, and the truncation error if any."""

    B: torch.Tensor
    A: torch.Tensor
    bias: torch.Tensor | None = None
    err_sq: float | None = None
    norm_sq: float | None = None


def load_inputs(items: Sequence[Any]) -> tuple[list[AdapterState], list[str]]:
    states, labels = [], []
    for i, item in enumerate(items):
        if isinstance(item, AdapterState):
            states.append(item)
            labels.append(f"adapter #{i}")
        elif isinstance(item, (str, Path)):
            states.append(load_state(item))
            labels.append(str(item))
        else:
            raise MergeInputError(f"item #{i} to merge is a {type(item).__name__}; give AdapterStates or folders")
    return states, labels


class Merger:
    """Base of the merge methods: ``Merger(**args).merge(states, weights) -> AdapterState``.

    Subclasses set ``name``, ``Args`` (frozen dataclass, defaults from the paper) and implement
    :meth:`merge_module`; :meth:`validate` may refuse inputs before any work is done.
    """

    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs
    caps: ClassVar[Cap] = Cap.NONE

    def __init__(self, **args: Any) -> None:
        self.args = build_args(self.Args, args, owner=f"merge method {self.name!r}")

    def validate(self, ranks: dict[str, list[int]]) -> None:
        """Refuse what this method cannot do; ``ranks`` maps module path -> the inputs' ranks."""

    def merge_module(self, inputs: list[LoRAFactors], weights: list[float], index: int) -> ModuleResult:
        raise NotImplementedError(f"merge method {self.name!r} must implement merge_module()")

    def merge(self, states: Sequence[AdapterState | str | Path], weights: Sequence[float] | None = None, *,
              progress: bool = False) -> AdapterState:
        """Merge ``states`` (AdapterStates or adapter folders) with ``weights`` into one LoRA state.

        The result's ``meta["merge"]`` reports the method, inputs, weights, args, output rank(s),
        the relative truncation error ‖M − B·A‖_F/‖M‖_F (None for exact methods) and the seconds.
        """
        start = time.perf_counter()
        states, labels = load_inputs(list(states))
        paths, factors = gather(states, labels)
        w = resolve_weights(weights, len(states))
        self.validate({p: [f[p].rank for f in factors] for p in paths})
        results: dict[str, ModuleResult] = {}
        with torch.no_grad():
            for i, path in enumerate(tqdm(paths, desc=f"merge ({self.name})", unit="module", leave=False,
                                          disable=not progress)):
                results[path] = self.merge_module([f[path] for f in factors], w, i)
        return build_state(self, results, states, labels, w, time.perf_counter() - start)


def build_state(merger: Merger, results: dict[str, ModuleResult], states: Sequence[AdapterState],
                labels: Sequence[str], weights: Sequence[float], seconds: float) -> AdapterState:
    """A plain ``lora`` AdapterState (α = r per module, so s = 1) holding the merged factors."""
    ranks = {p: r.A.shape[0] for p, r in results.items()}
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    first = states[0]
    errs = {p: r for p, r in results.items() if r.err_sq is not None}
    err_sq, norm_sq = sum(r.err_sq for r in errs.values()), sum(r.norm_sq or 0.0 for r in errs.values())
    report = {
        "method": merger.name,
        "inputs": list(labels),
        "weights": list(weights),
        "args": dataclasses.asdict(merger.args),
        "rank": default_r,
        "ranks": sorted(set(ranks.values())),
        "modules": len(results),
        "relative_error": (math.sqrt(err_sq / norm_sq) if norm_sq > 0 else 0.0) if errs else None,
        "module_errors": {p: (math.sqrt(r.err_sq / r.norm_sq) if r.norm_sq else 0.0) for p, r in errs.items()},
        "seconds": seconds,
    }
    meta: dict[str, Any] = {"peft_target_modules": first.meta.get("peft_target_modules"),
                            "fan_in_fan_out": bool(first.meta.get("fan_in_fan_out", False)), "merge": report}
    if first.meta.get("task_type"):
        meta["task_type"] = first.meta["task_type"]
    base = next((s.base for s in states if _has_fingerprint(s.base)), first.base)
    return lora_state({p: LoRAFactors(B=r.B, A=r.A, bias=r.bias) for p, r in results.items()}, base=base,
                      meta=meta, targets=first.spec.targets, exclude=first.spec.exclude)


def summary(state: AdapterState) -> str:
    """One line: method, inputs, output rank, seconds, truncation error where there is one."""
    r = state.meta["merge"]
    ranks = r["ranks"]
    rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}..{ranks[-1]} (per module)"
    err = "" if r["relative_error"] is None else f", relative truncation error {r['relative_error']:.3e}"
    return (f"{r['method']}: merged {len(r['inputs'])} adapters over {r['modules']} modules into rank {rank} "
            f"in {r['seconds']:.2f}s{err}")


# -- the dense-ΔW pipeline (TIES, DARE, magnitude pruning) -------------------------------------------


class DenseMerger(Merger):
    """Per module: τ_n = ΔW_n (dense, scale folded) → sparsify (``sparsifier``) → weighted sum, or
    TIES consensus when ``uses_consensus`` → ×λ → best rank-k LoRA (k default: the largest input rank).
    Args fields read: ``k``, ``lam`` and, as the method needs, ``density``, ``rescale``, ``seed``,
    ``consensus``, ``normalize``."""

    sparsifier: ClassVar[str | None] = None
    uses_consensus: ClassVar[bool] = False

    def dense_merge(self, inputs: list[LoRAFactors], weights: list[float], index: int) -> torch.Tensor:
        a = self.args
        generator = module_generator(getattr(a, "seed", 0), index) if self.sparsifier == "random" else None
        taus = []
        for f in inputs:
            tau = f.delta()
            if self.sparsifier is not None:
                tau = sparsify(tau, a.density, self.sparsifier, rescale=getattr(a, "rescale", "none"),
                               generator=generator)
            taus.append(tau)
        stacked = torch.stack(taus)
        w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device)
        if self.uses_consensus:
            merged = ties_consensus(stacked, w, a.consensus, a.normalize)
        else:
            merged = (stacked * w.view(-1, 1, 1)).sum(dim=0)
        return merged * a.lam

    def merge_module(self, inputs: list[LoRAFactors], weights: list[float], index: int) -> ModuleResult:
        merged = self.dense_merge(inputs, weights, index)
        k = self.args.k or max(f.rank for f in inputs)
        t = truncate_dense(merged, k)
        bias = merged_bias(inputs, weights)
        return ModuleResult(B=t.B, A=t.A, bias=None if bias is None else bias * self.args.lam,
                            err_sq=t.err_sq, norm_sq=t.norm_sq)
