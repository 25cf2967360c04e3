"""CLoRA (Meral, Simsar, Tombari, Yanardag, "CLoRA: A Contrastive Approach to Compose Multiple LoRA Models",
arXiv 2403.19776, ICCV 2025). The official ``gemlab-vt/clora`` was not available; this follows a copy with the
same API (``PinAura/clora-test pipeline_clora.py::CloraPipeline``), as ``METHODS.md`` §6 records.

Branches j = 0..N: branch 0 is the base (no LoRA) with the base prompt, branch j ≥ 1 is LoRA j with its own
prompt (the prompt with LoRA j's trigger word). ``concept_tokens[c][j]`` lists the token indices of concept c
in prompt j (WordPiece positions: MiniLM splits words, DIFFUSION.md pitfall 3).

Per step t:

1. **Attention store**: every branch's cross-attention probabilities at ``res``×``res`` queries (16×16) are
   averaged over heads and layers (down/mid/up), giving A_j ∈ [B, res², T].
2. **Contrastive latent update** while step < ``max_iter_fraction``·T (official: 30 of 50): each listed
   token's map, min–max normalised and flattened, is one embedding with class = its concept; the loss is
   NT-Xent (Chen et al., SimCLR, arXiv 2002.05709; as ``pytorch_metric_learning.losses.NTXentLoss``, τ = 0.5,
   cosine similarity): for every positive pair (a, p) of the same class,
   ℓ_ap = −log( e^{s_ap/τ} / (e^{s_ap/τ} + Σ_{n ∉ class(a)} e^{s_an/τ}) ), averaged over the pairs; then
   z ← z − η·∇_z L with η = ``step_size`` = 20. These passes run on the conditional prompts with gradients.
3. **Masked fusion**: mask_j = OR over the tokens of concept j in prompt j of 1[A_j,tok > 0.3·max A_j,tok];
   pixels no mask covers go to branch 0; masks are nearest-upsampled to the latent; for the unconditional and
   conditional halves separately ε = Σ_j mask_j·ε_j / Σ_j mask_j; then CFG.

UNet passes: ``passes`` counts the N + 1 CFG passes per step, ``grad_passes`` the N + 1 gradient passes of the
latent update steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.diffusion.composers import ComposeError, Composer, cfg


def nt_xent(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent over ``embeddings`` [M, D] with class ``labels`` [M] (see the module docstring); 0 without
    positive pairs."""
    e = F.normalize(embeddings, dim=1)
    sim = e @ e.T / temperature
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos = same & ~eye
    if not pos.any():
        return embeddings.sum() * 0.0
    neg = ~same
    a, p = pos.nonzero(as_tuple=True)
    neg_sum = torch.where(neg, sim.exp(), torch.zeros_like(sim)).sum(1)  # Σ_n e^{s_an/τ} per anchor
    num = sim[a, p].exp()
    return -(num / (num + neg_sum[a])).log().mean()


class AttentionStore:
    """Collects cross-attention probabilities at ``res``×``res`` queries (head-averaged) from every layer."""

    def __init__(self, res: int) -> None:
        self.res = res
        self.maps: list[torch.Tensor] = []

    def add(self, probs: torch.Tensor, heads: int) -> None:
        bh, q, t = probs.shape
        if q == self.res * self.res:
            self.maps.append(probs.view(bh // heads, heads, q, t).mean(1))

    def mean(self) -> torch.Tensor:
        if not self.maps:
            raise ComposeError(f"clora: no cross-attention layer attends at {self.res}×{self.res}; set res to a "
                               "resolution the UNet has")
        return torch.stack(self.maps).mean(0)

    def clear(self) -> None:
        self.maps = []


class StoreProcessor:
    """diffusers' classic ``AttnProcessor`` (explicit attention probabilities) that hands cross-attention
    probabilities to an :class:`AttentionStore`."""

    def __init__(self, store: AttentionStore) -> None:
        from lorakit.diffusion._deps import diffusers

        AttnProcessor = diffusers().models.attention_processor.AttnProcessor
        self.store, self.inner = store, AttnProcessor()

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
        if encoder_hidden_states is None:
            return self.inner(attn, hidden_states, None, *args, **kwargs)
        original = attn.get_attention_scores

        def scores(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            probs = original(query, key, mask)
            self.store.add(probs, attn.heads)
            return probs

        attn.get_attention_scores = scores
        try:
            return self.inner(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        finally:
            del attn.get_attention_scores


def minmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


def contrastive_loss(maps: Sequence[torch.Tensor], concept_tokens: Sequence[Sequence[Sequence[int]]],
                     temperature: float = 0.5) -> torch.Tensor:
    """Σ over batch rows of NT-Xent over the min–max normalised token maps (``maps[j]``: [B, HW, T])."""
    total = maps[0].sum() * 0.0
    for b in range(maps[0].shape[0]):
        emb, lab = [], []
        for c, per_prompt in enumerate(concept_tokens):
            for j, toks in enumerate(per_prompt):
                for tok in toks:
                    emb.append(minmax(maps[j][b, :, tok]))
                    lab.append(c)
        if emb:
            total = total + nt_xent(torch.stack(emb), torch.tensor(lab), temperature)
    return total


def branch_masks(maps: Sequence[torch.Tensor], concept_tokens: Sequence[Sequence[Sequence[int]]],
                 threshold: float = 0.3) -> torch.Tensor:
    """Masks [N+1, B, HW] (float 0/1): branch j ≥ 1 from the tokens of concept j−1 in prompt j, branch 0 where
    no other mask is."""
    out = []
    for j in range(1, len(maps)):
        toks = concept_tokens[j - 1][j]
        if not toks:
            raise ComposeError(f"clora: concept {j - 1} lists no token in prompt {j} (its LoRA's branch)")
        a = maps[j][:, :, list(toks)]  # [B, HW, k]
        out.append((a > threshold * a.amax(1, keepdim=True)).any(-1).float())
    rest = 1.0 - torch.stack(out).amax(0) if out else torch.ones_like(maps[0][:, :, 0])
    return torch.stack([rest, *out])


def fuse(eps: Sequence[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """ε = Σ_j m_j ε_j / Σ_j m_j with masks [N+1, B, HW] nearest-upsampled to ε's [B, C, H, W]."""
    n, b, hw = masks.shape
    r = int(round(hw ** 0.5))
    m = F.interpolate(masks.reshape(n * b, 1, r, r), size=eps[0].shape[-2:], mode="nearest").reshape(n, b, 1,
                                                                                                         *eps[0].shape[-2:])
    num = sum(m[j] * e for j, e in enumerate(eps))
    return num / m.sum(0).clamp_min(1e-8)


@dataclass(frozen=True)
class CLoRAArgs:
    step_size: float = 20.0
    max_iter_fraction: float = 0.6  # official: 30 of 50 steps
    temperature: float = 0.5
    threshold: float = 0.3
    res: int = 16

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_iter_fraction <= 1.0 or self.temperature <= 0 or self.res < 1:
            raise ValueError("clora: max_iter_fraction in [0, 1], temperature > 0 and res >= 1 are required")


class CLoRAComposer(Composer):
    """CLoRA (see the module docstring). ``cond`` = N + 1 prompt embeddings (base prompt, then one per LoRA);
    ``concept_tokens[c][j]`` = token indices of concept c (LoRA c) in prompt j."""

    name = "clora"
    Args = CLoRAArgs

    def __init__(self, unet: nn.Module, loras: Sequence[str], weights: Sequence[float] | None = None, *,
                 concept_tokens: Sequence[Sequence[Sequence[int]]] | None = None, **args: Any) -> None:
        super().__init__(unet, loras, weights, **args)
        n = len(self.loras)
        if concept_tokens is None or len(concept_tokens) != n or any(len(p) != n + 1 for p in concept_tokens):
            raise ComposeError(f"clora: concept_tokens must be [{n} concepts][{n + 1} prompts][token indices]")
        self.concept_tokens = [[list(t) for t in p] for p in concept_tokens]
        self.grad_passes = 0
        self.losses: list[float] = []

    def setup(self) -> None:
        self._previous = lorakit.active_adapters(self.unet)
        self._processors = self.unet.attn_processors
        self.store = AttentionStore(self.args.res)
        self.unet.set_attn_processor(StoreProcessor(self.store))

    def teardown(self) -> None:
        self.unet.set_attn_processor(self._processors)
        lorakit.set_active(self.unet, list(self._previous))

    def _branches(self) -> list[list[str]]:
        return [[]] + [[n] for n in self.loras]

    def _prompts(self, cond: Any) -> list[torch.Tensor]:
        prompts = [cond] * (len(self.loras) + 1) if isinstance(cond, torch.Tensor) else list(cond)
        if len(prompts) != len(self.loras) + 1:
            raise ComposeError(f"clora: {len(prompts)} prompt embeddings for {len(self.loras) + 1} branches")
        return prompts

    def prepare(self, latents, t, step, cond, uncond):
        if step >= self.args.max_iter_fraction * (self.total_steps or 0):
            return latents
        prompts = self._prompts(cond)
        z = latents.detach().requires_grad_(True)
        with torch.enable_grad():
            maps = []
            for active, p in zip(self._branches(), prompts):
                lorakit.set_active(self.unet, active)
                self.store.clear()
                self.unet(z, t, encoder_hidden_states=p.expand(z.shape[0], *p.shape[1:]))
                maps.append(self.store.mean())
                self.grad_passes += 1
            loss = contrastive_loss(maps, self.concept_tokens, self.args.temperature)
        self.losses.append(float(loss))
        if not loss.requires_grad:
            return latents
        (grad,) = torch.autograd.grad(loss, z)
        return (latents - self.args.step_size * grad).detach()

    def noise(self, latents, t, step, cond, uncond, guidance):
        prompts = self._prompts(cond)
        n = latents.shape[0]
        eps_u, eps_c, maps = [], [], []
        for active, p in zip(self._branches(), prompts):
            lorakit.set_active(self.unet, active)
            self.store.clear()
            eu, ec = self.run_pair(latents, t, p, uncond)
            maps.append(self.store.mean()[n:])  # the conditional half's maps
            eps_u.append(eu)
            eps_c.append(ec)
        masks = branch_masks(maps, self.concept_tokens, self.args.threshold)
        self.last_masks = masks
        return cfg(fuse(eps_u, masks), fuse(eps_c, masks), guidance)
