"""Ensembles of adapters on one frozen base: K members' class scores from one batched forward.

Each member is an adapter already attached or loaded on ``model`` (``lorakit.attach`` / ``lorakit.load``).
A prediction replicates the batch once per member and gives every copy its member's adapter through the
per-row adapter context (``lorakit.mixed_batch``, ``core.context``): one forward computes all K members
(``batched=True``), or one forward per member (``batched=False``). The active-adapter set is not used.

Class scores z_k ∈ R^C of member k, for C classes:

- ``head="lm"``: the next-token logits at each row's last real token restricted to the task's label tokens
  (``train.objectives.last_token_logits`` and ``ClassificationCollator.label_token_ids``), as the lorakit
  objective trains and scores them;
- ``head="seq_cls"``: the logits of a sequence-classification head (``head_logits``; the head's per-adapter
  copy, ``modules_to_save``, follows the per-row ids too).

Combination (``combine``):

- ``"mean_logits"``: z = (1/K) Σ_k z_k (NEAS, Chen et al., CVPR 2021, arXiv 2104.00597: prediction = mean
  of the heads' logits);
- ``"mean_probs"``: z = log((1/K) Σ_k softmax(z_k)) in float64 (the deep-ensemble average of the window
  cascade code, Xia & Bouganis, ICCV 2023, arXiv 2303.08010, ``cascade_results.py``); softmax(z) is the
  averaged distribution.

Cost of a prediction (:class:`Cost`): forward passes, rows per member, wall time, and a FLOP estimate
(lorakit's, the usual 2·params·tokens rule): 2·T·Σ_{layers run} (base + member-adapter parameters of the
linear maps) + 2·R·(parameters of the linear maps outside the layer stack: head, pooler), T = real tokens,
R = rows; attention-score FLOPs are left out.

Prefix reuse (``prefix``/``capture`` in :meth:`Ensemble.run`): when every member adapts only layers ≥ L of
the layer stack (and, outside it, only the head), the input of layer L is the base's and is the same for all
members; a later pass can start there (layers < L are skipped) from the hidden states captured in an earlier
pass (Xia & Bouganis's cascade mapped to LoRA, lorakit's: their members share no computation).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lorakit.core.inject import SavedModule, adapted_layers, mixed_batch, specs
from lorakit.core.layer import AdaptedLayer

COMBINES = ("mean_logits", "mean_probs")
HEADS = ("lm", "seq_cls")


class EnsembleError(ValueError):
    """An ensemble that cannot be built or run (unknown member, bad combine, missing label tokens...)."""


@dataclass
class Cost:
    """What a prediction cost: forward passes, rows per member, seconds, estimated FLOPs."""

    passes: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    flops: float = 0.0

    def add(self, other: Cost) -> Cost:
        rows = dict(self.rows)
        for k, v in other.rows.items():
            rows[k] = rows.get(k, 0) + v
        return Cost(self.passes + other.passes, rows, self.seconds + other.seconds, self.flops + other.flops)

    @property
    def member_rows(self) -> int:
        return sum(self.rows.values())

    def to_dict(self) -> dict[str, Any]:
        return {"passes": self.passes, "rows": dict(self.rows), "member_rows": self.member_rows,
                "seconds": self.seconds, "flops": self.flops}


@dataclass
class Prediction:
    """Combined class scores [N, C], the members' [K, N, C], and the cost."""

    logits: torch.Tensor
    member_logits: torch.Tensor
    members: tuple[str, ...]
    cost: Cost

    @property
    def probs(self) -> torch.Tensor:
        return self.logits.double().softmax(-1)


def combine_logits(member_logits: torch.Tensor, combine: str) -> torch.Tensor:
    """[K, N, C] member scores -> [N, C] combined (see the module docstring)."""
    if combine == "mean_logits":
        return member_logits.double().mean(0)
    if combine == "mean_probs":
        return member_logits.double().softmax(-1).mean(0).log()
    raise EnsembleError(f"unknown combine {combine!r}; known: {', '.join(COMBINES)}")


def replicate(batch: dict[str, Any], k: int) -> dict[str, Any]:
    """The batch repeated ``k`` times along rows (tensors with a row dim; other values as they are)."""
    n = batch_rows(batch)
    return {key: (v.repeat(k, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) and v.dim() and
                  v.shape[0] == n else v) for key, v in batch.items()}


def batch_rows(batch: dict[str, Any]) -> int:
    for key in ("input_ids", "attention_mask"):
        if isinstance(batch.get(key), torch.Tensor):
            return int(batch[key].shape[0])
    raise EnsembleError("a batch needs input_ids (or attention_mask) to count its rows")


def select_rows(batch: dict[str, Any], rows: torch.Tensor) -> tuple[dict[str, Any], int]:
    """(the batch with only ``rows``, its new length): rows are dropped, not masked; trailing columns that
    are padding in every kept row are cut when the batch is right-padded (so the sub-batch runs shorter)."""
    n = batch_rows(batch)
    rows = torch.as_tensor(rows, dtype=torch.long)
    sub = {k: (v.index_select(0, rows.to(v.device)) if isinstance(v, torch.Tensor) and v.dim() and
               v.shape[0] == n else v) for k, v in batch.items()}
    mask = sub.get("attention_mask")
    length = int(sub["input_ids"].shape[1]) if "input_ids" in sub else 0
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.numel() and _right_padded(mask):
        length = max(int(mask.sum(1).max()), 1)
        for k in ("input_ids", "attention_mask", "token_type_ids"):
            if isinstance(sub.get(k), torch.Tensor) and sub[k].dim() == 2:
                sub[k] = sub[k][:, :length]
    return sub, length


def _right_padded(mask: torch.Tensor) -> bool:
    lengths = mask.sum(1)
    expected = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
    return bool((mask.bool() == expected).all())


# -- layer stack, prefix and cost -------------------------------------------------------------------
_INDEXED = re.compile(r"^(.*)\.(\d+)(?:\.|$)")


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(path, ModuleList) of the model's repeated blocks: the ModuleList holding the most adapted layers."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for path, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or ".adapters" in f".{path}" or not len(module):
            continue
        count = sum(isinstance(m, AdaptedLayer) for m in module.modules())
        if count and (best is None or count > best[0]):
            best = (count, path, module)
    return None if best is None else (best[1], best[2])


def _head_paths(model: nn.Module) -> set[str]:
    """Paths of modules that run after the layer stack (output embedding, classification heads)."""
    from lorakit.train.run import head_modules

    out = set()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = set(head_modules(model))
    for path, module in model.named_modules():
        base = module.base_layer if isinstance(module, AdaptedLayer | SavedModule) else module
        if head is not None and (module is head or base is head) or path.rsplit(".", 1)[-1] in names:
            out.add(path)
    return out


def first_adapted_layer(model: nn.Module, members: Sequence[str]) -> int:
    """L: the lowest index of the layer stack any member adapts (0: no prefix to share). Adapted or saved
    modules outside the stack count as layer 0 unless they are heads (they run after the stack)."""
    stack = layer_stack(model)
    if stack is None:
        return 0
    stack_path, layers = stack
    heads = _head_paths(model)
    lowest = len(layers)
    modules = [(p, m) for p, m in adapted_layers(model)]
    modules += [(p, m) for p, m in model.named_modules() if isinstance(m, SavedModule)]
    for path, module in modules:
        if not any(name in module.adapters for name in members):
            continue
        if path in heads:
            continue
        if path.startswith(stack_path + "."):
            lowest = min(lowest, int(path[len(stack_path) + 1:].split(".", 1)[0]))
        else:
            return 0
    return lowest


def _linear_params(module: nn.Module) -> int:
    """Weights of the linear maps a forward runs once (per-adapter copies of saved modules left out)."""
    total = 0
    for path, m in module.named_modules():
        if ".adapters." in f".{path}.":
            continue
        if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D":
            total += m.weight.numel()
    return total


def _adapter_params(module: nn.Module, name: str) -> int:
    total = 0
    for m in module.modules():
        if isinstance(m, AdaptedLayer) and name in m.adapters:
            total += sum(p.numel() for p in m.adapters[name].parameters())
    return total


class _Pass(nn.Module):
    """Stands in for a skipped block: returns its hidden-state input (and reads the original's attributes)."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "_original", original)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


# -- the ensemble -----------------------------------------------------------------------------------
class Ensemble:
    """K adapters on one base; see the module docstring.

    ``label_token_ids`` (``head="lm"``): the token id of each class's label word
    (``ClassificationCollator.label_token_ids``). ``head=None`` picks ``"lm"`` when label tokens are given,
    else ``"seq_cls"``.
    """

    def __init__(self, model: nn.Module, members: Sequence[str], combine: str = "mean_logits", *,
                 head: str | None = None, label_token_ids: Sequence[int] | None = None,
                 batched: bool = True) -> None:
        members = tuple(members)
        if not members:
            raise EnsembleError("an ensemble needs at least one member adapter")
        if len(set(members)) != len(members):
            raise EnsembleError(f"members repeat an adapter: {list(members)}")
        known = specs(model)
        missing = [m for m in members if m not in known]
        if missing:
            raise EnsembleError(f"adapter(s) {missing} are not on the model; it has {sorted(known)}")
        if combine not in COMBINES:
            raise EnsembleError(f"unknown combine {combine!r}; known: {', '.join(COMBINES)}")
        head = head or ("lm" if label_token_ids is not None else "seq_cls")
        if head not in HEADS:
            raise EnsembleError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
        if head == "lm" and not label_token_ids:
            raise EnsembleError("head 'lm' scores label tokens: give label_token_ids (one per class)")
        self.model, self.members, self.combine, self.head = model, members, combine, head
        self.label_token_ids = None if label_token_ids is None else torch.as_tensor(list(label_token_ids))
        self.batched = batched
        self._costs: dict[tuple[str, int], tuple[int, int]] = {}

    # -- scores -------------------------------------------------------------------------------------
    def _class_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        from lorakit.train.objectives import head_logits, last_token_logits

        device = next(self.model.parameters()).device
        batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if self.head == "lm":
            return last_token_logits(self.model, batch)[:, self.label_token_ids.to(device)].float()
        inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return head_logits(self.model, inputs).float()

    @property
    def prefix_layer(self) -> int:
        """L (see :func:`first_adapted_layer`): layers below it are shared by all members."""
        return first_adapted_layer(self.model, self.members)

    @torch.no_grad()
    def run(self, batch: dict[str, Any], members: Sequence[str] | None = None, *,
            capture: dict[str, torch.Tensor] | None = None,
            prefix: torch.Tensor | None = None) -> tuple[torch.Tensor, Cost]:
        """Class scores [K, N, C] of ``members`` (default: all) on ``batch``, and the cost.

        ``capture``: a dict that receives ``"hidden"``, the input of layer :attr:`prefix_layer` for the
        batch's rows (for one member only). ``prefix``: that tensor for these rows; layers below L are then
        skipped (every member of this ensemble must adapt only layers ≥ L).
        """
        members = tuple(members or self.members)
        unknown = [m for m in members if m not in self.members]
        if unknown:
            raise EnsembleError(f"{unknown} are not members of this ensemble {list(self.members)}")
        n = batch_rows(batch)
        level = self.prefix_layer if (capture is not None or prefix is not None) else 0
        if (capture is not None or prefix is not None) and level == 0:
            raise EnsembleError("prefix reuse needs members that adapt only upper layers (the first adapted "
                                "layer is 0: nothing below it to share)")
        if capture is not None and len(members) != 1:
            raise EnsembleError("capture the prefix from one member's pass")
        t0 = time.perf_counter()
        with self._prefix(level, capture, prefix, len(members) if self.batched else 1):
            if self.batched or len(members) == 1:
                with mixed_batch(self.model, [m for m in members for _ in range(n)]):
                    out = self._class_logits(replicate(batch, len(members)) if len(members) > 1 else batch)
                logits, passes = out.reshape(len(members), n, -1), 1
            else:
                parts = []
                for m in members:
                    with mixed_batch(self.model, [m] * n):
                        parts.append(self._class_logits(batch))
                logits, passes = torch.stack(parts), len(members)
        seconds = time.perf_counter() - t0
        tokens = self._tokens(batch)
        start = level if prefix is not None else 0  # a capturing pass still runs every layer
        flops = sum(self.flops(m, tokens, n, start=start) for m in members)
        return logits, Cost(passes, {m: n for m in members}, seconds, flops)

    def predict(self, batch: dict[str, Any]) -> Prediction:
        """All members on ``batch`` and their combination."""
        member_logits, cost = self.run(batch)
        return Prediction(combine_logits(member_logits, self.combine), member_logits, self.members, cost)

    def predict_examples(self, examples: Sequence[Any], collate: Callable[[Sequence[Any]], dict[str, Any]],
                         batch_size: int = 32, members: Sequence[str] | None = None) -> Prediction:
        """:meth:`predict` over ``examples`` in batches of ``batch_size`` (``members`` default all)."""
        if batch_size < 1:
            raise EnsembleError(f"batch_size must be >= 1, got {batch_size}")
        members = tuple(members or self.members)
        parts, cost = [], Cost()
        for i in range(0, len(examples), batch_size):
            logits, c = self.run(collate(examples[i:i + batch_size]), members)
            parts.append(logits)
            cost = cost.add(c)
        if not parts:
            raise EnsembleError("no examples to predict")
        member_logits = torch.cat(parts, dim=1)
        return Prediction(combine_logits(member_logits, self.combine), member_logits, members, cost)

    # -- cost ----------------------------------------------------------------------------------------
    @staticmethod
    def _tokens(batch: dict[str, Any]) -> int:
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            return int(mask.sum())
        return int(batch["input_ids"].numel())

    def flops(self, member: str, tokens: int, rows: int, start: int = 0) -> float:
        """Estimated FLOPs of ``member`` over ``tokens`` real tokens in ``rows`` rows, from layer ``start``."""
        key = (member, start)
        if key not in self._costs:
            stack = layer_stack(self.model)
            if stack is None:
                per_token, per_row = _linear_params(self.model) + _adapter_params(self.model, member), 0
            else:
                _, layers = stack
                per_token = sum(_linear_params(layer) + _adapter_params(layer, member)
                                for layer in list(layers)[start:])
                per_row = _linear_params(self.model) - sum(_linear_params(layer) for layer in layers)
            self._costs[key] = (per_token, per_row)
        per_token, per_row = self._costs[key]
        return 2.0 * tokens * per_token + 2.0 * rows * per_row

    # -- prefix reuse -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _prefix(self, level: int, capture: dict[str, torch.Tensor] | None, prefix: torch.Tensor | None,
                copies: int) -> Iterator[None]:
        if level == 0:
            yield
            return
        stack = layer_stack(self.model)
        assert stack is not None
        _, layers = stack
        handles, originals = [], {}
        if capture is not None:
            def grab(_module: nn.Module, args: tuple, kwargs: dict) -> None:
                capture["hidden"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
            handles.append(layers[level].register_forward_pre_hook(grab, with_kwargs=True))
        if prefix is not None:
            cached = prefix.repeat(copies, *([1] * (prefix.dim() - 1))) if copies > 1 else prefix

            def inject(_module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                if args:
                    if args[0].shape != cached.shape:
                        raise EnsembleError(f"prefix hidden states {tuple(cached.shape)} do not fit the layer input "
                                            f"{tuple(args[0].shape)}")
                    return (cached.to(args[0].dtype), *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": cached}
            handles.append(layers[level].register_forward_pre_hook(inject, with_kwargs=True))
            for i in range(level):
                originals[i] = layers[i]
                layers[i] = _Pass(originals[i])
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            for i, module in originals.items():
                layers[i] = module
