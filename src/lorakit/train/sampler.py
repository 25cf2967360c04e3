"""Deterministic, resumable batch indices shared by all ranks.

Micro-batch k of a run covers positions [k·B·W, (k+1)·B·W) of an endless stream made of seeded
per-epoch permutations; rank r takes its B positions. Resuming at micro-batch k needs no replay.
"""

from __future__ import annotations

import torch


class IndexStream:
    def __init__(self, n: int, seed: int, shuffle: bool = True) -> None:
        if n <= 0:
            raise ValueError("training data is empty")
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if not self.shuffle:
                self._perms[epoch] = torch.arange(self.n)
            else:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._perms[epoch] = torch.randperm(self.n, generator=g)
            for old in [e for e in self._perms if e < epoch - 1]:
                del self._perms[old]
        return self._perms[epoch]

    def batch(self, k: int, batch_size: int, rank: int = 0, world: int = 1) -> list[int]:
        start = k * batch_size * world + rank * batch_size
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + batch_size)]

    def epoch_of(self, k: int, batch_size: int, world: int = 1) -> float:
        return k * batch_size * world / self.n
