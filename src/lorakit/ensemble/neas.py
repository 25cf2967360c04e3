"""NEAS mapped to LoRA adapters: a one-shot supernet of K adapter paths over one frozen base.

Chen, Peng, Fu, Ling, Li, Wang. "One-Shot Neural Ensemble Architecture Search by Diversity-Guided
Search Space Shrinking", CVPR 2021, arXiv 2104.00597 (code ``researchmm/NEAS``: retrain/test only; the
search code was never released).

Ensemble (the released code, ``lib/models/NEAS_subnet.py::NEAS.forward_features``): a shared trunk, then
K paths. Here the trunk is the transformer layers below a split point s, adapted by ONE shared set of
LoRAs; layers ≥ s hold one LoRA set per path. The trunk runs once per batch, the K upper stacks run on its
output (:func:`run_paths`), and

    GradDivHeads(x) = x  (forward),   ∂L/∂x ← (1/K) · ∂L/∂x  (backward),            [code: GradDivHeads]

sits between the trunk and the paths, so the trunk gets the *mean* of the K path gradients. Loss and
prediction (``train_function.py::train_epoch``, ``valid_function.py::validate``):

    L = Σ_k CE(z_k, y),          z_ens = (1/K) Σ_k z_k       (the mean of logits, not of softmaxes).

Search space (lorakit's mapping of the paper's per-layer operators): per transformer layer ℓ an operator
o_ℓ ∈ ``choices`` (default {0 = no adapter, LoRA r = 2, 4, 8}) applied to every target module of that layer;
K paths; the split point s ∈ ``splits``. As the code's ``arch_list``: split point first, then one choice per
shared layer, then one list per path for the layers above (:class:`Architecture`).

Supernet (paper: one-shot, weight-sharing): per layer and per role (the shared trunk, path k) one DyLoRA of
rank r_max = max(choices) (``forms/dylora.py``, arXiv 2210.07558): a subnet with rank r uses A[:r], B[:, :r]
and scale α/r, i.e. exactly the standalone rank-r LoRA with those factors (α/r, Eq. 4 of arXiv 2106.09685).
Each step samples one architecture uniformly from the current space and takes a step on Σ_k CE_k.

Diversity-guided shrinking: the paper scores operators by "potentiality" and "diversity" and drops the
low scorers periodically, but the formula is not published. **lorakit's choice** (labelled as ours): every
``shrink_every`` steps sample M architectures from the current space, measure on validation batches each
one's ensemble accuracy acc(a) and path diversity div(a) = mean over path pairs of the fraction of rows on
which their argmax predictions differ; then

    score(ℓ, o) = mean_{a ∋ (ℓ, o)} [ acc(a) + λ · div(a) ],

over the sampled a that use o at layer ℓ (as the shared op or in some path); per layer drop the
``shrink_drop`` lowest scores (ties: the later choice), keeping at least ``shrink_min``; unseen choices stay.

Evolutionary search (paper: K-path evolution under a FLOPs budget, split point searched): population,
mutation (split and per-(path, layer) ops), crossover (per layer from either parent), elitism; fitness =
the supernet-inherited validation accuracy of the ensemble (mean of logits); candidates over the budget are
never admitted. Budgets (lorakit's closed forms): ``params`` = Σ_{ℓ<s} r_ℓ·D_ℓ + Σ_k Σ_{ℓ≥s} r_{kℓ}·D_ℓ with
D_ℓ = Σ_{targets in ℓ} (d_in + d_out); ``flops`` per token = Σ_{ℓ<s} (F_ℓ + 2 r_ℓ D_ℓ) + Σ_k Σ_{ℓ≥s}
(F_ℓ + 2 r_{kℓ} D_ℓ), F_ℓ = 2·(weights of the base Linear layers of ℓ): the upper layers run K times, which
is the cost the split point saves. Heads (one per path on a classification model) are not counted.

Retrain (paper: the found architecture is trained from scratch): plain LoRAs at the searched ranks, one
shared adapter for the trunk and one per path (with its own copy of the classification head), same loss and
GradDivHeads; :meth:`NEASEnsemble.save` writes K PEFT adapters (path k = the shared LoRAs + path k's) and
``neas.json`` (split, paths); :func:`load_ensemble` reads them back with the trunk shared again.

Models: any HF model with one ``nn.ModuleList`` of ``config.num_hidden_layers`` blocks (Llama, BERT/MiniLM;
tested on ``tiny_llama`` and a tiny ``BertForSequenceClassification``). The trunk is run once by capturing
the output of block s−1 and replaying it in the K path passes (the blocks below s are swapped for a replay
module during those passes); the embedding lookup is repeated per pass (a gather, no matmul). The
per-layer adapter choice is set on the adapted layers for each pass and restored afterwards, so do not
combine these forwards with gradient checkpointing (backward would re-run blocks with the last path's setting).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core import atomic
from lorakit.core.inject import (
    _saved_wrappers,
    adapted_layers,
    delete,
    exact_pattern,
    mark_trainable,
    set_active,
)
from lorakit.core.layer import AdaptedLayer
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import read_json
from lorakit.strategies.base import Strategy

ARCH_FORMAT = "lorakit-neas-arch"
ENSEMBLE_FORMAT = "lorakit-neas"
SHARED = "neas_shared"
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
MAX_LAYERS = 4096
MAX_PATHS = 64
MAX_RANK = 1 << 16


class NEASError(ValueError):
    """A NEAS setup, architecture or file that cannot be used (the message names the problem)."""


class ArchitectureError(NEASError):
    """An architecture that is malformed, outside the search space or over the budget."""


def path_name(k: int) -> str:
    return f"neas_p{k}"


# -- configuration --------------------------------------------------------------------------------
@dataclass(frozen=True)
class NEASConfig:
    """Search space, supernet training, shrinking and evolution settings (frozen ``Args``-style)."""

    paths: int = 2  # K (the released configs: num_head 2)
    choices: tuple[int, ...] = (0, 2, 4, 8)  # per-layer operator: 0 = no adapter, else the LoRA rank
    targets: tuple[str, ...] = ("q_proj", "v_proj")  # module names inside each block (BERT: query, value)
    splits: tuple[int, ...] | None = None  # allowed split points; None: 0..L
    alpha: float = 8.0  # LoRA α (scale α/r at rank r, as the standalone LoRA)
    budget: str = "params"  # "params" | "flops"
    max_budget: float | None = None  # None: no budget
    label_key: str = "label_index"
    # supernet training
    steps: int = 300
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    # diversity-guided shrinking (lorakit's formula, module docstring)
    shrink_every: int = 0  # 0: no shrinking
    shrink_samples: int = 16  # M sampled architectures per round
    shrink_lambda: float = 1.0  # λ (0: potentiality only)
    shrink_drop: int = 1
    shrink_min: int = 2
    # evolution
    population: int = 20
    generations: int = 10
    mutation_prob: float = 0.2
    max_tries: int = 200  # draws per admitted candidate before giving up on the budget

    def __post_init__(self) -> None:
        choices = tuple(self.choices)
        object.__setattr__(self, "choices", choices)
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.splits is not None:
            object.__setattr__(self, "splits", tuple(sorted(set(self.splits))))
        if not 1 <= self.paths <= MAX_PATHS:
            raise NEASError(f"neas: paths (K) must be in 1..{MAX_PATHS}, got {self.paths}")
        if not choices or len(set(choices)) != len(choices) or any(
                isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= MAX_RANK for c in choices):
            raise NEASError(f"neas: choices must be distinct integers (0 = no adapter, else a rank), got {choices}")
        if max(choices) < 1:
            raise NEASError("neas: choices need at least one rank >= 1")
        if self.budget not in ("params", "flops"):
            raise NEASError(f"neas: budget must be 'params' or 'flops', got {self.budget!r}")
        if self.max_budget is not None and not (self.max_budget > 0 and math.isfinite(self.max_budget)):
            raise NEASError(f"neas: max_budget must be a positive finite number, got {self.max_budget}")
        if self.shrink_every < 0 or self.shrink_samples < 1 or self.shrink_drop < 0 or self.shrink_min < 1:
            raise NEASError("neas: shrink_every >= 0, shrink_samples >= 1, shrink_drop >= 0, shrink_min >= 1")
        if self.population < 2 or self.generations < 0 or not 0 <= self.mutation_prob <= 1:
            raise NEASError("neas: population >= 2, generations >= 0, mutation_prob in [0, 1]")
        if self.steps < 0 or self.batch_size < 1 or self.lr <= 0:
            raise NEASError("neas: steps >= 0, batch_size >= 1, lr > 0")

    @property
    def r_max(self) -> int:
        return max(self.choices)


# -- architecture ---------------------------------------------------------------------------------
def _op(value: Any, where: str, choices: Sequence[int] | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArchitectureError(f"{where}: an operator is an integer rank (0 = no adapter), got {value!r}")
    if not 0 <= value <= MAX_RANK:
        raise ArchitectureError(f"{where}: rank {value} is outside 0..{MAX_RANK}")
    if choices is not None and value not in choices:
        raise ArchitectureError(f"{where}: operator {value} is not in the search space {list(choices)}")
    return value


@dataclass(frozen=True)
class Architecture:
    """An ensemble architecture, encoded as the released code's ``arch_list``: the split point s, one
    operator per shared layer (``shared``, length s), then per path the operators of layers s..L−1."""

    split: int
    shared: tuple[int, ...]
    paths: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if isinstance(self.split, bool) or not isinstance(self.split, int):
            raise ArchitectureError(f"architecture: split must be an integer, got {self.split!r}")
        object.__setattr__(self, "shared", tuple(self.shared))
        object.__setattr__(self, "paths", tuple(tuple(p) for p in self.paths))
        if not 1 <= len(self.paths) <= MAX_PATHS:
            raise ArchitectureError(f"architecture: needs 1..{MAX_PATHS} paths, got {len(self.paths)}")
        if self.split != len(self.shared):
            raise ArchitectureError(f"architecture: split {self.split} but {len(self.shared)} shared operator(s)")
        lengths = {len(p) for p in self.paths}
        if len(lengths) != 1:
            raise ArchitectureError(f"architecture: paths have different lengths {sorted(lengths)}")
        if self.num_layers > MAX_LAYERS or self.num_layers < 1:
            raise ArchitectureError(f"architecture: {self.num_layers} layers (need 1..{MAX_LAYERS})")
        for i, o in enumerate(self.shared):
            _op(o, f"architecture: shared[{i}]", None)
        for k, p in enumerate(self.paths):
            for i, o in enumerate(p):
                _op(o, f"architecture: paths[{k}][{i}]", None)

    @property
    def num_paths(self) -> int:
        return len(self.paths)

    @property
    def num_layers(self) -> int:
        return self.split + len(self.paths[0])

    def ops(self, k: int) -> tuple[int, ...]:
        """Operators of path k over all L layers (the shared ones first)."""
        return self.shared + self.paths[k]

    def op(self, k: int, layer: int) -> int:
        return self.shared[layer] if layer < self.split else self.paths[k][layer - self.split]

    def validate(self, num_layers: int | None = None, *, choices: Sequence[int] | None = None,
                 paths: int | None = None, splits: Sequence[int] | None = None) -> Architecture:
        """Check this architecture against a model's depth and a search space; returns self."""
        if num_layers is not None and self.num_layers != num_layers:
            raise ArchitectureError(f"architecture: has {self.num_layers} layers, the model has {num_layers}")
        if paths is not None and self.num_paths != paths:
            raise ArchitectureError(f"architecture: has {self.num_paths} paths, expected {paths}")
        if splits is not None and self.split not in splits:
            raise ArchitectureError(f"architecture: split {self.split} is not an allowed split {list(splits)}")
        if choices is not None:
            for i, o in enumerate(self.shared):
                _op(o, f"architecture: shared[{i}]", choices)
            for k, p in enumerate(self.paths):
                for i, o in enumerate(p):
                    _op(o, f"architecture: paths[{k}][{i}]", choices)
        return self

    @classmethod
    def from_ops(cls, split: int, path_ops: Sequence[Sequence[int]]) -> Architecture:
        """From K full-depth operator lists; layers below ``split`` take path 0's operator."""
        path_ops = [tuple(p) for p in path_ops]
        return cls(split=split, shared=path_ops[0][:split], paths=tuple(p[split:] for p in path_ops))

    def to_dict(self) -> dict[str, Any]:
        return {"format": ARCH_FORMAT, "version": 1, "split": self.split, "shared": list(self.shared),
                "paths": [list(p) for p in self.paths]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, where: str = "architecture") -> Architecture:
        if not isinstance(data, dict):
            raise ArchitectureError(f"{where}: expected a JSON object, got {type(data).__name__}")
        known = {"format", "version", "split", "shared", "paths"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ArchitectureError(f"{where}: unknown field(s) {unknown}; known: {sorted(known)}")
        if data.get("format") != ARCH_FORMAT or data.get("version") != 1:
            raise ArchitectureError(f"{where}: not a {ARCH_FORMAT!r} version 1 object "
                                    f"(format={data.get('format')!r}, version={data.get('version')!r})")
        shared, paths = data.get("shared"), data.get("paths")
        if not isinstance(shared, list) or not isinstance(paths, list) or not all(isinstance(p, list) for p in paths):
            raise ArchitectureError(f"{where}: 'shared' must be a list and 'paths' a list of lists")
        if len(shared) > MAX_LAYERS or len(paths) > MAX_PATHS or any(len(p) > MAX_LAYERS for p in paths):
            raise ArchitectureError(f"{where}: too many layers or paths")
        try:
            return cls(split=data.get("split"), shared=tuple(shared), paths=tuple(tuple(p) for p in paths))
        except ArchitectureError as e:
            raise ArchitectureError(f"{where}: {e}") from None

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "architecture") -> Architecture:
        if len(text) > 1 << 20:
            raise ArchitectureError(f"{where}: architecture JSON larger than 1 MiB")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as e:
            raise ArchitectureError(f"{where}: not valid JSON ({e})") from None
        return cls.from_dict(data, where)

    def save(self, path: str | Path) -> Path:
        atomic.write_json(path, self.to_dict())
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Architecture:
        return cls.from_dict(read_json(Path(path)), str(path))


# -- GradDivHeads ---------------------------------------------------------------------------------
class GradDivHeads(torch.autograd.Function):
    """Identity forward, gradient × 1/K backward (``NEAS_subnet.py::GradDivHeads``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, k: int) -> torch.Tensor:
        ctx.k = k
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / ctx.k, None


def grad_div_heads(x: torch.Tensor, k: int) -> torch.Tensor:
    if k < 1:
        raise NEASError(f"GradDivHeads needs K >= 1, got {k}")
    return GradDivHeads.apply(x, k)


def _map_floats(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.is_floating_point() else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_map_floats(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_floats(o, fn) for o in obj]
    return obj


# -- the shared-trunk runtime ---------------------------------------------------------------------
def layer_stack(model: nn.Module) -> nn.ModuleList:
    """The model's block list: the outermost ``nn.ModuleList`` of ``config.num_hidden_layers`` modules."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if ".adapters" in f".{name}" or ".base_layer" in f".{name}":
            continue
        if isinstance(module, nn.ModuleList) and (n is None or len(module) == n) and len(module) > 0:
            return module
    raise NEASError(f"neas: cannot find the transformer block list of {type(model).__name__} "
                    f"(an nn.ModuleList of config.num_hidden_layers={n} blocks)")


class _Replay(nn.Module):
    """Stands in for a trunk block during the path passes: returns the trunk's captured output."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


class _TrunkDone(Exception):
    pass


# what each adapted layer of block ℓ runs for path k: (adapter name or None, DyLoRA rank or None)
LayerPlan = Callable[[int, int], tuple[str | None, int | None]]


def _model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def default_logits(output: Any, batch: dict[str, Any]) -> torch.Tensor:
    """[N, C] logits: a classifier's logits as they are; a causal LM's at the last real token
    (``last_index`` if the batch has it, else from a right-padded ``attention_mask``)."""
    logits = output.logits if hasattr(output, "logits") else output
    if logits.dim() == 2:
        return logits
    if "last_index" in batch:
        last = batch["last_index"]
    elif "attention_mask" in batch:
        last = batch["attention_mask"].sum(dim=1) - 1
    else:
        last = torch.full((logits.shape[0],), logits.shape[1] - 1, dtype=torch.long)
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


def run_paths(model: nn.Module, batch: dict[str, Any], *, split: int, num_paths: int, plan: LayerPlan,
              heads: Sequence[str | None] | None = None, logits_fn: Callable[..., torch.Tensor] = default_logits,
              grad_div: bool = True) -> list[torch.Tensor]:
    """Logits [N, C] of each of the K paths. Blocks < ``split`` run once (path 0's plan, which the
    shared layers have in common), then block ``split``.. run once per path on the trunk's output, which
    passes through GradDivHeads(·, K) when ``grad_div``. ``heads[k]``: the adapter whose copy of the
    classification head (``modules_to_save``) path k uses."""
    stack = layer_stack(model)
    n = len(stack)
    if not 0 <= split <= n:
        raise ArchitectureError(f"neas: split {split} outside 0..{n}")
    adapted = [[m for m in block.modules() if isinstance(m, AdaptedLayer)] for block in stack]
    wrappers = [w for _, w in _saved_wrappers(model)]
    saved_active = [(layer, layer.active) for layer in (a for block in adapted for a in block)]
    saved_heads = [(w, w.active) for w in wrappers]
    inputs = _model_inputs(batch)

    def configure(k: int, layers: Iterable[int]) -> None:
        for i in layers:
            name, rank = plan(k, i)
            for layer in adapted[i]:
                if name is not None and name in layer.adapters:
                    layer.active = (name,)
                    if rank is not None:
                        layer.adapters[name].set_rank(rank)
                else:
                    layer.active = ()
        head = heads[k] if heads is not None else None
        for w in wrappers:
            w.active = (head,) if head is not None else ()

    out: list[torch.Tensor] = []
    originals = list(stack)
    try:
        trunk = None
        if split > 0:
            configure(0, range(split))
            captured: list[Any] = []

            def capture(module: nn.Module, args: Any, output: Any) -> None:
                captured.append(output)
                raise _TrunkDone

            handle = stack[split - 1].register_forward_hook(capture)
            try:
                model(**inputs)
            except _TrunkDone:
                pass
            finally:
                handle.remove()
            if not captured:
                raise NEASError("neas: the model never ran its block list (cannot share the trunk)")
            trunk = _map_floats(captured[0], lambda t: grad_div_heads(t, num_paths)) if grad_div else captured[0]
            replay = _Replay(trunk)
            for i in range(split):
                stack[i] = replay
        for k in range(num_paths):
            configure(k, range(split, n))
            out.append(logits_fn(model(**inputs), batch))
    finally:
        for i, block in enumerate(originals):
            stack[i] = block
        for layer, active in saved_active:
            layer.active = active
        for w, active in saved_heads:
            w.active = active
    return out


COMBINE = ("mean_logits", "mean_probs")


def ensemble_logits(path_logits: Sequence[torch.Tensor], combine: str = "mean_logits") -> torch.Tensor:
    """``mean_logits``: z_ens = (1/K) Σ_k z_k (the released code, the default); ``mean_probs``:
    log((1/K) Σ_k softmax(z_k)) (the deep-ensemble convention; an option, not the code's)."""
    stacked = torch.stack(list(path_logits))
    if combine == "mean_logits":
        return stacked.mean(dim=0)
    if combine == "mean_probs":
        return torch.logsumexp(torch.log_softmax(stacked.float(), dim=-1), dim=0) - math.log(len(stacked))
    raise NEASError(f"neas: combine must be one of {COMBINE}, got {combine!r}")


def path_loss(path_logits: Sequence[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """L = Σ_k CE(z_k, y) (``train_function.py::train_epoch``; no label smoothing here)."""
    return sum(F.cross_entropy(z.float(), labels.to(z.device)) for z in path_logits)


def diversity(path_logits: Sequence[torch.Tensor]) -> float:
    """lorakit's diversity: mean over path pairs of the fraction of rows whose argmax differs."""
    preds = [z.argmax(dim=-1) for z in path_logits]
    pairs = [(a, b) for a in range(len(preds)) for b in range(a + 1, len(preds))]
    if not pairs:
        return 0.0
    return float(sum((preds[a] != preds[b]).float().mean().item() for a, b in pairs) / len(pairs))


# -- costs ----------------------------------------------------------------------------------------
def _block_dims(stack: nn.ModuleList, targets: Sequence[str]) -> tuple[list[int], list[int], list[list[str]]]:
    """Per block: D_ℓ = Σ_targets (d_in + d_out), F_ℓ = 2·(Linear weights), the target module names."""
    dims, flops, names = [], [], []
    for block in stack:
        d, f, found = 0, 0, []
        for name, m in block.named_modules():
            if ".adapters" in f".{name}" or ".base_layer" in f".{name}":
                continue
            base = m.base_layer if isinstance(m, AdaptedLayer) else m
            if isinstance(base, nn.Linear):
                f += 2 * base.in_features * base.out_features
                if name.split(".")[-1] in targets:
                    d += base.in_features + base.out_features
                    found.append(name)
        dims.append(d)
        flops.append(f)
        names.append(found)
    return dims, flops, names


class _Costs:
    def __init__(self, dims: Sequence[int], flops: Sequence[int], budget: str, max_budget: float | None) -> None:
        self.dims, self.flops, self.budget, self.max_budget = list(dims), list(flops), budget, max_budget

    def params(self, arch: Architecture) -> int:
        """Σ_{ℓ<s} r_ℓ D_ℓ + Σ_k Σ_{ℓ≥s} r_kℓ D_ℓ (adapter parameters; heads not counted)."""
        shared = sum(r * self.dims[i] for i, r in enumerate(arch.shared))
        return shared + sum(r * self.dims[arch.split + i] for p in arch.paths for i, r in enumerate(p))

    def flops_per_token(self, arch: Architecture) -> int:
        """Σ_{ℓ<s} (F_ℓ + 2 r_ℓ D_ℓ) + Σ_k Σ_{ℓ≥s} (F_ℓ + 2 r_kℓ D_ℓ)."""
        shared = sum(self.flops[i] + 2 * r * self.dims[i] for i, r in enumerate(arch.shared))
        return shared + sum(self.flops[arch.split + i] + 2 * r * self.dims[arch.split + i]
                            for p in arch.paths for i, r in enumerate(p))

    def cost(self, arch: Architecture) -> float:
        return float(self.params(arch) if self.budget == "params" else self.flops_per_token(arch))

    def within(self, arch: Architecture) -> bool:
        return self.max_budget is None or self.cost(arch) <= self.max_budget

    def check(self, arch: Architecture) -> None:
        if not self.within(arch):
            raise ArchitectureError(f"architecture: {self.budget} {self.cost(arch):.0f} exceeds the budget "
                                    f"{self.max_budget:.0f}")


def _head_modules(model: nn.Module) -> list[str]:
    from lorakit.train.run import head_modules

    return head_modules(model)


# -- the supernet ---------------------------------------------------------------------------------
@dataclass
class ShrinkRound:
    step: int
    scores: dict[int, dict[int, float]]  # layer -> choice -> score
    removed: dict[int, list[int]]  # layer -> dropped choices


class NEASSupernet:
    """K+1 rank-sliceable LoRA sets (DyLoRA, r_max = max(choices)) on ``model``: ``neas_shared`` (used by
    blocks below the split) and ``neas_p{k}`` (path k above it, with its own head copy on a classifier)."""

    def __init__(self, model: nn.Module, config: NEASConfig | None = None, *,
                 logits_fn: Callable[..., torch.Tensor] = default_logits) -> None:
        import lorakit

        self.model, self.config, self.logits_fn = model, config or NEASConfig(), logits_fn
        c = self.config
        stack = layer_stack(model)
        self.num_layers = len(stack)
        dims, flops, names = _block_dims(stack, c.targets)
        if not any(dims):
            raise NEASError(f"neas: no module named {list(c.targets)} inside the blocks of {type(model).__name__}")
        self.costs = _Costs(dims, flops, c.budget, c.max_budget)
        self.splits = c.splits if c.splits is not None else tuple(range(self.num_layers + 1))
        if any(not 0 <= s <= self.num_layers for s in self.splits):
            raise NEASError(f"neas: splits {list(self.splits)} must lie in 0..{self.num_layers}")
        self.choices: list[list[int]] = [list(c.choices) for _ in range(self.num_layers)]
        self.shrink_history: list[ShrinkRound] = []
        heads = _head_modules(model)
        stack_prefix = _module_path(model, stack)
        paths = [f"{stack_prefix}.{i}.{n}" for i, block in enumerate(names) for n in block]
        args = {"r": c.r_max, "alpha": c.alpha}
        regex = "|".join(p.replace(".", "[.]") for p in paths)  # exactly the blocks' target modules
        lorakit.attach(model, AdapterSpec(form="dylora", form_args=args, targets=regex), SHARED, seed=c.seed,
                       trainable=False)
        for k in range(c.paths):
            lorakit.attach(model, AdapterSpec(form="dylora", form_args=args, targets=regex, modules_to_save=heads),
                           path_name(k), seed=c.seed + 1 + k, trainable=False)
        self.names = [SHARED, *(path_name(k) for k in range(c.paths))]
        mark_trainable(model, self.names)
        set_active(model, [])

    # -- space --------------------------------------------------------------------------------
    def space_size(self) -> int:
        total = 0
        for s in self.splits:
            shared = math.prod(len(self.choices[i]) for i in range(s))
            upper = math.prod(len(self.choices[i]) for i in range(s, self.num_layers))
            total += shared * upper ** self.config.paths
        return total

    def sample(self, rng: random.Random) -> Architecture:
        """One architecture uniformly per dimension: the split, then each operator from its layer's choices."""
        s = rng.choice(self.splits)
        shared = tuple(rng.choice(self.choices[i]) for i in range(s))
        paths = tuple(tuple(rng.choice(self.choices[i]) for i in range(s, self.num_layers))
                      for _ in range(self.config.paths))
        return Architecture(s, shared, paths)

    def check(self, arch: Architecture, *, budget: bool = True) -> Architecture:
        arch.validate(self.num_layers, paths=self.config.paths, splits=self.splits)
        for k in range(arch.num_paths):
            for i in range(self.num_layers):
                if arch.op(k, i) not in self.choices[i]:
                    raise ArchitectureError(f"architecture: operator {arch.op(k, i)} at layer {i} is not in the "
                                            f"(shrunk) search space {self.choices[i]}")
        if budget:
            self.costs.check(arch)
        return arch

    def params(self, arch: Architecture) -> int:
        return self.costs.params(arch)

    def flops_per_token(self, arch: Architecture) -> int:
        return self.costs.flops_per_token(arch)

    # -- forward ------------------------------------------------------------------------------
    def _plan(self, arch: Architecture) -> LayerPlan:
        def plan(k: int, i: int) -> tuple[str | None, int | None]:
            r = arch.op(k, i)
            if r == 0:
                return None, None
            return (SHARED if i < arch.split else path_name(k)), r
        return plan

    def path_logits(self, batch: dict[str, Any], arch: Architecture) -> list[torch.Tensor]:
        return run_paths(self.model, batch, split=arch.split, num_paths=arch.num_paths, plan=self._plan(arch),
                         heads=[path_name(k) for k in range(arch.num_paths)], logits_fn=self.logits_fn)

    def loss(self, batch: dict[str, Any], arch: Architecture) -> torch.Tensor:
        return path_loss(self.path_logits(batch, arch), batch[self.config.label_key])

    @torch.no_grad()
    def evaluate(self, arch: Architecture, batches: Sequence[dict[str, Any]]) -> dict[str, float]:
        """Ensemble accuracy (mean of logits), mean path accuracy and diversity with the supernet weights."""
        return _evaluate(lambda b: self.path_logits(b, arch), batches, self.config.label_key, self.model)

    # -- training -----------------------------------------------------------------------------
    def train(self, train_data: Sequence[Any], collate: Callable[[list[Any]], Any],
              val_batches: Sequence[dict[str, Any]] | None = None, *, steps: int | None = None,
              train_config: Any = None) -> list[float]:
        """One-shot training: each step samples an architecture and steps on Σ_k CE_k (the Trainer);
        shrinks the space every ``shrink_every`` steps on ``val_batches``. Returns the step losses."""
        from lorakit.train.trainer import TrainConfig, Trainer

        c = self.config
        steps = c.steps if steps is None else steps
        if steps == 0:
            return []
        if c.shrink_every and not val_batches:
            raise NEASError("neas: shrinking (shrink_every > 0) needs val_batches")
        tc = train_config or TrainConfig(steps=steps, batch_size=c.batch_size, lr=c.lr, seed=c.seed,
                                         eval_at_start=False, progress=False, warmup_ratio=0.0)
        rng = random.Random(c.seed)
        supernet = self

        def loss_fn(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
            return supernet.loss(batch, supernet.sample(rng))

        strategies = []
        if c.shrink_every:
            strategies.append(_ShrinkHook(self, val_batches or [], random.Random(c.seed + 7919)))
        self.model.train()
        result = Trainer(self.model, train_data, collate, loss_fn, tc, strategies=strategies).train(resume=False)
        self.model.eval()
        return result.losses

    def shrink(self, val_batches: Sequence[dict[str, Any]], rng: random.Random, step: int = 0) -> ShrinkRound:
        """One round of lorakit's diversity-guided shrinking (module docstring)."""
        c = self.config
        sums: dict[tuple[int, int], list[float]] = {}
        was_training = self.model.training
        self.model.eval()
        try:
            for _ in range(c.shrink_samples):
                arch = self.sample(rng)
                m = self.evaluate(arch, val_batches)
                value = m["accuracy"] + c.shrink_lambda * m["diversity"]
                for i in range(self.num_layers):
                    for o in {arch.op(k, i) for k in range(arch.num_paths)}:
                        sums.setdefault((i, o), []).append(value)
        finally:
            self.model.train(was_training)
        scores: dict[int, dict[int, float]] = {}
        removed: dict[int, list[int]] = {}
        for i in range(self.num_layers):
            seen = {o: sum(sums[(i, o)]) / len(sums[(i, o)]) for o in self.choices[i] if (i, o) in sums}
            scores[i] = seen
            n_drop = min(c.shrink_drop, max(0, len(self.choices[i]) - c.shrink_min), len(seen))
            order = sorted(seen, key=lambda o: (seen[o], -self.choices[i].index(o)))  # ties: later choice first
            drop = order[:n_drop]
            if drop:
                removed[i] = drop
                self.choices[i] = [o for o in self.choices[i] if o not in drop]
        record = ShrinkRound(step, scores, removed)
        self.shrink_history.append(record)
        return record


def _evaluate(fn: Callable[[dict[str, Any]], list[torch.Tensor]], batches: Sequence[dict[str, Any]],
              label_key: str, model: nn.Module) -> dict[str, float]:
    correct = paths_correct = count = 0
    div_sum = 0.0
    for batch in batches:
        zs = fn(batch)
        y = batch[label_key].to(zs[0].device)
        correct += int((ensemble_logits(zs).argmax(-1) == y).sum())
        paths_correct += sum(int((z.argmax(-1) == y).sum()) for z in zs) / len(zs)
        div_sum += diversity(zs) * len(y)
        count += len(y)
    if not count:
        raise NEASError("neas: evaluation needs at least one labelled row")
    return {"accuracy": correct / count, "path_accuracy": paths_correct / count, "diversity": div_sum / count}


def _module_path(model: nn.Module, target: nn.Module) -> str:
    for name, m in model.named_modules():
        if m is target:
            return name
    raise NEASError("neas: block list not found in the model")


class _ShrinkHook(Strategy):
    """Trainer hook: a shrinking round every ``shrink_every`` steps, before the last step."""

    name = "neas_shrink"
    resumable = False

    def __init__(self, supernet: NEASSupernet, val_batches: Sequence[dict[str, Any]], rng: random.Random) -> None:
        super().__init__()
        self.supernet, self.val_batches, self.rng = supernet, val_batches, rng

    def on_step_end(self, ctx: Any, step: int, logs: dict[str, Any]) -> None:
        if step % self.supernet.config.shrink_every == 0 and step < ctx.total_steps:
            rnd = self.supernet.shrink(self.val_batches, self.rng, step)
            logs["neas_removed"] = sum(len(v) for v in rnd.removed.values())


# -- evolutionary search --------------------------------------------------------------------------
@dataclass
class SearchResult:
    architecture: Architecture
    fitness: float
    history: list[dict[str, Any]] = field(default_factory=list)  # per generation: best, mean fitness
    evaluated: dict[str, float] = field(default_factory=dict)  # arch JSON -> fitness


def _random_within(supernet: NEASSupernet, rng: random.Random) -> Architecture:
    for _ in range(supernet.config.max_tries):
        arch = supernet.sample(rng)
        if supernet.costs.within(arch):
            return arch
    raise NEASError(f"neas: no architecture within the {supernet.config.budget} budget "
                    f"{supernet.config.max_budget} in {supernet.config.max_tries} random draws; raise the budget")


def _mutate(supernet: NEASSupernet, arch: Architecture, rng: random.Random) -> Architecture:
    p = supernet.config.mutation_prob
    split = rng.choice(supernet.splits) if rng.random() < p else arch.split
    ops = [[rng.choice(supernet.choices[i]) if rng.random() < p else arch.op(k, i)
            for i in range(supernet.num_layers)] for k in range(arch.num_paths)]
    return Architecture.from_ops(split, ops)


def _crossover(a: Architecture, b: Architecture, rng: random.Random) -> Architecture:
    split = a.split if rng.random() < 0.5 else b.split
    parents = [a if rng.random() < 0.5 else b for _ in range(a.num_layers)]
    ops = [[parents[i].op(k, i) for i in range(a.num_layers)] for k in range(a.num_paths)]
    return Architecture.from_ops(split, ops)


def search(supernet: NEASSupernet, val_batches: Sequence[dict[str, Any]], *,
           fitness: Callable[[Architecture], float] | None = None, seed: int | None = None) -> SearchResult:
    """K-path evolutionary search under the config's budget; fitness = supernet ensemble accuracy on
    ``val_batches`` (or ``fitness(arch)``). Deterministic under ``seed`` (default: the config's)."""
    c = supernet.config
    rng = random.Random(c.seed if seed is None else seed)
    cache: dict[str, float] = {}

    def score(arch: Architecture) -> float:
        key = arch.to_json()
        if key not in cache:
            supernet.check(arch)
            cache[key] = fitness(arch) if fitness is not None else supernet.evaluate(arch, val_batches)["accuracy"]
        return cache[key]

    def admit(make: Callable[[], Architecture]) -> Architecture | None:
        for _ in range(c.max_tries):
            arch = make()
            if supernet.costs.within(arch):
                return arch
        return None

    population = [_random_within(supernet, rng) for _ in range(c.population)]
    history = []
    for gen in range(c.generations + 1):
        ranked = sorted(population, key=lambda a: -score(a))
        fits = [score(a) for a in ranked]
        history.append({"generation": gen, "best": fits[0], "mean": sum(fits) / len(fits),
                        "best_cost": supernet.costs.cost(ranked[0])})
        if gen == c.generations:
            break
        parents = ranked[: max(2, c.population // 2)]
        children: list[Architecture] = []
        while len(parents) + len(children) < c.population:
            if rng.random() < 0.5:
                child = admit(lambda ps=parents: _crossover(rng.choice(ps), rng.choice(ps), rng))
            else:
                child = admit(lambda ps=parents: _mutate(supernet, rng.choice(ps), rng))
            children.append(child if child is not None else _random_within(supernet, rng))
        population = parents + children
    best = max(population, key=lambda a: (score(a), -supernet.costs.cost(a)))
    return SearchResult(best, score(best), history, dict(cache))


# -- standalone retraining and export -------------------------------------------------------------
class NEASEnsemble:
    """A trained K-path ensemble of plain LoRAs on ``model``; the trunk runs once per batch."""

    def __init__(self, model: nn.Module, arch: Architecture, plan: LayerPlan, heads: Sequence[str | None],
                 names: Sequence[str], *, logits_fn: Callable[..., torch.Tensor] = default_logits,
                 label_key: str = "label_index") -> None:
        self.model, self.arch, self._plan, self.heads, self.names = model, arch, plan, list(heads), list(names)
        self.logits_fn, self.label_key = logits_fn, label_key

    def path_logits(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        return run_paths(self.model, batch, split=self.arch.split, num_paths=self.arch.num_paths, plan=self._plan,
                         heads=self.heads, logits_fn=self.logits_fn)

    def logits(self, batch: dict[str, Any], combine: str = "mean_logits") -> torch.Tensor:
        return ensemble_logits(self.path_logits(batch), combine)

    @torch.no_grad()
    def evaluate(self, batches: Sequence[dict[str, Any]]) -> dict[str, float]:
        return _evaluate(self.path_logits, batches, self.label_key, self.model)

    def trainable_params(self) -> int:
        """Adapter and head-copy parameters the K paths use (shared ones once)."""
        seen: dict[int, int] = {}
        blocks = list(layer_stack(self.model))
        for k in range(self.arch.num_paths):
            for i, block in enumerate(blocks):
                name, _ = self._plan(k, i)
                for m in block.modules():
                    if isinstance(m, AdaptedLayer) and name in m.adapters:
                        seen.update({id(p): p.numel() for p in m.adapters[name].parameters()})
        for _, w in _saved_wrappers(self.model):
            for head in self.heads:
                if head is not None and head in w.adapters:
                    seen.update({id(p): p.numel() for p in w.adapters[head].parameters()})
        return sum(seen.values())

    def save(self, out_dir: str | Path, *, base_model_name: str | None = None,
             meta: dict[str, Any] | None = None) -> Path:
        """K PEFT adapters ``path_{k}/`` (the shared LoRAs + path k's, its head copy) and ``neas.json``."""
        import lorakit

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        folders = []
        for k in range(self.arch.num_paths):
            name = f"neas_export{k}"
            _build_export(self.model, self, k, name)
            try:
                folder = f"path_{k}"
                lorakit.save(self.model, out / folder, name, base_model_name=base_model_name,
                             meta={"neas": {"path": k, "split": self.arch.split}, **(meta or {})})
                folders.append(folder)
            finally:
                delete(self.model, name)
        atomic.write_json(out / "neas.json", {"format": ENSEMBLE_FORMAT, "version": 1, "combine": "mean_logits",
                                              "architecture": self.arch.to_dict(), "paths": folders})
        return out


def _targets_of(model: nn.Module, targets: Sequence[str]) -> list[list[str]]:
    stack = layer_stack(model)
    prefix = _module_path(model, stack)
    _, _, names = _block_dims(stack, targets)
    return [[f"{prefix}.{i}.{n}" for n in block] for i, block in enumerate(names)]


def _lora_spec(paths_ranks: dict[str, int], alpha: float, heads: Sequence[str]) -> AdapterSpec:
    regex = "|".join(p.replace(".", "[.]") for p in paths_ranks)
    module_args = {exact_pattern(p): {"r": r} for p, r in paths_ranks.items()}
    return AdapterSpec(form="lora", form_args={"r": max(paths_ranks.values()), "alpha": alpha}, targets=regex,
                       module_args=module_args, modules_to_save=list(heads))


def _build_export(model: nn.Module, ens: NEASEnsemble, k: int, name: str) -> None:
    import lorakit

    ranks: dict[str, int] = {}
    sources: dict[str, str] = {}
    alpha = None
    for path, layer in adapted_layers(model):
        for i in range(ens.arch.num_layers):
            src, _ = ens._plan(k, i)
            if src is not None and src in layer.adapters and _in_block(model, path, i):
                ranks[path] = layer.adapters[src].lora_A.shape[0]
                sources[path] = src
                alpha = layer.adapters[src].args.alpha
    heads = _head_modules(model) if ens.heads[k] is not None else []
    if not ranks:
        raise NEASError(f"neas: path {k} has no adapted layer; a PEFT adapter needs at least one target module")
    lorakit.attach(model, _lora_spec(ranks, alpha or 8.0, heads), name, trainable=False, activate=False)
    with torch.no_grad():
        for path, src in sources.items():
            layer = model.get_submodule(path)
            layer.adapters[name].load_tensors(layer.adapters[src].save_tensors())
        head = ens.heads[k]
        for _, w in _saved_wrappers(model):
            if head in w.adapters and name in w.adapters:
                w.adapters[name].load_state_dict(w.adapters[head].state_dict())


def _in_block(model: nn.Module, path: str, i: int) -> bool:
    prefix = _module_path(model, layer_stack(model))
    return path.startswith(f"{prefix}.{i}.")


def build_ensemble(model: nn.Module, arch: Architecture, *, targets: Sequence[str] = ("q_proj", "v_proj"),
                   alpha: float = 8.0, seed: int = 0, logits_fn: Callable[..., torch.Tensor] = default_logits,
                   label_key: str = "label_index") -> NEASEnsemble:
    """Attach fresh plain LoRAs for ``arch`` (``neas_shared`` below the split, ``neas_p{k}`` above, each
    path with its own head copy on a classifier) and return the (untrained) ensemble."""
    import lorakit

    blocks = _targets_of(model, targets)
    arch.validate(len(blocks))
    heads = _head_modules(model)
    names = []
    shared = {p: r for i, r in enumerate(arch.shared) if r for p in blocks[i]}
    if shared:
        lorakit.attach(model, _lora_spec(shared, alpha, []), SHARED, seed=seed, trainable=False)
        names.append(SHARED)
    head_names: list[str | None] = []
    for k, ops in enumerate(arch.paths):
        upper = {p: r for i, r in enumerate(ops) if r for p in blocks[arch.split + i]}
        if not upper and not heads:
            head_names.append(None)
            continue
        if not upper:
            # a head-only path (e.g. split = L, NEAS-S): a lorakit adapter must target some module, so it
            # carries a dormant rank-1 LoRA on the first target that its plan never activates (lorakit's
            # workaround; not trained, not exported, not counted)
            upper = {next(p for b in blocks for p in b): 1}
        spec = _lora_spec(upper, alpha, heads)
        lorakit.attach(model, spec, path_name(k), seed=seed + 1 + k, trainable=False)
        names.append(path_name(k))
        head_names.append(path_name(k) if heads else None)
    if not names:
        raise NEASError("neas: the architecture adapts no layer")
    mark_trainable(model, names)
    set_active(model, [])

    def plan(k: int, i: int) -> tuple[str | None, int | None]:
        r = arch.op(k, i)
        if r == 0:
            return None, None
        return (SHARED if i < arch.split else path_name(k)), None

    return NEASEnsemble(model, arch, plan, head_names, names, logits_fn=logits_fn, label_key=label_key)


def retrain(model: nn.Module, arch: Architecture, train_data: Sequence[Any], collate: Callable[[list[Any]], Any],
            *, train_config: Any = None, steps: int = 300, batch_size: int = 8, lr: float = 1e-3,
            targets: Sequence[str] = ("q_proj", "v_proj"), alpha: float = 8.0, seed: int = 0,
            logits_fn: Callable[..., torch.Tensor] = default_logits, label_key: str = "label_index") -> NEASEnsemble:
    """Train ``arch`` from scratch on ``model`` (stand-alone: fresh LoRAs at the searched ranks, loss Σ_k CE_k,
    trunk gradient ÷ K) through the Trainer; returns the trained :class:`NEASEnsemble`."""
    from lorakit.train.trainer import TrainConfig, Trainer

    ens = build_ensemble(model, arch, targets=targets, alpha=alpha, seed=seed, logits_fn=logits_fn,
                         label_key=label_key)
    tc = train_config or TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_at_start=False,
                                     progress=False, warmup_ratio=0.0)

    def loss_fn(_: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return path_loss(ens.path_logits(batch), batch[label_key])

    model.train()
    Trainer(model, train_data, collate, loss_fn, tc).train(resume=False)
    model.eval()
    return ens


def load_ensemble(model: nn.Module, folder: str | Path, *,
                  logits_fn: Callable[..., torch.Tensor] = default_logits,
                  label_key: str = "label_index") -> NEASEnsemble:
    """Load an ensemble saved by :meth:`NEASEnsemble.save` (K adapters ``neas_path{k}``). The trunk is shared
    again only if the K adapters hold identical tensors on every block below the split (else refused)."""
    import lorakit

    folder = Path(folder)
    info = read_json(folder / "neas.json")
    if info.get("format") != ENSEMBLE_FORMAT or info.get("version") != 1:
        raise NEASError(f"{folder}/neas.json: not a {ENSEMBLE_FORMAT!r} version 1 file")
    arch = Architecture.from_dict(info.get("architecture"), f"{folder}/neas.json: architecture")
    paths = info.get("paths")
    if not isinstance(paths, list) or len(paths) != arch.num_paths:
        raise NEASError(f"{folder}/neas.json: 'paths' must list {arch.num_paths} folder name(s)")
    blocks = _targets_of(model, ())
    arch.validate(len(blocks))
    names = []
    for k, sub in enumerate(paths):
        if not isinstance(sub, str) or not sub.replace("_", "").isalnum():
            raise NEASError(f"{folder}/neas.json: path folder {sub!r} must be a plain name")
        name = f"neas_path{k}"
        lorakit.load(model, folder / sub, name, activate=False)
        names.append(name)
    for path, layer in adapted_layers(model):
        held = [n for n in names if n in layer.adapters]
        block = next((i for i in range(arch.num_layers) if _in_block(model, path, i)), None)
        if block is None or block >= arch.split or not held:
            continue
        ref = layer.adapters[held[0]].save_tensors()
        for n in held[1:]:
            other = layer.adapters[n].save_tensors()
            if set(other) != set(ref) or any(not torch.equal(other[t], ref[t]) for t in ref):
                raise NEASError(f"{folder}: adapters differ on {path} below the split {arch.split}; "
                                "the trunk cannot be shared")
        if len(held) != arch.num_paths:
            raise NEASError(f"{folder}: only {len(held)} of {arch.num_paths} adapters hold {path} below the split")
    heads = bool(_head_modules(model)) and any(n in w.adapters for _, w in _saved_wrappers(model) for n in names)
    set_active(model, [])

    def plan(k: int, i: int) -> tuple[str | None, int | None]:
        return (names[0] if i < arch.split else names[k]), None

    return NEASEnsemble(model, arch, plan, names if heads else [None] * len(names), names, logits_fn=logits_fn,
                        label_key=label_key)


__all__ = [
    "ArchitectureError", "Architecture", "GradDivHeads", "NEASConfig", "NEASEnsemble", "NEASError", "NEASSupernet",
    "SearchResult", "ShrinkRound", "build_ensemble", "default_logits", "diversity", "ensemble_logits",
    "grad_div_heads", "layer_stack", "load_ensemble", "path_loss", "retrain", "run_paths", "search",
]

