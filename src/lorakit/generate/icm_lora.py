"""ICM-LoRA: In-Context Meta LoRA Generation (Shao et al., IJCAI 2025, arXiv 2501.17635).

A conditional VAE over flattened, per-tensor z-scored LoRA parameter vectors. For a checkpoint of
task n flattened to v ∈ R^D (the bank layout) and the task condition c_n ∈ R^{d_c}:

    x_t = (v_t − mean(v_t)) / std(v_t)       per tensor t (torch's unbiased std), x = [x_1 … x_T]
    x̃ = [x, 0 … 0] ∈ R^{L'},  L' = ⌈D / 2^K⌉ · 2^K  (zero padding so K stride-2 convolutions divide it)
    h = to_latent(flatten(Enc(x̃))),  μ = W_μ [h, c] + b_μ,  log σ² = W_σ [h, c] + b_σ
    z = μ + σ ⊙ ε,  ε ~ N(0, I),   x̂ = Dec([z, c])                 (prior p(z) = N(0, I))
    L = MSE(x̂, x̃) + β · mean_batch( −½ Σ_j (1 + log σ_j² − μ_j² − σ_j²) ),   β = 0.005

Enc is K × [Conv1d(k, stride 2, pad k//2) → BatchNorm → LeakyReLU]; Dec is Linear → (K − 1) ×
[ConvTranspose1d(k, stride 2, output_padding 1) → BatchNorm → ELU] → ConvTranspose1d → BatchNorm →
ELU → Conv1d(→ 1), which doubles the length K times back to L'. Generation: z ~ N(0, I) (or z = 0
with ``mode="mean"``), x̂ = Dec([z, c]) cropped to D, then de-normalised per tensor,
v̂_t = x̂_t · s_t + m_t, and unflattened into an adapter.

Sources and divergences (notes ``LATER-ROWS.md`` §2.1–2.2):

- Network, loss, KL weight 0.005, prior N(0, I), condition by concatenation only: the official code
  (``model/CVAE_design.py::CVAE``). The code's size (12 layers, channels 8…256…8, latent 256) is an
  Args default scaled down here (lorakit's choice: latent 64, 6 layers); the code pads to a multiple
  of 4096 then asserts a multiple of 2^12, here the padding is to a multiple of 2^K directly.
- Per-tensor z-scoring of EACH checkpoint by its own statistics: the code
  (``utils/normalizeLoraWeight_small.py``).
- **Multi-task**: the paper trains one generator on "training data from all tasks"; the code's
  ``VAEDataset`` gives one condition to every file of one directory, i.e. one task per run. Here
  :meth:`ICMLoRA.fit` takes every task of the bank with its own condition (the paper).
- **De-normalisation**. The code de-normalises with the per-tensor mean/std of one real checkpoint of
  the task (``utils/ReconstructLora_cvae.py``, default ``normalized_adapter_model_99.pth``):
  ``denorm="reference_checkpoint"`` does that and needs ``reference=`` (a checkpoint of that task),
  which makes generation NOT zero-shot. ``denorm="bank"`` (lorakit's default and lorakit's choice)
  keeps the statistics in the generator: for a condition equal to a training task's condition, the
  mean over that task's checkpoints of their per-tensor (mean, std); for any other condition the
  pooled statistics over all checkpoints (``unseen_stats="pooled"``) or a ridge-regression head
  [c, 1] ↦ (m, log s) fitted on the training tasks (``unseen_stats="head"``). An unconditional model
  always uses the pooled statistics (it must not depend on c).
- Optimiser: the shipped training script never creates one; AdamW (lr 2e-4) with the script's
  ``CosineAnnealingLR(T_max = 2·epochs)`` stepped per epoch is used (the LR ends at half its start).
- **BatchNorm with tiny batches** (the code trains with batch 2): batch statistics of 2 samples are
  noisy, and the running averages that eval mode uses then describe only the last few updates. After
  training, the running statistics are re-estimated as a cumulative average over one pass of the
  whole bank (lorakit's choice), and sampling always runs in eval mode.
- Unconditional baseline ``conditional=False``: the same network without c (the code's
  ``model/VAEdesign.py::OneDimVAE``, a p-diff-style VAE).
- The condition itself (a hidden state of the tuned model in the code, "task descriptions" in the
  paper) comes from :mod:`lorakit.generate.conditions`; the generator takes any [d_c] vector.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.state import AdapterState
from lorakit.generate.bank import CheckpointBank
from lorakit.generate.base import Generator, GeneratorError

DENORMS = ("bank", "reference_checkpoint")
UNSEEN_STATS = ("pooled", "head")


@dataclass(frozen=True)
class ICMLoRAArgs:
    latent_dim: int = 64  # code: 256
    channels: tuple[int, ...] = (8, 16, 32, 32, 16, 8)  # code: (8, 16, 32, 64, 128, 256, 256, 128, 64, 32, 16, 8)
    kernel_size: int = 7
    kld_weight: float = 0.005
    conditional: bool = True
    denorm: str = "bank"  # bank | reference_checkpoint (the official code's path; not zero-shot)
    unseen_stats: str = "pooled"  # pooled | head: statistics for a condition that is no training task's
    ridge: float = 1e-3  # the stats head's ridge penalty
    epochs: int = 300  # code: 2000
    batch_size: int = 8  # code: 2
    lr: float = 2e-4
    seed: int = 2024
    match_atol: float = 1e-5  # |c − c_n|_∞ ≤ atol·(1 + |c_n|_∞): c is training task n's condition

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(self.channels))
        if not self.channels or not all(isinstance(ch, int) and ch > 0 for ch in self.channels) \
                or len(self.channels) > 20:
            raise ValueError(f"icm_lora: channels must be 1–20 positive integers, got {self.channels}")
        if self.latent_dim < 1:
            raise ValueError(f"icm_lora: latent_dim must be >= 1, got {self.latent_dim}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"icm_lora: kernel_size must be odd (length-preserving padding), got {self.kernel_size}")
        if self.kld_weight < 0:
            raise ValueError(f"icm_lora: kld_weight must be >= 0, got {self.kld_weight}")
        if self.denorm not in DENORMS:
            raise ValueError(f"icm_lora: denorm must be one of {DENORMS}, got {self.denorm!r}")
        if self.unseen_stats not in UNSEEN_STATS:
            raise ValueError(f"icm_lora: unseen_stats must be one of {UNSEEN_STATS}, got {self.unseen_stats!r}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0 or self.ridge < 0 or self.match_atol < 0:
            raise ValueError("icm_lora: epochs >= 0, batch_size >= 1, lr > 0, ridge >= 0, match_atol >= 0 required")


class _ConvCVAE(nn.Module):
    """The conv1d (C)VAE of ``model/CVAE_design.py`` with configurable depth and widths."""

    def __init__(self, dim: int, cond_dim: int, a: ICMLoRAArgs) -> None:
        super().__init__()
        k, chans = a.kernel_size, list(a.channels)
        stride_total = 2 ** len(chans)
        self.dim, self.cond_dim, self.latent_dim = dim, cond_dim, a.latent_dim
        self.padded = math.ceil(dim / stride_total) * stride_total
        self.last_len, self.last_ch = self.padded // stride_total, chans[-1]
        layers, cin = [], 1
        for ch in chans:
            layers.append(nn.Sequential(nn.Conv1d(cin, ch, k, 2, k // 2), nn.BatchNorm1d(ch), nn.LeakyReLU()))
            cin = ch
        self.encoder = nn.Sequential(*layers)
        flat = self.last_len * self.last_ch
        self.to_latent = nn.Linear(flat, a.latent_dim)
        self.fc_mu = nn.Linear(a.latent_dim + cond_dim, a.latent_dim)
        self.fc_var = nn.Linear(a.latent_dim + cond_dim, a.latent_dim)
        self.to_decode = nn.Linear(a.latent_dim + cond_dim, flat)
        # The code reverses its channel list in place (harmless there: the list is symmetric); the
        # decoder here starts from the encoder's last width whatever the list.
        rev = chans[::-1]
        self.decoder = nn.Sequential(*[
            nn.Sequential(nn.ConvTranspose1d(rev[i], rev[i + 1], k, 2, k // 2, output_padding=1),
                          nn.BatchNorm1d(rev[i + 1]), nn.ELU()) for i in range(len(rev) - 1)])
        self.final_layer = nn.Sequential(
            nn.ConvTranspose1d(rev[-1], rev[-1], k, 2, k // 2, output_padding=1), nn.BatchNorm1d(rev[-1]), nn.ELU(),
            nn.Conv1d(rev[-1], 1, k, 1, k // 2))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, self.padded - x.shape[-1]))

    def encode(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.to_latent(self.encoder(self.pad(x)[:, None, :]).flatten(1))
        h = torch.cat([h, c], -1)
        return self.fc_mu(h), self.fc_var(h)

    def decode(self, z: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.to_decode(torch.cat([z, c], -1)).view(-1, self.last_ch, self.last_len)
        return self.final_layer(self.decoder(h))[:, 0, :]  # [B, padded]

    def loss(self, x: torch.Tensor, c: torch.Tensor, kld_weight: float,
             gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, log_var = self.encode(x, c)
        eps = torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)
        recons = self.decode(mu + eps * torch.exp(0.5 * log_var), c)
        rec = F.mse_loss(recons, self.pad(x))
        kld = torch.mean(-0.5 * torch.sum(1 + log_var - mu ** 2 - log_var.exp(), dim=1))
        return rec + kld_weight * kld, rec, kld


class ICMLoRA(Generator):
    """ICM-LoRA's conv1d CVAE, multi-task (the paper), with stored or reference de-normalisation."""

    name = "icm_lora"
    Args = ICMLoRAArgs

    def __init__(self, layout: Any, cond_dim: int, args: ICMLoRAArgs | None = None, *,
                 encoder: str | None = None) -> None:
        super().__init__(layout, cond_dim, args, encoder=encoder)
        a: ICMLoRAArgs = self.args
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(a.seed)
            self.net = _ConvCVAE(layout.dim, cond_dim if a.conditional else 0, a)
        n_slots = len(layout.slots)
        self.register_buffer("task_conditions", torch.zeros(0, cond_dim))
        self.register_buffer("task_mean", torch.zeros(0, n_slots))
        self.register_buffer("task_std", torch.zeros(0, n_slots))
        self.register_buffer("pooled_mean", torch.zeros(n_slots))
        self.register_buffer("pooled_std", torch.ones(n_slots))
        if a.unseen_stats == "head":
            self.register_buffer("stats_head", torch.zeros(cond_dim + 1, 2 * n_slots))
        self._reference: Any = None

    def prepare_for_load(self, num_tasks: int) -> None:
        n_slots = len(self.layout.slots)
        self.task_conditions = torch.zeros(num_tasks, self.cond_dim)
        self.task_mean = torch.zeros(num_tasks, n_slots)
        self.task_std = torch.zeros(num_tasks, n_slots)

    # -- normalisation ------------------------------------------------------------------------
    def checkpoint_stats(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-checkpoint, per-tensor (mean, unbiased std), each [N, T] (``normalizeLoraWeight_small.py``)."""
        segs = self.layout.segments()
        mean = torch.stack([vectors[:, a:b].mean(1) for a, b in segs], 1)
        std = torch.stack([vectors[:, a:b].std(1) if b - a > 1 else torch.zeros(len(vectors)) for a, b in segs], 1)
        return mean, std

    def normalize_checkpoints(self, vectors: torch.Tensor) -> torch.Tensor:
        """Each row z-scored per tensor by its own statistics (the code's per-checkpoint normalisation)."""
        mean, std = self.checkpoint_stats(vectors)
        return torch.stack([self.layout.normalize(v, (m, s)) for v, m, s in zip(vectors, mean, std)])

    # -- training -----------------------------------------------------------------------------
    def fit(self, bank: CheckpointBank, conditions: torch.Tensor, *, epochs: int | None = None,
            **kw: Any) -> dict[str, Any]:
        """Train on every (task condition, checkpoints) pair of ``bank`` at once (the paper's multi-task
        generator), then store the per-task and pooled de-normalisation statistics."""
        if kw:
            raise GeneratorError(f"icm_lora.fit: unknown option(s) {sorted(kw)}")
        a: ICMLoRAArgs = self.args
        c = self._remember(bank, conditions)
        if a.conditional and len(c) > 1 and torch.cdist(c, c).add(torch.eye(len(c)) * 1e9).min() <= 1e-12:
            raise GeneratorError("two tasks have the same condition; a conditional generator cannot tell them apart")
        x_raw, idx = bank.all_vectors()
        if len(x_raw) < 2:
            raise GeneratorError("icm_lora needs at least 2 checkpoints in the bank (BatchNorm batch statistics)")
        x = self.normalize_checkpoints(x_raw)
        mean, std = self.checkpoint_stats(x_raw)
        n_tasks = len(bank.tasks)
        self.task_conditions = c.clone()
        self.task_mean = torch.stack([mean[idx == i].mean(0) for i in range(n_tasks)])
        self.task_std = torch.stack([std[idx == i].mean(0) for i in range(n_tasks)])
        self.pooled_mean, self.pooled_std = mean.mean(0), std.mean(0)
        if a.unseen_stats == "head":
            self.stats_head = self._fit_stats_head(c, self.task_mean, self.task_std)
        cond = c[idx] if a.conditional else torch.zeros(len(x), 0)
        device = next(self.parameters()).device
        x, cond = x.to(device), cond.to(device)
        epochs = a.epochs if epochs is None else int(epochs)
        gen = torch.Generator().manual_seed(a.seed)
        opt = torch.optim.AdamW(self.net.parameters(), lr=a.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, 2 * epochs))
        history, t0 = [], time.perf_counter()
        self.net.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=gen)
            total, rec_sum, kld_sum, seen = 0.0, 0.0, 0.0, 0
            for batch in self._batches(perm, a.batch_size):
                loss, rec, kld = self.net.loss(x[batch], cond[batch], a.kld_weight, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                n = len(batch)
                total, rec_sum, kld_sum, seen = total + loss.item() * n, rec_sum + rec.item() * n, \
                    kld_sum + kld.item() * n, seen + n
            sched.step()
            history.append({"loss": total / seen, "recon": rec_sum / seen, "kld": kld_sum / seen})
        self._recalibrate_batchnorm(x, cond, gen)
        self.eval()
        last = history[-1] if history else {"loss": math.nan, "recon": math.nan, "kld": math.nan}
        return {"epochs": epochs, "samples": len(x), "tasks": n_tasks, "seconds": time.perf_counter() - t0,
                "final_loss": last["loss"], "final_recon": last["recon"], "final_kld": last["kld"],
                "history": history}

    @staticmethod
    def _batches(perm: torch.Tensor, size: int) -> list[torch.Tensor]:
        out = list(perm.split(size))
        if len(out) > 1 and len(out[-1]) == 1:  # BatchNorm cannot normalise one sample at length 1
            last = out.pop()
            out[-1] = torch.cat([out[-1], last])
        return out

    @torch.no_grad()
    def _recalibrate_batchnorm(self, x: torch.Tensor, cond: torch.Tensor, gen: torch.Generator) -> None:
        bns = [m for m in self.net.modules() if isinstance(m, nn.BatchNorm1d)]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the pass
        self.net.train()
        try:
            for batch in self._batches(torch.arange(len(x)), max(self.args.batch_size, 2)):
                self.net.loss(x[batch], cond[batch], 0.0, gen)
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            self.net.eval()

    def _fit_stats_head(self, c: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """Ridge regression [c, 1] ↦ [mean, log std] per tensor (lorakit's choice for unseen tasks)."""
        phi = torch.cat([c, torch.ones(len(c), 1)], 1).double()
        y = torch.cat([mean, std.clamp_min(1e-12).log()], 1).double()
        reg = self.args.ridge * torch.eye(phi.shape[1], dtype=torch.float64)
        reg[-1, -1] = 0.0  # the intercept is not penalised
        return torch.linalg.solve(phi.T @ phi + reg, phi.T @ y).float().contiguous()  # as a loaded one

    # -- sampling -----------------------------------------------------------------------------
    def seen_task(self, c: torch.Tensor) -> int | None:
        """Index of the training task whose condition equals ``c`` (within ``match_atol``), else None."""
        if not len(self.task_conditions):
            return None
        tc = self.task_conditions.to(c)
        tol = self.args.match_atol * (1 + tc.abs().amax(1))
        hits = ((tc - c).abs().amax(1) <= tol).nonzero().flatten()
        return int(hits[0]) if len(hits) else None

    def stats_for(self, c: torch.Tensor, reference: AdapterState | torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-tensor (mean, std) used to de-normalise a sample for condition ``c``."""
        if self.args.denorm == "reference_checkpoint":
            if reference is None:
                raise GeneratorError("icm_lora with denorm='reference_checkpoint' needs reference= (a real "
                                     "checkpoint of the task, as the official code; this makes generation not "
                                     "zero-shot); use denorm='bank' for stored statistics")
            v = self.layout.flatten(reference, "reference checkpoint") if isinstance(reference, AdapterState) \
                else self.layout._check_vectors(reference.detach().float().cpu(), "reference vector")
            if v.dim() != 1:
                raise GeneratorError(f"reference must be one [D] vector, got shape {tuple(v.shape)}")
            mean, std = self.checkpoint_stats(v[None])
            return mean[0], std[0]
        if reference is not None:
            raise GeneratorError("reference= is used only with denorm='reference_checkpoint'")
        if not self.args.conditional:
            return self.pooled_mean, self.pooled_std
        i = self.seen_task(c)
        if i is not None:
            return self.task_mean[i], self.task_std[i]
        if self.args.unseen_stats == "head":
            out = torch.cat([c.cpu(), torch.ones(1)]) @ self.stats_head.cpu()
            n = len(self.layout.slots)
            return out[:n], out[n:].exp()
        return self.pooled_mean, self.pooled_std

    @torch.no_grad()
    def sample_normalized(self, c: torch.Tensor, n: int = 1, *, seed: int | None = None,
                          mode: str = "sample") -> torch.Tensor:
        """[n, D] decoder outputs in the z-scored space (before de-normalisation)."""
        self._check_ready()
        c = self.check_condition(c)
        if mode not in ("sample", "mean"):
            raise GeneratorError(f"mode must be 'sample' or 'mean', got {mode!r}")
        if not isinstance(n, int) or n < 1:
            raise GeneratorError(f"n must be a positive integer, got {n!r}")
        device = next(self.parameters()).device
        if mode == "mean":
            z = torch.zeros(n, self.args.latent_dim)
        else:
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            z = torch.randn(n, self.args.latent_dim, generator=gen)
        cond = c.expand(n, -1) if self.args.conditional else torch.zeros(n, 0)
        was = self.net.training
        self.net.eval()  # eval-mode BatchNorm (recalibrated running statistics) at sampling
        try:
            out = self.net.decode(z.to(device), cond.to(device))
        finally:
            self.net.train(was)
        return out[:, :self.layout.dim].float().cpu()

    def sample(self, c: torch.Tensor, n: int = 1, *, seed: int | None = None, mode: str = "sample",
               reference: AdapterState | torch.Tensor | None = None) -> torch.Tensor:
        x = self.sample_normalized(c, n, seed=seed, mode=mode)
        stats = self.stats_for(c.float(), reference if reference is not None else self._reference)
        return self.layout.denormalize(x, (stats[0].cpu(), stats[1].cpu()))

    def generate(self, *, reference: AdapterState | torch.Tensor | None = None, **kw: Any) -> AdapterState:
        """:meth:`Generator.generate`, plus ``reference=`` for ``denorm="reference_checkpoint"``."""
        self._reference = reference
        try:
            return super().generate(**kw)
        finally:
            self._reference = None
