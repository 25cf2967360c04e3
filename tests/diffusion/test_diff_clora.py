"""CLoRA: NT-Xent against a loop reference, attention capture, masks and masked fusion against a manual
computation, the latent step lowers the contrastive loss, UNet pass counts."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

import lorakit  # noqa: E402
from lorakit.core.inject import adapter_modules  # noqa: E402
from lorakit.diffusion import UNET_TARGETS  # noqa: E402
from lorakit.diffusion.clora import (  # noqa: E402
    AttentionStore,
    CLoRAComposer,
    StoreProcessor,
    branch_masks,
    contrastive_loss,
    fuse,
    nt_xent,
)
from lorakit.diffusion.composers import cfg, sample  # noqa: E402
from lorakit.diffusion.tiny import tiny_unet  # noqa: E402

TOKENS = [[[1], [1, 2], []], [[3], [], [3]]]  # concept c in prompt j (prompts: base, LoRA a, LoRA b)


def _unet():
    unet = tiny_unet(0)
    for i, name in enumerate(("a", "b")):
        lorakit.attach(unet, lorakit.AdapterSpec(form_args={"r": 2, "alpha": 2.0}, targets=list(UNET_TARGETS)),
                       name, seed=i)
        g = torch.Generator().manual_seed(60 + i)
        with torch.no_grad():
            for form in adapter_modules(unet, name).values():
                form.lora_B.copy_(0.5 * torch.randn(form.lora_B.shape, generator=g))
    lorakit.set_active(unet, [])
    return unet.eval()


def test_nt_xent_matches_the_loop_formula():
    g = torch.Generator().manual_seed(0)
    e, labels, tau = torch.randn(6, 5, generator=g), torch.tensor([0, 0, 1, 1, 1, 2]), 0.5
    e_n = e / e.norm(dim=1, keepdim=True)
    terms = []
    for a in range(6):
        for p in range(6):
            if a != p and labels[a] == labels[p]:
                pos = math.exp(float(e_n[a] @ e_n[p]) / tau)
                neg = sum(math.exp(float(e_n[a] @ e_n[n]) / tau) for n in range(6) if labels[n] != labels[a])
                terms.append(-math.log(pos / (pos + neg)))
    assert float(nt_xent(e, labels, tau)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert float(nt_xent(e[:2], torch.tensor([0, 1]))) == 0.0  # no positive pair


def test_attention_store_captures_cross_attention():
    unet = tiny_unet(0)
    store = AttentionStore(8)
    unet.set_attn_processor(StoreProcessor(store))
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    with torch.no_grad():
        out = unet(x, torch.tensor(10), encoder_hidden_states=enc).sample
    # 8×8 cross-attention: the first down level and the two last up-block layers
    assert len(store.maps) == 3 and store.mean().shape == (2, 64, 5)
    torch.testing.assert_close(store.mean().sum(-1), torch.ones(2, 64))
    ref = tiny_unet(0)
    with torch.no_grad():
        torch.testing.assert_close(out, ref(x, torch.tensor(10), encoder_hidden_states=enc).sample, rtol=1e-5,
                                   atol=1e-6)


def test_masks_and_fusion():
    g = torch.Generator().manual_seed(2)
    maps = [torch.rand(1, 4, 5, generator=g) for _ in range(3)]
    masks = branch_masks(maps, TOKENS, 0.3)
    a1 = maps[1][0, :, [1, 2]]
    m1 = (a1 > 0.3 * a1.amax(0, keepdim=True)).any(-1).float()
    a2 = maps[2][0, :, [3]]
    m2 = (a2 > 0.3 * a2.amax(0, keepdim=True)).any(-1).float()
    torch.testing.assert_close(masks[:, 0], torch.stack([1 - torch.maximum(m1, m2), m1, m2]))
    eps = [torch.randn(1, 3, 4, 4, generator=g) for _ in range(3)]
    fused = fuse(eps, masks)
    up = masks.reshape(3, 1, 2, 2).repeat_interleave(2, -1).repeat_interleave(2, -2)  # nearest 2×2 → 4×4
    ref = sum(up[j] * eps[j][0] for j in range(3)) / up.sum(0)
    torch.testing.assert_close(fused[0], ref)


def test_latent_step_lowers_the_contrastive_loss_and_pass_counts():
    from diffusers import DDIMScheduler

    unet = _unet()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    prompts = [torch.randn(1, 5, 12, generator=g) for _ in range(3)]
    uncond = torch.randn(1, 5, 12, generator=g)
    comp = CLoRAComposer(unet, ["a", "b"], concept_tokens=TOKENS, res=8, step_size=0.5)
    comp.total_steps = 10
    comp.setup()
    t = torch.tensor(400)
    with torch.no_grad():
        z1 = comp.prepare(x, t, 0, prompts, uncond)
        comp.prepare(z1, t, 0, prompts, uncond)
    assert comp.losses[1] < comp.losses[0] and comp.grad_passes == 6
    comp.teardown()
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}
    comp = CLoRAComposer(unet, ["a", "b"], concept_tokens=TOKENS, res=8)
    s = sample(comp, prompts, uncond, scheduler=DDIMScheduler(num_train_timesteps=100), steps=5, shape=(4, 8, 8))
    assert s.passes == 3 * 5 and comp.grad_passes == 3 * 3  # steps 0, 1, 2 < 0.6·5
    assert torch.isfinite(s.latents).all() and lorakit.active_adapters(unet) == ()


def test_fusion_with_full_masks_is_the_branch_prediction():
    """All pixels in LoRA a's mask only: the fused ε is branch a's CFG prediction."""
    unet = _unet()
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor(300)
    prompts = [torch.randn(1, 5, 12, generator=g) for _ in range(3)]
    uncond = torch.randn(1, 5, 12, generator=g)
    maps = [torch.zeros(1, 64, 5) for _ in range(3)]
    maps[1][..., 1] = 1.0
    masks = branch_masks(maps, [[[1], [1], []], [[3], [], [3]]], 0.3)
    assert masks[1].min() == 1 and masks[0].max() == 0
    lorakit.set_active(unet, ["a"])
    with torch.no_grad():
        eu = unet(x, t, encoder_hidden_states=uncond).sample
        ec = unet(x, t, encoder_hidden_states=prompts[1]).sample
    lorakit.set_active(unet, [])
    torch.testing.assert_close(fuse([eu * 0, eu, eu * 7], masks), eu)
    torch.testing.assert_close(cfg(fuse([eu, eu, eu], masks), fuse([ec, ec, ec], masks), 2.0), cfg(eu, ec, 2.0))
    assert contrastive_loss(maps, [[[1], [1], []], [[3], [], [3]]]).item() >= 0
