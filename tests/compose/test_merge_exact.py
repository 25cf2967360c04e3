"""linear, cat and svd against closed forms: exact weighted sums of ΔW, and Eckart–Young truncation."""

from __future__ import annotations

import math

import pytest
import torch
from merge_testutil import deltas, make_state, weighted_sum

from lorakit.compose.merge import merge


@pytest.fixture(scope="module")
def mixed():
    """Three adapters of different ranks, scalings (rsLoRA), biases and per-module ranks."""
    return [
        make_state(r=2, alpha=3, seed=0),
        make_state(r=5, alpha=4, seed=1, rslora=True, bias=True),
        make_state(r=3, alpha=6, seed=2, module_args={"v_proj": {"r": 1, "alpha": 7}}),
    ]


WEIGHTS = [0.5, -1.25, 2.0]


@pytest.mark.parametrize("method", ["linear", "cat"])
def test_exact_weighted_sum_of_delta_w(mixed, method):
    merged = merge(mixed, method, WEIGHTS)
    want = weighted_sum(mixed, WEIGHTS)
    got = deltas(merged)
    assert set(got) == set(want)
    for path, (dw, bias) in want.items():
        torch.testing.assert_close(got[path][0], dw, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[path][1], bias, rtol=0, atol=1e-6)
    report = merged.meta["merge"]
    assert report["relative_error"] is None and report["method"] == method
    # rank Σr per module: 2 + 5 + 3 (v_proj: 2 + 5 + 1), written as α = r (scale 1)
    ranks = {p: merged.tensors[f"{p}.lora_A.weight"].shape[0] for p in want}
    assert {r for p, r in ranks.items() if "v_proj" in p} == {8}
    assert {r for p, r in ranks.items() if "v_proj" not in p} == {10}
    assert merged.spec.form == "lora" and merged.spec.form_args["alpha"] == merged.spec.form_args["r"]


def test_cat_folds_weights_and_scales_into_b():
    a, b = make_state(r=2, alpha=3, seed=0), make_state(r=4, alpha=4, seed=1, rslora=True)
    merged = merge([a, b], "cat", [0.3, 2.0])
    path = "model.layers.0.self_attn.q_proj"
    s_a, s_b = 3 / 2, 4 / math.sqrt(4)
    Ba, Bb = a.tensors[f"{path}.lora_B.weight"], b.tensors[f"{path}.lora_B.weight"]
    want_b = torch.cat([0.3 * s_a * Ba, 2.0 * s_b * Bb], 1)
    want_a = torch.cat([a.tensors[f"{path}.lora_A.weight"], b.tensors[f"{path}.lora_A.weight"]], 0)
    torch.testing.assert_close(merged.tensors[f"{path}.lora_B.weight"], want_b)
    torch.testing.assert_close(merged.tensors[f"{path}.lora_A.weight"], want_a)


def test_linear_is_not_factorwise_average():
    """PEFT's `linear` averages A and B separately (cross terms); ours is the exact average of ΔW."""
    a, b = make_state(r=4, seed=0), make_state(r=4, seed=1)
    path = "model.layers.0.self_attn.q_proj"
    merged = deltas(merge([a, b], "linear", [0.5, 0.5]))[path][0]
    s = 8 / 4
    factorwise = (s * 0.5 ** 0.5 * (a.tensors[f"{path}.lora_B.weight"] + b.tensors[f"{path}.lora_B.weight"])) @ \
        (0.5 ** 0.5 * (a.tensors[f"{path}.lora_A.weight"] + b.tensors[f"{path}.lora_A.weight"]))
    exact = 0.5 * (deltas(a)[path][0] + deltas(b)[path][0])
    torch.testing.assert_close(merged, exact, rtol=0, atol=1e-6)
    assert (factorwise - exact).norm() > 0.1 * exact.norm()


@pytest.mark.parametrize("method", ["svd", "linear"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_truncation_error_is_the_discarded_singular_values(mixed, method, k):
    merged = merge(mixed, method, WEIGHTS, k=k)
    want = weighted_sum(mixed, WEIGHTS)
    got = deltas(merged)
    report = merged.meta["merge"]
    err_sq = norm_sq = 0.0
    for path, (dw, _) in want.items():
        sigma = torch.linalg.svdvals(dw.double())
        discarded = float(sigma[k:].pow(2).sum())
        total = float(sigma.pow(2).sum())
        # the output is the best rank-k approximation: its error is exactly the discarded σ's
        actual = float((got[path][0].double() - dw.double()).pow(2).sum())
        assert actual == pytest.approx(discarded, rel=1e-4, abs=1e-9)
        assert report["module_errors"][path] == pytest.approx(math.sqrt(discarded / total), rel=1e-4, abs=1e-7)
        # and it is the SVD truncation itself (σ's are distinct for random data)
        U, S, Vh = torch.linalg.svd(dw.double())
        torch.testing.assert_close(got[path][0].double(), (U[:, :k] * S[:k]) @ Vh[:k], rtol=0, atol=1e-5)
        assert merged.tensors[f"{path}.lora_A.weight"].shape[0] == k
        err_sq, norm_sq = err_sq + discarded, norm_sq + total
    assert report["relative_error"] == pytest.approx(math.sqrt(err_sq / norm_sq), rel=1e-4)
    assert report["rank"] == k and report["ranks"] == [k]


def test_svd_rank_defaults_to_the_largest_input_rank_and_pads_beyond_sum():
    a, b = make_state(r=2, seed=0), make_state(r=3, seed=1)
    assert merge([a, b], "svd").meta["merge"]["ranks"] == [3]
    big = merge([a, b], "svd", k=7)  # more than Σr = 5: exact, zero-padded to rank 7
    assert big.meta["merge"]["relative_error"] == pytest.approx(0.0, abs=1e-6)
    for path, (dw, _) in weighted_sum([a, b], [1.0, 1.0]).items():
        torch.testing.assert_close(deltas(big)[path][0], dw, rtol=0, atol=1e-5)


def test_single_adapter_and_default_weights():
    a, b = make_state(r=3, seed=0), make_state(r=2, seed=1)
    one = merge([a], "linear")
    for path, (dw, _) in deltas(a).items():
        torch.testing.assert_close(deltas(one)[path][0], dw, rtol=0, atol=1e-6)
    summed = merge([a, b], "linear")  # default weights: 1 each (task arithmetic's sum)
    assert summed.meta["merge"]["weights"] == [1.0, 1.0]
    for path, (dw, _) in weighted_sum([a, b], [1.0, 1.0]).items():
        torch.testing.assert_close(deltas(summed)[path][0], dw, rtol=0, atol=1e-6)


def test_merge_takes_adapter_folders(tmp_path):
    import lorakit

    a, b = make_state(r=2, seed=0), make_state(r=2, seed=1)
    lorakit.save_state(a, tmp_path / "a")
    lorakit.save_state(b, tmp_path / "b")
    merged = merge([tmp_path / "a", str(tmp_path / "b")], "cat", [1.0, 0.5])
    assert merged.meta["merge"]["inputs"] == [str(tmp_path / "a"), str(tmp_path / "b")]
    for path, (dw, _) in weighted_sum([a, b], [1.0, 0.5]).items():
        torch.testing.assert_close(deltas(merged)[path][0], dw, rtol=0, atol=1e-6)


def test_adapter_whose_init_rewrote_the_base_merges_for_the_original_base():
    """An adapter carrying ``initial`` tensors (its init rewrote W ← W − s·B0·A0, e.g. PiSSA) is read as
    [s·B, −s·B0]·[A; A0]: the merge is relative to the ORIGINAL base, exact at rank 2r."""
    from lorakit.core import registry

    rewriting = [e.name for e in registry.entries("init") if e.name in ("pissa", "lora_ga")]
    if not rewriting:
        pytest.skip("no base-rewriting init in the catalog")
    from merge_testutil import base_model, logits

    import lorakit
    from lorakit.api import extract_state

    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    model = base_model()
    lorakit.attach(model, lorakit.AdapterSpec(init=rewriting[0], form_args={"r": 3, "alpha": 3},
                                              targets=["q_proj", "v_proj"]), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    state = extract_state(model)
    assert getattr(state, "initial", None)
    merged = merge([state], "cat")
    assert merged.meta["merge"]["ranks"] == [6]
    fresh = base_model()
    lorakit.apply_state(fresh, merged)
    torch.testing.assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=1e-5)
