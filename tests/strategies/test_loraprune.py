"""LoRAPrune: the LoRA-guided importance equals the paper's formula (dense check), the sparsity schedule
is cubic, and the physically pruned tiny Llama runs, is smaller, and reproduces the masked model."""

from __future__ import annotations

import torch

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.core.spec import AdapterSpec
from lorakit.models import tiny_llama
from lorakit.strategies.loraprune import LoRAPrune, cubic_sparsity, element_importance, find_blocks, group_scores
from lorakit.train import TrainConfig, Trainer

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (10,), generator=G) for _ in range(16)]


def adapted_model(seed=0):
    try:
        from tests.conftest import randomize_adapter
    except ImportError:  # pragma: no cover - rootdir-relative import
        from conftest import randomize_adapter
    model = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=seed)
    lorakit.attach(model, AdapterSpec(form_args={"r": 4, "alpha": 8}, targets=ALL7), seed=seed)
    randomize_adapter(model, seed=3, std=0.1)
    return model


def backward(model):
    ids = torch.stack(DATA[:4])
    model(input_ids=ids, labels=ids).loss.backward()


def test_importance_equals_paper_formula_dense():
    model = adapted_model()
    backward(model)
    blocks = find_blocks(model)
    b = blocks[0]
    forms = adapter_modules(model, "default")
    # element importance: |(BA − (B − g_B)(A − g_A)) ⊙ (W + s·BA)| recomputed independently
    per_module = {}
    for path, f in forms.items():
        W = model.get_submodule(path).base_layer.weight.detach().double()
        A, B = f.lora_A.detach().double(), f.lora_B.detach().double()
        gA, gB = f.lora_A.grad.double(), f.lora_B.grad.double()
        ref = ((B @ A - (B - gB) @ (A - gA)) * (W + f.scaling * B @ A)).abs()
        got = element_importance(model.get_submodule(path).base_layer.weight, f)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-9)
        per_module[path.rpartition(".")[2] if path.startswith("model.layers.0.") else None] = ref
    # groups of block 0 by explicit loops: kv group j = q heads {2j, 2j+1}, k/v head j, o columns of those q heads
    hd, rep = 8, 2
    kv = torch.zeros(2, dtype=torch.float64)
    vecs = {}
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
        imp = per_module[n]
        v = torch.zeros(2, dtype=torch.float64)
        for j in range(2):
            if n == "q_proj":
                v[j] = imp[j * rep * hd:(j + 1) * rep * hd].sum()
            elif n == "o_proj":
                v[j] = imp[:, j * rep * hd:(j + 1) * rep * hd].sum()
            else:
                v[j] = imp[j * hd:(j + 1) * hd].sum()
        vecs[n] = v
        kv += v / v.norm()
    ch = per_module["gate_proj"].sum(1) / per_module["gate_proj"].sum(1).norm() \
        + per_module["up_proj"].sum(1) / per_module["up_proj"].sum(1).norm() \
        + per_module["down_proj"].sum(0) / per_module["down_proj"].sum(0).norm()
    got_kv, got_ch = group_scores(b)
    torch.testing.assert_close(got_kv.double(), kv, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(got_ch.double(), ch, rtol=1e-5, atol=1e-9)


def test_schedule_is_cubic():
    T, tw, tc, pf, p0 = 100, 10, 10, 0.5, 0.0
    assert cubic_sparsity(0, T, pf, p0, tw, tc) == 0.0
    assert cubic_sparsity(tw, T, pf, p0, tw, tc) == p0
    assert cubic_sparsity(T - tc, T, pf, p0, tw, tc) == pf
    assert cubic_sparsity(T - 1, T, pf, p0, tw, tc) == pf
    for t in range(tw, T - tc):
        u = (t - tw) / (T - tw - tc)
        assert abs(cubic_sparsity(t, T, pf, p0, tw, tc) - (pf + (p0 - pf) * (1 - u) ** 3)) < 1e-12
        # cubic: remaining sparsity (pf − p)/(pf − p0) = (1 − u)^3
        assert abs((pf - cubic_sparsity(t, T, pf, p0, tw, tc)) / (pf - p0) - (1 - u) ** 3) < 1e-12


def test_pruned_model_runs_smaller_and_equals_masked_model():
    model = adapted_model()
    s = LoRAPrune(ratio=0.5, layers=[0, 1])
    s.attach(model, total_steps=10)
    backward(model)
    s.accumulate()
    s.update_masks(0.5)
    blocks = s.blocks
    assert all(len(b.keep_kv) == 1 and len(b.keep_ch) == 32 for b in blocks)
    ids = torch.stack(DATA[4:8])
    with torch.no_grad():
        masked = model(input_ids=ids).logits
    n_before = sum(p.numel() for p in model.parameters())
    s.finalize()
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    n_after = sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(pruned, masked, rtol=1e-5, atol=1e-5)
    # per block: half the q/k/v/o and gate/up/down parameters (base and LoRA) are gone
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.base_layer.weight.shape == (16, 32) and attn.k_proj.base_layer.weight.shape == (8, 32)
    assert attn.o_proj.base_layer.weight.shape == (32, 16)
    assert model.model.layers[1].mlp.down_proj.base_layer.weight.shape == (32, 32)
    assert n_after < n_before
    assert n_before - n_after == 2 * (16 * 32 * 2 + 8 * 32 * 2 + 32 * 3 * 32  # base: q,o ; k,v ; gate,up,down
                                      + 4 * (16 * 2 + 8 * 2 + 32 * 3))  # LoRA: B of q,k,v,gate,up / A of o,down


def test_trainer_run_prunes_and_output_runs():
    model = adapted_model()
    n0 = sum(p.numel() for p in model.parameters())
    s = LoRAPrune(ratio=0.5, prune_freq=2, layers=[0, 1])
    cfg = TrainConfig(steps=6, batch_size=4, lr=1e-3, progress=False, eval_at_start=False, warmup_steps=0)
    Trainer(model, DATA, lambda b: torch.stack(b),
            lambda m, ids: m(input_ids=ids, labels=ids).loss, cfg, strategies=[s]).train(resume=False)
    assert s.pruned and sum(p.numel() for p in model.parameters()) < n0
    with torch.no_grad():
        out = model(input_ids=torch.stack(DATA[:2])).logits
    assert torch.isfinite(out).all()
