"""Composition baselines against dense references on a tiny UNet: merge = exact weighted ΔW sum, switch's
schedule, composite = mean of per-LoRA ε then CFG, lorahub's composed factors, UNet pass counts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

import lorakit  # noqa: E402
from lorakit.core.inject import adapter_modules  # noqa: E402
from lorakit.diffusion import UNET_CONV_TARGETS, UNET_TARGETS  # noqa: E402
from lorakit.diffusion.composers import (  # noqa: E402
    ComposeError,
    CompositeComposer,
    LoraHubComposer,
    MergeComposer,
    SwitchComposer,
    cfg,
    sample,
)
from lorakit.diffusion.tiny import tiny_unet  # noqa: E402

NAMES = ("a", "b", "c")
G = 3.0


def _unet(conv: bool = False) -> nn.Module:
    unet = tiny_unet(0)
    targets = list(UNET_TARGETS + (UNET_CONV_TARGETS if conv else ()))
    for i, name in enumerate(NAMES):
        lorakit.attach(unet, lorakit.AdapterSpec(form_args={"r": 2, "alpha": 2.0 + i}, targets=targets), name, seed=i)
        g = torch.Generator().manual_seed(20 + i)
        with torch.no_grad():
            for form in adapter_modules(unet, name).values():
                form.lora_B.copy_(0.3 * torch.randn(form.lora_B.shape, generator=g))
    lorakit.set_active(unet, [])
    return unet.eval()


def _delta(form) -> torch.Tensor:
    s = form.args.alpha / form.args.r
    B, A = form.lora_B, form.lora_A
    return s * (B.flatten(1) @ A.flatten(1)).reshape(B.shape[0], *A.shape[1:])


def _dense(unet: nn.Module, weights: dict[str, float]) -> nn.Module:
    ref = tiny_unet(0)
    with torch.no_grad():
        for name, w in weights.items():
            for path, form in adapter_modules(unet, name).items():
                ref.get_submodule(path).weight.add_(w * _delta(form))
    return ref.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500), torch.randn(2, 5, 12, generator=g),
            torch.randn(1, 5, 12, generator=g))


def _pair(model, x, t, cond, uncond):
    with torch.no_grad():
        eu = model(x, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
        ec = model(x, t, encoder_hidden_states=cond).sample
    return eu, ec


@pytest.mark.parametrize("conv", [False, True])
def test_merge_is_the_exact_weighted_delta_sum(conv):
    unet = _unet(conv)
    x, t, cond, uncond = _inputs()
    w = [0.5, -0.3, 1.2]
    comp = MergeComposer(unet, NAMES, w)
    comp.setup()
    with torch.no_grad():
        got = comp.noise(x, t, 0, cond, uncond, G)
    comp.teardown()
    assert comp._runtime is conv  # Linear-only: compose.merge.linear; with Conv2d: the runtime's weighted sum
    ref = cfg(*_pair(_dense(unet, dict(zip(NAMES, w))), x, t, cond, uncond), G)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert lorakit.active_adapters(unet) == () and "__merge__" not in lorakit.specs(unet)


def test_switch_schedule_and_prediction():
    unet = _unet()
    comp = SwitchComposer(unet, NAMES, k=5)
    # official callback: switch at the end of step i > 0 with i % 5 == 0
    assert [comp.active_index(i) for i in range(21)] == [0] * 6 + [1] * 5 + [2] * 5 + [0] * 5
    x, t, cond, uncond = _inputs()
    comp.setup()
    with torch.no_grad():
        got = comp.noise(x, t, 7, cond, uncond, G)  # step 7: LoRA "b"
    comp.teardown()
    torch.testing.assert_close(got, cfg(*_pair(_dense(unet, {"b": 1.0}), x, t, cond, uncond), G), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batched", [False, True])
def test_composite_is_the_mean_then_cfg(batched):
    unet = _unet(conv=True)
    x, t, cond, uncond = _inputs()
    comp = CompositeComposer(unet, NAMES, batched=batched)
    comp.setup()
    with torch.no_grad():
        got = comp.noise(x, t, 0, cond, uncond, G)
    comp.teardown()
    pairs = [_pair(_dense(unet, {n: 1.0}), x, t, cond, uncond) for n in NAMES]
    eu = sum(p[0] for p in pairs) / 3
    ec = sum(p[1] for p in pairs) / 3
    torch.testing.assert_close(got, eu + G * (ec - eu), rtol=1e-4, atol=1e-5)
    assert comp.passes == 3 and comp.calls == (1 if batched else 3)


def test_pass_counts_in_the_sampling_loop():
    from diffusers import DDIMScheduler

    unet = _unet()
    _, _, cond, uncond = _inputs()
    counts = {}
    for cls in (MergeComposer, SwitchComposer, CompositeComposer):
        comp = cls(unet, NAMES)
        s = sample(comp, cond, uncond, scheduler=DDIMScheduler(num_train_timesteps=100), steps=4, shape=(4, 8, 8))
        counts[cls.name] = (s.passes, s.calls)
        assert s.latents.shape == (2, 4, 8, 8) and torch.isfinite(s.latents).all()
    assert counts == {"merge": (4, 4), "switch": (4, 4), "composite": (12, 12)}
    assert lorakit.active_adapters(unet) == ()


def test_lorahub_composes_the_searched_weights():
    from diffusers import DDPMScheduler

    unet = _unet()
    x, t, cond, uncond = _inputs()
    comp = LoraHubComposer(unet, NAMES, examples=(x, cond), scheduler=DDPMScheduler(num_train_timesteps=100),
                           budget=4, optimizer="random")
    comp.setup()
    with torch.no_grad():
        got = comp.noise(x, t, 0, cond, uncond, G)
    comp.teardown()
    w = comp.weights
    assert comp.report["evaluations"] == 4 and comp.search_passes == 4 and len(w) == 3
    # LoraHub's composition: Â = Σ w_i A_i, B̂ = Σ w_i s_i B_i (scale folded), ΔŴ = B̂·Â
    ref = tiny_unet(0)
    with torch.no_grad():
        for path in adapter_modules(unet, "a"):
            forms = [adapter_modules(unet, n)[path] for n in NAMES]
            B = sum(wi * f.args.alpha / f.args.r * f.lora_B for wi, f in zip(w, forms))
            A = sum(wi * f.lora_A for wi, f in zip(w, forms))
            ref.get_submodule(path).weight.add_(B @ A)
    torch.testing.assert_close(got, cfg(*_pair(ref.eval(), x, t, cond, uncond), G), rtol=1e-4, atol=1e-5)


def test_bad_inputs():
    unet = _unet()
    with pytest.raises(ComposeError, match="not adapters"):
        MergeComposer(unet, ["a", "zzz"])
    with pytest.raises(ComposeError, match="weight"):
        MergeComposer(unet, NAMES, [1.0])
    with pytest.raises(ValueError, match="k must be"):
        SwitchComposer(unet, NAMES, k=0)
    with pytest.raises(ComposeError, match="few-shot"):
        LoraHubComposer(unet, NAMES)
