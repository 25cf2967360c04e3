"""SG-LoRA: Semantic-guided LoRA parameters generation (Li et al., CVPR 2026, arXiv 2509.10535).

The official code (``keepgoingjkg/SG-LoRA``) is not available; this follows the paper as quoted by its
reviewers and a paper note (notes LATER-ROWS §3); the prototype is the reviewers' "Eq. 3 and 7", the
variance of the aggregate is derived in the paper's App. B.

1. Expert bank: task n has M checkpoints ΔW_n^m (a :class:`~lorakit.generate.bank.CheckpointBank`),
   a prototype μ_n = (1/M) Σ_m ΔW_n^m and an element-wise variance σ_n² over the M checkpoints (the
   latter is the notes' reading [UNVERIFIED]), and a description embedding d_n.
2. Sparse aggregator (:func:`~lorakit.generate.conditions.semantic_prior`): for a description d*,
   α = softmax(cos(d*, d_n)/τ) over the top-K tasks, μ* = Σ α_n μ_n,
   σ*² = Σ α_n σ_n² + Σ α_n (μ_n − μ*)² (App. B). The condition is c = [μ*, σ*²] ∈ R^{2D}, in parameter space.
3. CVAE with a semantic prior: encoder q(z | x, c) and prior p(z | c) are 2-layer ReLU MLPs giving the
   mean and log-variance of a diagonal Gaussian; decoder p(x | z, c) is a 3-layer ReLU MLP. Loss

       L = E_q ‖x − x̂‖² + λ · KL( q(z|x,c) ‖ p(z|c) ),   λ = 1,

   with ‖·‖² summed over the D parameters and KL summed over the latent, both averaged over the batch.
   At inference z ~ p(z | c) (``mode="sample"``) or z = E[p(z|c)] (``mode="mean"``, deterministic), then
   x = decoder(z, c).

Where the paper is silent, lorakit's choices (each an ``Args`` field):

- ``cond_proj``: c ∈ R^{2D} (2D ≈ 2·10⁵ for rank-2 LoRAs) first goes through one learned linear layer to
  ``cond_proj`` dims, shared by encoder, prior and decoder; ``cond_proj=0`` feeds c unprojected.
- ``normalize``: the networks work on per-tensor z-scores of the bank (:meth:`BankLayout.normalize`, stats
  over every checkpoint; ICM-LoRA's normalisation), μ* and σ*² are mapped to that space, outputs are
  de-normalised.
- ``leave_self_out=True``: a training task's condition is the aggregator over the bank *without* that
  task, so training conditions look like those of an unseen task (with itself included, cos = 1 puts
  nearly all weight on its own prototype and the decoder could copy c). The paper does not say how c
  is formed for a training task (notes §3.1.5).
- τ = 0.1 (not stated); latent, hidden sizes, optimiser Adam as in the paper, learning rate and steps.
- ``residual=False``: decode x directly, as the paper; ``True`` decodes x − μ* (lorakit's option).
- Numerics for D ≈ 10⁵: linear layers with fan-in n > 1024 learn at lr·1024/n (the μP rule for Adam)
  and log-variances are clamped to [−10, 10]; without them training diverges in the first steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lorakit.generate.bank import BankLayout, CheckpointBank
from lorakit.generate.base import Generator, GeneratorError
from lorakit.generate.conditions import DEFAULT_TAU, semantic_prior

LOGVAR_CLAMP = 10.0
WIDE_FAN_IN = 1024


@dataclass(frozen=True)
class SGLoRAArgs:
    latent: int = 64            # not stated in the paper
    hidden: int = 256           # not stated in the paper
    cond_proj: int = 128        # lorakit's choice (the paper does not say whether c is projected); 0 = none
    k: int = 4                  # paper: K = 4
    tau: float = DEFAULT_TAU    # not stated; lorakit's choice
    lam: float = 1.0            # paper: λ = 1
    leave_self_out: bool = True  # not stated; lorakit's choice (see the module docstring)
    normalize: bool = True      # lorakit's choice: per-tensor z-scored parameter space
    residual: bool = False      # lorakit's option: decode x − μ* instead of x
    emb_dim: int = 0            # description-embedding size; 0 = taken from the conditions given to fit

    def __post_init__(self) -> None:
        for name in ("latent", "hidden", "k"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"sg_lora: {name} must be a positive integer, got {v!r}")
        for name in ("cond_proj", "emb_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"sg_lora: {name} must be a non-negative integer, got {v!r}")
        if not (isinstance(self.tau, (int, float)) and self.tau > 0 and math.isfinite(self.tau)):
            raise ValueError(f"sg_lora: tau must be > 0, got {self.tau!r}")
        if not (isinstance(self.lam, (int, float)) and self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"sg_lora: lam must be >= 0, got {self.lam!r}")


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class SGLoRA(Generator):
    """CVAE with a learned semantic prior p(z | c), c = [μ*, σ*²] from the description's top-K experts.

    ``cond_dim`` must be 2·D (the condition lives in parameter space); :meth:`for_layout` builds one.
    ``fit(bank, task_embs)`` takes one description embedding per task; ``condition(embedding)`` turns a new
    description embedding into c with the stored bank (prototypes, variances, embeddings are buffers).
    """

    name = "sg_lora"
    Args = SGLoRAArgs

    def __init__(self, layout: BankLayout, cond_dim: int, args: Any = None, *, encoder: str | None = None) -> None:
        super().__init__(layout, cond_dim, args, encoder=encoder)
        d, a = layout.dim, self.args
        if cond_dim != 2 * d:
            raise GeneratorError(f"sg_lora's condition is [μ*, σ*²] in parameter space: cond_dim must be "
                                 f"2·D = {2 * d}, got {cond_dim}")
        c = a.cond_proj or 2 * d
        self.cond_net: nn.Module = nn.Linear(2 * d, a.cond_proj) if a.cond_proj else nn.Identity()
        self.encoder_net = _mlp([d + c, a.hidden, 2 * a.latent])         # q(z | x, c): 2 layers
        self.prior_net = _mlp([c, a.hidden, 2 * a.latent])               # p(z | c): 2 layers
        self.decoder_net = _mlp([a.latent + c, a.hidden, a.hidden, d])   # p(x | z, c): 3 layers
        t = len(layout.slots)
        self.register_buffer("stat_mean", torch.zeros(t))
        self.register_buffer("stat_std", torch.ones(t))
        self.prepare_for_load(0)

    @classmethod
    def for_layout(cls, layout: BankLayout, encoder: str | None = None, **args: Any) -> SGLoRA:
        gen = cls.build(layout, 2 * layout.dim, encoder, **args)
        assert isinstance(gen, SGLoRA)
        return gen

    @classmethod
    def for_embeddings(cls, layout: BankLayout, emb_dim: int, encoder: str | None = None, **args: Any) -> SGLoRA:
        return cls.for_layout(layout, encoder, **{"emb_dim": emb_dim, **args})

    def prepare_for_load(self, num_tasks: int) -> None:
        d, e = self.layout.dim, self.args.emb_dim
        self.register_buffer("task_embs", torch.zeros(num_tasks, e))
        self.register_buffer("prototypes", torch.zeros(num_tasks, d))
        self.register_buffer("variances", torch.zeros(num_tasks, d))

    # -- condition ------------------------------------------------------------------------------
    def prior(self, embedding: torch.Tensor, leave_out: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(μ*, σ*², α) of a description embedding over the stored bank (raw parameter space)."""
        self._check_ready()
        if not isinstance(embedding, torch.Tensor) or embedding.shape != (self.task_embs.shape[1],):
            shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
            raise GeneratorError(f"sg_lora: a description embedding must have shape [{self.task_embs.shape[1]}], "
                                 f"got {shape}")
        return semantic_prior(embedding.float(), self.task_embs, self.prototypes, self.variances,
                              k=self.args.k, tau=self.args.tau, leave_out=leave_out)

    def condition(self, embedding: torch.Tensor) -> torch.Tensor:
        mu, var, _ = self.prior(embedding)
        return torch.cat([mu, var])

    def _net_condition(self, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(projected condition h_c [B, P], μ* in the networks' space [B, D]) of raw conditions [B, 2D]."""
        d = self.layout.dim
        mu, var = c[:, :d], c[:, d:]
        if self.args.normalize:
            stats = (self.stat_mean, self.stat_std)
            mu = self.layout.normalize(mu, stats)
            _, std = self.layout._expand(stats, var)
            var = var / (std + 1e-8) ** 2
        return self.cond_net(torch.cat([mu, var], 1)), mu

    # -- training -------------------------------------------------------------------------------
    def fit(self, bank: CheckpointBank, conditions: torch.Tensor, *, steps: int = 2000, lr: float = 1e-3,
            batch: int = 16, seed: int = 0, progress: bool = False) -> dict[str, Any]:
        """Train on every checkpoint of ``bank``; ``conditions`` [tasks, E] are the tasks' description
        embeddings (e.g. ``text_encoder("minilm").encode(bank.descriptions)``). Returns the loss history."""
        if bank.layout.slots != self.layout.slots or bank.layout.spec != self.layout.spec:
            raise GeneratorError("the bank's layout differs from the generator's (other adapter structure)")
        if not isinstance(conditions, torch.Tensor) or not conditions.is_floating_point() or conditions.dim() != 2:
            raise GeneratorError("sg_lora.fit: conditions must be a float tensor [tasks, E] of description "
                                 "embeddings")
        n, e = conditions.shape
        if n != len(bank.tasks):
            raise GeneratorError(f"give one description embedding per task: {n} for {len(bank.tasks)} task(s)")
        if self.args.emb_dim and e != self.args.emb_dim:
            raise GeneratorError(f"sg_lora was built for {self.args.emb_dim}-d embeddings, got {e}")
        if not torch.isfinite(conditions).all():
            raise GeneratorError("conditions hold NaN or inf")
        if self.args.leave_self_out and n < 2:
            raise GeneratorError("leave_self_out needs at least 2 tasks (a task's condition comes from the others)")
        for nm, v in (("steps", steps), ("batch", batch)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise GeneratorError(f"sg_lora.fit: {nm} must be a positive integer, got {v!r}")
        if e != self.args.emb_dim:
            self.args = dataclasses.replace(self.args, emb_dim=e)
        self.prepare_for_load(n)
        x, idx = bank.all_vectors()
        with torch.no_grad():
            self.task_embs.copy_(conditions.float())
            self.prototypes.copy_(bank.prototypes())
            self.variances.copy_(bank.variances())
            mean, std = bank.layout.tensor_stats(x)
            self.stat_mean.copy_(mean)
            self.stat_std.copy_(std)
        self.task_ids, self.task_descriptions = bank.task_ids, bank.descriptions
        self.fitted = True
        task_c = torch.stack([self.condition_of_task(i) for i in range(n)])

        with torch.random.fork_rng():  # a fit starts from a fresh init that depends on `seed` alone
            torch.manual_seed(seed)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    m.reset_parameters()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self._param_groups(lr))
        hist: dict[str, list[float]] = {"loss": [], "recon": [], "kl": []}
        bar = range(steps)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc="sg_lora", leave=False)
        self.train()
        for _ in bar:
            rows = torch.randint(0, len(x), (min(batch, len(x)),), generator=g)
            xb, cb = x[rows], task_c[idx[rows]]
            if self.args.normalize:  # per batch: a z-scored copy of the whole bank would double its memory
                xb = self.layout.normalize(xb, (self.stat_mean, self.stat_std))
            h, mu_star = self._net_condition(cb)
            goal = xb - mu_star if self.args.residual else xb
            q_mu, q_logvar = _gaussian(self.encoder_net(torch.cat([goal, h], 1)))
            p_mu, p_logvar = _gaussian(self.prior_net(h))
            z = q_mu + torch.randn(q_mu.shape, generator=g) * (0.5 * q_logvar).exp()
            recon = ((self.decoder_net(torch.cat([z, h], 1)) - goal) ** 2).sum(1).mean()
            kl = gaussian_kl(q_mu, q_logvar, p_mu, p_logvar).mean()
            loss = recon + self.args.lam * kl
            opt.zero_grad()
            loss.backward()
            opt.step()
            hist["loss"].append(loss.item())
            hist["recon"].append(recon.item())
            hist["kl"].append(kl.item())
            if progress:
                bar.set_postfix(loss=f"{loss.item():.4g}")  # type: ignore[attr-defined]
        self.eval()
        return hist

    def _param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Adam groups: a linear layer with fan-in n > WIDE_FAN_IN learns at lr·WIDE_FAN_IN/n (lorakit's
        choice, the μP rule for Adam). Adam moves every weight by ~lr, so a layer reading D ≈ 10⁵
        coherent inputs would shift its outputs by ~lr·D per step and diverge at any usable lr."""
        groups: list[dict[str, Any]] = []
        for m in self.modules():
            if isinstance(m, nn.Linear):
                scale = min(1.0, WIDE_FAN_IN / m.in_features)
                groups.append({"params": list(m.parameters()), "lr": lr * scale})
        return groups

    def condition_of_task(self, i: int) -> torch.Tensor:
        """A stored task's training condition (without itself when ``leave_self_out``)."""
        mu, var, _ = self.prior(self.task_embs[i], leave_out=i if self.args.leave_self_out else None)
        return torch.cat([mu, var])

    # -- sampling -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, c: torch.Tensor, n: int = 1, *, seed: int | None = None, mode: str = "sample") -> torch.Tensor:
        self._check_ready()
        if mode not in ("sample", "mean"):
            raise GeneratorError(f"mode must be 'sample' or 'mean', got {mode!r}")
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise GeneratorError(f"n must be a positive integer, got {n!r}")
        c = self.check_condition(c)
        if bool((c[self.layout.dim:] < 0).any()):
            raise GeneratorError("the condition's second half is σ*² and must be non-negative")
        h, mu_star = self._net_condition(c.unsqueeze(0).expand(n, -1))
        p_mu, p_logvar = _gaussian(self.prior_net(h))
        if mode == "mean":
            z = p_mu
        else:
            g = torch.Generator().manual_seed(seed) if seed is not None else None
            z = p_mu + torch.randn(p_mu.shape, generator=g) * (0.5 * p_logvar).exp()
        out = self.decoder_net(torch.cat([z, h], 1))
        if self.args.residual:
            out = out + mu_star
        return self.layout.denormalize(out, (self.stat_mean, self.stat_std)) if self.args.normalize else out


def _gaussian(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, log-variance) of a network's [B, 2L] output; the log-variance is clamped to [−LOGVAR_CLAMP,
    LOGVAR_CLAMP] (lorakit's choice: with D ≈ 10⁵ inputs one optimiser step can move it by ~10² and
    overflow exp)."""
    mu, logvar = out.chunk(2, dim=1)
    return mu, logvar.clamp(-LOGVAR_CLAMP, LOGVAR_CLAMP)


def gaussian_kl(q_mu: torch.Tensor, q_logvar: torch.Tensor, p_mu: torch.Tensor, p_logvar: torch.Tensor
                ) -> torch.Tensor:
    """KL(N(q_mu, e^{q_logvar}) ‖ N(p_mu, e^{p_logvar})) summed over the last dimension:
    ½ Σ [ log σ_p² − log σ_q² + (σ_q² + (μ_q − μ_p)²)/σ_p² − 1 ]."""
    return 0.5 * (p_logvar - q_logvar + (q_logvar.exp() + (q_mu - p_mu) ** 2) / p_logvar.exp() - 1).sum(-1)
