"""modules_to_save in the core: one trainable full copy per adapter, the active adapter's copy runs, the
original when disabled; delete/unload unwrap; bad names and overlaps are refused before the model changes.
Also: Conv2d/Embedding targets are refused, naming the layer type and the form, for forms without the
capability."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit import AdapterSpec
from lorakit.core.inject import SavedModule, saved_modules
from lorakit.core.state import BaseMismatchError


class Net(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.body = nn.Linear(4, 6)
        self.head = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(self.conv(x).mean((2, 3)))))


def net(classes: int = 3) -> Net:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Net(classes).eval()


def spec(**kw) -> AdapterSpec:
    return AdapterSpec(targets=["body"], form_args={"r": 2, "alpha": 2}, modules_to_save=["head"], **kw)


X = torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(0))


def bump(module: nn.Module, by: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(by)


def out(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_each_adapter_has_its_own_copy_and_the_active_one_runs():
    model = net()
    original_head = model.head
    lorakit.attach(model, spec(), name="a", seed=0)
    lorakit.attach(model, spec(), name="b", seed=0)
    assert isinstance(model.head, SavedModule) and model.head.base_layer is original_head
    bump(saved_modules(model, "a")["head"], 0.1)
    bump(saved_modules(model, "b")["head"], -0.1)
    lorakit.set_active(model, ["a"])
    out_a = out(model)
    lorakit.set_active(model, ["b"])
    out_b = out(model)
    assert (out_a - out_b).abs().max() > 1e-3
    with lorakit.disabled(model):
        assert torch.allclose(out(model), out(net()), atol=1e-6)
    with lorakit.mixed_batch(model, ["a", "b", None, "a"]):
        mixed = out(model)
    assert torch.allclose(mixed[[0, 3]], out_a[[0, 3]], atol=1e-6)
    assert torch.allclose(mixed[1], out_b[1], atol=1e-6)
    assert torch.allclose(mixed[2], out(net())[2], atol=1e-6)
    lorakit.delete(model, "a")
    assert list(model.head.adapters) == ["b"]
    lorakit.delete(model, "b")
    assert model.head is original_head


def test_only_the_adapter_and_its_copy_train():
    model = lorakit.attach(net(), spec(), seed=0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert all(".adapters.default." in n for n in trainable)
    assert any(n.startswith("head.adapters.default.") for n in trainable)
    assert sum("head." in n for n in trainable) == 4  # two Linear layers' weight and bias


@pytest.mark.parametrize("merge_active", [True, False])
def test_unload_keeps_the_active_copy_when_merging(merge_active):
    model = lorakit.attach(net(), spec(), seed=0)
    bump(saved_modules(model, "default")["head"], 0.2)
    copy = model.head.adapters["default"]
    plain = lorakit.unload(model, merge_active=merge_active)
    assert isinstance(plain.head, nn.Sequential)
    assert (plain.head is copy) == merge_active


def test_bad_modules_to_save_are_refused_before_the_model_changes():
    model = net()
    with pytest.raises(ValueError, match="modules_to_save 'nope' matches no module"):
        lorakit.attach(model, AdapterSpec(targets=["body"], modules_to_save=["nope"]))
    with pytest.raises(ValueError, match="is \\(or contains\\) an adapter target"):
        lorakit.attach(model, AdapterSpec(targets=["body"], modules_to_save=["body"]))
    with pytest.raises(ValueError, match="is \\(or contains\\) an adapter target"):
        lorakit.attach(model, AdapterSpec(targets=[r"head.0"], modules_to_save=["head"]))
    assert lorakit.specs(model) == {}
    assert not any(isinstance(m, SavedModule) for m in model.modules())
    assert all(not hasattr(m, "adapters") for m in model.modules())


@pytest.mark.filterwarnings("ignore:.*base model weights differ")
def test_saved_copy_round_trips_and_refuses_another_head(tmp_path):
    model = lorakit.attach(net(), spec(), seed=0)
    bump(saved_modules(model, "default")["head"], 0.3)
    want = out(model)
    lorakit.save(model, tmp_path)
    state = lorakit.load_state(tmp_path)
    assert sorted(state.saved_modules) == ["head.0.bias", "head.0.weight", "head.2.bias", "head.2.weight"]
    assert not any(k.startswith("head") for k in state.tensors)
    assert torch.allclose(out(lorakit.load(net(), tmp_path)), want, atol=1e-6)
    other = net(classes=5)
    with pytest.raises(BaseMismatchError, match=r"head\.2\.weight: shape \(3, 6\) in the adapter, \(5, 6\)"):
        lorakit.load(other, tmp_path)
    assert not any(isinstance(m, SavedModule) for m in other.modules())


@pytest.mark.parametrize("form", ["dora", "dylora"])
def test_conv2d_needs_a_form_that_declares_it(form):
    model = net()
    with pytest.raises(ValueError, match=rf"Conv2d layer 'conv'.*form '{form}'.*CONV2D_OK"):
        lorakit.attach(model, AdapterSpec(form=form, targets=["conv", "body"]))
    assert lorakit.specs(model) == {}
    assert lorakit.find_targets(model, AdapterSpec(targets=["conv", "body"])) == ["conv", "body"]  # lora: ok
    assert lorakit.find_targets(model, AdapterSpec(targets="all-linear")) == ["body", "head.0", "head.2"]


def test_ffa_on_embedding_freezes_a_nonzero_a():
    emb = nn.Module()
    emb.embed = nn.Embedding(10, 4)
    lorakit.attach(emb, AdapterSpec(form="ffa", targets=["embed"], form_args={"r": 2, "alpha": 2}), seed=0)
    form = emb.embed.adapters["default"]
    assert not form.lora_A.requires_grad and form.lora_A.abs().min() > 0
    assert form.lora_B.requires_grad and form.lora_B.abs().max() == 0  # identity at init
