"""NOLA: k + l coefficients per layer whatever the rank; bases from seeds, never saved; exact ΔW."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.forms.nola import NOLA, SEED_LIMIT, NOLAArgs
from lorakit.models import tiny_gpt2, tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _attach(model, attach_seed=0, targets="all-linear", **form_args):
    spec = lorakit.AdapterSpec(form="nola", form_args=form_args, targets=targets)
    return lorakit.attach(model, spec, seed=attach_seed)


def _randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def test_trainable_count_is_k_plus_l_whatever_the_rank():
    counts = {}
    for r in (2, 8):
        model = _attach(tiny_llama(seed=0), r=r, alpha=8.0, num_basis_A=24, num_basis_B=40)
        layers = len(adapter_modules(model, "default"))
        counts[r] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert counts[r] == layers * (24 + 40)
    assert counts[2] == counts[8]


@pytest.mark.parametrize("with_A0,cache", [(True, True), (False, False)])
def test_delta_weight_equals_dense_linear_combination(with_A0, cache):
    torch.manual_seed(0)
    form = NOLA(nn.Linear(12, 10), NOLAArgs(r=3, alpha=6.0, num_basis_A=5, num_basis_B=40, seed=9,
                                            with_A0=with_A0, cache_bases=cache))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        form.coef_A.copy_(torch.randn(5, generator=g))
        form.coef_B.copy_(torch.randn(40, generator=g))
    a0, basis_a, basis_b = form.bases()
    assert basis_a.shape == (5, 3, 12) and basis_b.shape == (40, 10, 3)
    assert basis_a.abs().max() <= 1 / 5**0.5 and basis_b.abs().max() <= 1 / 40**0.5  # U(-1,1)/√count
    a = (a0.double() if with_A0 else torch.zeros(3, 12, dtype=torch.float64))
    for i in range(5):
        a = a + float(form.coef_A.detach()[i]) * basis_a[i].double()
    b = torch.zeros(10, 3, dtype=torch.float64)
    for j in range(40):
        b = b + float(form.coef_B.detach()[j]) * basis_b[j].double()
    dense = (6.0 / 3) * b @ a  # (α/r)·(Σβ_j B_j)(A0 + Σα_i A_i)
    torch.testing.assert_close(form.delta_weight().double(), dense, rtol=1e-5, atol=1e-6)
    x = torch.randn(4, 12, generator=g)
    torch.testing.assert_close(form.apply(x, torch.zeros(4, 10)).double(), x.double() @ dense.T,
                               rtol=1e-5, atol=1e-6)


def test_regenerating_bases_in_backward_gives_the_cached_gradients():
    grads = []
    for cache in (True, False):
        torch.manual_seed(0)
        args = NOLAArgs(r=3, num_basis_A=70, num_basis_B=33, seed=4, cache_bases=cache)
        form = NOLA(nn.Linear(12, 10), args)
        with torch.no_grad():
            form.coef_A.copy_(torch.linspace(-1, 1, 70))
            form.coef_B.copy_(torch.linspace(1, -1, 33))
        x = torch.randn(6, 12, generator=torch.Generator().manual_seed(1))
        form.apply(x, torch.zeros(6, 10)).pow(2).sum().backward()
        grads.append((form.coef_A.grad.clone(), form.coef_B.grad.clone()))
    for cached, regenerated in zip(*grads, strict=True):
        torch.testing.assert_close(regenerated, cached, rtol=1e-5, atol=1e-6)


def test_identity_at_init_with_nonzero_gradient():
    for with_a0 in (True, False):
        model = tiny_gpt2(seed=0)
        with torch.no_grad():
            base = model(IDS).logits
        _attach(model, targets=["c_attn", "c_fc"], r=4, num_basis_A=8, num_basis_B=8, with_A0=with_a0)
        out = model(IDS).logits
        torch.testing.assert_close(out, base, rtol=0, atol=1e-6)
        model(IDS, labels=IDS).loss.backward()
        forms = adapter_modules(model, "default").values()
        assert all(f.coef_B.grad.abs().sum() > 0 for f in forms)  # β learns from step 0


def test_saved_file_holds_only_coefficients_and_seeds_and_reload_is_exact(tmp_path):
    model = _attach(tiny_llama(seed=0), attach_seed=5, r=4, num_basis_A=16, num_basis_B=24)
    _randomize(model)
    with torch.no_grad():
        logits = model(IDS).logits
    lorakit.save(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    forms = adapter_modules(model, "default")
    assert len(saved) == 3 * len(forms)
    for key, tensor in saved.items():
        suffix = key.rpartition(".")[2]
        assert suffix in {"coef_A", "coef_B", "seed"}, key
        assert tensor.numel() == {"coef_A": 16, "coef_B": 24, "seed": 1}[suffix]
    assert sum(t.numel() for t in saved.values()) == len(forms) * (16 + 24 + 1)  # no basis, no A0
    torch.manual_seed(12345)  # the bases must not depend on the global RNG
    fresh = lorakit.load(tiny_llama(seed=0), tmp_path)
    rng = torch.random.get_rng_state()
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, logits)
    assert torch.equal(torch.random.get_rng_state(), rng)  # generating bases leaves the global RNG alone
    for path, form in adapter_modules(fresh, "default").items():
        assert torch.equal(form.delta_weight(), forms[path].delta_weight())


def test_layer_seeds_derive_from_base_seed_and_path_and_another_process_rebuilds_the_bases(tmp_path):
    seeds = []
    for global_seed in (0, 99):
        model = _attach(tiny_llama(seed=0), attach_seed=global_seed, r=2, num_basis_A=4, num_basis_B=4,
                        seed=7)
        seeds.append({p: int(f.seed) for p, f in adapter_modules(model, "default").items()})
    assert seeds[0] == seeds[1]  # same base seed -> same per-layer seeds whatever the attach seed
    assert len(set(seeds[0].values())) == len(seeds[0])  # each module path its own seed
    assert all(0 <= s < SEED_LIMIT for s in seeds[0].values())
    # another process rebuilds the identical ΔW from the saved coefficients and seed alone
    torch.manual_seed(0)
    form = NOLA(nn.Linear(12, 10), NOLAArgs(r=3, num_basis_A=6, num_basis_B=7, seed=21))
    form.bind_path("model.layers.0.self_attn.q_proj")
    with torch.no_grad():
        form.coef_A.normal_()
        form.coef_B.normal_()
    save_file({k: v.contiguous() for k, v in form.save_tensors().items()}, str(tmp_path / "t.safetensors"))
    script = (
        "import json, sys, torch\n"
        "from torch import nn\n"
        "from safetensors.torch import load_file, save_file\n"
        "from lorakit.forms.nola import NOLA, NOLAArgs\n"
        "torch.manual_seed(777)\n"
        "args = NOLAArgs(**json.loads(sys.argv[2]))\n"
        "form = NOLA(nn.Linear(12, 10), args)\n"
        "form.load_tensors(load_file(sys.argv[1] + '/t.safetensors'))\n"
        "save_file({'dw': form.delta_weight().detach().contiguous()}, sys.argv[1] + '/dw.safetensors')\n"
    )
    args = {"r": 3, "num_basis_A": 6, "num_basis_B": 7, "seed": 21}
    subprocess.run([sys.executable, "-c", script, str(tmp_path), json.dumps(args)], check=True, timeout=120)
    assert torch.equal(load_file(str(tmp_path / "dw.safetensors"))["dw"], form.delta_weight().detach())
