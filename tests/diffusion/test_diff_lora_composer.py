"""LoRA-Composer's attention rewrites against a dense manual computation: region-aware cross-attention
injection (LoRA r's K/V/out on its region prompt inside its box, averaged on overlaps, base outside) and
self-attention isolation between boxes; the sampling loop restores the processors."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")

import lorakit  # noqa: E402
from lorakit.core.inject import adapter_modules  # noqa: E402
from lorakit.diffusion import UNET_TARGETS  # noqa: E402
from lorakit.diffusion.composers import ComposeError, sample  # noqa: E402
from lorakit.diffusion.lora_composer import (  # noqa: E402
    ISOLATION_BIAS,
    LoRAComposerComposer,
    RegionProcessor,
    box_mask,
    composer_loss,
)
from lorakit.diffusion.tiny import tiny_unet  # noqa: E402

BLOCK = "down_blocks.0.attentions.0.transformer_blocks.0"
BOXES = [(0.0, 0.0, 0.625, 1.0), (0.5, 0.25, 1.0, 0.75)]  # overlapping in the 8×8 grid


def _unet():
    unet = tiny_unet(0)
    for i, name in enumerate(("a", "b")):
        lorakit.attach(unet, lorakit.AdapterSpec(form_args={"r": 2, "alpha": 2.0}, targets=list(UNET_TARGETS)),
                       name, seed=i)
        g = torch.Generator().manual_seed(80 + i)
        with torch.no_grad():
            for form in adapter_modules(unet, name).values():
                form.lora_B.copy_(0.5 * torch.randn(form.lora_B.shape, generator=g))
    lorakit.set_active(unet, [])
    return unet.eval()


def _weight(unet, path, name=None):
    layer = unet.get_submodule(path)
    W = layer.base_layer.weight.detach().clone()
    if name is not None:
        f = adapter_modules(unet, name)[path]
        W = W + (f.args.alpha / f.args.r) * f.lora_B @ f.lora_A
    return W, layer.base_layer.bias


def _lin(x, wb):
    W, b = wb
    return x @ W.T + (0 if b is None else b)


def _mha(q, k, v, heads, bias=None):
    B, Q, C = q.shape
    d = C // heads
    split = lambda t: t.view(t.shape[0], t.shape[1], heads, d).transpose(1, 2)  # noqa: E731
    s = split(q) @ split(k).transpose(-1, -2) / d ** 0.5
    if bias is not None:
        s = s + bias
    return (s.softmax(-1) @ split(v)).transpose(1, 2).reshape(B, Q, C)


def test_box_mask():
    m = box_mask((0.0, 0.0, 0.5, 0.25), 4, 4).view(4, 4)
    assert m.sum() == 2 and m[0, :2].all()
    with pytest.raises(ComposeError):
        box_mask((0.5, 0.0, 0.4, 1.0), 4, 4)


def test_region_injection_matches_dense_reference():
    unet = _unet()
    g = torch.Generator().manual_seed(0)
    regions = [torch.randn(1, 5, 12, generator=g), torch.randn(1, 5, 12, generator=g)]
    comp = LoRAComposerComposer(unet, ["a", "b"], region_prompts=regions, boxes=BOXES)
    attn = unet.get_submodule(f"{BLOCK}.attn2")
    x, enc = torch.randn(2, 64, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    with torch.no_grad():
        got = RegionProcessor(comp)(attn, x, enc)
        p = f"{BLOCK}.attn2"
        q = _lin(x, _weight(unet, f"{p}.to_q"))
        base = _lin(_mha(q, _lin(enc, _weight(unet, f"{p}.to_k")), _lin(enc, _weight(unet, f"{p}.to_v")), attn.heads),
                    _weight(unet, f"{p}.to_out.0"))
        outs = []
        for name, c in zip(("a", "b"), regions):
            o = _mha(q[1:], _lin(c, _weight(unet, f"{p}.to_k", name)), _lin(c, _weight(unet, f"{p}.to_v", name)),
                     attn.heads)
            outs.append(_lin(o, _weight(unet, f"{p}.to_out.0", name)))
    masks = torch.stack([box_mask(b, 8, 8) for b in BOXES]).float()
    count = masks.sum(0)[None, :, None]
    region = (masks[0][None, :, None] * outs[0] + masks[1][None, :, None] * outs[1]) / count.clamp_min(1)
    want_cond = torch.where(count > 0, region, base[1:])
    torch.testing.assert_close(got[:1], base[:1], rtol=1e-5, atol=1e-6)  # unconditional row untouched
    torch.testing.assert_close(got[1:], want_cond, rtol=1e-5, atol=1e-6)
    assert (masks.sum(0) == 2).any() and (masks.sum(0) == 0).any()  # overlap and outside both exercised


def test_self_attention_isolation_matches_dense_reference():
    unet = _unet()
    g = torch.Generator().manual_seed(1)
    comp = LoRAComposerComposer(unet, ["a", "b"], region_prompts=[torch.zeros(1, 5, 12)] * 2, boxes=BOXES)
    attn = unet.get_submodule(f"{BLOCK}.attn1")
    x = torch.randn(2, 64, 8, generator=g)
    with torch.no_grad():
        got = RegionProcessor(comp)(attn, x)
        p = f"{BLOCK}.attn1"
        m = [box_mask(b, 8, 8) for b in BOXES]
        bias = torch.zeros(64, 64)
        bias[m[0][:, None] & (m[1] & ~m[0])[None, :]] = ISOLATION_BIAS
        bias[m[1][:, None] & (m[0] & ~m[1])[None, :]] = ISOLATION_BIAS
        want = _lin(_mha(_lin(x, _weight(unet, f"{p}.to_q")), _lin(x, _weight(unet, f"{p}.to_k")),
                         _lin(x, _weight(unet, f"{p}.to_v")), attn.heads, bias), _weight(unet, f"{p}.to_out.0"))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_sampling_loop_one_pass_per_step_and_restores_processors():
    from diffusers import DDIMScheduler

    unet = _unet()
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(1, 5, 12, generator=g), torch.randn(1, 5, 12, generator=g)
    comp = LoRAComposerComposer(unet, ["a", "b"], region_prompts=[cond, uncond], boxes=BOXES)
    s = sample(comp, cond, uncond, scheduler=DDIMScheduler(num_train_timesteps=100), steps=3, shape=(4, 8, 8))
    assert s.passes == 3 and torch.isfinite(s.latents).all()
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}
    with pytest.raises(ComposeError, match="region prompt"):
        LoRAComposerComposer(unet, ["a", "b"], region_prompts=[cond], boxes=BOXES)


def test_refinement_loss_closed_forms():
    box = [(0.0, 0.0, 0.5, 0.5)]  # the top-left 2×2 pixels of a 4×4 map
    ind = box_mask(box[0], 4, 4).float()
    g_in = math.exp(-0.5 * 0.5 ** 2) ** 2  # every box pixel is 0.125 = half a half-width from the centre
    # the token attends exactly to its box: the fill terms vanish, enhancement = 8·(1 − mean top-3 of A·G)
    assert float(composer_loss(ind.view(1, 16, 1), None, [[0]], box)) == pytest.approx(8 * (1 - g_in), rel=1e-5)
    # the token attends to the far corner only: fill = 2·(1 + 1); enhancement from that pixel's Gaussian value
    far = torch.zeros(1, 16, 1)
    far[0, 15, 0] = 0.3
    g_far = math.exp(-0.5 * 2.5 ** 2) ** 2
    assert float(composer_loss(far, None, [[0]], box)) == pytest.approx(8 * (1 - g_far / 3) + 4, rel=1e-5)
    # self-attention from the box to an outside key: 10·mean top-|box| = 10; identity self-attention: 0
    s = torch.zeros(1, 16, 16)
    s[0, :, 15] = 1.0
    base = float(composer_loss(ind.view(1, 16, 1), None, [[0]], box))
    assert float(composer_loss(ind.view(1, 16, 1), s, [[0]], box)) - base == pytest.approx(10.0, rel=1e-5)
    assert float(composer_loss(ind.view(1, 16, 1), torch.eye(16)[None], [[0]], box)) == pytest.approx(base)


def test_refinement_step_lowers_the_loss():
    unet = _unet()
    g = torch.Generator().manual_seed(5)
    cond = torch.randn(1, 5, 12, generator=g)
    comp = LoRAComposerComposer(unet, ["a", "b"], region_prompts=[cond, cond], boxes=BOXES,
                                concept_tokens=[[1], [3]], res=8, reinit=False, step_size=0.5)
    comp.setup()
    z = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        z1 = comp.prepare(z, torch.tensor(500), 0, cond, cond)
        comp.prepare(z1, torch.tensor(500), 1, cond, cond)
    comp.teardown()
    assert comp.losses[1] < comp.losses[0] and comp.grad_passes == 2


def test_reinitialisation_copies_the_best_window_and_restandardises():
    unet = _unet()
    comp = LoRAComposerComposer(unet, ["a"], region_prompts=[torch.zeros(1, 5, 12)], boxes=[(0.0, 0.0, 0.5, 0.5)],
                                concept_tokens=[[2]], res=8)
    cross = torch.zeros(1, 64, 5)
    peak = torch.zeros(8, 8)
    peak[4:8, 4:8] = 1.0
    cross[0, :, 2] = peak.flatten()
    comp._maps = lambda z, t, c: (cross, None)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6))
    got = comp.reinitialise(z, torch.tensor(999), torch.zeros(1, 5, 12))
    raw = z.clone()
    raw[:, :, 0:4, 0:4] = z[:, :, 4:8, 4:8]
    want = (raw - raw.mean()) / raw.std() * z.std() + z.mean()
    torch.testing.assert_close(got, want)


def test_full_method_pass_counts():
    from diffusers import DDIMScheduler

    unet = _unet()
    g = torch.Generator().manual_seed(7)
    cond, uncond = torch.randn(1, 5, 12, generator=g), torch.randn(1, 5, 12, generator=g)
    comp = LoRAComposerComposer(unet, ["a", "b"], region_prompts=[cond, cond], boxes=BOXES, concept_tokens=[[1], [3]],
                                res=8, refine_steps=3)
    s = sample(comp, cond, uncond, scheduler=DDIMScheduler(num_train_timesteps=100), steps=4, shape=(4, 8, 8))
    assert s.passes == 4 and comp.grad_passes == 1 + 3 and len(comp.losses) == 3
    assert torch.isfinite(s.latents).all()
