"""Paged KV cache (lorakit.serving.kv) and the S-LoRA unified budget in the engine.

- PagedKVCache alone reproduces full-recompute logits (Llama with GQA and GPT-2, sdpa and eager) with
  rows leaving mid-decode, and returns every page;
- the engine with kv="paged" gives the same logits (1e-5) and greedy tokens as kv="dense", and matches
  PEFT per request (1e-4) and model.generate, with joins/leaves, mixed prompt lengths and adapters;
- pages and reservations all come back when requests finish (no leak);
- a tight unified budget evicts an idle adapter to admit a request's KV pages, makes an adapter request
  wait while KV pages hold the budget, and still answers correctly;
- a request needing more than the whole budget fails with a clear error.
"""

from __future__ import annotations

import pytest
import torch
from serving_helpers import (
    base_dirs_refs,
    make_engine,
    reference_logits,
    tiny_base,
)

from lorakit.serving import Request
from lorakit.serving.kv import PagedKVCache, PagedKVPool, attention_mask_for

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10, 11], [20, 21, 22, 23], [40, 41],
           [7, 8, 9, 10, 11, 12]]
ADAPTERS = ["a", "b", None, "c", "d", "a"]
LENGTHS = [3, 7, 2, 6, 4, 5]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return base_dirs_refs(tmp_path_factory.mktemp("adapters"))




def run_join_leave(eng):
    reqs = [Request(p, a, max_new_tokens=n, return_logits=True, ignore_eos=True)
            for p, a, n in zip(PROMPTS, ADAPTERS, LENGTHS, strict=True)]
    for r in reqs[:2]:
        eng.submit(r)
    eng.step()
    eng.step()
    for r in reqs[2:]:
        eng.submit(r)
    while not eng.idle:
        eng.step()
    return reqs


def assert_no_leak(eng):
    cache = eng.kv_cache
    assert not cache.seqs and cache.pool.used_pages == 0 and len(cache.pool.free) == cache.pool.capacity
    assert eng.kv_reserved_bytes == 0 and eng.bank.reserved_bytes == 0 and not eng._kv_reserved
    assert all(h.in_use == 0 for h in eng.bank.adapters.values())
    assert not eng.rows and not eng.requests


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_paged_cache_matches_full_recompute(arch, attn):
    if arch == "llama":
        model = tiny_base()
    else:
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=64,
                                           bos_token_id=0, eos_token_id=0)).eval()
    model.config._attn_implementation = attn
    pool = PagedKVPool.for_model(model, page_tokens=4, initial_pages=1)  # forces growth
    cache = PagedKVCache(pool)
    seqs = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [1, 2, 3, 4, 5]]
    q = max(map(len, seqs))
    ids = torch.zeros(3, q, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s)
        cache.add(b)
    rows, new, inputs, pos = [0, 1, 2], [len(s) for s in seqs], ids, torch.arange(q).expand(3, -1)
    with torch.no_grad():
        for step in range(6):
            plan = cache.prepare(rows, new, inputs.shape[1])
            out = model(input_ids=inputs, attention_mask=attention_mask_for(model, plan.mask), position_ids=pos,
                        past_key_values=cache, use_cache=True).logits
            cache.commit()
            for k, r in enumerate(rows):
                ref = model(torch.tensor([seqs[r]])).logits[0, -1]
                assert (out[k, new[k] - 1] - ref).abs().max() < 1e-5
                seqs[r].append(int(ref.argmax()))
            if step == 2:
                cache.remove(1)  # a row leaves mid-decode
                rows = [0, 2]
            new = [1] * len(rows)
            inputs = torch.tensor([[seqs[r][-1]] for r in rows])
            pos = torch.tensor([[cache.length(r)] for r in rows])
    assert pool.used_pages == sum(pool.pages_for(len(seqs[r]) - 1) for r in rows)
    for r in rows:
        cache.remove(r)
    assert pool.used_pages == 0 and pool.capacity > 1


def test_paged_engine_matches_dense_and_peft(setup):
    base, dirs, refs = setup
    dense = run_join_leave(make_engine(base, dirs, max_batch=3))
    eng = make_engine(base, dirs, max_batch=3, kv="paged", page_tokens=4)
    paged = run_join_leave(eng)
    for d, p in zip(dense, paged, strict=True):
        assert p.tokens == d.tokens and len(p.tokens) == p.max_new_tokens
        assert (torch.stack(p.logits) - torch.stack(d.logits)).abs().max() < 1e-5
        ref = refs[p.adapter]
        assert (torch.stack(p.logits) - reference_logits(ref, p.prompt, p.tokens)).abs().max() < 1e-4
        g = ref.generate(torch.tensor([p.prompt]), max_new_tokens=p.max_new_tokens,
                         min_new_tokens=p.max_new_tokens, do_sample=False)[0, len(p.prompt):].tolist()
        assert p.tokens == g
    assert_no_leak(eng)
    assert 0 < eng.kv_stats["peak_bytes"] <= eng.kv_stats["peak_reserved_bytes"]


def test_unified_budget_evicts_idle_adapter_for_kv(setup):
    base, dirs, refs = setup
    probe = make_engine(base, dirs, names=["a"], kv="paged", page_tokens=4)
    page, a_bytes = probe.kv_cache.pool.page_bytes, probe.bank.adapters["a"].nbytes_pages
    budget = a_bytes + 4 * page  # adapter "a" + 4 KV pages (16 tokens)
    eng = make_engine(base, dirs, names=["a", "b"], kv="paged", page_tokens=4, unified_budget_bytes=budget)
    # 1) adapter request (10 tokens = 3 pages + a) fits; "a" stays resident and idle afterwards
    r1 = eng.generate([Request([5, 6, 7, 8, 9], "a", max_new_tokens=5, return_logits=True, ignore_eos=True)])[0]
    assert eng.bank.adapters["a"].slot >= 0 and eng.bank.stats["evictions"] == 0
    # 2) a base request needing 6 pages (24 tokens) only fits if the idle adapter is evicted
    r2 = eng.generate([Request(list(range(3, 15)), None, max_new_tokens=12, return_logits=True,
                               ignore_eos=True)])[0]
    assert eng.bank.adapters["a"].slot < 0 and eng.bank.stats["evictions"] == 1
    # 3) while a base request holds 6 KV pages, an adapter request must wait (not fail), then run
    r3 = Request(list(range(3, 15)), None, max_new_tokens=12, return_logits=True, ignore_eos=True)
    r4 = Request([20, 21, 22, 23], "a", max_new_tokens=6, return_logits=True, ignore_eos=True)
    eng.submit(r3)
    eng.submit(r4)
    batch = []
    while not eng.idle:
        eng.step()
        batch.append(len(eng.rows))
        assert eng.bank.used_bytes + eng.bank.reserved_bytes <= budget
    assert max(batch) == 1
    for r in (r1, r2, r3, r4):
        assert r.finish_reason == "length" and r.error is None
        ref = refs[r.adapter]
        assert (torch.stack(r.logits) - reference_logits(ref, r.prompt, r.tokens)).abs().max() < 1e-4
    assert r3.tokens == r2.tokens
    assert_no_leak(eng)


def test_request_over_whole_budget_errors(setup):
    base, dirs, _ = setup
    probe = make_engine(base, dirs, names=["a"], kv="paged", page_tokens=4)
    page, a_bytes = probe.kv_cache.pool.page_bytes, probe.bank.adapters["a"].nbytes_pages
    eng = make_engine(base, dirs, names=["a"], kv="paged", page_tokens=4, unified_budget_bytes=a_bytes + 2 * page)
    ok, too_big = eng.generate([Request([1, 2, 3], "a", max_new_tokens=5),  # 2 pages + a: fits exactly
                                Request([1, 2, 3], "a", max_new_tokens=6)])  # 3 pages + a: never fits
    assert ok.finish_reason == "length" and ok.error is None
    assert too_big.finish_reason == "error" and "unified budget" in too_big.error
    kv_only = make_engine(base, dirs, names=["a"], kv="paged", page_tokens=4, kv_budget_bytes=2 * page)
    r = kv_only.generate([Request([1, 2, 3], None, max_new_tokens=6)])[0]
    assert r.finish_reason == "error" and "KV budget" in r.error
    assert_no_leak(eng)
    assert_no_leak(kv_only)


def test_paged_cancel_and_sampling_free_pages(setup):
    base, dirs, _ = setup
    eng = make_engine(base, dirs, kv="paged", page_tokens=4)
    a = eng.submit(Request([5, 6, 7], "a", max_new_tokens=20, temperature=0.8, seed=1, ignore_eos=True))
    eng.submit(Request([8, 9], "b", max_new_tokens=3, temperature=0.8, seed=2, ignore_eos=True))
    eng.step()
    eng.step()
    eng.cancel(a)
    while not eng.idle:
        eng.step()
    assert_no_leak(eng)
