"""CMLoRA — Cached Multi-LoRA (Zou et al., "Cached Multi-LoRA Composition for Multi-Concept Image Generation",
arXiv 2502.04923; official code Yqcca/CMLoRA, ``LoRA_Cache/pipelines/stable_diffusion/pipeline_offline.py``).

1. **Frequency ordering** (paper Sec. 3.2): each LoRA's image rendered alone, |FFT| of its grayscale, radial
   profile; LoRAs whose high-frequency band carries more of the spectrum form the set H, the others L, and
   the order is H then L. The official code hard-codes it by category (character/clothing/style/object = H,
   background = L); here it is computed (:func:`frequency_order`). The band statistic is lorakit's: the share
   of the radial amplitude profile at radii ≥ ``start``·r_max (0.3), over the radii that hold pixels. (The official
   online statistic averages radial bins [80:], an empty slice on small latents: NaN, after which its
   ``m >= g`` branch never fires; empty bins are never averaged here.)
2. **Backbone** (Composite-style, paper Eq. 6–7 / official ``__call__``): every step, one UNet pass per LoRA with
   only that LoRA active; the CFG halves are combined with weights c = N − 0.5, w_non = N/(c + N − 1),
   w_dom = c·w_non: ε = (w_dom·ε_dom + Σ_{i≠dom} w_non·ε_i)/N (weights sum to 1), for ε_u and ε_c alike, then
   CFG. The official code decrements ``dom_lora_coeff`` but never recomputes the weights: they stay constant
   (followed here). The dominant LoRA advances at each cache-refresh step through H while
   step ≤ ``switch_fraction``·T (official: step 120 of 220), afterwards through H + L.
3. **Non-uniform caching** (DeepCache-style, ``diffusion.unet_cache``): at a refresh step the dominant LoRA runs
   the full UNet and refreshes its cached deep feature; every other LoRA (and every LoRA between refresh
   steps) recomputes only the shallow branch from its own cache. ``cache_interval``: 0 = refresh every 2 steps
   in the first 37.5 % of the steps, every 3 until 87.5 %, every 2 after (official default); c > 1 = every c
   steps (the official quadratic-centre variant is not implemented); 1 = no caching, every LoRA runs the full
   UNet every step (lorakit's reading of "1 = every step").

UNet passes: ``passes`` counts full passes, ``shallow_passes`` the shallow ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

import lorakit
from lorakit.diffusion.composers import Composer, cfg
from lorakit.diffusion.unet_cache import cached_forward


def radial_profile(image: np.ndarray) -> np.ndarray:
    """Mean |FFT| (DC-centred, mean removed) of the grayscale image per integer radius, over the radii that
    hold at least one frequency (no empty bins, so no NaN)."""
    x = np.asarray(image, dtype=np.float64)
    gray = x.mean(axis=-1) if x.ndim == 3 else x
    amp = np.abs(np.fft.fftshift(np.fft.fft2(gray - gray.mean())))
    h, w = amp.shape
    yy, xx = np.indices((h, w))
    r = np.rint(np.hypot(yy - h // 2, xx - w // 2)).astype(int).ravel()
    sums, counts = np.bincount(r, weights=amp.ravel()), np.bincount(r)
    keep = counts > 0
    return sums[keep] / counts[keep]


def high_frequency_score(image: np.ndarray, start: float = 0.3) -> float:
    """Share of the radial amplitude profile at radii ≥ ``start``·r_max (0 for a flat image)."""
    prof = radial_profile(image)
    total = float(prof.sum())
    if total <= 0 or len(prof) < 2:
        return 0.0
    return float(prof[int(np.ceil(start * (len(prof) - 1))):].sum() / total)


def frequency_order(images: Mapping[str, np.ndarray], n_high: int | None = None, start: float = 0.3,
                    low_ratio: float = 0.5) -> tuple[list[str], list[str]]:
    """(H, L): LoRAs sorted by :func:`high_frequency_score` of their rendered image; H = the ``n_high`` highest,
    or (default) every LoRA scoring at least ``low_ratio`` × the highest score (lorakit's split rule; on the
    testbed it puts the sunset background, and only it, in L)."""
    if not images:
        raise ValueError("frequency_order needs at least one LoRA image")
    scores = {k: high_frequency_score(v, start) for k, v in images.items()}
    ranked = sorted(scores, key=lambda k: -scores[k])
    if n_high is None:
        top = scores[ranked[0]]
        n_high = sum(scores[k] >= low_ratio * top for k in ranked)
    if not 0 <= n_high <= len(ranked):
        raise ValueError(f"n_high must be in [0, {len(ranked)}], got {n_high}")
    return ranked[:n_high], ranked[n_high:]


def composite_weights(n: int, dominant: int) -> list[float]:
    """Per-LoRA weights of CMLoRA's backbone: w_dom/N for the dominant one, w_non/N for the others."""
    c = n - 0.5
    w_non = n / (c + n - 1)
    return [(c * w_non if i == dominant else w_non) / n for i in range(n)]


def refresh_steps(total: int, interval: int) -> list[int]:
    """The cache-refresh steps of a ``total``-step run (see the module docstring)."""
    if interval < 0:
        raise ValueError(f"cmlora: cache_interval must be >= 0, got {interval}")
    if interval >= 1:
        return list(range(0, total, interval))
    out, s = [], 0
    while s < total:
        out.append(s)
        s += 2 if s < 0.375 * total else 3 if s < 0.875 * total else 2
    return out


@dataclass(frozen=True)
class CMLoRAArgs:
    cache_interval: int = 0
    switch_fraction: float = 120 / 220  # official: switch step 120 of 220
    n_high: int | None = None  # the first n_high LoRAs (given in H-then-L order) are H; None: all are H

    def __post_init__(self) -> None:
        if self.cache_interval < 0 or not 0.0 <= self.switch_fraction <= 1.0:
            raise ValueError("cmlora: cache_interval must be >= 0 and switch_fraction in [0, 1]")


class CMLoRAComposer(Composer):
    """CMLoRA (see the module docstring). ``loras`` in H-then-L order (:func:`frequency_order`)."""

    name = "cmlora"
    Args = CMLoRAArgs

    def setup(self) -> None:
        self._previous = lorakit.active_adapters(self.unet)
        n_high = len(self.loras) if self.args.n_high is None else self.args.n_high
        if not 0 < n_high <= len(self.loras):
            raise ValueError(f"cmlora: n_high must be in [1, {len(self.loras)}], got {n_high}")
        self.high = self.loras[:n_high]
        total = self.total_steps or 0
        if total < 1:
            raise ValueError("cmlora needs the number of sampling steps (composer.total_steps; sample() sets it)")
        self.refresh = set(refresh_steps(total, self.args.cache_interval))
        self.caches: dict[str, dict[str, torch.Tensor]] = {n: {} for n in self.loras}
        self.shallow_passes = 0
        self._turn = -1
        self.schedule: list[str] = []  # the dominant LoRA of every step

    def teardown(self) -> None:
        lorakit.set_active(self.unet, list(self._previous))

    def dominant(self, step: int) -> str:
        if step in self.refresh or self.args.cache_interval == 1:
            self._turn += 1
        pool: Sequence[str] = self.high if step <= self.args.switch_fraction * self.total_steps else self.loras
        return pool[self._turn % len(pool)]

    def noise(self, latents, t, step, cond, uncond, guidance):
        dom = self.dominant(step)
        self.schedule.append(dom)
        n = latents.shape[0]
        x = torch.cat([latents, latents])
        eps_u, eps_c = [], []
        for i, name in enumerate(self.loras):
            lorakit.set_active(self.unet, [name])
            c = self.cond_for(cond, i)
            emb = torch.cat([uncond.expand(n, *uncond.shape[1:]), c.expand(n, *c.shape[1:])])
            cache = self.caches[name]
            full = self.args.cache_interval == 1 or not cache or (step in self.refresh and name == dom)
            out = cached_forward(self.unet, x, t, emb, cache, shallow=not full)
            if full:
                self.passes += 1
            else:
                self.shallow_passes += 1
            self.calls += 1
            eps_u.append(out[:n])
            eps_c.append(out[n:])
        w = composite_weights(len(self.loras), self.loras.index(dom))
        mix = lambda eps: sum(wi * e for wi, e in zip(w, eps))  # noqa: E731
        return cfg(mix(eps_u), mix(eps_c), guidance)
