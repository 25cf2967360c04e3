"""lorakit adapters on a diffusers UNet2DConditionModel (attention/FF Linears and Conv2d layers) through the
unified runtime: forward = dense recomputation; per-row ids (mixed batch) and per-row weights (mixing)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

import lorakit  # noqa: E402
from lorakit.core.inject import adapter_modules  # noqa: E402
from lorakit.diffusion import UNET_CONV_TARGETS, UNET_TARGETS  # noqa: E402
from lorakit.diffusion.tiny import tiny_unet  # noqa: E402
from lorakit.forms.lora import LoRA  # noqa: E402

SPEC = lorakit.AdapterSpec(form_args={"r": 2, "alpha": 4.0}, targets=list(UNET_TARGETS + UNET_CONV_TARGETS))


def _adapted(names=("a", "b")) -> nn.Module:
    unet = tiny_unet(0)
    for i, name in enumerate(names):
        lorakit.attach(unet, SPEC, name, seed=i)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for form in adapter_modules(unet, name).values():
                form.lora_B.copy_(0.2 * torch.randn(form.lora_B.shape, generator=g))
    return unet.eval()


def _dense(unet: nn.Module, weights: dict[str, float]) -> nn.Module:
    """A plain UNet whose weights are W0 + Σ_a w_a·s·B_a·A_a, computed here from the factors."""
    ref = tiny_unet(0)
    with torch.no_grad():
        for name, w in weights.items():
            for path, form in adapter_modules(unet, name).items():
                s = form.args.alpha / form.args.r
                B, A = form.lora_B, form.lora_A
                delta = s * (B.flatten(1) @ A.flatten(1)).reshape(B.shape[0], *A.shape[1:])
                ref.get_submodule(path).weight.add_(w * delta)
    return ref


def _inputs(n: int):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([5, 400, 999][:n]),
            torch.randn(n, 5, 12, generator=g))


def _run(unet, x, t, enc):
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=enc).sample


def test_targets_cover_attention_ff_and_convs():
    assert lorakit.Cap.CONV2D_OK in LoRA.caps
    unet = _adapted(("a",))
    paths = adapter_modules(unet, "a")
    kinds = {type(f._base_layer).__name__ for f in paths.values()}
    assert kinds == {"Linear", "Conv2d"}
    assert any(p.endswith("attn2.to_k") for p in paths) and any(p.endswith("ff.net.2") for p in paths)
    assert any(p.endswith("resnets.0.conv1") for p in paths) and any(p.endswith("proj_in") for p in paths)


def test_forward_equals_dense_recomputation():
    unet = _adapted()
    x, t, enc = _inputs(2)
    lorakit.set_active(unet, ["a"])
    torch.testing.assert_close(_run(unet, x, t, enc), _run(_dense(unet, {"a": 1.0}), x, t, enc), rtol=1e-4, atol=1e-5)
    lorakit.set_active(unet, ["a", "b"])  # active adapters add up: the exact ΔW sum
    torch.testing.assert_close(_run(unet, x, t, enc), _run(_dense(unet, {"a": 1.0, "b": 1.0}), x, t, enc),
                               rtol=1e-4, atol=1e-5)


def test_mixed_batch_rows_use_their_own_adapter():
    unet = _adapted()
    x, t, enc = _inputs(3)
    with lorakit.mixed_batch(unet, ["a", None, "b"]):
        mixed = _run(unet, x, t, enc)
    for i, name in enumerate(["a", None, "b"]):
        ref = _dense(unet, {name: 1.0} if name else {})
        torch.testing.assert_close(mixed[i:i + 1], _run(ref, x[i:i + 1], t[i:i + 1], enc[i:i + 1]),
                                   rtol=1e-4, atol=1e-5)


def test_per_row_weights_through_mixing():
    unet = _adapted()
    x, t, enc = _inputs(3)
    w = [[0.5, 0.5], [1.0, 0.0], [0.0, 0.0]]
    with lorakit.mixing(["a", "b"], w):
        mixed = _run(unet, x, t, enc)
    for i, (wa, wb) in enumerate(w):
        ref = _dense(unet, {"a": wa, "b": wb})
        torch.testing.assert_close(mixed[i:i + 1], _run(ref, x[i:i + 1], t[i:i + 1], enc[i:i + 1]),
                                   rtol=1e-4, atol=1e-5)


def test_save_load_round_trip_with_conv_layers(tmp_path):
    unet = _adapted(("a",))
    x, t, enc = _inputs(2)
    lorakit.save(unet, tmp_path / "a", "a")
    other = lorakit.load(tiny_unet(0), tmp_path / "a", "a")
    torch.testing.assert_close(_run(other, x, t, enc), _run(unet, x, t, enc), rtol=1e-5, atol=1e-6)
