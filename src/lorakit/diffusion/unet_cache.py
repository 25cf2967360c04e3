"""DeepCache-style feature caching for ``UNet2DConditionModel`` (Ma et al., DeepCache, arXiv 2312.00858, Sec. 3.2):
a full pass stores the deep feature (the input of the last up block); a shallow pass recomputes only the
shallow branch (``conv_in`` → first down block → last up block → output head) and reuses the stored
deep feature in place of everything below. CMLoRA (arXiv 2502.04923) uses it as its non-uniform cache
(official code ``LoRA_Cache/models/unets/unet_2d_condition.py``: cache_layer_id 0, cache_block_id 1; with this
testbed's three levels the recomputed shallow part is the 16×16 level, DIFFUSION.md pitfall 4).

The forward below is diffusers' ``UNet2DConditionModel.forward`` for the plain text-to-image case (no class /
added embeddings, ControlNet or T2I-Adapter residuals, attention masks); other configurations are refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class CacheError(ValueError):
    """A UNet configuration this cached forward does not cover, or a shallow pass without a cache."""


def _check(unet: nn.Module, sample: torch.Tensor) -> None:
    cfg = unet.config
    for key in ("class_embed_type", "addition_embed_type"):
        if cfg.get(key) is not None:
            raise CacheError(f"cached UNet forward: {key}={cfg[key]!r} is not supported (plain text-to-image only)")
    if getattr(unet, "num_upsamplers", 0) and any(d % (2 ** unet.num_upsamplers) for d in sample.shape[-2:]):
        raise CacheError(f"cached UNet forward: latent size {tuple(sample.shape[-2:])} is not a multiple of "
                         f"{2 ** unet.num_upsamplers}")


def _block(block: nn.Module, h: torch.Tensor, emb: torch.Tensor, enc: torch.Tensor, **kw: Any) -> Any:
    if getattr(block, "has_cross_attention", False):
        return block(hidden_states=h, temb=emb, encoder_hidden_states=enc, **kw)
    return block(hidden_states=h, temb=emb, **kw)


def cached_forward(unet: nn.Module, sample: torch.Tensor, timestep: torch.Tensor | int,
                   encoder_hidden_states: torch.Tensor, cache: dict[str, torch.Tensor] | None = None, *,
                   shallow: bool = False) -> torch.Tensor:
    """ε_θ(sample, t, c). Full pass (``shallow=False``): stores ``cache["deep"]`` when a ``cache`` dict is given.
    Shallow pass: reuses ``cache["deep"]`` and recomputes only the shallow branch."""
    _check(unet, sample)
    if shallow and (cache is None or "deep" not in cache):
        raise CacheError("a shallow pass needs a cache filled by a full pass")
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), None)
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    enc = unet.process_encoder_hidden_states(encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=None)
    h = unet.conv_in(sample)
    res: tuple[torch.Tensor, ...] = (h,)
    last = unet.up_blocks[-1]
    n_last = len(last.resnets)
    downs = unet.down_blocks[:1] if shallow else unet.down_blocks
    for block in downs:
        h, r = _block(block, h, emb, enc)
        res += r
    if shallow:
        if len(res) < n_last:
            raise CacheError(f"the first down level yields {len(res)} skip features; the last up block needs {n_last}")
        h = cache["deep"]
        res = res[:n_last]
    else:
        if unet.mid_block is not None:
            if getattr(unet.mid_block, "has_cross_attention", False):
                h = unet.mid_block(h, emb, encoder_hidden_states=enc)
            else:
                h = unet.mid_block(h, emb)
        for block in unet.up_blocks[:-1]:
            r, res = res[-len(block.resnets):], res[: -len(block.resnets)]
            h = _block(block, h, emb, enc, res_hidden_states_tuple=r)
        if cache is not None:
            cache["deep"] = h.detach()
    h = _block(last, h, emb, enc, res_hidden_states_tuple=res[-n_last:])
    if unet.conv_norm_out:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)
