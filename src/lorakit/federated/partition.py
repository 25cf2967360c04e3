"""Seeded non-IID splits of a labelled training set over clients (Dirichlet over labels).

For each label c, a vector q_c ~ Dir(α·1_K) says which share of that label's examples each of the
K clients gets (Hsu, Qi, Brown, arXiv 1909.06335, the usual label-skew benchmark split): small α
(0.1) gives each client a few dominant labels, large α (100) is close to IID. Every client gets at
least ``min_size`` examples (taken from the largest clients, deterministically).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def dirichlet_partition(labels: Sequence[object], n_clients: int, alpha: float = 0.5, *, seed: int = 0,
                        min_size: int = 1) -> list[list[int]]:
    """Indices of ``labels`` for each of ``n_clients`` clients; a partition of range(len(labels)).

    Labels may be any hashables (``None`` for unlabelled data: then it is a Dirichlet split of sizes).
    """
    n = len(labels)
    if n_clients < 1:
        raise ValueError(f"n_clients must be >= 1, got {n_clients}")
    if alpha <= 0:
        raise ValueError(f"the Dirichlet concentration alpha must be > 0, got {alpha}")
    if n < n_clients * min_size:
        raise ValueError(f"{n} examples cannot give {n_clients} clients {min_size} example(s) each; "
                         "use fewer clients or more data")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(str(y), []).append(i)
    parts: list[list[int]] = [[] for _ in range(n_clients)]
    for label in sorted(by_label):
        idx = np.array(by_label[label])
        rng.shuffle(idx)
        share = rng.dirichlet(np.full(n_clients, alpha))
        cuts = (np.cumsum(share)[:-1] * len(idx)).round().astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(int(i) for i in chunk)
    # top up clients below min_size from the largest ones (last items, deterministic)
    for k in range(n_clients):
        while len(parts[k]) < min_size:
            donor = max(range(n_clients), key=lambda j: (len(parts[j]), -j))
            parts[k].append(parts[donor].pop())
    for p in parts:
        rng.shuffle(p)
    return [[int(i) for i in p] for p in parts]


def label_histogram(labels: Sequence[object], parts: list[list[int]]) -> list[dict[str, int]]:
    """Per client, how many examples of each label it holds."""
    out = []
    for p in parts:
        h: dict[str, int] = {}
        for i in p:
            h[str(labels[i])] = h.get(str(labels[i]), 0) + 1
        out.append(dict(sorted(h.items())))
    return out
