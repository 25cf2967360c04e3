"""LoLDU: P·L·D·U reconstructs W, the output equals the base at init, only the r diagonal entries z
train, and ΔW equals the paper's residual form W_res + σ·P·L_r·diag(z)·U_r − W (dense reference built
from torch.linalg.lu)."""

from __future__ import annotations

import warnings

import pytest
import torch

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.core.state import BaseMismatchError
from lorakit.forms.loldu import LoLDU, ldu
from lorakit.models import tiny_gpt2, tiny_llama

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, wide (16x32) and tall-input (32x64) layers


def _perm_matrix(pi: torch.Tensor) -> torch.Tensor:
    p = torch.zeros(len(pi), len(pi))
    p[torch.arange(len(pi)), pi] = 1.0
    return p


@pytest.mark.parametrize("shape", [(24, 24), (40, 16), (16, 40)])
def test_pldu_reconstructs_w_and_matches_torch_lu(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    pi, lower, d, upper = ldu(w)
    p_ref, l_ref, u_ref = torch.linalg.lu(w)  # independent reference, dense P
    torch.testing.assert_close(_perm_matrix(pi), p_ref, rtol=0, atol=0)  # the index vector is P
    torch.testing.assert_close(lower, l_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(d, torch.diagonal(u_ref), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.diagonal(upper), torch.ones(min(shape)), rtol=0, atol=1e-6)  # unit upper
    torch.testing.assert_close(_perm_matrix(pi) @ lower @ torch.diag(d) @ upper, w, rtol=0, atol=1e-5)
    torch.testing.assert_close((lower @ torch.diag(d) @ upper)[pi], w, rtol=0, atol=1e-5)  # row-index form


def test_rank_deficient_weight_has_no_inf_and_still_reconstructs():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20, 3, generator=g) @ torch.randn(3, 20, generator=g)  # rank 3: pivots 4.. vanish
    pi, lower, d, upper = ldu(w)
    assert torch.isfinite(lower).all() and torch.isfinite(d).all() and torch.isfinite(upper).all()
    torch.testing.assert_close((lower @ torch.diag(d) @ upper)[pi], w, rtol=0, atol=1e-5)


def _attach(model, targets=TARGETS, **args):
    lorakit.attach(model, lorakit.AdapterSpec(form="loldu", form_args={"r": 8, "alpha": 4, **args},
                                              targets=targets), seed=0)
    return adapter_modules(model, "default")


def test_identity_at_init_and_only_z_trains_r_per_layer():
    for make, targets in ((tiny_llama, TARGETS), (tiny_gpt2, ["c_attn", "c_fc"])):
        model = make(seed=0)
        with torch.no_grad():
            base = model(IDS).logits
        forms = _attach(model, targets)
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, base)  # exactly: ΔW = σ·P·L_r·diag(z − D_r)·U_r = 0
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(n.endswith(".ldu_z") for n in trainable)
        assert all(p.numel() == 8 for p in trainable.values())
        assert len(trainable) == len(forms)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 8 * len(forms)


def test_delta_equals_paper_residual_form_after_training():
    model = tiny_llama(seed=0)
    forms = _attach(model)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for path, form in forms.items():
        w = model.get_submodule(path).base_layer.weight.detach()
        assert not torch.equal(form.ldu_z, form.ldu_D)  # z moved
        p, lower, upper = torch.linalg.lu(w)
        d = torch.diagonal(upper)
        upper = upper / d[:, None]
        r, sigma = 8, 4 / 8
        lr_, dr, ur = lower[:, :r], d[:r], upper[:r]
        w_res = w - sigma * p @ lr_ @ torch.diag(dr) @ ur  # the paper writes this into the layer
        w_eff = w_res + sigma * p @ lr_ @ torch.diag(form.ldu_z.detach()) @ ur
        torch.testing.assert_close(form.delta_weight(), w_eff - w, rtol=1e-4, atol=1e-6)
        x = torch.randn(4, form.in_features)
        with torch.no_grad():
            torch.testing.assert_close(form.apply(x, x @ w.T), x @ w_eff.T, rtol=1e-4, atol=1e-5)


def test_base_weight_untouched_and_reload_checks_the_pivots(tmp_path):
    model = tiny_llama(seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    forms = _attach(model)
    with torch.no_grad():
        for f in forms.values():
            f.ldu_z.add_(0.5)
    after = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "adapters" not in n}
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
    lorakit.save(model, tmp_path / "small")
    saved = lorakit.extract_state(model).tensors
    assert sorted({k.rpartition(".")[2] for k in saved}) == ["ldu_D", "ldu_z"]  # 2r numbers per layer
    fresh = lorakit.load(tiny_llama(seed=0), tmp_path / "small")
    with torch.no_grad():
        assert torch.equal(fresh(IDS).logits, model(IDS).logits)
    # a different base pivots differently: refused with a clear message instead of a silent wrong ΔW
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the base fingerprint differs too: lorakit warns, LoLDU refuses
        with pytest.raises((ValueError, BaseMismatchError), match="pivots"):
            lorakit.load(tiny_llama(seed=5), tmp_path / "small")
    # save_factors=True: P (as an index vector), L_r, U_r travel with the adapter
    model2 = tiny_llama(seed=0)
    forms2 = _attach(model2, save_factors=True)
    keys = lorakit.extract_state(model2).tensors
    assert sorted({k.rpartition(".")[2] for k in keys}) == ["ldu_D", "ldu_L", "ldu_U", "ldu_z", "perm"]
    assert all(f.perm.dtype == torch.long and f.perm.shape == (f.out_features,) for f in forms2.values())


def test_merge_unmerge_round_trip_and_rank_limit():
    model = tiny_llama(seed=0)
    forms = _attach(model)
    with torch.no_grad():
        for f in forms.values():
            f.ldu_z.mul_(1.5)
        unmerged = model(IDS).logits
        lorakit.merge(model)
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-4, atol=1e-5)
        lorakit.unmerge(model)
        torch.testing.assert_close(model(IDS).logits, unmerged, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="exceeds min"):
        _attach(tiny_llama(seed=0), targets=["v_proj"], r=17)  # v_proj is 16x32
    assert isinstance(next(iter(forms.values())), LoLDU)
