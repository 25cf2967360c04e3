"""SHiRA: masks select the right entries, merge is a scatter that unmerges bit-exactly, the sparse fast
path equals the dense update (values and gradients), and PEFT files cross both ways.

References: ``torch.topk`` on |W|, |G|, |W ⊙ G| with G from plain autograd on an untouched model;
PEFT's own ``random_mask``; real ``peft`` ShiraConfig models for files and logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.core import registry
from lorakit.core.inject import adapter_modules
from lorakit.forms.shira import _SparseDelta
from lorakit.inits import initialize
from lorakit.models import tiny_llama

TARGETS = ["q_proj", "k_proj", "down_proj"]  # 32×32, 16×32, 32×64 (out×in)
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _attach(form_args, targets=TARGETS, seed=0):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form="shira", form_args=form_args, targets=targets), seed=seed)
    return model


def _randomize(params, seed=1, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _flat(form) -> set[int]:
    rows, cols = form.shira_indices
    return set((rows * form.in_features + cols).tolist())


def _topk(scores: torch.Tensor, k: int) -> set[int]:
    return set(torch.topk(scores.reshape(-1), k).indices.tolist())


def test_budget_and_random_masks():
    model = _attach({"r": 2})
    forms = adapter_modules(model, "default")
    for form in forms.values():
        assert form.shira_weight.numel() == 2 * (form.in_features + form.out_features)  # k = r(m+n)
        assert form.shira_indices.dtype == torch.int64 and len(_flat(form)) == form.shira_weight.numel()
    masks = [_flat(f) for p, f in forms.items() if "q_proj" in p]
    assert masks[0] != masks[1]  # global RNG: every layer its own mask
    again = adapter_modules(_attach({"r": 2}), "default")
    assert all(_flat(f) == _flat(again[p]) for p, f in forms.items())  # attach(seed=) reproduces them


def test_random_seed_mask_is_peft_random_mask():
    pytest.importorskip("peft")
    from peft.tuners.shira.mask_functions import random_mask

    model = _attach({"r": 3, "random_seed": 11})
    for path, form in adapter_modules(model, "default").items():
        mask = random_mask(model.get_submodule(path).base_layer, 3, random_seed=11)
        assert torch.equal(torch.stack(torch.where(mask == 1)), form.shira_indices)


def test_wm_mask_is_top_k_weight_magnitude():
    model = _attach({"r": 2, "mask": "wm"})
    for form in adapter_modules(model, "default").values():
        assert _flat(form) == _topk(form.base_weight.detach().abs(), form.shira_weight.numel())


@pytest.mark.parametrize("init,accumulate",
                         [("shira_grad", "sum"), ("shira_grad", "abs"), ("shira_snip", "sum")])
def test_gradient_masks_are_top_k_of_reference_scores(init, accumulate):
    batches = [torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(s)) for s in (5, 6)]
    # reference: plain autograd on an untouched copy of the base model
    ref = tiny_llama(seed=0)
    grads = {}
    for ids in batches:
        ref.zero_grad()
        ref(input_ids=ids, labels=ids).loss.backward()
        for name, p in ref.named_parameters():
            g = p.grad.detach().clone()
            grads[name] = grads.get(name, 0) + (g.abs() if accumulate == "abs" else g)
    model = _attach({"r": 2})
    _randomize([p for p in model.parameters() if p.requires_grad])  # the init must reset values to 0
    initialize(model, "default", registry.get("init", init)(accumulate=accumulate), batches)
    for path, form in adapter_modules(model, "default").items():
        w = ref.get_submodule(path).weight.detach()
        score = grads[f"{path}.weight"].abs()
        if init == "shira_snip":
            score = (w * grads[f"{path}.weight"]).abs()
        assert _flat(form) == _topk(score, form.shira_weight.numel())
        assert torch.count_nonzero(form.shira_weight) == 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)
    assert all(p.grad is None for p in model.parameters())


def test_gradient_mask_needs_batches_and_a_sparse_form():
    model = _attach({"r": 2})
    with pytest.raises(ValueError, match="needs calibration batches"):
        initialize(model, "default", registry.get("init", "shira_grad")())
    with pytest.raises(ValueError, match="select_top"):
        lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(form="lora", init="shira_snip"))
    with pytest.raises(ValueError, match="init 'shira_grad'"):
        _attach({"r": 2, "mask": "grad"})


def test_merge_is_a_scatter_and_unmerge_restores_w_exactly():
    model = _attach({"r": 2})
    _randomize([p for p in model.parameters() if p.requires_grad], std=1.0)
    forms = adapter_modules(model, "default")
    before = {p: model.get_submodule(p).base_layer.weight.detach().clone() for p in forms}
    unmerged = _logits(model)
    lorakit.merge(model)
    for path, form in forms.items():
        w = model.get_submodule(path).base_layer.weight.detach()
        changed = set(torch.nonzero((w != before[path]).reshape(-1)).flatten().tolist())
        assert changed <= _flat(form)  # only masked entries move
        torch.testing.assert_close(w, before[path] + form.delta_weight().detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model), unmerged, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    for path in forms:
        assert torch.equal(model.get_submodule(path).base_layer.weight, before[path])  # bit-exact


def test_sparse_fast_path_matches_dense_values_and_gradients():
    torch.manual_seed(0)
    m, n, k, t = 24, 40, 90, 6
    flat = torch.randperm(m * n)[:k].sort().values
    rows, cols = flat // n, flat % n
    values = torch.randn(k, dtype=torch.float64, requires_grad=True)
    x = torch.randn(t, n, dtype=torch.float64, requires_grad=True)
    crow = torch.nn.functional.pad(torch.bincount(rows, minlength=m).cumsum(0), (1, 0))
    perm_t = torch.argsort(cols * m + rows)
    crow_t = torch.nn.functional.pad(torch.bincount(cols, minlength=n).cumsum(0), (1, 0))

    def sparse(x, values):
        return _SparseDelta.apply(x, values, crow, cols, crow_t, rows[perm_t], perm_t, m, n)

    dense = x @ torch.zeros(m, n, dtype=torch.float64).index_put((rows, cols), values).T
    torch.testing.assert_close(sparse(x, values), dense)
    assert torch.autograd.gradcheck(sparse, (x, values))


def test_peft_file_loads_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.ShiraConfig(r=2, target_modules=TARGETS, random_seed=3)
    theirs = peft.get_peft_model(tiny_llama(seed=0), config)
    _randomize([p for n, p in theirs.named_parameters() if "shira_weight" in n])
    theirs.eval().save_pretrained(tmp_path)
    ours = lorakit.load(tiny_llama(seed=0), tmp_path)
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    for path, form in adapter_modules(ours, "default").items():
        layer = theirs.base_model.model.get_submodule(path)
        assert torch.equal(form.shira_indices, layer.shira_indices["default"].long())


def test_lorakit_file_loads_in_peft_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = _attach({"r": 2, "mask": "wm"})  # a mask PEFT cannot build: it must come from the file
    _randomize([p for p in model.parameters() if p.requires_grad])
    lorakit.save(model, tmp_path)
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(v.dtype == torch.int64 for k, v in tensors.items() if k.endswith("shira_indices"))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SHIRA"
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), _logits(model), rtol=1e-5, atol=1e-5)


def test_bad_indices_are_refused():
    form = next(iter(adapter_modules(_attach({"r": 1}, targets=["q_proj"]), "default").values()))
    dup = form.shira_indices.clone()
    dup[:, 1] = dup[:, 0]
    with pytest.raises(ValueError, match="duplicate"):
        form.set_indices(dup)
    with pytest.raises(ValueError, match="out of range"):
        form.set_indices(form.shira_indices + 100)


def test_bare_scatter_add_and_conv1d_layout():
    from lorakit.models import tiny_gpt2

    form = next(iter(adapter_modules(_attach({"r": 2}, targets=["q_proj"]), "default").values()))
    _randomize([form.shira_weight])
    w0 = form.base_weight.detach().clone()
    w = form.merge_into_(w0.clone(), exact=False)  # one read-modify-write pass
    torch.testing.assert_close(w, w0 + form.delta_weight().detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(form.unmerge_from_(w), w0, rtol=0, atol=1e-6)
    # GPT-2 Conv1D stores (in, out): ΔW, the fast path and merge work on the (out, in) view
    model = tiny_gpt2(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form="shira", form_args={"r": 2}, targets=["c_attn"]), seed=0)
    _randomize([p for p in model.parameters() if p.requires_grad])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = _logits(model)
    for f in adapter_modules(model, "default").values():
        x, base = torch.randn(3, f.in_features), torch.randn(3, f.out_features)
        torch.testing.assert_close(f.apply(x, base), base + x @ f.delta_weight().T, rtol=1e-5, atol=1e-5)
    lorakit.merge(model)
    torch.testing.assert_close(_logits(model), unmerged, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_plain_load_state_dict_rebuilds_the_sparse_structure():
    src = _attach({"r": 2}, seed=0)
    _randomize([p for p in src.parameters() if p.requires_grad])
    dst = _attach({"r": 2}, seed=5)  # other masks
    dst.load_state_dict(src.state_dict())
    torch.testing.assert_close(_logits(dst), _logits(src), rtol=0, atol=1e-6)
