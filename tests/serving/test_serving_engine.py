"""Engine correctness: every request's logits match PEFT with that adapter alone (1e-4, fp32) and
greedy tokens are identical, over mixed ranks, base-only rows, rsLoRA, different target sets and
per-module ranks, with requests joining and leaving the batch (continuous batching)."""

from __future__ import annotations

import copy

import pytest
import torch
from serving_helpers import (
    base_dirs_refs,
    make_engine,
    reference_logits,
)

from lorakit.serving import AdapterBank, QueueFullError, Request

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10], [20, 21, 22, 23], [40, 41], [7, 8, 9, 10, 11, 12]]
ADAPTERS = ["a", "b", None, "c", "d", "a"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return base_dirs_refs(tmp_path_factory.mktemp("adapters"))




def check(reqs, refs, max_new):
    for r in reqs:
        ref = refs[r.adapter]
        want = reference_logits(ref, r.prompt, r.tokens)
        got = torch.stack(r.logits)
        assert (got - want).abs().max() < 1e-4, r.adapter
        if r.temperature == 0:
            g = ref.generate(torch.tensor([list(r.prompt)]), max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False)[0, len(r.prompt):].tolist()
            assert r.tokens == g[:len(r.tokens)], r.adapter


@pytest.mark.parametrize("path", ["auto", "sgmv", "bgmv"])
def test_mixed_batch_matches_peft(setup, path):
    base, dirs, refs = setup
    eng = make_engine(base, dirs, path=path)
    reqs = eng.generate([Request(p, a, max_new_tokens=5, return_logits=True, ignore_eos=True)
                         for p, a in zip(PROMPTS, ADAPTERS, strict=True)])
    assert all(r.finish_reason == "length" and len(r.tokens) == 5 for r in reqs)
    check(reqs, refs, 5)


def test_requests_join_and_leave(setup):
    base, dirs, refs = setup
    eng = make_engine(base, dirs, max_batch=3)
    lengths = [3, 7, 2, 6, 4, 5]
    reqs = [Request(p, a, max_new_tokens=n, return_logits=True, ignore_eos=True)
            for p, a, n in zip(PROMPTS, ADAPTERS, lengths, strict=True)]
    for r in reqs[:2]:
        eng.submit(r)
    eng.step()
    eng.step()
    for r in reqs[2:]:
        eng.submit(r)
    seen_batch = []
    while not eng.idle:
        eng.step()
        seen_batch.append(len(eng.rows))
    assert max(seen_batch) <= 3
    assert [len(r.tokens) for r in reqs] == lengths
    check(reqs, refs, 7)
    assert all(h.in_use == 0 for h in eng.bank.adapters.values())


def test_eviction_under_tight_budget_keeps_answers(setup):
    base, dirs, refs = setup
    bank_probe = AdapterBank.for_model(copy.deepcopy(base), budget_bytes=1 << 20, page_rows=4)
    page_bytes = sum(layer.page_bytes for layer in bank_probe.layers.values())
    eng = make_engine(base, dirs, budget=4 * page_bytes, max_batch=2)  # "b" alone needs all 4 pages of q/v
    reqs = eng.generate([Request(p, a, max_new_tokens=3, return_logits=True, ignore_eos=True)
                         for p, a in zip(PROMPTS * 2, ADAPTERS * 2, strict=True)])
    assert eng.bank.stats["evictions"] > 0
    assert eng.bank.used_bytes <= eng.bank.budget_bytes
    check(reqs, refs, 3)


def test_stop_conditions_sampling_and_cancel(setup):
    base, dirs, refs = setup
    eng = make_engine(base, dirs)
    greedy = eng.generate([Request(PROMPTS[0], "a", max_new_tokens=8, temperature=1.0, seed=0, ignore_eos=True)])[0]
    toks = greedy.tokens
    k = next(i for i in range(1, len(toks)) if toks[i] not in toks[:i])  # first new token after the first
    r1 = Request(PROMPTS[0], "a", max_new_tokens=8, temperature=1.0, seed=0, stop_token_ids=[toks[k]],
                 ignore_eos=True)
    r2 = Request(PROMPTS[0], "a", max_new_tokens=8, temperature=1.0, seed=0, stop_sequences=[toks[k - 1:k + 1]],
                 ignore_eos=True)
    s1 = Request(PROMPTS[1], "b", max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True)
    s2 = Request(PROMPTS[1], "b", max_new_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True)
    long = Request(PROMPTS[2], None, max_new_tokens=50, ignore_eos=True)
    for r in (r1, r2, s1, s2, long):
        eng.submit(r)
    eng.step()
    eng.cancel(long.id)
    while not eng.idle:
        eng.step()
    assert r1.tokens == toks[:k + 1] and r1.finish_reason == "stop"
    assert r2.tokens == toks[:k + 1] and r2.finish_reason == "stop"
    assert s1.tokens == s2.tokens and len(s1.tokens) == 8  # same seed, same stream
    assert long.finish_reason == "cancelled" and len(long.tokens) < 50
    assert eng.bank.adapters["a"].in_use == 0


def test_admission_errors(setup):
    base, dirs, _ = setup
    eng = make_engine(base, dirs, max_queue=2, max_context=32)
    with pytest.raises(ValueError, match="unknown adapter"):
        eng.submit(Request([1, 2], "nope"))
    with pytest.raises(ValueError, match="exceeds the context length"):
        eng.submit(Request(list(range(30)), None, max_new_tokens=8))
    eng.submit(Request([1, 2], None))
    eng.submit(Request([1, 2], None))
    with pytest.raises(QueueFullError):
        eng.submit(Request([1, 2], None))


def test_load_and_unload_at_runtime(setup, tmp_path):
    base, dirs, refs = setup
    eng = make_engine(base, {k: v for k, v in dirs.items() if k != "b"})
    r = eng.generate([Request(PROMPTS[0], "a", max_new_tokens=2, return_logits=True, ignore_eos=True)])
    eng.bank.add("b", dirs["b"])  # hot load
    reqs = eng.generate([Request(PROMPTS[1], "b", max_new_tokens=3, return_logits=True, ignore_eos=True),
                         Request(PROMPTS[0], "a", max_new_tokens=3, return_logits=True, ignore_eos=True)])
    check(r + reqs, refs, 3)
    eng.bank.remove("a")
    with pytest.raises(ValueError, match="unknown adapter"):
        eng.submit(Request(PROMPTS[0], "a"))
    check(eng.generate([Request(PROMPTS[1], "b", max_new_tokens=2, return_logits=True, ignore_eos=True)]), refs, 2)
