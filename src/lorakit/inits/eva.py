"""EVA: Explained Variance Adaptation (Paischer, Hauzenberger, Schmied, Alkin, Deisenroth, Hochreiter,
"One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation", arXiv 2410.07170, 2024).

For each target layer with input activations X ∈ R^{N×n} (rows = tokens, padding and, with
``use_label_mask``, label-ignored positions removed), EVA computes the mean-centred PCA of X by
incremental PCA (one SVD update per calibration batch, Ross et al. 2008 / scikit-learn's IncrementalPCA):

    X − μ = U Σ Vᵀ,   components = rows of Vᵀ,   explained-variance ratio ξ_i = σ_i² / Σ_j (x_j − μ)²

with round(ρ·r) components per layer. A component has converged when the cosine similarity of its
direction between two consecutive batches is ≥ τ; a layer stops being fed once the components it is
currently assigned have converged, and the pass ends when every layer has. Layers that receive the same
input (q/k/v, gate/up) are found by hashing one batch of inputs and share one PCA.

Rank redistribution (the paper's Sec. 3, "adaptive rank allocation"): pool ξ_{1..ρr} of every layer,
keep the top Σ_layers r values (the budget of uniform rank r), and give each layer as many components as
it has among them (0 ≤ k ≤ ρr; k = 0 removes the adapter from that layer). Then

    A = Vᵀ[:k]  (k×n, optionally whitened: row i divided by √σ_i),   B = 0,

so the output is unchanged at init, and with ``adjust_scaling_factors`` α_layer = α·k/r keeps the LoRA
scale s = α/r of the uniform-rank adapter (PEFT's ``EvaConfig.adjust_scaling_factors``).
Ranks and α are recorded as per-module args (``AdapterSpec.module_args``), so save/load and the PEFT
export (``rank_pattern``/``alpha_pattern``) reproduce them.

Defaults: ρ = 2, τ = 0.99, use_label_mask = True (PEFT ``EvaConfig`` and the official
``bash/run_svd_precompute.sh``: rho ∈ {1, 2}, early_stop_sim_thresh 0.99); the randomized SVD
(``torch.svd_lowrank`` with q = 2·components, 4 power iterations, seed 42) as PEFT and the official code
(``lowrank=True``); ``lowrank=False`` uses the exact SVD.

Paper/code choices: the official code (ml-jku/EVA ``src/svd.py::compute_svd`` + ``src/utils.py``) keeps
α unchanged after redistribution (s = α/k), PEFT rescales α (s = α/r): PEFT's rescaling is the default,
``adjust_scaling_factors=False`` is the official code's variant. As in both, the explained-variance
*ratio* is the redistribution metric and the calibration batches are cycled until convergence
(here at most ``max_batches`` forwards; unconverged layers then keep their current components, with a
warning, where PEFT would loop on). After the first batch the incremental update stacks
[Σ·Vᵀ; X − x̄_batch; mean correction] in float64, as PEFT's IncrementalPCA ends up doing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import cycle
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_fields
from lorakit.forms.base import Form
from lorakit.inits.base import Init
from lorakit.inits.calibration import layer_inputs


class IncrementalPCA:
    """Mean-centred incremental PCA (Ross et al., 2008; scikit-learn's ``IncrementalPCA.partial_fit``)."""

    def __init__(self, n_components: int, *, lowrank: bool = True, niter: int = 4, seed: int | None = 42) -> None:
        self.n_components = n_components
        self.lowrank, self.niter, self.seed = lowrank, niter, seed
        self.n_seen = 0
        self.mean: torch.Tensor | None = None  # float64
        self.m2: torch.Tensor | None = None  # Σ (x − μ)² per feature, float64
        self.components: torch.Tensor | None = None  # (k, n)
        self.singular_values: torch.Tensor | None = None
        self.explained_variance_ratio: torch.Tensor | None = None

    def _svd(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.lowrank:
            _, s, vh = torch.linalg.svd(x, full_matrices=False)
        else:
            with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [],
                                       enabled=self.seed is not None):
                if self.seed is not None:
                    torch.manual_seed(self.seed)
                _, s, v = torch.svd_lowrank(x, q=min(2 * self.n_components, *x.shape), niter=self.niter)
            vh = v.mH
        # deterministic signs: the largest-magnitude entry of each direction is positive (svd_flip on V)
        idx = vh.abs().argmax(dim=1)
        signs = torch.sign(vh[torch.arange(vh.shape[0]), idx])
        return s, vh * signs[:, None]

    @torch.no_grad()
    def partial_fit(self, x: torch.Tensor) -> None:
        x = x.float()
        n = x.shape[0]
        batch_sum = x.sum(dim=0, dtype=torch.float64)
        batch_mean64 = batch_sum / n
        batch_m2 = (x.double() - batch_mean64).square().sum(dim=0)
        if self.mean is None:
            total, mean, m2 = n, batch_mean64, batch_m2
            data = (x.double() - mean).float()
        else:
            total = self.n_seen + n
            delta = batch_mean64 - self.mean
            mean = self.mean + delta * (n / total)
            m2 = self.m2 + batch_m2 + delta.square() * (self.n_seen * n / total)
            correction = ((self.n_seen / total) * n) ** 0.5 * (self.mean - x.mean(dim=0))
            data = torch.vstack([self.singular_values[:, None].double() * self.components.double(),
                                 (x - x.mean(dim=0)).double(), correction[None]])
        s, vh = self._svd(data)
        k = self.n_components
        self.n_seen, self.mean, self.m2 = total, mean, m2
        self.components, self.singular_values = vh[:k], s[:k]
        self.explained_variance_ratio = s[:k].square() / m2.sum()


def redistribute_ranks(ratios: dict[str, torch.Tensor], budget: int, max_components: dict[str, int],
                       same_input: dict[str, str] | None = None) -> dict[str, int]:
    """EVA's rank allocation: pool each layer's explained-variance ratios ξ[:max_components], keep the
    ``budget`` largest, a layer's rank = how many of its values were kept. ``ratios`` holds one entry
    per PCA; ``same_input`` maps a layer to the layer whose PCA it shares (it gets that layer's values,
    and the PCA's own layer gets the largest rank of its group so its components cover the group)."""
    same_input = same_input or {}
    owner = {**{p: p for p in ratios}, **same_input}
    keys, values = zip(*[(layer, v) for layer, src in owner.items() for v in ratios[src][: max_components[layer]]])
    order = torch.stack(list(values)).argsort(descending=True)
    counts = Counter(keys[i] for i in order[:budget].tolist())
    ranks = {layer: counts.get(layer, 0) for layer in owner}
    for layer, src in same_input.items():
        if ranks[src] < ranks[layer]:
            ranks[src], ranks[layer] = ranks[layer], ranks[src]
    return ranks


@dataclass(frozen=True)
class EVAArgs:
    rho: float = 2.0  # rank budget factor: each layer may get up to ρ·r components (paper/PEFT default 2)
    tau: float = 0.99  # convergence: cosine similarity of the components between passes (PEFT default)
    use_label_mask: bool = True  # skip token positions whose label is label_mask_value
    label_mask_value: int = -100
    whiten: bool = False  # divide row i of A by √σ_i
    adjust_scaling_factors: bool = True  # α_i = α·r_i/r so the scale α/r is unchanged by redistribution
    lowrank: bool = True  # randomized SVD in the incremental PCA
    max_batches: int = 1000  # stop after this many batches even if not converged
    progress: bool = True

    def __post_init__(self) -> None:
        check_fields("init 'eva'", self, at_least={"rho": 1.0, "max_batches": 1}, unit=("tau",))


class EVAInit(Init):
    """A = top principal directions of the layer inputs, ranks redistributed by explained variance."""

    name = "eva"
    caps = Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)
    Args = EVAArgs
    needs = Cap.NEEDS_DATA
    requires = Cap.FACTORED_AB

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ranks: dict[str, int] = {}
        self.batches_run = 0

    @classmethod
    def check_form(cls, form_cls: type[Form]) -> None:
        super().check_form(form_cls)
        fields = {f.name for f in dataclasses.fields(form_cls.Args)}
        if not {"r", "alpha"} <= fields:
            raise ValueError(f"init 'eva' redistributes ranks and needs a form with 'r' and 'alpha' arguments; "
                             f"form {form_cls.name!r} has {sorted(fields)}")

    # -- calibration ---------------------------------------------------------------------------
    def _rows(self, x: torch.Tensor, batch: Any) -> torch.Tensor:
        """Rows of the layer input at the kept token positions (attention mask, label mask)."""
        mask = None
        if isinstance(batch, dict):
            if batch.get("attention_mask") is not None:
                mask = batch["attention_mask"].bool()
            if self.args.use_label_mask and batch.get("labels") is not None:
                keep = batch["labels"] != self.args.label_mask_value
                mask = keep if mask is None else mask & keep
        if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
            return x[mask.to(x.device)]
        return x.reshape(-1, x.shape[-1])

    def collect(self, model: nn.Module, layers: dict[str, nn.Module], batches: Any) -> dict[str, torch.Tensor]:
        forms = self.forms or {}
        items = list(batches)
        if not items:
            raise ValueError("init 'eva': the calibration batches were empty")
        # 1. one batch to find layers with identical inputs (q/k/v, gate/up): they share one PCA
        digests: dict[str, str] = {}

        def digest(path: str, x: torch.Tensor, batch: Any) -> None:
            t = x.detach().float().contiguous().cpu()
            digests[path] = hashlib.blake2b(t.numpy().tobytes(), digest_size=16).hexdigest() + str(tuple(t.shape))

        layer_inputs(model, layers, items[:1], digest, progress=False, desc="eva: equal inputs")
        groups: dict[str, list[str]] = defaultdict(list)
        for path in layers:
            groups[digests[path]].append(path)
        same_input = {p: g[0] for g in groups.values() for p in g[1:]}
        ranks0 = {p: forms[p].lora_A.shape[0] for p in layers}
        budget = sum(ranks0.values())
        max_components = {p: min(round(ranks0[p] * self.args.rho), forms[p].in_features) for p in layers}
        for g in groups.values():
            top = max(max_components[p] for p in g)
            for p in g:
                max_components[p] = top
        pcas = {p: IncrementalPCA(max_components[p], lowrank=self.args.lowrank) for p in layers if p not in same_input}
        converged = {p: torch.zeros(max_components[p], dtype=torch.bool) for p in pcas}
        done = dict.fromkeys(pcas, False)  # a layer is fed while not done
        ranks = dict(max_components)

        # 2. incremental PCA over the (cycled) batches until every layer's assigned components converged
        def consume(path: str, x: torch.Tensor, batch: Any) -> None:
            pca = pcas[path]
            if done[path]:
                return
            rows = self._rows(x, batch)
            if rows.shape[0] < pca.n_components:
                return  # too few tokens in this batch for the requested components (skipped, as PEFT)
            previous = pca.components
            pca.partial_fit(rows)
            if previous is not None:
                sim = F.cosine_similarity(pca.components, previous.to(pca.components.dtype))
                converged[path] = sim >= self.args.tau

        def stop() -> bool:
            nonlocal ranks
            if all(p.components is not None for p in pcas.values()):
                ranks = redistribute_ranks({p: pca.explained_variance_ratio for p, pca in pcas.items()}, budget,
                                           max_components, same_input)
            for p in pcas:
                done[p] = bool(converged[p][: ranks[p]].all())
            return all(done.values())

        self.batches_run = layer_inputs(model, {p: layers[p] for p in pcas}, cycle(items), consume,
                                        max_batches=self.args.max_batches, progress=self.args.progress,
                                        desc="eva: incremental PCA", stop=stop)
        missing = [p for p, pca in pcas.items() if pca.components is None]
        if missing:
            raise ValueError(f"init 'eva': no calibration batch had enough tokens for the PCA of {missing[:3]} "
                             f"(needs >= {max(max_components[p] for p in missing)} kept tokens per batch)")
        unconverged = [p for p in pcas if not done[p]]
        if unconverged:
            warnings.warn(f"init 'eva': {len(unconverged)} layer(s) had not converged (tau={self.args.tau}) after "
                          f"{self.batches_run} batches, e.g. {unconverged[:3]}; their current components are used",
                          stacklevel=2)
        self.ranks = ranks
        out = {}
        for path in layers:
            pca = pcas[same_input.get(path, path)]
            k = ranks[path]
            a = pca.components[:k].float()
            if self.args.whiten:
                a = a / pca.singular_values[:k].float().sqrt()[:, None]
            out[path] = a
        return out

    def module_overrides(self, stats: dict[str, torch.Tensor]) -> dict[str, dict[str, Any] | None]:
        overrides: dict[str, dict[str, Any] | None] = {}
        for path, a in stats.items():
            form = self.forms[path]
            r, k = form.lora_A.shape[0], a.shape[0]
            if k == 0:
                overrides[path] = None
            elif k != r:
                overrides[path] = {"r": k}
                if self.args.adjust_scaling_factors:
                    overrides[path]["alpha"] = form.args.alpha * k / r
        return overrides

    def apply(self, form: Form, base_layer: nn.Module, stats: Any) -> None:
        if stats is None or stats.shape != form.lora_A.shape:
            raise ValueError(f"init 'eva': components of shape {None if stats is None else tuple(stats.shape)} "
                             f"do not fit lora_A {tuple(form.lora_A.shape)}")
        with torch.no_grad():
            form.lora_A.copy_(stats)
            nn.init.zeros_(form.lora_B)
            if getattr(form, "lora_bias", None) is not None:
                nn.init.zeros_(form.lora_bias)
