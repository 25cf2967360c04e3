"""CMLoRA: frequency ordering (no NaN on small images), backbone weights, refresh schedule, the cached
UNet forward (exact), the no-cache variant against a dense weighted Composite, and UNet pass counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import lorakit  # noqa: E402
from lorakit.core.inject import adapter_modules  # noqa: E402
from lorakit.diffusion import UNET_TARGETS  # noqa: E402
from lorakit.diffusion import scenes as sc  # noqa: E402
from lorakit.diffusion.cmlora import (  # noqa: E402
    CMLoRAComposer,
    composite_weights,
    frequency_order,
    high_frequency_score,
    refresh_steps,
)
from lorakit.diffusion.composers import cfg, sample  # noqa: E402
from lorakit.diffusion.tiny import tiny_unet  # noqa: E402
from lorakit.diffusion.unet_cache import CacheError, cached_forward  # noqa: E402

NAMES = ("a", "b", "c")


def _unet():
    unet = tiny_unet(0)
    for i, name in enumerate(NAMES):
        lorakit.attach(unet, lorakit.AdapterSpec(form_args={"r": 2, "alpha": 2.0}, targets=list(UNET_TARGETS)),
                       name, seed=i)
        g = torch.Generator().manual_seed(40 + i)
        with torch.no_grad():
            for form in adapter_modules(unet, name).values():
                form.lora_B.copy_(0.3 * torch.randn(form.lora_B.shape, generator=g))
    lorakit.set_active(unet, [])
    return unet.eval()


def test_frequency_order_puts_the_sunset_background_last():
    striped = sc.render(sc.Scene((sc.Obj("square", "red", "centre", striped=True),), "white"))
    ring = sc.render(sc.Scene((sc.Obj("ring", "cyan", "centre"),), "white"))
    sunset = sc.render(sc.Scene((), "sunset"))
    assert high_frequency_score(striped) > high_frequency_score(sunset)
    high, low = frequency_order({"sunset": sunset, "striped": striped, "ring": ring})
    assert low == ["sunset"] and set(high) == {"striped", "ring"}
    # tiny and flat images: finite scores, no NaN (the official statistic's empty radial bins)
    assert np.isfinite(high_frequency_score(np.zeros((2, 2, 3)))) and high_frequency_score(np.ones((1, 1))) == 0.0


def test_backbone_weights_and_refresh_schedule():
    for n in (1, 2, 3, 5):
        w = composite_weights(n, 0)
        assert abs(sum(w) - 1) < 1e-12 and (n == 1 or w[0] > w[1])
    c = 3 - 0.5
    w_non = 3 / (c + 2)
    assert composite_weights(3, 1) == pytest.approx([w_non / 3, c * w_non / 3, w_non / 3])
    assert refresh_steps(20, 0) == [0, 2, 4, 6, 8, 11, 14, 17]
    assert refresh_steps(10, 3) == [0, 3, 6, 9] and refresh_steps(4, 1) == [0, 1, 2, 3]


def test_cached_forward_is_exact():
    unet = tiny_unet(0)
    g = torch.Generator().manual_seed(0)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    cache = {}
    with torch.no_grad():
        ref = unet(x, torch.tensor(300), encoder_hidden_states=enc).sample
        full = cached_forward(unet, x, torch.tensor(300), enc, cache)
        shallow = cached_forward(unet, x, torch.tensor(300), enc, cache, shallow=True)
    torch.testing.assert_close(full, ref, rtol=0, atol=0)
    torch.testing.assert_close(shallow, ref, rtol=0, atol=0)  # same inputs: the cached deep feature is exact
    with pytest.raises(CacheError):
        cached_forward(unet, x, torch.tensor(3), enc, {}, shallow=True)


def test_without_cache_it_is_the_weighted_composite():
    unet = _unet()
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500)
    cond, uncond = torch.randn(2, 5, 12, generator=g), torch.randn(1, 5, 12, generator=g)
    comp = CMLoRAComposer(unet, NAMES, cache_interval=1, n_high=2)
    comp.total_steps = 10
    comp.setup()
    with torch.no_grad():
        got = [comp.noise(x, t, i, cond, uncond, 4.0) for i in range(3)]
    comp.teardown()
    assert comp.schedule == ["a", "b", "a"]  # rotation through H = {a, b} while step <= 120/220 of the run
    for step, dom in enumerate(comp.schedule):
        w = composite_weights(3, NAMES.index(dom))
        eu = ec = 0
        with torch.no_grad():
            for wi, name in zip(w, NAMES):
                lorakit.set_active(unet, [name])
                eu = eu + wi * unet(x, t, encoder_hidden_states=uncond.expand(2, -1, -1)).sample
                ec = ec + wi * unet(x, t, encoder_hidden_states=cond).sample
        torch.testing.assert_close(got[step], cfg(eu, ec, 4.0), rtol=1e-4, atol=1e-5)
    lorakit.set_active(unet, [])


def test_cached_run_pass_counts():
    from diffusers import DDIMScheduler

    unet = _unet()
    g = torch.Generator().manual_seed(3)
    cond, uncond = torch.randn(2, 5, 12, generator=g), torch.randn(1, 5, 12, generator=g)
    comp = CMLoRAComposer(unet, NAMES)
    s = sample(comp, cond, uncond, scheduler=DDIMScheduler(num_train_timesteps=100), steps=20, shape=(4, 8, 8))
    refreshes = refresh_steps(20, 0)
    # step 0: every LoRA fills its cache; later refresh steps: only the dominant LoRA runs the full UNet
    assert s.passes == 3 + (len(refreshes) - 1)
    assert comp.shallow_passes == 20 * 3 - s.passes and s.calls == 60
    assert torch.isfinite(s.latents).all()
    assert set(comp.schedule[12:]) <= set(NAMES) and lorakit.active_adapters(unet) == ()
