"""ties, dare_linear, dare_ties and magnitude_prune against straightforward dense references.

The merges run at full rank (k = min(out, in)), so their SVD step is exact and the output ΔW must
equal the reference; the truncation itself is tested in test_merge_exact.py (and checked here once).
"""

from __future__ import annotations

import pytest
import torch
from merge_testutil import deltas, make_state, weighted_sum

from lorakit.compose.merge import merge

FULL = 64  # >= min(out, in) of every tiny-Llama module: no truncation


@pytest.fixture(scope="module")
def inputs():
    return [make_state(r=2, alpha=3, seed=0), make_state(r=4, alpha=4, seed=1, rslora=True),
            make_state(r=3, alpha=6, seed=2)]


WEIGHTS = [1.0, 0.7, 1.5]


def trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the int(density·numel) largest |entries| (random data: no ties at the threshold)."""
    k = int(density * t.numel())
    threshold = t.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(t.abs() >= threshold, t, torch.zeros_like(t))


def ties_reference(taus, weights, consensus="sum", normalize=True):
    weighted = [w * t for w, t in zip(weights, taus)]
    if consensus == "sum":
        total = sum(weighted)
    else:
        total = sum(torch.sign(t) for t in weighted)
    gamma = torch.where(total >= 0, 1.0, -1.0)
    num, den = torch.zeros_like(taus[0]), torch.zeros_like(taus[0])
    for w, t in zip(weights, weighted):
        agree = (t != 0) & (torch.sign(t) == gamma)
        num += torch.where(agree, t, 0.0)
        den += torch.where(agree, torch.full_like(t, w), 0.0)
    return num / torch.where(den == 0, 1.0, den) if normalize else num


def dare_masks(paths, shapes, n, density, seed):
    """The documented mask protocol: per module (sorted order i) a generator seeded seed·1_000_003 + i,
    one torch.bernoulli(full(shape, density)) per input, in input order."""
    out = {}
    for i, path in enumerate(sorted(paths)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        out[path] = [torch.bernoulli(torch.full(shapes[path], density), generator=g) for _ in range(n)]
    return out


def per_input(states):
    per = [deltas(s) for s in states]
    return {p: [d[p][0] for d in per] for p in per[0]}


def check(merged, want):
    got = deltas(merged)
    assert set(got) == set(want)
    for path, dw in want.items():
        torch.testing.assert_close(got[path][0], dw, rtol=0, atol=2e-5)


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_dense_reference(inputs, consensus, normalize):
    density, lam = 0.3, 0.8
    merged = merge(inputs, "ties", WEIGHTS, k=FULL, density=density, consensus=consensus, normalize=normalize, lam=lam)
    want = {p: lam * ties_reference([trim(t, density) for t in taus], WEIGHTS, consensus, normalize)
            for p, taus in per_input(inputs).items()}
    check(merged, want)


def test_ties_with_full_density_and_agreeing_signs_is_the_weighted_mean():
    a = make_state(r=3, seed=0)
    merged = merge([a, a], "ties", [1.0, 3.0], k=FULL, density=1.0)
    check(merged, {p: dw for p, (dw, _) in deltas(a).items()})  # mean of identical vectors


def test_magnitude_prune_matches_dense_reference(inputs):
    density = 0.25
    merged = merge(inputs, "magnitude_prune", WEIGHTS, k=FULL, density=density)
    want = {p: sum(w * trim(t, density) for w, t in zip(WEIGHTS, taus)) for p, taus in per_input(inputs).items()}
    check(merged, want)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_dense_reference(inputs, method):
    density, seed = 0.4, 7
    taus = per_input(inputs)
    masks = dare_masks(taus, {p: t[0].shape for p, t in taus.items()}, len(inputs), density, seed)
    dropped = {p: [m * t / density for m, t in zip(masks[p], ts)] for p, ts in taus.items()}
    merged = merge(inputs, method, WEIGHTS, k=FULL, density=density, seed=seed)
    if method == "dare_linear":
        want = {p: sum(w * t for w, t in zip(WEIGHTS, ts)) for p, ts in dropped.items()}
    else:
        want = {p: ties_reference(ts, WEIGHTS) for p, ts in dropped.items()}
    check(merged, want)


def test_dare_is_seeded_and_unbiased(inputs):
    a = merge(inputs, "dare_linear", WEIGHTS, k=FULL, density=0.5, seed=3)
    b = merge(inputs, "dare_linear", WEIGHTS, k=FULL, density=0.5, seed=3)
    c = merge(inputs, "dare_linear", WEIGHTS, k=FULL, density=0.5, seed=4)
    key = "model.layers.0.self_attn.q_proj.lora_B.weight"
    assert torch.equal(a.tensors[key], b.tensors[key]) and not torch.equal(a.tensors[key], c.tensors[key])
    # E[DARE] = the plain weighted sum: the mean over many seeds approaches it
    exact = weighted_sum(inputs, WEIGHTS)
    path = "model.layers.1.mlp.down_proj"
    runs = []
    for seed in range(60):
        m = merge(inputs, "dare_linear", WEIGHTS, k=FULL, density=0.5, seed=seed)
        assert m.spec.form_args["alpha"] == m.spec.form_args["r"] and not m.spec.module_args  # scale 1
        runs.append(m.tensors[f"{path}.lora_B.weight"] @ m.tensors[f"{path}.lora_A.weight"])
    mean = torch.stack(runs).mean(0)
    single = (runs[0] - exact[path][0]).norm()
    assert (mean - exact[path][0]).norm() < 0.25 * single  # ~1/√60 of one run's deviation


def test_dare_with_density_one_is_linear(inputs):
    merged = merge(inputs, "dare_linear", WEIGHTS, k=FULL, density=1.0)
    check(merged, {p: dw for p, (dw, _) in weighted_sum(inputs, WEIGHTS).items()})


@pytest.mark.parametrize("rescale", ["l1", "l2", "linf"])
def test_norm_rescale_restores_each_task_vector_norm(rescale):
    a = make_state(r=3, seed=0)
    density = 0.3
    merged = merge([a], "magnitude_prune", k=FULL, density=density, rescale=rescale)
    norm = {"l1": lambda t: t.abs().sum(), "l2": lambda t: t.norm(), "linf": lambda t: t.abs().max()}[rescale]
    for path, (dw, _) in deltas(a).items():
        kept = trim(dw, density)
        check_dw = deltas(merged)[path][0]
        torch.testing.assert_close(check_dw, kept * norm(dw) / norm(kept), rtol=1e-5, atol=2e-5)


def test_dense_methods_truncate_to_k_and_report_the_error(inputs):
    merged = merge(inputs, "ties", WEIGHTS, k=2, density=0.5)
    full = deltas(merge(inputs, "ties", WEIGHTS, k=FULL, density=0.5))
    got = deltas(merged)
    report = merged.meta["merge"]
    assert report["ranks"] == [2]
    for path, (dw, _) in full.items():
        sigma = torch.linalg.svdvals(dw.double())
        expected = float((sigma[2:].pow(2).sum() / sigma.pow(2).sum()).sqrt())
        assert report["module_errors"][path] == pytest.approx(expected, rel=1e-4)
        assert float((got[path][0] - dw).norm() / dw.norm()) == pytest.approx(expected, rel=1e-3)
    # default k: the largest input rank
    assert merge(inputs, "dare_ties", WEIGHTS).meta["merge"]["ranks"] == [4]
