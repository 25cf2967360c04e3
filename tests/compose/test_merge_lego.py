"""LoRA-LEGO: the paper's MSU properties, the clustering, the dual reweighting and canonicalization."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.compose.merge import merge
from lorakit.compose.merge.kmeans import kmeans, torch_kmeans
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState

OUT, IN, MOD = 24, 20, "m"


def state(B: torch.Tensor, A: torch.Tensor, alpha: float | None = None) -> AdapterState:
    r = A.shape[0]
    spec = AdapterSpec(form="lora", form_args={"r": r, "alpha": float(alpha if alpha is not None else r)},
                       targets=[MOD])
    return AdapterState(spec=spec, tensors={f"{MOD}.lora_A.weight": A.clone(), f"{MOD}.lora_B.weight": B.clone()})


def factors(s: AdapterState) -> tuple[torch.Tensor, torch.Tensor]:
    assert s.spec.form_args["alpha"] == s.spec.form_args["r"] and not s.spec.module_args  # scale 1
    return s.tensors[f"{MOD}.lora_B.weight"], s.tensors[f"{MOD}.lora_A.weight"]


def delta(s: AdapterState) -> torch.Tensor:
    r = s.tensors[f"{MOD}.lora_A.weight"].shape[0]
    scale = s.spec.form_args["alpha"] / r
    return scale * s.tensors[f"{MOD}.lora_B.weight"] @ s.tensors[f"{MOD}.lora_A.weight"]


def random_state(r: int, seed: int, alpha: float | None = None) -> AdapterState:
    g = torch.Generator().manual_seed(seed)
    return state(torch.randn(OUT, r, generator=g), torch.randn(r, IN, generator=g), alpha)


PROTOS = 4


@pytest.fixture(scope="module")
def planted():
    """3 adapters of rank 4; MSU i of adapter n is a noisy copy of prototype perm_n(i)."""
    g = torch.Generator().manual_seed(0)
    pb, pa = torch.randn(PROTOS, OUT, generator=g), torch.randn(PROTOS, IN, generator=g)
    states, groups = [], []
    for _ in range(3):
        perm = torch.randperm(PROTOS, generator=g)
        b = pb[perm] + 0.05 * torch.randn(PROTOS, OUT, generator=g)
        a = pa[perm] + 0.05 * torch.randn(PROTOS, IN, generator=g)
        states.append(state(b.T, a))
        groups.append(perm)
    return states, groups


def expected_clusters(states, groups, param_reweight, norm="l2"):
    """ΔW of the merge when clusters = prototypes, computed from the known membership."""
    out = torch.zeros(OUT, IN)
    for j in range(PROTOS):
        members = []
        for s, perm in zip(states, groups):
            B, A = s.tensors[f"{MOD}.lora_B.weight"], s.tensors[f"{MOD}.lora_A.weight"]
            i = int((perm == j).nonzero())
            members.append(torch.cat([A[i], B[:, i]]))
        m = torch.stack(members)
        c = m.mean(0)
        if param_reweight:
            nrm = (lambda x: x.norm(dim=-1)) if norm == "l2" else (lambda x: x.abs().amax(dim=-1))
            c = c * nrm(m).mean() / nrm(c)
        out += torch.outer(c[IN:], c[:IN])
    return out


@pytest.mark.parametrize("features", ["normalized", "raw"])
@pytest.mark.parametrize("param_reweight,norm", [(False, "l2"), (True, "l2"), (True, "linf")])
def test_recovers_planted_clusters_and_parameter_reweighting(planted, features, param_reweight, norm):
    states, groups = planted
    merged = merge(states, "lego", k=PROTOS, features=features, param_reweight=param_reweight, norm=norm,
                   output_reweight=False, backend="torch")
    torch.testing.assert_close(delta(merged), expected_clusters(states, groups, param_reweight, norm),
                               rtol=0, atol=1e-4)
    B, A = factors(merged)
    assert A.shape == (PROTOS, IN) and B.shape == (OUT, PROTOS)


def test_output_reweighting_is_sqrt_r_over_k():
    states = [random_state(2, 0), random_state(4, 1), random_state(6, 2)]
    off = delta(merge(states, "lego", k=3, output_reweight=False))
    for ref, r in [("mean", 4), ("max", 6), ("min", 2)]:
        on = delta(merge(states, "lego", k=3, rank_ref=ref))
        torch.testing.assert_close(on, math.sqrt(r / 3) * off, rtol=1e-5, atol=1e-5)


def test_msu_permutation_invariance():
    a, b = random_state(5, 0), random_state(3, 1)
    perm = torch.tensor([3, 0, 4, 2, 1])
    B, A = a.tensors[f"{MOD}.lora_B.weight"], a.tensors[f"{MOD}.lora_A.weight"]
    permuted = state(B[:, perm], A[perm])
    torch.testing.assert_close(delta(permuted), delta(a), rtol=0, atol=1e-5)  # the property itself
    for k in (3, 5):  # and LEGO's result does not depend on the order of units or adapters
        ref = delta(merge([a, b], "lego", k=k, backend="torch"))
        torch.testing.assert_close(delta(merge([permuted, b], "lego", k=k, backend="torch")), ref, rtol=0, atol=1e-5)
        torch.testing.assert_close(delta(merge([b, permuted], "lego", k=k, backend="torch")), ref, rtol=0, atol=1e-5)


def test_concatenation_summation_equivalence():
    a, b = random_state(3, 0, alpha=6.0), random_state(2, 1, alpha=1.0)
    Ba, Aa = a.tensors[f"{MOD}.lora_B.weight"] * 2.0, a.tensors[f"{MOD}.lora_A.weight"]
    Bb, Ab = b.tensors[f"{MOD}.lora_B.weight"] * 0.5, b.tensors[f"{MOD}.lora_A.weight"]
    pooled = torch.cat([Ba, Bb], 1) @ torch.cat([Aa, Ab], 0)
    torch.testing.assert_close(pooled, delta(a) + delta(b), rtol=0, atol=1e-5)
    torch.testing.assert_close(delta(merge([a, b], "cat")), delta(a) + delta(b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("param_reweight", [False, True])
def test_k_equal_sum_of_ranks_without_output_reweighting_is_cat_exactly(param_reweight):
    states = [random_state(2, 0, alpha=5.0), random_state(3, 1), random_state(4, 2, alpha=1.0)]
    w = [0.5, 1.0, -2.0]
    lego = merge(states, "lego", w, k=9, output_reweight=False, param_reweight=param_reweight)
    cat = merge(states, "cat", w)
    for name in (f"{MOD}.lora_A.weight", f"{MOD}.lora_B.weight"):
        assert torch.equal(lego.tensors[name], cat.tensors[name])
    # with output reweighting, the same units scaled by √(r/k), r = mean rank 3, k = 9
    scaled = merge(states, "lego", w, k=9)
    torch.testing.assert_close(delta(scaled), math.sqrt(3 / 9) * delta(cat), rtol=1e-6, atol=1e-6)


def transformed(s: AdapterState, seed: int, signs: bool = True, scales: bool = True) -> AdapterState:
    """Same adapter, each MSU (b, a) replaced by (±c·b, ±a/c)."""
    g = torch.Generator().manual_seed(seed)
    B, A = s.tensors[f"{MOD}.lora_B.weight"], s.tensors[f"{MOD}.lora_A.weight"]
    r = A.shape[0]
    sign = torch.where(torch.rand(r, generator=g) < 0.5, -1.0, 1.0) if signs else torch.ones(r)
    c = torch.exp(torch.empty(r).uniform_(-1.2, 1.2, generator=g)) if scales else torch.ones(r)
    return state(B * (sign * c), A * (sign / c)[:, None], s.spec.form_args["alpha"])


@pytest.mark.parametrize("features", ["normalized", "raw"])
def test_canonicalization_makes_lego_invariant_to_sign_flips_and_rescaling(planted, features):
    states, groups = planted
    moved = [transformed(s, seed=10 + i) for i, s in enumerate(states)]
    for s, m in zip(states, moved):
        torch.testing.assert_close(delta(m), delta(s), rtol=0, atol=1e-5)  # same adapters
    args = dict(k=PROTOS, features=features, canonicalize="both", backend="torch")
    ref = delta(merge(states, "lego", **args))
    torch.testing.assert_close(delta(merge(moved, "lego", **args)), ref, rtol=1e-4, atol=1e-4)
    # with canonicalization the planted clusters are found in the transformed pool too
    planted_ref = expected_clusters(states, groups, param_reweight=False)
    canon = delta(merge(moved, "lego", **{**args, "param_reweight": False, "output_reweight": False}))
    assert (canon - planted_ref).norm() < 0.2 * planted_ref.norm()
    # without it, sign-flipped copies of one unit split or cancel and the merge changes
    raw = delta(merge(moved, "lego", k=PROTOS, features=features, backend="torch"))
    assert (raw - ref).norm() > 0.1 * ref.norm()


def test_sign_canonicalization_alone_handles_flips():
    s = random_state(6, 3)
    flipped = transformed(s, seed=1, scales=False)
    args = dict(k=3, canonicalize="sign", backend="torch")
    torch.testing.assert_close(delta(merge([flipped, s], "lego", **args)), delta(merge([s, s], "lego", **args)),
                               rtol=1e-5, atol=1e-5)


def test_seeded_determinism_and_default_k(planted):
    states, _ = planted
    a = merge(states, "lego", seed=1)
    b = merge(states, "lego", seed=1)
    assert torch.equal(a.tensors[f"{MOD}.lora_A.weight"], b.tensors[f"{MOD}.lora_A.weight"])
    assert a.meta["merge"]["ranks"] == [4]  # default k: the largest input rank
    assert a.meta["merge"]["relative_error"] is None


def test_sklearn_backend_recovers_planted_clusters(planted):
    pytest.importorskip("sklearn")
    states, groups = planted
    merged = merge(states, "lego", k=PROTOS, param_reweight=False, output_reweight=False, backend="sklearn")
    torch.testing.assert_close(delta(merged), expected_clusters(states, groups, False), rtol=0, atol=1e-4)


def test_torch_kmeans_blobs_and_degenerate_pools():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 8, generator=g) * 10
    truth = torch.arange(5).repeat_interleave(7)
    x = centers[truth] + 0.1 * torch.randn(35, 8, generator=g)
    labels = torch_kmeans(x, 5, seed=0)
    # same partition as the truth (up to renaming the clusters)
    assert all(len(set(labels[truth == c].tolist())) == 1 for c in range(5)) and len(set(labels.tolist())) == 5
    assert torch.equal(labels, torch_kmeans(x, 5, seed=0))
    dup = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [5.0, 5.0]])
    labels = kmeans(dup, 4, backend="torch")  # fewer distinct points than k: no crash, valid labels
    assert labels.shape == (5,) and int(labels.min()) >= 0 and int(labels.max()) < 4
    assert torch.equal(kmeans(dup, 5), torch.arange(5))
    with pytest.raises(ValueError, match="k must be in"):
        kmeans(dup, 6)
