"""Deterministic bank baselines for parameter generation (each returns an :class:`AdapterState`).

SG-LoRA (Li et al., CVPR 2026, arXiv 2509.10535) compares against three training-free combinations of the
expert prototypes μ_n (:attr:`BankTask.prototype`), and ICM-LoRA (Shao et al., IJCAI 2025, arXiv
2501.17635) against a random LoRA:

- :func:`model_soup`: x = (1/N) Σ_n μ_n ("Model Soups", uniform average of all experts);
- :func:`adapter_soup`: x = (1/K) Σ_{n∈S} μ_n, S = top-K by cos(d*, d_n) ("AdapterSoup");
- :func:`topk_weighted`: x = μ* = Σ_{n∈S} softmax(s/τ)_n μ_n ("Top-K LoRA weighted", SG-LoRA's prior mean;
  :func:`lorakit.generate.conditions.semantic_prior`);
- :func:`matched_random`: x_t ~ N(m_t, s_t²) entry-wise, with (m_t, s_t) each tensor's mean and std over
  every checkpoint of the bank (ICM-LoRA's random-LoRA control with matched per-tensor statistics;
  lorakit's reading of "random LoRA").
"""

from __future__ import annotations

import torch

from lorakit.core.state import AdapterState
from lorakit.generate.bank import CheckpointBank
from lorakit.generate.conditions import DEFAULT_TAU, ConditionError, semantic_prior, top_k_tasks


def model_soup(bank: CheckpointBank) -> AdapterState:
    return bank.state(bank.prototypes().mean(0), {"generated_by": "model_soup"})


def adapter_soup(bank: CheckpointBank, query_emb: torch.Tensor, task_embs: torch.Tensor, k: int = 4) -> AdapterState:
    _check_embs(bank, task_embs)
    _, chosen = top_k_tasks(query_emb, task_embs, k)
    x = bank.prototypes()[chosen].mean(0)
    return bank.state(x, {"generated_by": "adapter_soup", "k": k,
                          "tasks": [bank.task_ids[i] for i in chosen.tolist()]})


def topk_weighted(bank: CheckpointBank, query_emb: torch.Tensor, task_embs: torch.Tensor, k: int = 4,
                  tau: float = DEFAULT_TAU) -> AdapterState:
    _check_embs(bank, task_embs)
    mu, _, w = semantic_prior(query_emb, task_embs, bank.prototypes(), bank.variances(), k=k, tau=tau)
    return bank.state(mu, {"generated_by": "topk_weighted", "k": k, "tau": tau,
                           "weights": {bank.task_ids[i]: float(w[i]) for i in (w > 0).nonzero().flatten().tolist()}})


def matched_random(bank: CheckpointBank, seed: int = 0) -> AdapterState:
    x, _ = bank.all_vectors()
    mean, std = bank.layout.tensor_stats(x)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(bank.layout.dim, generator=g)
    return bank.state(bank.layout.denormalize(noise, (mean, std), eps=0.0), {"generated_by": "matched_random",
                                                                          "seed": seed})


def _check_embs(bank: CheckpointBank, task_embs: torch.Tensor) -> None:
    if not isinstance(task_embs, torch.Tensor) or task_embs.dim() != 2 or task_embs.shape[0] != len(bank.tasks):
        shape = tuple(task_embs.shape) if isinstance(task_embs, torch.Tensor) else type(task_embs).__name__
        raise ConditionError(f"task_embs must be [tasks={len(bank.tasks)}, E], one embedding per bank task; "
                             f"got {shape}")
