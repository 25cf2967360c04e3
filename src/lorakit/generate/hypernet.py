"""A Text-to-LoRA-style hypernetwork (Charakorn et al., "Text-to-LoRA: Instant Transformer Adaption",
ICML 2025, arXiv 2506.06105; code ``SakanaAI/text-to-lora``): the strong peer baseline of ``generate/``.

One network generates every LoRA of the adapter. For a task embedding e (a description embedding, or any
condition), a layer depth l and a module type m (e.g. ``self_attn.q_proj``):

    u(e, l, m) = [LN(W_e e + b_e),  LN(E_depth[l]),  LN(E_type[m])]                 (T2L's "linear" encoder)
    h = MLP₃(Res₂(Res₁(Mixer(u))))                  (T2L's mixer, two residual MLP blocks, projection)
    [vec(A_{l,m}), vec(B_{l,m}ᵀ)] = H_m h + β_m ∈ R^{r_m (in_m + out_m)}      (one linear head per type)

A_{l,m} ∈ R^{r×in}, B_{l,m} ∈ R^{out×r} (the head emits B as [r, out] and transposes, as T2L). All
(layer, module) pairs of the layout are one batch through the trunk; each type's rows then go through
that type's head. The (layer, type, A/B shape) of every tensor is read from the bank layout's slot keys
(``<prefix>.<layer>.<module path>.lora_A.weight`` / ``.lora_B.weight``); layouts this cannot parse
(no layer index, biases, DoRA magnitudes, other forms, types whose shape differs across layers) are
refused.

Training (both as T2L):

- **reconstruction** (``fit``; ``scripts/train_hyper_recon.py``): MSE to the bank's checkpoints,
  optionally in element-wise z-score space, x = (v − mean_v) / std_v over all training checkpoints
  (T2L's ``pred_z_score`` with ``mean_recon_target`` / ``std_recon_target``); generation de-normalises
  x̂ · std + mean. T2L has one oracle LoRA per task; with several checkpoints per task each step draws
  one at random per task (lorakit's choice; equal to MSE to the task mean up to a constant).
- **SFT** (``fit_sft``; ``scripts/train_custom_sft.py``): end-to-end through the frozen base's task
  loss: the generated A, B replace the parameters of a lorakit adapter attached to the base, through
  ``torch.func.functional_call`` (gradients flow into the hypernetwork only), plus
  λ · Σ_m (mean(A_m²) + mean(B_m²)) over the generated weights of each module type, λ = 1e-3 (T2L's
  ``l2_reg_generated_w``). Needs no bank: :meth:`TextToLoRA.for_model` builds the layout from a spec.

Head initialisation ``head_init``: ``"lora"`` (T2L's ``match_lora_init``, bias-HyperInit): head weight 0
and bias = a Kaiming-uniform A and B = 0, so the first generated adapter is LoRA's own init (ΔW = 0);
``"zero"`` (T2L's ``zero_init_head``, with the bias zeroed too); ``"default"``: PyTorch's. T2L's head
has no bias unless ``head_use_bias``; here it always has one (lorakit's choice; needed for ``"lora"``).
Not implemented from T2L: the discrete/VQ/softmax task encoders, shared A/B heads, autoregressive
rank generation, label smoothing and NEFTune noise in SFT.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.spec import AdapterSpec
from lorakit.generate.bank import BankLayout, CheckpointBank
from lorakit.generate.base import Generator, GeneratorError

_KEY = re.compile(r"^(?P<pre>(?:[^.]+\.)*?)(?P<layer>\d+)\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
HEAD_INITS = ("lora", "zero", "default")
LossFn = Callable[[nn.Module, Any], torch.Tensor]
BoundLoss = Callable[[Any, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # (batch, c) -> (task loss, x)


@dataclass(frozen=True)
class TextToLoRAArgs:
    latent_size: int = 128  # T2L default; the trunk width is latent/2 + latent/4 + latent/4
    head_in_size: int = 512  # T2L default
    dropout: float = 0.05  # T2L
    head_init: str = "lora"  # lora (T2L match_lora_init) | zero (T2L zero_init_head) | default
    z_score: bool = True  # reconstruction targets as element-wise z-scores (T2L pred_z_score)
    steps: int = 1000
    lr: float = 1e-3
    batch_tasks: int = 0  # tasks per reconstruction step (0: all)
    weight_decay: float = 1e-2  # T2L's SFT script
    l2: float = 1e-3  # T2L l2_reg_generated_w (SFT)
    max_grad_norm: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.latent_size < 4 or self.head_in_size < 1:
            raise ValueError(f"text_to_lora: latent_size >= 4 and head_in_size >= 1 required, got "
                             f"{self.latent_size}, {self.head_in_size}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"text_to_lora: dropout must be in [0, 1), got {self.dropout}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"text_to_lora: head_init must be one of {HEAD_INITS}, got {self.head_init!r}")
        if self.steps < 0 or self.lr <= 0 or self.batch_tasks < 0 or self.l2 < 0 or self.weight_decay < 0 \
                or self.max_grad_norm <= 0:
            raise ValueError("text_to_lora: steps >= 0, lr > 0, batch_tasks >= 0, l2 >= 0, weight_decay >= 0 "
                             "and max_grad_norm > 0 required")


@dataclass(frozen=True)
class ModuleType:
    """One target module type (e.g. ``self_attn.q_proj``) and the LoRA shapes it has at every depth."""

    name: str
    in_features: int
    out_features: int
    rank: int

    @property
    def head_size(self) -> int:
        return self.rank * (self.in_features + self.out_features)


@dataclass(frozen=True)
class Site:
    """One (layer, module type) pair and the layout slots of its A and B."""

    layer: int
    type_index: int
    a_slot: int
    b_slot: int


def parse_lora_layout(layout: BankLayout) -> tuple[list[ModuleType], list[Site], int]:
    """(module types, sites, number of layers) of a plain-LoRA layout, or a GeneratorError naming the problem."""
    where = "text_to_lora cannot generate this adapter"
    if layout.spec.form != "lora":
        raise GeneratorError(f"{where}: it generates plain LoRA factors A, B; the bank's form is "
                             f"{layout.spec.form!r}")
    if layout.spec.form_args.get("freeze_A") or layout.spec.form_args.get("bias"):
        raise GeneratorError(f"{where}: freeze_A / bias LoRA variants are not generated")
    groups: dict[tuple[int, str], dict[str, int]] = {}
    prefixes = set()
    for i, slot in enumerate(layout.slots):
        m = _KEY.match(slot.key)
        if m is None or len(slot.shape) != 2:
            raise GeneratorError(f"{where}: tensor {slot.key!r} (shape {slot.shape}) is not "
                                 "'<prefix>.<layer>.<module>.lora_A.weight' / '.lora_B.weight' with a 2-D shape")
        prefixes.add(m["pre"])
        groups.setdefault((int(m["layer"]), m["module"]), {})[m["ab"]] = i
    if len(prefixes) > 1:
        raise GeneratorError(f"{where}: its tensors come from more than one layer stack ({sorted(prefixes)})")
    types: dict[str, ModuleType] = {}
    sites = []
    for (layer, module), ab in sorted(groups.items()):
        if set(ab) != {"A", "B"}:
            raise GeneratorError(f"{where}: layer {layer} module {module!r} lacks lora_{'B' if 'A' in ab else 'A'}")
        (r, fan_in), (fan_out, r_b) = layout.slots[ab["A"]].shape, layout.slots[ab["B"]].shape
        if r != r_b:
            raise GeneratorError(f"{where}: layer {layer} module {module!r} has A rank {r} and B rank {r_b}")
        t = ModuleType(module, fan_in, fan_out, r)
        if types.setdefault(module, t) != t:
            raise GeneratorError(f"{where}: module type {module!r} has shapes {types[module]} and {t} at different "
                                 "layers (one head per type needs one shape)")
        sites.append((layer, module, ab["A"], ab["B"]))
    names = sorted(types)
    out = [Site(layer, names.index(module), a, b) for layer, module, a, b in sites]
    return [types[n] for n in names], out, max(s.layer for s in out) + 1


class _Residual(nn.Module):
    """T2L's ``MLPResidualBlock`` (pre-LayerNorm, post-dropout)."""

    def __init__(self, d: int, p: float) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(p), nn.Linear(4 * d, d),
                                 nn.SiLU(), nn.Dropout(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(x)


class _LossOf(nn.Module):
    """``loss_fn(model, batch)`` as a module, so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy; labels default to the input ids."""
    ids = batch["input_ids"]
    return model(input_ids=ids, attention_mask=batch.get("attention_mask"), labels=batch.get("labels", ids)).loss


class TextToLoRA(Generator):
    """One hypernetwork for all (layer, module type) pairs, per-type heads, trained by reconstruction or SFT."""

    name = "text_to_lora"
    Args = TextToLoRAArgs

    def __init__(self, layout: BankLayout, cond_dim: int, args: TextToLoRAArgs | None = None, *,
                 encoder: str | None = None) -> None:
        super().__init__(layout, cond_dim, args, encoder=encoder)
        a: TextToLoRAArgs = self.args
        self.module_types, self.sites, self.num_layers = parse_lora_layout(layout)
        enc, emb = a.latent_size // 2, a.latent_size // 4
        d = enc + 2 * emb
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(a.seed)
            self.task_encoder = nn.Sequential(nn.Linear(cond_dim, enc), nn.LayerNorm(enc))
            self.depth_embedding = nn.Sequential(nn.Embedding(self.num_layers, emb), nn.LayerNorm(emb))
            self.type_embedding = nn.Sequential(nn.Embedding(len(self.module_types), emb), nn.LayerNorm(emb))
            p = a.dropout
            self.mixer = nn.Sequential(nn.Dropout(p), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(p),
                                       nn.Linear(4 * d, d), nn.SiLU(), nn.Dropout(p))
            self.mlp1, self.mlp2 = _Residual(d, p), _Residual(d, p)
            self.mlp3 = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.SiLU(), nn.Dropout(p),
                                      nn.Linear(4 * d, a.head_in_size), nn.SiLU())
            self.heads = nn.ModuleList(nn.Linear(a.head_in_size, t.head_size) for t in self.module_types)
            self._init_heads()
        self.register_buffer("target_mean", torch.zeros(layout.dim))
        self.register_buffer("target_std", torch.ones(layout.dim))
        self._build_index()

    def _init_heads(self) -> None:
        if self.args.head_init == "default":
            return
        with torch.no_grad():
            for head, t in zip(self.heads, self.module_types):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)
                if self.args.head_init == "lora":  # lorakit's LoRA init of A (as PEFT), B = 0
                    a_init = torch.empty(t.rank, t.in_features)
                    nn.init.kaiming_uniform_(a_init, a=math.sqrt(5))
                    head.bias[:t.rank * t.in_features] = a_init.flatten()

    def _build_index(self) -> None:
        """perm: layout position → position in the per-type concatenation of head outputs."""
        layer_idx = torch.tensor([s.layer for s in self.sites])
        type_idx = torch.tensor([s.type_index for s in self.sites])
        perm = torch.empty(self.layout.dim, dtype=torch.long)
        rows, offset = [], 0
        for ti, t in enumerate(self.module_types):
            mine = [j for j, s in enumerate(self.sites) if s.type_index == ti]
            rows.append(torch.tensor(mine))
            for k, j in enumerate(mine):
                base = offset + k * t.head_size
                a, b = self.layout.slots[self.sites[j].a_slot], self.layout.slots[self.sites[j].b_slot]
                perm[a.offset:a.offset + a.numel] = base + torch.arange(a.numel)
                # B is emitted as [r, out] and transposed into the slot's [out, r]
                gen_b = base + t.rank * t.in_features + torch.arange(t.rank * t.out_features).view(t.rank,
                                                                                                   t.out_features)
                perm[b.offset:b.offset + b.numel] = gen_b.T.reshape(-1)
            offset += len(mine) * t.head_size
        self.register_buffer("_layer_idx", layer_idx, persistent=False)
        self.register_buffer("_type_idx", type_idx, persistent=False)
        self.register_buffer("_perm", perm, persistent=False)
        for ti, r in enumerate(rows):
            self.register_buffer(f"_rows{ti}", r, persistent=False)
        # the slots of each type's A and of its B (for T2L's per-type L2 on generated weights)
        self._type_slots = [([s.a_slot for s in self.sites if s.type_index == ti],
                             [s.b_slot for s in self.sites if s.type_index == ti]) for ti in range(len(rows))]

    @classmethod
    def for_model(cls, model: nn.Module, spec: AdapterSpec, cond_dim: int, encoder: str | None = None,
                  **args: Any) -> TextToLoRA:
        """A hypernetwork for ``spec`` on ``model`` without a bank (for :meth:`fit_sft`)."""
        import lorakit

        name = "_text_to_lora_layout"
        lorakit.attach(model, spec, name=name, activate=False, trainable=False)
        try:
            state = lorakit.extract_state(model, name)
        finally:
            lorakit.delete(model, name)
        return cls.build(BankLayout.of(state), cond_dim, encoder, **args)

    # -- the network ---------------------------------------------------------------------------
    def forward_normalized(self, c: torch.Tensor) -> torch.Tensor:
        """[B, D] outputs for conditions [B, cond_dim], in the (z-scored) training space."""
        bsz, n_sites = c.shape[0], len(self.sites)
        e = self.task_encoder(c)[:, None].expand(bsz, n_sites, -1)
        depth = self.depth_embedding(self._layer_idx)[None].expand(bsz, -1, -1)
        kind = self.type_embedding(self._type_idx)[None].expand(bsz, -1, -1)
        h = self.mlp3(self.mlp2(self.mlp1(self.mixer(torch.cat([e, depth, kind], -1)))))  # all sites, one batch
        parts = [head(h[:, getattr(self, f"_rows{ti}")]).reshape(bsz, -1) for ti, head in enumerate(self.heads)]
        return torch.cat(parts, 1)[:, self._perm]

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """[B, D] adapter parameter vectors (de-normalised)."""
        return self.forward_normalized(c) * self.target_std + self.target_mean

    def sample(self, c: torch.Tensor, n: int = 1, *, seed: int | None = None, mode: str = "sample") -> torch.Tensor:
        """Deterministic: ``n`` copies of the one adapter for ``c`` (``seed`` and ``mode`` change nothing)."""
        self._check_ready()
        c = self.check_condition(c)
        if mode not in ("sample", "mean"):
            raise GeneratorError(f"mode must be 'sample' or 'mean', got {mode!r}")
        if not isinstance(n, int) or n < 1:
            raise GeneratorError(f"n must be a positive integer, got {n!r}")
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                x = self(c[None].to(self.target_mean.device))[0]
        finally:
            self.train(was)
        return x.float().cpu().expand(n, -1).clone()

    def generated_l2(self, x: torch.Tensor) -> torch.Tensor:
        """Σ_m (mean(A_m²) + mean(B_m²)) of one [D] vector (T2L's ``generated_w_l2_loss`` before λ)."""
        total = x.new_zeros(())
        for a_slots, b_slots in self._type_slots:
            for group in (a_slots, b_slots):
                parts = [x[self.layout.slots[i].offset:self.layout.slots[i].offset + self.layout.slots[i].numel]
                         for i in group]
                total = total + torch.cat(parts).pow(2).mean()
        return total

    # -- reconstruction training ---------------------------------------------------------------
    def fit(self, bank: CheckpointBank, conditions: torch.Tensor, *, mode: str = "reconstruction",
            steps: int | None = None, **kw: Any) -> dict[str, Any]:
        """Reconstruction training: MSE to the bank's checkpoints (T2L ``train_hyper_recon.py``)."""
        if mode == "sft":
            raise GeneratorError("SFT training needs the base model and task data: call fit_sft(model, "
                                 "task_batches, conditions)")
        if mode != "reconstruction":
            raise GeneratorError(f"mode must be 'reconstruction' (or use fit_sft), got {mode!r}")
        if kw:
            raise GeneratorError(f"text_to_lora.fit: unknown option(s) {sorted(kw)}")
        a: TextToLoRAArgs = self.args
        c = self._remember(bank, conditions)
        x, idx = bank.all_vectors()
        if a.z_score:
            mean = x.mean(0)
            std = x.std(0) if len(x) > 1 else torch.ones_like(mean)
            self.target_mean, self.target_std = mean, std.clamp_min(1e-8)  # clamp: lorakit's choice
        device = self.target_mean.device
        target = ((x.to(device) - self.target_mean) / self.target_std)
        c = c.to(device)
        owners = [torch.nonzero(idx == i).flatten() for i in range(len(bank.tasks))]
        gen = torch.Generator().manual_seed(a.seed)
        opt = torch.optim.AdamW(self.parameters(), lr=a.lr, weight_decay=0.0)  # no decay: lorakit's choice
        steps = a.steps if steps is None else int(steps)
        n_tasks = len(bank.tasks)
        per = n_tasks if a.batch_tasks == 0 or a.batch_tasks >= n_tasks else a.batch_tasks
        history, t0 = [], time.perf_counter()
        self.train()
        for _ in range(steps):
            tasks = torch.randperm(n_tasks, generator=gen)[:per]
            rows = torch.stack([owners[t][torch.randint(len(owners[t]), (1,), generator=gen)][0] for t in tasks])
            loss = F.mse_loss(self.forward_normalized(c[tasks]), target[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(self.parameters(), a.max_grad_norm)
            opt.step()
            history.append(loss.item())
        self.eval()
        return {"mode": "reconstruction", "steps": steps, "seconds": time.perf_counter() - t0,
                "final_loss": history[-1] if history else math.nan, "losses": history}

    def reconstruction_mse(self, bank: CheckpointBank, conditions: torch.Tensor) -> float:
        """Mean squared error (raw parameter space) of each task's generation to its checkpoints."""
        c = self.check_condition(conditions, batch=True)
        x, idx = bank.all_vectors()
        was = self.training
        self.eval()
        with torch.no_grad():
            pred = self(c.to(self.target_mean.device)).cpu()
        self.train(was)
        return float(((pred[idx] - x) ** 2).mean())

    # -- SFT training --------------------------------------------------------------------------
    @contextlib.contextmanager
    def bind(self, model: nn.Module, adapter_name: str = "text_to_lora",
             loss_fn: LossFn | None = None) -> Iterator[BoundLoss]:
        """Attach a lorakit adapter of the layout's spec to ``model`` (frozen) and yield
        ``loss(batch, c) -> (task loss, generated vector)``, differentiable in the hypernetwork: the
        adapter's parameters are replaced by the generated A, B through ``torch.func.functional_call``.
        The adapter is removed and the model's active adapters and requires_grad flags restored after."""
        import lorakit
        from lorakit.core.inject import active_adapters, adapter_modules

        if adapter_name in lorakit.specs(model):
            raise GeneratorError(f"the model already has an adapter named {adapter_name!r}")
        if self.layout.base:
            from lorakit.core.extract import fingerprint
            from lorakit.models.loading import compare_fingerprints

            differ = compare_fingerprints(self.layout.base, fingerprint(model))
            if differ:
                raise GeneratorError(f"the model is not the base the hypernetwork's layout was built on ({differ[0]})")
        active = active_adapters(model)
        flags = {n: p.requires_grad for n, p in model.named_parameters()}
        lorakit.attach(model, self.layout.spec, name=adapter_name, trainable=False)
        try:
            names = {id(p): n for n, p in model.named_parameters()}
            where: dict[str, str] = {}
            for path, form in adapter_modules(model, adapter_name).items():
                for tname in form.save_tensors():
                    where[f"{path}.{form.tensor_key(tname)}"] = names[id(getattr(form, tname))]
            mine = {s.key: s.shape for s in self.layout.slots}
            if set(where) != set(mine):
                diff = sorted(set(where) ^ set(mine))[:3]
                raise GeneratorError(f"the adapter on this model does not match the layout (e.g. {diff})")
            for p in model.parameters():
                p.requires_grad_(False)
            wrapper = _LossOf(model, loss_fn or causal_lm_loss)

            def loss(batch: Any, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                x = self(c[None])[0]
                params = {f"model.{where[s.key]}": x[s.offset:s.offset + s.numel].view(s.shape)
                          for s in self.layout.slots}
                return torch.func.functional_call(wrapper, params, (batch,)), x

            yield loss
        finally:
            lorakit.delete(model, adapter_name)
            if active:
                lorakit.set_active(model, list(active))
            for n, p in model.named_parameters():
                p.requires_grad_(flags.get(n, p.requires_grad))

    def fit_sft(self, model: nn.Module, task_batches: Sequence[Sequence[Any]], conditions: torch.Tensor, *,
                task_ids: Sequence[str] | None = None, descriptions: Sequence[str] | None = None,
                steps: int | None = None, loss_fn: LossFn | None = None,
                adapter_name: str = "text_to_lora") -> dict[str, Any]:
        """End-to-end training through the frozen base's loss (T2L ``train_custom_sft.py``): task i's
        loss on its batches with the adapter generated from ``conditions[i]``, + l2 · generated-weight L2."""
        a: TextToLoRAArgs = self.args
        c = self.check_condition(conditions, batch=True)
        if len(task_batches) != len(c) or not all(len(b) for b in task_batches):
            raise GeneratorError(f"give one non-empty list of batches per condition: {len(task_batches)} list(s) "
                                 f"for {len(c)} condition(s)")
        ids = [str(t) for t in task_ids] if task_ids is not None else [f"task{i}" for i in range(len(c))]
        descs = [str(d) for d in descriptions] if descriptions is not None else [""] * len(c)
        if len(ids) != len(c) or len(descs) != len(c) or len(set(ids)) != len(ids):
            raise GeneratorError("task_ids / descriptions must be distinct ids, one per condition")
        steps = a.steps if steps is None else int(steps)
        gen = torch.Generator().manual_seed(a.seed)
        opt = torch.optim.AdamW(self.parameters(), lr=a.lr, weight_decay=a.weight_decay)
        device = self.target_mean.device
        c = c.to(device)
        history, task_hist, t0 = [], [], time.perf_counter()
        cursor = [0] * len(c)
        self.train()
        with self.bind(model, adapter_name, loss_fn) as loss_of:
            order: list[int] = []
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(c), generator=gen).tolist()
                i = order.pop()
                batch = task_batches[i][cursor[i] % len(task_batches[i])]
                cursor[i] += 1
                task_loss, x = loss_of(batch, c[i])
                loss = task_loss + a.l2 * self.generated_l2(x)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"text_to_lora SFT loss is {loss.item()}; lower the lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                nn.utils.clip_grad_norm_(self.parameters(), a.max_grad_norm)
                opt.step()
                history.append(loss.item())
                task_hist.append(task_loss.item())
        self.eval()
        self.task_ids, self.task_descriptions, self.fitted = ids, descs, True
        return {"mode": "sft", "steps": steps, "seconds": time.perf_counter() - t0,
                "final_loss": history[-1] if history else math.nan, "losses": history, "task_losses": task_hist}
