"""LoRAM: the adapter trained on the pruned tiny Llama is recovered to full size; it loads on the ORIGINAL
model, its ΔW equals the pruned adapter's ΔW on kept coordinates and is 0 on pruned ones, and real
``peft`` loads the saved adapter with the same logits as lorakit."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.core.spec import AdapterSpec
from lorakit.models import tiny_llama
from lorakit.strategies.loram import LoRAM, prune_model, recover, structured_keep
from lorakit.train import TrainConfig, Trainer

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (10,), generator=G) for _ in range(16)]
IDS = torch.stack(DATA[:3])


def original():
    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


def train(model, steps=4, strategies=(), out=None):
    cfg = TrainConfig(steps=steps, batch_size=4, lr=5e-3, progress=False, eval_at_start=False, warmup_steps=0,
                      schedule="constant", out_dir=str(out) if out else None)
    Trainer(model, DATA, lambda b: torch.stack(b), lambda m, ids: m(input_ids=ids, labels=ids).loss, cfg,
            strategies=list(strategies)).train(resume=False)


def check_recovered(pruned_forms, full_forms, imap):
    assert set(pruned_forms) == set(full_forms)
    n_pruned_modules = 0
    for path, f in pruned_forms.items():
        dW_small, dW_full = f.delta_weight().detach(), full_forms[path].delta_weight().detach()
        if path not in imap:
            torch.testing.assert_close(dW_full, dW_small)
            continue
        n_pruned_modules += 1
        dim, idx, full = imap[path]
        assert dW_full.shape[dim] == full and dW_small.shape[dim] == len(idx) < full
        torch.testing.assert_close(dW_full.index_select(dim, idx), dW_small, rtol=1e-6, atol=1e-7)
        gone = torch.ones(full, dtype=torch.bool)
        gone[idx] = False
        assert dW_full.index_select(dim, gone.nonzero().squeeze(1)).abs().max() == 0
    assert n_pruned_modules == 14  # 7 projections x 2 blocks


def test_recovered_adapter_loads_on_original_and_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    small = original()
    keep = structured_keep(small, ratio=0.5, layers=[0, 1])
    imap = prune_model(small, keep)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in original().parameters())
    lorakit.attach(small, AdapterSpec(form_args={"r": 4, "alpha": 8}, targets=ALL7), seed=0)
    train(small)  # LoRA on the pruned model
    assert any(f.lora_B.abs().max() > 0 for f in adapter_modules(small, "default").values())
    full = recover(small, original(), imap)
    check_recovered(adapter_modules(small, "default"), adapter_modules(full, "default"), imap)
    # saved from the original model, it loads on a fresh original (lorakit) and in real peft
    lorakit.save(full, tmp_path / "recovered")
    ours = lorakit.load(original(), tmp_path / "recovered")
    with torch.no_grad():
        ref = full(input_ids=IDS).logits
        got = ours(input_ids=IDS).logits
        base = original()(input_ids=IDS).logits
        pm = peft.PeftModel.from_pretrained(original(), str(tmp_path / "recovered"))
        theirs = pm(input_ids=IDS).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theirs, ref, rtol=1e-5, atol=1e-5)
    assert (ref - base).abs().max() > 1e-4  # the adapter does something


def test_strategy_trains_small_and_ends_on_original_model(tmp_path):
    model = original()
    ref = copy.deepcopy(model)
    lorakit.attach(model, AdapterSpec(form_args={"r": 4, "alpha": 8}, targets=ALL7), seed=0)
    s = LoRAM(ratio=0.5, layers="0,1")
    train(model, steps=3, strategies=[s], out=tmp_path / "run")
    assert s.recovered and s.params_pruned < s.params_full
    # base weights are the original ones again; ΔW on pruned coordinates is 0
    for (n, p), (n2, p2) in zip(lorakit.unload(copy.deepcopy(model), merge_active=False).named_parameters(),
                                ref.named_parameters(), strict=True):
        assert n == n2 and torch.equal(p, p2), n
    forms = adapter_modules(model, "default")
    for path, (dim, idx, full) in s.imap.items():
        dW = forms[path].delta_weight().detach()
        gone = torch.ones(full, dtype=torch.bool)
        gone[idx] = False
        assert dW.shape[dim] == full and dW.index_select(dim, gone.nonzero().squeeze(1)).abs().max() == 0
    loaded = lorakit.load(original(), tmp_path / "run" / "recovered_adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=IDS).logits, model(input_ids=IDS).logits)
