"""RandLoRA: PEFT-identical bases and files (both directions), the N(r+d) count, and full-rank ΔW."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.forms.randlora import RandLoRA, RandLoRAArgs
from lorakit.models import tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "v_proj", "down_proj"]  # 32x32, 16x32 and 32x64: bases sized to (out 32, in 64)
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
VARIANTS = [{}, {"sparse": True}, {"very_sparse": True}]


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _randomize(params, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _base(kind):
    return (tiny_llama(seed=0), TARGETS) if kind == "llama" else (tiny_gpt2(seed=0), ["c_attn", "c_fc"])


def _peft_model(kind="llama", r=4, key=7, **kw):
    model, targets = _base(kind)
    cfg = peft.RandLoraConfig(r=r, randlora_alpha=2 * r, target_modules=targets, projection_prng_key=key,
                              fan_in_fan_out=kind == "gpt2", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(model, cfg).eval()
    _randomize([p for p in pm.parameters() if p.requires_grad])
    return pm


def _lorakit_model(kind="llama", r=4, key=7, **kw):
    model, targets = _base(kind)
    args = {"r": r, "alpha": 2 * r, "projection_prng_key": key, **kw}
    lorakit.attach(model, lorakit.AdapterSpec(form="randlora", form_args=args, targets=targets), seed=0)
    _randomize([p for p in model.parameters() if p.requires_grad])
    return model.eval()


@pytest.mark.parametrize("kw", VARIANTS, ids=["dense", "sparse", "very_sparse"])
def test_same_key_gives_peft_bases_bit_for_bit(kw):
    pm = _peft_model(r=5, key=123, **kw)
    ours = _lorakit_model(r=5, key=123, **kw)
    shared = next(iter(adapter_modules(ours, "default").values())).shared
    assert torch.equal(shared.randlora_A, pm.base_model.randlora_A["default"])
    assert torch.equal(shared.randlora_B, pm.base_model.randlora_B["default"])
    assert tuple(shared.randlora_A.shape) == (5, 1, 32) and tuple(shared.randlora_B.shape) == (64, 7, 5)


@pytest.mark.parametrize("kind,kw", [("llama", {}), ("llama", {"sparse": True}), ("gpt2", {}),
                                     ("llama", {"save_projection": False})])
def test_peft_files_load_with_equal_logits(kind, kw, tmp_path):
    pm = _peft_model(kind, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert ("base_model.randlora_A" in keys) == kw.get("save_projection", True)  # PEFT's model-level key
    ours = lorakit.load(tiny_llama(seed=0) if kind == "llama" else tiny_gpt2(seed=0), tmp_path)
    torch.testing.assert_close(_logits(ours), _logits(pm), rtol=0, atol=1e-5)
    plain = _logits(tiny_llama(seed=0) if kind == "llama" else tiny_gpt2(seed=0))
    assert (_logits(ours) - plain).abs().max() > 1e-3  # the adapter does change the output


@pytest.mark.parametrize("kind,kw", [("llama", {}), ("llama", {"very_sparse": True}),
                                     ("gpt2", {"sparse": True}), ("llama", {"save_projection": False})])
def test_lorakit_files_load_in_peft_with_equal_logits(kind, kw, tmp_path):
    ours = _lorakit_model(kind, **kw)
    lorakit.save(ours, tmp_path)
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert ("base_model.randlora_A" in keys) == kw.get("save_projection", True)
    assert not any(k.startswith("base_model.model.") and k.endswith(".randlora_A") for k in keys)  # once
    base = tiny_llama(seed=0) if kind == "llama" else tiny_gpt2(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.PeftModel.from_pretrained(base, str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=0, atol=1e-5)


def test_peft_layer_copies_write_peft_exact_layout(tmp_path):
    ours = _lorakit_model(peft_layer_copies=True)
    lorakit.save(ours, tmp_path / "ours")
    pm = _peft_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path / "peft")
    mine = load_file(str(tmp_path / "ours" / "adapter_model.safetensors"))
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    # PEFT up to 0.1x wrote a copy of the shared bases under every layer; newer PEFT (0.22) writes them
    # once. The layer copies are for the older readers: every key PEFT writes is there with its shape,
    # and the only extra keys are those per-layer copies.
    assert set(theirs) <= set(mine)
    extra = set(mine) - set(theirs)
    assert all(k.startswith("base_model.model.") and k.rsplit(".", 1)[1] in ("randlora_A", "randlora_B")
               for k in extra)
    assert all(mine[k].shape == theirs[k].shape for k in theirs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path / "ours")).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    torch.testing.assert_close(_logits(loaded), _logits(ours), rtol=0, atol=1e-5)
    # and lorakit reads PEFT's layout back to one shared copy
    back = lorakit.extract_state(lorakit.load(tiny_llama(seed=0), tmp_path / "peft"))
    assert "randlora_A" in back.tensors and not any(k.endswith(".randlora_A") for k in back.tensors)


@pytest.mark.parametrize("r", [4, 5, 7])
def test_trainable_count_is_n_times_r_plus_d(r):
    ours = _lorakit_model(r=r)
    pm = _peft_model(r=r)
    for form in adapter_modules(ours, "default").values():
        d = min(form.in_features, form.out_features)
        n = math.ceil(d / r)
        assert form.randlora_lambda.numel() + form.randlora_gamma.numel() == n * (r + d)
        assert RandLoRA.num_trainable(form.in_features, form.out_features, form.args) == n * (r + d)
    count = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    assert count == sum(p.numel() for p in pm.parameters() if p.requires_grad)


def _dense_reference(form: RandLoRA) -> torch.Tensor:
    """Σ_i B_i Λ_i A Γ_i term by term, with PEFT's fixed pairing of B columns (an independent loop)."""
    r, n, d, big = form.args.r, form.num_bases, form.small, form.big
    a = form.shared.randlora_A[:r, 0, :d]
    b = form.shared.randlora_B
    total = torch.zeros(big, d, dtype=torch.float64)
    for i in range(n):
        for k in range(r):
            j = k * n + i
            col = b[:big, j // r, j % r].double()
            row = (form.randlora_lambda[k, i] * a[k] * form.randlora_gamma[i]).double()
            total += torch.outer(col, row)
    total = total * form.scaling
    return (total if form.in_features == d else total.T).float()


@pytest.mark.parametrize("in_f,out_f,r", [(12, 20, 5), (20, 12, 5), (16, 16, 4), (9, 30, 2)])
def test_update_reaches_full_rank(in_f, out_f, r):
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f)
    form = RandLoRA(layer, RandLoRAArgs(r=r, alpha=r, projection_prng_key=5))
    assert torch.count_nonzero(form.delta_weight()) == 0  # identity at init
    _randomize(form.parameters(), seed=3)
    delta = form.delta_weight()
    assert delta.shape == (out_f, in_f)
    torch.testing.assert_close(delta, _dense_reference(form), rtol=1e-5, atol=1e-6)
    assert torch.linalg.matrix_rank(delta).item() == min(in_f, out_f)
    # one term alone is rank r: it is the sum over N = ceil(d/r) terms that makes the update full rank
    with torch.no_grad():
        form.randlora_lambda[:, 1:] = 0
    assert torch.linalg.matrix_rank(form.delta_weight()).item() == r


def test_bases_exist_once_and_custom_backward_matches_autograd():
    model = _lorakit_model()
    forms = list(adapter_modules(model, "default").values())
    assert len({id(f.shared) for f in forms}) == 1  # one SharedTensors module for the whole adapter
    model.to(torch.float64)
    assert len({f.shared.randlora_B.data_ptr() for f in forms}) == 1
    assert forms[0].shared.randlora_B.dtype == torch.float64
    # the memory-saving backward of the scaled A side equals plain autograd of λ ⊙ A ⊙ γ
    for form in (forms[0], forms[2]):  # q_proj (input = smaller side) and down_proj (output smaller)
        x = torch.randn(5, form.in_features, dtype=torch.float64)
        form.apply(x, torch.zeros(5, form.out_features, dtype=torch.float64)).pow(2).sum().backward()
        lam = form.randlora_lambda.detach().clone().requires_grad_()
        gam = form.randlora_gamma.detach().clone().requires_grad_()
        r, n, d, big = form.args.r, form.num_bases, form.small, form.big
        a_side = (lam[:, :, None] * form.shared.randlora_A[:r, :, :d] * gam[None]).reshape(r * n, d)
        b_side = form.shared.randlora_B[:big, :n, :r].reshape(big, n * r)
        delta = (b_side @ a_side) * form.scaling
        delta = delta if form.in_features == d else delta.T
        (x @ delta.T).pow(2).sum().backward()
        torch.testing.assert_close(form.randlora_lambda.grad, lam.grad)
        torch.testing.assert_close(form.randlora_gamma.grad, gam.grad)
