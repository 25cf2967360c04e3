"""LoRA (Hu et al., 2021, arXiv 2106.09685) on Conv2d and Embedding layers: the factored forward equals the
dense ΔW recomputation in a mixed batch too, gradients reach only the adapter, and the layer layouts
(forms.base) invert each other."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterSpec
from lorakit.core.inject import adapter_modules
from lorakit.forms.base import layer_dims, layer_kind, stored_layout, weight_out_in, write_weight


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(12, 6, padding_idx=1)
        self.conv = nn.Conv2d(6, 4, (3, 2), stride=(1, 2), padding=(1, 0), bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)  # (batch, seq, 6) -> a 6-channel "image" of height seq, width 2
        return self.conv(h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 2).contiguous())


def tiny() -> Tiny:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Tiny().eval()


IDS = torch.tensor([[1, 3, 5, 7], [2, 1, 11, 0], [4, 4, 9, 1]])


def randomize(model: nn.Module, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for form in adapter_modules(model, name).values():
            for p in form.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def dense(model: Tiny, name: str) -> torch.Tensor:
    """The same network with W ← W + ΔW written out densely, nothing factored."""
    forms = adapter_modules(model, name)
    emb, conv = model.embed.base_layer, model.conv.base_layer
    e = emb.weight + forms["embed"].delta_weight().T
    h = nn.functional.embedding(IDS, e, padding_idx=1)
    x = h.transpose(1, 2).unsqueeze(-1).expand(-1, -1, -1, 2)
    return conv._conv_forward(x, conv.weight + forms["conv"].delta_weight(), None)


def test_mixed_batch_rows_equal_their_dense_adapter():
    model = tiny()
    spec = AdapterSpec(targets=["embed", "conv"], form_args={"r": 2, "alpha": 3})
    for i, name in enumerate(["a", "b"]):
        lorakit.attach(model, spec, name=name, seed=i)
        randomize(model, name, seed=i + 10)
    with torch.no_grad():
        want = {n: dense(model, n) for n in ("a", "b")}
        with lorakit.mixed_batch(model, ["b", None, "a"]):
            got = model(IDS)
        base = tiny()(IDS)
    assert torch.allclose(got[0], want["b"][0], atol=1e-5)
    assert torch.allclose(got[1], base[1], atol=1e-6)
    assert torch.allclose(got[2], want["a"][2], atol=1e-5)


def test_gradients_reach_only_the_adapter():
    model = lorakit.attach(tiny(), AdapterSpec(targets=["embed", "conv"], form_args={"r": 2, "alpha": 2}), seed=0)
    model(IDS).square().sum().backward()
    forms = adapter_modules(model, "default")
    # at init A = 0 on the embedding (B ~ N(0, 1)): A gets the gradient, B none yet
    assert forms["embed"].lora_A.grad.abs().max() > 0
    assert forms["conv"].lora_B.grad.abs().max() > 0
    assert model.embed.base_layer.weight.grad is None and model.conv.base_layer.weight.grad is None


@pytest.mark.parametrize(("layer", "kind", "dims", "layout"), [
    (nn.Linear(3, 5), "linear", (3, 5), (5, 3)),
    (nn.Embedding(7, 4), "embedding", (7, 4), (4, 7)),
    (nn.Conv2d(3, 6, (3, 1)), "conv2d", (3, 6), (6, 3, 3, 1)),
])
def test_layouts_invert(layer, kind, dims, layout):
    assert layer_kind(layer) == kind and layer_dims(layer) == dims
    w = weight_out_in(layer)
    assert tuple(w.shape) == layout
    new = torch.randn(layout, generator=torch.Generator().manual_seed(0))
    write_weight(layer, new)
    assert torch.equal(weight_out_in(layer), new)
    assert stored_layout(layer, new).shape == layer.weight.shape


def test_bad_layers_are_refused_clearly():
    with pytest.raises(TypeError, match=r"grouped Conv2d \(groups=2\)"):
        layer_dims(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(TypeError, match="unsupported layer type LayerNorm"):
        layer_dims(nn.LayerNorm(4))
    with pytest.raises(ValueError, match="bias=True is not supported on Embedding"):
        lorakit.attach(tiny(), AdapterSpec(targets=["embed"], form_args={"bias": True}))
    with pytest.raises(ValueError, match="write_weight"):
        write_weight(nn.Linear(3, 5), torch.zeros(3, 5))
