"""Conformance suite for every form in the catalog, parametrized over each form's example Args.

Checks are selected by declared capabilities, never by form name.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit
from lorakit.core import registry
from lorakit.core.caps import Cap
from lorakit.core.inject import adapter_modules
from lorakit.forms.base import layer_dims
from lorakit.models import tiny_gpt2, tiny_llama

CASES = [
    pytest.param(e.name, i, id=f"{e.name}-{i}")
    for e in registry.entries("form")
    for i in range(len(registry.get("form", e.name).examples()))
]
LLAMA_TARGETS = ["q_proj", "v_proj", "down_proj"]


def _spec(name: str, index: int, targets) -> lorakit.AdapterSpec:
    cls = registry.get("form", name)
    args = dataclasses.asdict(cls.examples()[index])
    return lorakit.AdapterSpec(form=name, form_args=args, targets=targets)


def _model(kind: str):
    return tiny_llama(seed=0) if kind == "llama" else tiny_gpt2(seed=0)


def _targets(kind: str):
    return LLAMA_TARGETS if kind == "llama" else ["c_attn", "c_fc"]


def _perturb(model, seed: int = 1, scale: float = 0.3) -> None:
    """Move every trainable tensor away from its init (zero-initialized factors hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _kinds(name: str):
    cls = registry.get("form", name)
    return ["llama", "gpt2"] if Cap.CONV1D_OK in cls.caps else ["llama"]


IDS = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name,index", CASES)
def test_forward_init_identity_and_trainable_count(name, index):
    cls = registry.get("form", name)
    for kind in _kinds(name):
        model = _model(kind)
        base = _logits(model)
        spec = _spec(name, index, _targets(kind))
        lorakit.attach(model, spec, seed=0)
        out = _logits(model)
        assert out.shape == base.shape and torch.isfinite(out).all()
        if Cap.IDENTITY_AT_INIT in cls.caps:
            torch.testing.assert_close(out, base, rtol=0, atol=1e-5)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".adapters.default." in n for n in trainable)
        forms = adapter_modules(model, "default")
        expected = sum(cls.num_trainable(*layer_dims(model.get_submodule(p).base_layer), f.args)
                       for p, f in forms.items())
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("name,index", CASES)
def test_merge_unmerge_and_delta_consistency(name, index):
    cls = registry.get("form", name)
    if Cap.MERGEABLE not in cls.caps:
        pytest.skip(f"form {name!r} declares no MERGEABLE capability (input-dependent ΔW)")
    for kind in _kinds(name):
        model = _model(kind)
        lorakit.attach(model, _spec(name, index, _targets(kind)), seed=0)
        _perturb(model)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
        unmerged = _logits(model)
        lorakit.merge(model)
        torch.testing.assert_close(_logits(model), unmerged, rtol=1e-4, atol=1e-5)
        lorakit.unmerge(model)
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-5)
        # apply() (the fast path) equals the dense ΔW definition on random inputs
        for form in adapter_modules(model, "default").values():
            x = torch.randn(4, form.in_features)
            base_out = torch.randn(4, form.out_features)
            dense = base_out + x @ form.delta_weight().T
            bias = form.delta_bias()
            dense = dense if bias is None else dense + bias
            torch.testing.assert_close(form.apply(x, base_out), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,index", CASES)
def test_save_load_round_trip_is_exact(name, index, tmp_path):
    for kind in _kinds(name):
        model = _model(kind)
        lorakit.attach(model, _spec(name, index, _targets(kind)), seed=0)
        _perturb(model)
        lorakit.save(model, tmp_path / kind)
        fresh = lorakit.load(_model(kind), tmp_path / kind)
        assert torch.equal(_logits(fresh), _logits(model))
        a, b = lorakit.extract_state(model).tensors, lorakit.extract_state(fresh).tensors
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,index", CASES)
def test_mixed_batch_rows_match_single_adapter_runs(name, index):
    model = tiny_llama(seed=0)
    lorakit.attach(model, _spec(name, index, LLAMA_TARGETS), name="a", seed=0)
    lorakit.attach(model, _spec(name, index, ["k_proj", "up_proj"]), name="b", seed=1)
    _perturb(model)
    model.eval()
    with lorakit.mixed_batch(model, ["a", None, "b"]):
        mixed = _logits(model)
    expected = []
    for row, adapter in enumerate(["a", None, "b"]):
        if adapter is None:
            with lorakit.disabled(model):
                expected.append(_logits(model, IDS[row:row + 1]))
        else:
            lorakit.set_active(model, [adapter])
            expected.append(_logits(model, IDS[row:row + 1]))
    torch.testing.assert_close(mixed, torch.cat(expected), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,index", CASES)
def test_tiny_training_lowers_loss(name, index):
    torch.manual_seed(0)
    model = tiny_llama(seed=0)
    lorakit.attach(model, _spec(name, index, "all-linear"), seed=0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(3))
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses


@pytest.mark.parametrize("name,index", CASES)
def test_peft_round_trip(name, index, tmp_path):
    cls = registry.get("form", name)
    if cls.peft_type is None:
        pytest.skip(f"form {name!r} has no PEFT equivalent (peft_type is None)")
    peft = pytest.importorskip("peft")
    for kind in _kinds(name):
        model = _model(kind)
        lorakit.attach(model, _spec(name, index, _targets(kind)), seed=0)
        _perturb(model)
        if kind == "gpt2" and not cls.peft_conv1d:  # PEFT's tuner wraps only nn.Linear: no PEFT config
            with pytest.warns(UserWarning, match="wraps only torch.nn.Linear"):
                lorakit.save(model, tmp_path / kind)
            assert not (tmp_path / kind / "adapter_config.json").exists()
            continue
        lorakit.save(model, tmp_path / kind)
        theirs = peft.PeftModel.from_pretrained(_model(kind), str(tmp_path / kind)).eval()
        torch.testing.assert_close(_logits(theirs), _logits(model), rtol=1e-4, atol=1e-5)
        theirs.save_pretrained(tmp_path / f"{kind}-peft")
        back = lorakit.load(_model(kind), tmp_path / f"{kind}-peft")
        torch.testing.assert_close(_logits(back), _logits(model), rtol=1e-4, atol=1e-5)
