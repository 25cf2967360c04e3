"""k-means with k-means++ seeding: scikit-learn's ``KMeans`` when it is installed, else a short seeded
torch implementation (Lloyd iterations; an empty cluster is re-seeded with the point farthest from its
centre, as scikit-learn does). No hard dependency on scikit-learn.
"""

from __future__ import annotations

import importlib.util

import torch

BACKENDS = ("auto", "torch", "sklearn")


def has_sklearn() -> bool:
    return importlib.util.find_spec("sklearn") is not None


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, n_init: int = 1, max_iter: int = 100,
           backend: str = "auto") -> torch.Tensor:
    """Cluster labels (n,) in [0, k) of the rows of ``x`` (n, d); deterministic for a given seed."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means: k must be in [1, {n}] (the number of points), got {k}")
    if backend not in BACKENDS:
        raise ValueError(f"k-means backend {backend!r} unknown; known: {', '.join(BACKENDS)}")
    if k == n:
        return torch.arange(n)
    if backend == "sklearn" or (backend == "auto" and has_sklearn()):
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=k, init="k-means++", n_init=n_init, max_iter=max_iter, random_state=seed)
        return torch.as_tensor(km.fit(x.double().cpu().numpy()).labels_, dtype=torch.long)
    return torch_kmeans(x, k, seed=seed, n_init=n_init, max_iter=max_iter)


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return ((x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)).clamp_min(0)


def kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): first centre uniform, then each next one
    drawn with probability proportional to the squared distance to the nearest chosen centre."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=generator))]
    d2 = _sq_dist(x, x[idx]).squeeze(1)
    for _ in range(1, k):
        total = d2.sum()
        if total <= 0:  # fewer distinct points than k: take any point not chosen yet
            rest = torch.ones(n, dtype=torch.bool)
            rest[idx] = False
            nxt = int(torch.nonzero(rest)[0])
        else:
            nxt = int(torch.multinomial(d2 / total, 1, generator=generator))
        idx.append(nxt)
        d2 = torch.minimum(d2, _sq_dist(x, x[nxt:nxt + 1]).squeeze(1))
    return x[idx].clone()


def _lloyd(x: torch.Tensor, centers: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, float]:
    k = centers.shape[0]
    labels = None
    for _ in range(max_iter):
        d2 = _sq_dist(x, centers)
        new = d2.argmin(1)
        if labels is not None and torch.equal(new, labels):
            break
        labels = new
        counts = torch.bincount(labels, minlength=k)
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        empty = counts == 0
        centers = sums / counts.clamp_min(1).unsqueeze(1).to(x.dtype)
        if empty.any():  # re-seed empty clusters with the points farthest from their centres
            far = d2.gather(1, labels[:, None]).squeeze(1).argsort(descending=True)
            centers[empty] = x[far[: int(empty.sum())]]
    d2 = _sq_dist(x, centers)
    labels = d2.argmin(1)
    return labels, float(d2.gather(1, labels[:, None]).sum())


def torch_kmeans(x: torch.Tensor, k: int, *, seed: int = 0, n_init: int = 1, max_iter: int = 100) -> torch.Tensor:
    """Seeded k-means++ + Lloyd in float64; the run of lowest inertia among ``n_init``."""
    x = x.detach().double().cpu()
    g = torch.Generator().manual_seed(int(seed))
    best, best_inertia = None, float("inf")
    for _ in range(max(1, n_init)):
        labels, inertia = _lloyd(x, kmeans_pp(x, k, g), max_iter)
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best
