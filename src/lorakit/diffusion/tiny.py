"""Tiny diffusers/transformers models built from configs (no downloads), as diffusers' own tests do: for tests
and examples of the SD 1.5 module layout (``UNet2DConditionModel`` + ``CLIPTextModel``)."""

from __future__ import annotations

import torch
from torch import nn


def tiny_unet(seed: int = 0, cross_attention_dim: int = 12) -> nn.Module:
    """A 2-level ``UNet2DConditionModel`` (4 latent channels, 8×8), cross-attention at both levels: the
    SD 1.5 block types and module names (attn1/attn2 to_q/k/v/out, ff, proj_in/out 1×1 convs, resnets)."""
    from lorakit.diffusion._deps import diffusers

    UNet2DConditionModel = diffusers().UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim, norm_num_groups=4, attention_head_dim=2).eval()


def tiny_text_encoder(seed: int = 0, hidden_size: int = 12) -> nn.Module:
    """A 2-layer ``CLIPTextModel`` (vocab 100, width ``hidden_size``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config = CLIPTextConfig(hidden_size=hidden_size, intermediate_size=24, num_attention_heads=2,
                                num_hidden_layers=2, vocab_size=100, max_position_embeddings=16,
                                projection_dim=hidden_size)
        return CLIPTextModel(config).eval()
