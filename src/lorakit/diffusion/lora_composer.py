"""LoRA-Composer (Yang et al., "LoRA-Composer: Leveraging Low-Rank Adaptation for Multi-Concept Customization in
Training-Free Diffusion Models", arXiv 2403.11627; official code Young98CN/LoRA_Composer,
``region_lora/multi_lora_sample.py``: register_region_aware_attention, _compute_max_attention_per_index,
_compute_loss, replace_latents).

Inputs: a global prompt, and per concept r a LoRA, a region prompt and a box (x0, y0, x1, y1) in [0, 1].

- **Concept injection** (every cross-attention layer, every step): for the conditional rows, inside box r the
  attention reads K_r = to_k^{(r)}(c_r), V_r = to_v^{(r)}(c_r) (LoRA r's projections on its region prompt c_r)
  and LoRA r's output projection: o_r = to_out^{(r)}(softmax(q K_rᵀ/√d) V_r), q from the base's to_q on the
  query (the official code keeps the global query); pixels in several boxes average their o_r; outside every
  box the base cross-attention with the global prompt. The unconditional rows are left as they are.
- **Concept isolation** (every self-attention layer): queries inside box k get a bias of −1e6 (official
  value) on the keys inside the boxes j ≠ k (pixels of box k that lie in box j too are not blocked).

- **Latent refinement** (steps i < ``refine_steps`` = 25, stopped once the loss rises after step 5): on the
  global cross-attention maps A_tok of each concept's tokens (at ``res``×``res``, head- and layer-averaged,
  divided by their maximum: lorakit's normalisation) and the self-attention maps S,
  L = Σ_tok 8·max(0, 1 − mean top-20 %(A_tok ⊙ G_r)) + Σ_tok 2·(‖max_y A_tok[box] − 1‖₁ + ‖max_x A_tok[box] − 1‖₁)
      + Σ_r 10·mean top-k(S[box r → outside box r]),
  G_r a Gaussian centred in box r (σ = half the box size; lorakit's choice), the L1 terms averaged over the
  box's columns / rows, k = the box's pixel count; z ← z − η_i·∇_z L, η_i = ``step_size``·√linspace(1, 0.5)[i]
  (step_size 20).
- **Latent re-initialisation** (before step 0): one UNet pass on z_T; for each concept, a box-sized window
  slides over its token map (a convolution with ones); the latent patch under the best window is copied into
  the concept's box; the latent is re-standardised to z_T's mean and std (× the scheduler's σ_init, 1 here).

LoRA r's projections are selected through the unified runtime (a per-forward ``AdapterContext`` routing every
row to LoRA r), so no adapter is merged or copied. Each step is one UNet pass (``passes``; the N region
branches are computed inside its cross-attention layers); refinement and re-initialisation passes are counted
in ``grad_passes``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.core.context import AdapterContext, use_context
from lorakit.diffusion.composers import ComposeError, Composer, cfg

ISOLATION_BIAS = -1e6


def box_mask(box: Sequence[float], h: int, w: int) -> torch.Tensor:
    """Boolean [h·w] mask of the pixels whose centres lie in ``box`` = (x0, y0, x1, y1) ⊂ [0, 1]."""
    x0, y0, x1, y1 = box
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ComposeError(f"lora_composer: box {tuple(box)} must satisfy 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1")
    ys = (torch.arange(h) + 0.5) / h
    xs = (torch.arange(w) + 0.5) / w
    m = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
    return m.flatten()


def _side(q: int, aspect: float = 1.0) -> tuple[int, int]:
    h = int(round((q / aspect) ** 0.5))
    if h * int(round(q / max(h, 1))) != q:
        raise ComposeError(f"lora_composer: {q} attention queries are not a square latent grid")
    return h, q // h


def _check(attn: nn.Module) -> None:
    if attn.group_norm is not None or attn.spatial_norm is not None or attn.residual_connection or \
            attn.rescale_output_factor != 1.0:
        raise ComposeError("lora_composer: only the plain Transformer-block attention of UNet2DConditionModel is "
                           "supported")


def _attend(attn: nn.Module, q: torch.Tensor, enc: torch.Tensor, bias: torch.Tensor | None = None,
            keep: list | None = None) -> torch.Tensor:
    """to_out(softmax(q Kᵀ/√d + bias) V) with K, V from ``enc`` (the adapters the current context selects);
    appends the head-averaged probabilities [rows, Q, K] to ``keep`` when given."""
    k = attn.head_to_batch_dim(attn.to_k(enc))
    v = attn.head_to_batch_dim(attn.to_v(enc))
    probs = attn.get_attention_scores(q, k, bias)
    if keep is not None:
        keep.append(probs.view(-1, attn.heads, *probs.shape[1:]).mean(1))
    h = attn.batch_to_head_dim(torch.bmm(probs, v))
    return attn.to_out[1](attn.to_out[0](h))


class RegionProcessor:
    """The attention processor of :class:`LoRAComposerComposer` (see the module docstring)."""

    def __init__(self, composer: LoRAComposerComposer) -> None:
        self.c = composer

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        _check(attn)
        if attention_mask is not None:
            raise ComposeError("lora_composer: attention masks are not supported")
        rows, n_q, _ = hidden_states.shape
        h, w = _side(n_q)
        masks = torch.stack([box_mask(b, h, w) for b in self.c.boxes]).to(hidden_states.device)  # [N, Q]
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        if encoder_hidden_states is None:  # self-attention: concept isolation
            block = torch.zeros(n_q, n_q, device=hidden_states.device)
            for k_ in range(len(masks)):
                others = masks[[j for j in range(len(masks)) if j != k_]].any(0) & ~masks[k_] if len(masks) > 1 \
                    else torch.zeros_like(masks[k_])
                block[masks[k_][:, None] & others[None, :]] = ISOLATION_BIAS
            bias = block.expand(rows * attn.heads, n_q, n_q).to(q.dtype)
            keep = [] if self.c.recording and n_q == self.c.args.res ** 2 else None
            out = _attend(attn, q, hidden_states, bias, keep)
            if keep:
                self.c.self_maps.append(keep[0][self.c.cond_rows(rows)])
            return out
        enc = attn.norm_encoder_hidden_states(encoder_hidden_states) if attn.norm_cross else encoder_hidden_states
        keep = [] if self.c.recording and n_q == self.c.args.res ** 2 else None
        out = _attend(attn, q, enc, None, keep)
        if keep:
            self.c.cross_maps.append(keep[0][self.c.cond_rows(rows)])
        if not self.c.args.injection:
            return out
        cond = self.c.cond_rows(rows)
        n = cond.stop - cond.start
        region = torch.zeros_like(out[cond])
        for r, name in enumerate(self.c.loras):
            emb = self.c.region_embeddings[r].to(enc.dtype)
            emb = emb.expand(n, *emb.shape[1:])
            with use_context(AdapterContext(names=(name,), ids=torch.zeros(n, dtype=torch.long))):
                q_r = q.view(rows, attn.heads, n_q, -1)[cond].reshape(n * attn.heads, n_q, -1)
                o_r = _attend(attn, q_r, emb)
            region = region + masks[r][None, :, None].to(out.dtype) * o_r
        count = masks.sum(0).to(out.dtype)[None, :, None]
        inside = count > 0
        fused = torch.where(inside, region / count.clamp_min(1), out[cond])
        return torch.cat([out[: cond.start], fused, out[cond.stop:]])


def _gaussian(box: Sequence[float], h: int, w: int) -> torch.Tensor:
    x0, y0, x1, y1 = box
    ys, xs = (torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w
    gy = torch.exp(-0.5 * ((ys - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2)
    gx = torch.exp(-0.5 * ((xs - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2)
    return (gy[:, None] * gx[None, :]).flatten()


def composer_loss(cross: torch.Tensor, self_attn: torch.Tensor | None, tokens: Sequence[Sequence[int]],
                  boxes: Sequence[Sequence[float]], top: float = 0.2) -> torch.Tensor:
    """LoRA-Composer's refinement loss (module docstring) for maps ``cross`` [B, HW, T] and ``self_attn``
    [B, HW, HW] (None: no region term), concept r's token indices ``tokens[r]`` in the global prompt."""
    b, hw, _ = cross.shape
    h, w = _side(hw)
    total = cross.sum() * 0.0
    for r, box in enumerate(boxes):
        inside = box_mask(box, h, w).to(cross.device)
        g = _gaussian(box, h, w).to(cross.device)
        rows_in = inside.view(h, w).any(1)
        cols_in = inside.view(h, w).any(0)
        for tok in tokens[r]:
            a = cross[:, :, tok]
            a = a / a.amax(1, keepdim=True).clamp_min(1e-8)
            k = max(1, int(top * hw))
            total = total + 8 * torch.clamp(1 - (a * g).topk(k, dim=1).values.mean(1), min=0).sum()
            boxed = (a * inside).view(b, h, w)
            fill_x = (boxed.amax(1)[:, cols_in] - 1).abs().mean(1)  # max over rows, per column in the box
            fill_y = (boxed.amax(2)[:, rows_in] - 1).abs().mean(1)
            total = total + 2 * (fill_x + fill_y).sum()
        if self_attn is not None:
            out_to = self_attn[:, inside][:, :, ~inside]  # [B, |box|, |outside|]
            if out_to.numel():
                k = min(int(inside.sum()), out_to.shape[-1])
                total = total + 10 * out_to.flatten(1).topk(k, dim=1).values.mean(1).sum()
    return total


@dataclass(frozen=True)
class LoRAComposerArgs:
    isolation: bool = True
    injection: bool = True
    refine: bool = True
    reinit: bool = True
    refine_steps: int = 25
    min_refine_steps: int = 5
    step_size: float = 20.0
    res: int = 16


class LoRAComposerComposer(Composer):
    """LoRA-Composer's attention rewrites (see the module docstring). ``cond`` is the global prompt;
    ``region_prompts[r]`` ([1, T, D]) and ``boxes[r]`` belong to LoRA r."""

    name = "lora_composer"
    Args = LoRAComposerArgs

    def __init__(self, unet: nn.Module, loras: Sequence[str], weights: Sequence[float] | None = None, *,
                 region_prompts: Sequence[torch.Tensor] | None = None,
                 boxes: Sequence[Sequence[float]] | None = None,
                 concept_tokens: Sequence[Sequence[int]] | None = None, **args: Any) -> None:
        super().__init__(unet, loras, weights, **args)
        if region_prompts is None or boxes is None or len(region_prompts) != len(self.loras) \
                or len(boxes) != len(self.loras):
            raise ComposeError("lora_composer needs one region prompt and one box per LoRA")
        for b in boxes:
            box_mask(b, 2, 2)  # validates
        self.region_embeddings = list(region_prompts)
        self.boxes = [tuple(float(v) for v in b) for b in boxes]
        if concept_tokens is not None and len(concept_tokens) != len(self.loras):
            raise ComposeError("lora_composer: concept_tokens needs one list of token indices per LoRA")
        self.concept_tokens = None if concept_tokens is None else [list(t) for t in concept_tokens]
        self.recording = False
        self.cross_maps: list[torch.Tensor] = []
        self.self_maps: list[torch.Tensor] = []
        self.grad_passes = 0
        self.losses: list[float] = []
        self._stopped = False
        self._pair = True

    def cond_rows(self, rows: int) -> slice:
        return slice(rows // 2, rows) if self._pair else slice(0, rows)  # run_pair stacks [uncond; cond]

    def setup(self) -> None:
        self._previous = lorakit.active_adapters(self.unet)
        self._processors = self.unet.attn_processors
        proc = RegionProcessor(self)
        procs = {}
        for name, p in self._processors.items():
            is_cross = name.endswith("attn2.processor")
            use = (is_cross and self.args.injection) or (not is_cross and self.args.isolation)
            procs[name] = proc if use else p
        self.unet.set_attn_processor(procs)
        lorakit.set_active(self.unet, [])  # the global branch is the base model
        self._pair = True
        self._stopped = False

    def teardown(self) -> None:
        self.unet.set_attn_processor(self._processors)
        lorakit.set_active(self.unet, list(self._previous))

    def _maps(self, z: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One UNet pass on the conditional prompt alone, recording the maps at ``res``."""
        self.cross_maps, self.self_maps, self.recording, self._pair = [], [], True, False
        try:
            self.unet(z, t, encoder_hidden_states=cond.expand(z.shape[0], *cond.shape[1:]))
        finally:
            self.recording, self._pair = False, True
        self.grad_passes += 1
        if not self.cross_maps:
            raise ComposeError(f"lora_composer: no attention layer at {self.args.res}×{self.args.res}; set res")
        return (torch.stack(self.cross_maps).mean(0),
                torch.stack(self.self_maps).mean(0) if self.self_maps else None)

    def reinitialise(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Latent re-initialisation (module docstring)."""
        with torch.no_grad():
            cross, _ = self._maps(latents, t, cond)
        n, c, H, W = latents.shape
        h, w = _side(cross.shape[1])
        out = latents.clone()
        for r, box in enumerate(self.boxes):
            target = box_mask(box, H, W).view(H, W)
            ys, xs = target.any(1).nonzero().flatten(), target.any(0).nonzero().flatten()
            bh, bw = len(ys), len(xs)
            m = cross[:, :, self.concept_tokens[r]].mean(-1).view(n, 1, h, w)
            m = torch.nn.functional.interpolate(m, size=(H, W), mode="nearest")
            score = torch.nn.functional.conv2d(m, torch.ones(1, 1, bh, bw))  # [n, 1, H-bh+1, W-bw+1]
            for i in range(n):
                best = int(score[i, 0].flatten().argmax())
                y, x = divmod(best, score.shape[-1])
                out[i, :, ys[0]:ys[0] + bh, xs[0]:xs[0] + bw] = latents[i, :, y:y + bh, x:x + bw]
        mean, std = latents.mean(dim=(1, 2, 3), keepdim=True), latents.std(dim=(1, 2, 3), keepdim=True)
        out = (out - out.mean(dim=(1, 2, 3), keepdim=True)) / out.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-8)
        return out * std + mean

    def prepare(self, latents, t, step, cond, uncond):
        if self.concept_tokens is None:
            return latents
        c = self.cond_for(cond, 0)
        if step == 0 and self.args.reinit:
            latents = self.reinitialise(latents, t, c)
        if not self.args.refine or self._stopped or step >= self.args.refine_steps:
            return latents
        z = latents.detach().requires_grad_(True)
        with torch.enable_grad():
            cross, selfm = self._maps(z, t, c)
            loss = composer_loss(cross, selfm, self.concept_tokens, self.boxes)
        value = float(loss)
        if step >= self.args.min_refine_steps and self.losses and value > self.losses[-1]:
            self._stopped = True  # the official loop stops refining once the loss rises after step 5
        self.losses.append(value)
        if self._stopped or not loss.requires_grad:
            return latents
        (grad,) = torch.autograd.grad(loss, z)
        n = self.args.refine_steps
        eta = self.args.step_size * (1.0 - 0.5 * step / max(n - 1, 1)) ** 0.5  # 20·√linspace(1, 0.5)[i]
        return (latents - eta * grad).detach()

    def noise(self, latents, t, step, cond, uncond, guidance):
        return cfg(*self.run_pair(latents, t, self.cond_for(cond, 0), uncond), guidance)
