"""Block-LoRA (INFERRED form): summing the input chunks and one small matmul equals the dense
ΔW = s·B·A_s·(1ᵀ ⊗ I_c), and the trainable count is r(m + n/n_blk)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.forms.block_lora import BlockLoRA, BlockLoRAArgs
from lorakit.models import tiny_llama


@pytest.mark.parametrize("n_in,n_out,n_blk", [(32, 48, 8), (64, 16, 4), (30, 20, 4), (12, 7, 1)])
def test_fast_path_equals_dense_kronecker_delta(n_in, n_out, n_blk):
    g = torch.Generator().manual_seed(0)
    form = BlockLoRA(nn.Linear(n_in, n_out), BlockLoRAArgs(r=3, alpha=6, dropout=0.0, n_blk=n_blk))
    with torch.no_grad():
        form.lora_A.copy_(torch.randn(form.lora_A.shape, generator=g))
        form.lora_B.copy_(torch.randn(form.lora_B.shape, generator=g))
    c = -(-n_in // n_blk)
    assert form.lora_A.shape == (3, c) and form.lora_B.shape == (n_out, 3)
    # dense reference: s·B·A_s·(1ᵀ ⊗ I_c), cut to the n real input columns (the rest is zero padding)
    tile = torch.kron(torch.ones(1, n_blk), torch.eye(c))[:, :n_in]
    dense = (6 / 3) * form.lora_B.detach() @ form.lora_A.detach() @ tile
    torch.testing.assert_close(form.delta_weight(), dense, rtol=1e-5, atol=1e-6)
    x = torch.randn(2, 5, n_in, generator=g)
    base_out = torch.randn(2, 5, n_out, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(form.apply(x, base_out), base_out + x @ dense.T, rtol=1e-5, atol=1e-5)
        # the chunk sum is the only A-side work: Σ_i x_i, then one r×c product
        padded = torch.nn.functional.pad(x, (0, n_blk * c - n_in))
        manual = sum(padded[..., i * c:(i + 1) * c] for i in range(n_blk))
        torch.testing.assert_close(form.chunk_sum(x), manual, rtol=0, atol=1e-6)
    assert BlockLoRA.num_trainable(n_in, n_out, form.args) == sum(p.numel() for p in form.parameters())
    if n_in % n_blk == 0:
        assert sum(p.numel() for p in form.parameters()) == 3 * (n_out + n_in // n_blk)  # r(m + n/n_blk)


def test_on_a_model_identity_at_init_count_and_merge():
    model = tiny_llama(seed=0)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids).logits
    spec = lorakit.AdapterSpec(form="block_lora", form_args={"r": 4, "alpha": 8, "dropout": 0.0, "n_blk": 8},
                               targets=["q_proj", "v_proj", "down_proj"])
    lorakit.attach(model, spec, seed=0)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
    forms = adapter_modules(model, "default")
    # q_proj 32→32, v_proj 32→16, down_proj 64→32 per layer: r(m + n/8)
    expected = sum(4 * (f.out_features + f.in_features // 8) for f in forms.values())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    lora_count = sum(4 * (f.out_features + f.in_features) for f in forms.values())
    assert expected < lora_count
    with torch.no_grad():
        for f in forms.values():
            f.lora_B.normal_(0, 0.05)
        adapted = model(ids).logits
        lorakit.merge(model)
        torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-4, atol=1e-5)


def test_bad_block_count_is_refused():
    with pytest.raises(ValueError, match="n_blk"):
        BlockLoRA(nn.Linear(4, 4), BlockLoRAArgs(n_blk=5))
    with pytest.raises(ValueError, match="n_blk"):
        BlockLoRAArgs(n_blk=0)
