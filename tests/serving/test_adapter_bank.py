"""AdapterBank: paging of heterogeneous ranks, byte budget, LRU eviction + pinning, runtime
load/unload, forms served by export or refused, and the batched kernels against a dense reference."""

from __future__ import annotations

import copy

import pytest
import torch
from serving_helpers import tiny_base, write_peft_adapters

import lorakit
from lorakit.io.peft import load_state
from lorakit.serving import AdapterBank, AdapterBankError, BankFullError, batched_lora
from lorakit.serving.kernels import RowPlan, choose_path


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    base = tiny_base()
    return base, write_peft_adapters(base, tmp_path_factory.mktemp("bank"))


def page_budget(base, pages):
    probe = AdapterBank.for_model(copy.deepcopy(base), budget_bytes=1 << 20, page_rows=4)
    return pages * sum(layer.page_bytes for layer in probe.layers.values())


def test_pages_follow_ranks_and_bytes(adapters):
    base, dirs = adapters
    bank = AdapterBank.for_model(copy.deepcopy(base), budget_bytes=1 << 20, page_rows=4)
    for n, d in dirs.items():
        bank.add(n, d)
    b = bank.adapters["b"]  # r=16 on q,v: 4 pages each; nothing on k,o
    assert {p.rpartition(".")[2]: ap.shape[0] for p, (ap, _, _) in b.modules.items()} == {"q_proj": 4, "v_proj": 4}
    c = bank.adapters["c"]  # r=6 (2 pages) on k, rank_pattern o_proj r=2 (1 page)
    assert sorted((p.rpartition(".")[2], r) for p, (_, _, r) in c.modules.items())[:2] == [("k_proj", 6),
                                                                                         ("k_proj", 6)]
    assert all(r == 2 for p, (_, _, r) in c.modules.items() if p.endswith("o_proj"))
    slot = bank.acquire("b")
    assert bank.used_bytes == b.nbytes_pages and b.nbytes_pages == b.nbytes_tensors  # 16 = 4 full pages
    # the paged weights are exactly s·B·A of the PEFT file (rsLoRA: s = α/√r)
    state = load_state(dirs["b"])
    path = next(iter(b.modules))
    a_t, b_t = state.tensors[f"{path}.lora_A.weight"], state.tensors[f"{path}.lora_B.weight"]
    a, bt = bank.layers[path].slot_weights(slot)
    torch.testing.assert_close(bt.T @ a, (8 / 16 ** 0.5) * b_t @ a_t)
    assert bank.adapters["d"].nbytes_pages > bank.adapters["d"].nbytes_tensors  # r=1 padded to one page


def test_lru_eviction_and_pinning(adapters):
    base, dirs = adapters
    bank = AdapterBank.for_model(copy.deepcopy(base), budget_bytes=page_budget(base, 4), page_rows=4)
    for n in ("a", "b", "c", "d"):
        bank.add(n, dirs[n])
    for n in ("a", "c", "d"):  # all fit: q 1, k 1+2, v 1, o 1+1+1
        bank.acquire(n)
        bank.release(n)
    assert sorted(bank.resident()) == ["a", "c", "d"]
    bank.acquire("a")
    bank.release("a")  # a is now most recently used; c is the LRU
    bank.acquire("b")  # needs all 4 pages of q and v: evicts a (holds q/v pages); c, d untouched
    assert sorted(bank.resident()) == ["b", "c", "d"] and bank.stats["evictions"] == 1
    bank.release("b")
    bank.pin("b")
    with pytest.raises(BankFullError, match="are pinned or in use"):
        bank.acquire("a")  # b is pinned and takes every q page
    bank.pin("b", False)
    bank.acquire("a")
    assert "b" not in bank.resident()
    assert bank.used_bytes <= bank.budget_bytes
    with pytest.raises(AdapterBankError, match="running request"):
        bank.remove("a")
    bank.release("a")
    bank.remove("a")
    assert "a" not in bank.adapters and "a" not in bank.resident()
    free_q = [len(layer.free_pages) for p, layer in bank.layers.items() if p.endswith("q_proj")]
    assert free_q == [4, 4]


def test_pinned_at_add_and_errors(adapters):
    base, dirs = adapters
    bank = AdapterBank.for_model(copy.deepcopy(base), budget_bytes=1 << 20, page_rows=4, max_rank=8)
    bank.add("a", dirs["a"], pin=True)
    assert bank.resident() == ["a"] and bank.adapters["a"].in_use == 0
    with pytest.raises(AdapterBankError, match="already loaded"):
        bank.add("a", dirs["a"])
    with pytest.raises(AdapterBankError, match="max_rank"):
        bank.add("b", dirs["b"])
    with pytest.raises(AdapterBankError, match="unknown adapter"):
        bank.acquire("zzz")
    with pytest.raises(ValueError, match="holds no page"):
        AdapterBank.for_model(copy.deepcopy(base), budget_bytes=10)


def _model_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_non_factored_form_export_or_refusal():
    base = tiny_base()
    model = lorakit.attach(copy.deepcopy(base), lorakit.AdapterSpec(form="dora", form_args={"r": 4},
                                                                    targets=["q_proj", "v_proj"]), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adapters" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.2)
    state = lorakit.extract_state(model)
    served = copy.deepcopy(base)
    bank = AdapterBank.for_model(served, budget_bytes=1 << 20, max_rank=32)
    with pytest.raises(AdapterBankError, match="export_rank"):
        bank.add("x", state)
    bank.add("x", state, export_rank=32)  # full rank of a 32×32 layer: exact
    assert max(bank.export_errors["x"].values()) < 1e-5
    from lorakit.serving import ServingEngine
    from lorakit.serving.engine import Request

    eng = ServingEngine(served, bank)
    req = eng.generate([Request([3, 4, 5, 6], "x", max_new_tokens=1, return_logits=True)])[0]
    want = _model_logits(model, torch.tensor([[3, 4, 5, 6]]))[0, -1]
    assert (req.logits[0] - want).abs().max() < 1e-4


def test_lorakit_state_source_and_bias_refused():
    base = tiny_base()
    spec = lorakit.AdapterSpec(form="lora", form_args={"r": 4, "alpha": 8, "bias": True}, targets=["q_proj"])
    model = lorakit.attach(copy.deepcopy(base), spec, seed=0)
    bank = AdapterBank.for_model(copy.deepcopy(base), budget_bytes=1 << 20)
    with pytest.raises(AdapterBankError, match="bias"):
        bank.add("x", lorakit.extract_state(model))
    ffa = lorakit.attach(copy.deepcopy(base), lorakit.AdapterSpec(form="ffa", form_args={"r": 4}), seed=0)
    bank.add("y", lorakit.extract_state(ffa))
    assert set(bank.adapters["y"].modules) == {p for p in bank.layers if p.endswith(("q_proj", "v_proj"))}


@pytest.mark.parametrize("tokens", [1, 5])
def test_kernel_paths_match_dense(adapters, tokens):
    base, dirs = adapters
    bank = AdapterBank.for_model(copy.deepcopy(base), budget_bytes=1 << 20, page_rows=4)
    for n, d in dirs.items():
        bank.add(n, d)
    names = ["a", None, "b", "c", "a", "d", None, "b"]
    slots = bank.slots(names)
    path = next(p for p in bank.layers if p.endswith("o_proj"))  # targeted by a, c (r=2), d; not b
    layer = bank.layers[path]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(names), tokens, 32, generator=g)
    base_out = torch.randn(len(names), tokens, 32, generator=g)
    want = base_out.clone()
    for i, n in enumerate(names):
        if n is None or path not in bank.adapters[n].modules:
            continue
        st = load_state(dirs[n])
        a, b = st.tensors[f"{path}.lora_A.weight"], st.tensors[f"{path}.lora_B.weight"]
        cfg = {"a": 8 / 4, "c": 3 / 2, "d": 2 / 1}[n]
        want[i] += cfg * x[i] @ a.T @ b.T
    for p in ("sgmv", "bgmv", "auto"):
        got = batched_lora(x, base_out.clone(), layer, slots, path=p)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    flat = batched_lora(x[:, 0], base_out[:, 0].clone(), layer, RowPlan.build(slots, 1, "bgmv"))
    torch.testing.assert_close(flat, want[:, 0], atol=1e-5, rtol=1e-5)
    assert choose_path(32, 32, 1) == "bgmv" and choose_path(32, 2, 1) == "sgmv" and choose_path(4, 4, 16) == "sgmv"


def test_triton_backend_guarded(adapters):
    from lorakit.serving.kernels import triton_available

    base, dirs = adapters
    if not (torch.cuda.is_available() and triton_available()):
        bank = AdapterBank.for_model(copy.deepcopy(base), budget_bytes=1 << 20)
        bank.add("a", dirs["a"])
        layer = next(iter(bank.layers.values()))
        with pytest.raises(RuntimeError, match="triton"):
            batched_lora(torch.zeros(1, 32), torch.zeros(1, 32), layer, bank.slots(["a"]), backend="triton")
        pytest.skip("Triton backend needs CUDA and triton")
    bank = AdapterBank.for_model(copy.deepcopy(base).cuda(), budget_bytes=1 << 20, device="cuda")
    for n, d in dirs.items():
        bank.add(n, d)
    slots = bank.slots(["a", None, "b", "c", "a", "d", None, "b"])
    x = torch.randn(8, 3, 32, device="cuda")
    base_out = torch.randn(8, 3, 32, device="cuda")
    for layer in bank.layers.values():
        want = batched_lora(x, base_out.clone(), layer, slots, backend="torch")
        got = batched_lora(x, base_out.clone(), layer, slots, backend="triton")
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
