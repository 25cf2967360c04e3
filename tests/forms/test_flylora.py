"""FlyLoRA: exactly k ranks per token, frozen sparse A, load-balancing bias, not mergeable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.forms.flylora import FlyLoRA, FlyLoRAArgs
from lorakit.models import tiny_llama


def _form(args: FlyLoRAArgs, n: int = 32, m: int = 24, seed: int = 0) -> FlyLoRA:
    torch.manual_seed(seed)
    form = FlyLoRA(nn.Linear(n, m), args)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        form.lora_B.copy_(torch.randn(form.lora_B.shape, generator=g))
        form.expert_bias.copy_(torch.randn(args.r, generator=g) * 0.05)
    return form


def _dense_reference(form: FlyLoRA, x: torch.Tensor, base_out: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: pick the k best ranks by sorting, build ΔW_t = (α/r)·B·diag(m_t)·A, apply it."""
    a, b, d = form.lora_A.double(), form.lora_B.double(), form.expert_bias.double()
    k, s = form.args.k, form.args.alpha / form.args.r
    flat_x, flat_out = x.reshape(-1, x.shape[-1]).double(), base_out.reshape(-1, base_out.shape[-1]).double()
    outs, masks = [], []
    for xt, ot in zip(flat_x, flat_out, strict=True):
        score = a @ xt + d
        if form.args.topk_abs:
            score = score.abs()
        order = sorted(range(form.args.r), key=lambda i: -float(score[i]))
        mask = torch.zeros(form.args.r, dtype=torch.float64)
        mask[order[:k]] = 1.0
        delta_t = s * b @ torch.diag(mask) @ a
        outs.append(ot + delta_t @ xt)
        masks.append(mask)
    return torch.stack(outs).reshape(base_out.shape), torch.stack(masks)


@pytest.mark.parametrize("topk_abs", [False, True])
def test_exactly_k_ranks_per_token_equals_dense_masked_update(topk_abs):
    form = _form(FlyLoRAArgs(r=8, k=3, alpha=16.0, topk_abs=topk_abs)).eval()
    g = torch.Generator().manual_seed(5)
    x, base_out = torch.randn(2, 7, 32, generator=g), torch.randn(2, 7, 24, generator=g)
    bias_before = form.expert_bias.clone()
    out = form.apply(x, base_out)
    expected, masks = _dense_reference(form, x, base_out)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)
    assert (masks.sum(-1) == 3).all()  # exactly k ranks active on every token
    selected = form.route(x).reshape(-1, 3)
    assert all(len(set(row.tolist())) == 3 for row in selected)
    assert torch.equal(masks.nonzero()[:, 1].reshape(-1, 3).sort(-1).values, selected.sort(-1).values)
    assert torch.equal(form.expert_bias, bias_before)  # eval mode: d is not updated by default


def test_a_is_frozen_sparse_with_the_specified_density():
    model = tiny_llama(seed=0)
    spec = lorakit.AdapterSpec(form="flylora", form_args={"r": 8, "k": 2, "alpha": 16.0},
                               targets="all-linear")
    lorakit.attach(model, spec, seed=3)
    forms = adapter_modules(model, "default")
    nonzero_values = []
    for form in forms.values():
        n = form.in_features
        assert form.lora_A.shape == (8, n) and "lora_A" not in dict(form.named_parameters())
        per_row = (form.lora_A != 0).sum(dim=1)
        assert (per_row == n * 2 // 8).all()  # p = n·ρ with ρ = k/r
        nonzero_values.append(form.lora_A[form.lora_A != 0])
    values = torch.cat(nonzero_values)
    assert abs(values.std().item() - 1 / 8) < 0.02 and abs(values.mean().item()) < 0.02  # N(0, 1/r²)
    # same seed -> same A; other density honoured
    again = lorakit.attach(tiny_llama(seed=0), spec, seed=3)
    for path, form in adapter_modules(again, "default").items():
        assert torch.equal(form.lora_A, forms[path].lora_A)
    dense = FlyLoRA(nn.Linear(40, 8), FlyLoRAArgs(r=4, k=1, density=0.3))
    assert ((dense.lora_A != 0).sum(dim=1) == 12).all()
    # training moves B only; A and the trainable count stay as specified
    a_before = {p: f.lora_A.clone() for p, f in forms.items()}
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    for path, form in forms.items():
        assert torch.equal(form.lora_A, a_before[path]) and form.lora_B.abs().sum() > 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        f.out_features * 8 for f in forms.values())


def test_bias_rule_pushes_selection_counts_toward_uniform():
    r, k, u = 8, 2, 0.02
    torch.manual_seed(0)
    form = FlyLoRA(nn.Linear(16, 4), FlyLoRAArgs(r=r, k=k, alpha=8.0, bias_u=u)).train()
    g = torch.Generator().manual_seed(0)
    direction = form.lora_A[0] + form.lora_A[1]  # every token leans one way: a few ranks win
    x = torch.randn(256, 16, generator=g) * 0.2 + 4.0 * direction / direction.norm()

    def counts() -> torch.Tensor:
        return torch.bincount(form.route(x).reshape(-1), minlength=r).float()

    first = counts()
    assert (first == 0).sum() >= r // 2  # skewed: half of the ranks are never chosen
    # one step follows the rule exactly: d += u·sign(mean(c) − c)
    d0 = form.expert_bias.clone()
    form.apply(x, torch.zeros(256, 4))
    torch.testing.assert_close(form.expert_bias, d0 + u * torch.sign(first.mean() - first))
    usage = torch.zeros(r)
    for step in range(400):
        if step >= 300:
            usage += counts()
        form.apply(x, torch.zeros(256, 4))
    cv_first = (first.std() / first.mean()).item()
    cv_last = (usage.std() / usage.mean()).item()
    assert cv_first > 1.5 and cv_last < 0.3, (cv_first, cv_last)  # measured: 1.85 -> 0.18
    assert (usage > 0).all()


def test_bias_update_modes_and_detached_input():
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(2))
    for mode, trains, evals in [("train", True, False), ("always", True, True), ("never", False, False)]:
        form = _form(FlyLoRAArgs(r=8, k=2, bias_update=mode, bias_u=0.1))
        for training, should in [(True, trains), (False, evals)]:
            form.train(training)
            before = form.expert_bias.clone()
            form.apply(x, torch.zeros(5, 24))
            assert (not torch.equal(form.expert_bias, before)) == should, (mode, training)
    for detach, grad_expected in [(False, True), (True, False)]:
        form = _form(FlyLoRAArgs(r=8, k=2, detach_input=detach)).eval()
        xg = x.clone().requires_grad_(True)
        form.apply(xg, torch.zeros(5, 24)).sum().backward()
        assert (xg.grad is not None and xg.grad.abs().sum() > 0) == grad_expected


def test_not_mergeable_and_bias_saved_exactly(tmp_path):
    model = tiny_llama(seed=0)
    spec = lorakit.AdapterSpec(form="flylora", form_args={"r": 8, "k": 2, "alpha": 16.0, "bias_u": 0.01})
    lorakit.attach(model, spec, seed=0)
    model.train()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert any(f.expert_bias.abs().sum() > 0 for f in adapter_modules(model, "default").values())
    with pytest.raises(ValueError, match="cannot be merged"):
        lorakit.merge(model)
    with pytest.raises(ValueError, match="no fixed ΔW"):
        next(iter(adapter_modules(model, "default").values())).delta_weight()
    lorakit.save(model, tmp_path)
    fresh = lorakit.load(tiny_llama(seed=0), tmp_path)
    for path, form in adapter_modules(fresh, "default").items():
        ref = adapter_modules(model, "default")[path]
        assert torch.equal(form.expert_bias, ref.expert_bias) and torch.equal(form.lora_A, ref.lora_A)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
