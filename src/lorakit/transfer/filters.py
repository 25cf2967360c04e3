"""Candidate filters for Trans-LoRA: which synthetic inputs the target is distilled on.

Each filter maps candidate texts to scores (higher = keep); :func:`select` keeps the top ones.

- ``discriminator`` (Trans-LoRA, Wang et al., NeurIPS 2024, arXiv 2405.17258, Fig. 1: "M_disc filters"
  the target's synthetic data): score = P(real | x) of a discriminator trained at source-training time
  (:mod:`lorakit.transfer.discriminator`); optionally only x with P(real | x) >= threshold (0.5 = the
  discriminator's "real" answer) are eligible, then the top ``keep`` by score.
- ``contrastive_excess`` (TiTok, arXiv 2510.04682, ``compute_contrastive_excess_loss.py``): per token
  y_i, S(y_i) = L_expert(y_i) − L_amateur(y_i) with the expert = M_s+θ_s, the amateur = M_s alone.
  lorakit reads L as the token LOG-LIKELIHOOD, S(y_i) = log p_expert(y_i|y_<i) − log p_amateur(y_i|y_<i)
  (high = the adapter made the token likelier, i.e. the sample carries what θ_s learned), and scores a
  sample by the mean of S over its tokens (lorakit's choice; TiTok keeps the top samples, then the top-k%
  tokens: the token mask does not apply to label-string distillation, whose loss sits at the answer).
- ``none``: every candidate scores 0; :func:`select` then keeps the first ``keep`` (generation order).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.inject import disabled
from lorakit.data.collate import LMCollator

FILTERS = ("discriminator", "contrastive_excess", "none")
ScoreFn = Callable[[Sequence[str]], torch.Tensor]


class FilterError(ValueError):
    """A filter that cannot run (unknown name, missing discriminator, bad keep/threshold)."""


def n_keep(keep: float, n: int) -> int:
    """``keep`` >= 1: that many; 0 < keep < 1: that fraction of ``n`` (at least 1)."""
    if keep <= 0:
        raise FilterError(f"keep must be > 0 (a count, or a fraction in (0, 1)), got {keep}")
    return min(n, int(keep)) if keep >= 1 else max(1, int(round(keep * n)))


def select(scores: torch.Tensor, keep: float, threshold: float | None = None) -> list[int]:
    """Indices of the top-``keep`` scores, best first (ties: earlier first); with ``threshold``, only
    scores >= threshold are eligible (fewer may be kept)."""
    scores = scores.detach().double().cpu()
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    if threshold is not None:
        order = [i for i in order if float(scores[i]) >= threshold]
    return order[:n_keep(keep, len(scores))] if len(scores) else []


@torch.no_grad()
def token_log_likelihoods(model: nn.Module, tokenizer: Any, texts: Sequence[str], *, batch_size: int = 16,
                          max_length: int = 128) -> list[torch.Tensor]:
    """Per text, log p(y_i | y_<i) of each of its tokens (after the BOS, without the appended EOS)."""
    collate = LMCollator(tokenizer, max_length=max_length, add_eos=False)
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        batch = collate(list(texts[start:start + batch_size]))
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        logp = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
        tok = logp.gather(-1, ids[:, 1:, None])[..., 0]
        for row, m in zip(tok, mask[:, 1:]):
            out.append(row[m.bool()].cpu())
    return out


def contrastive_excess_tokens(model: nn.Module, tokenizer: Any, texts: Sequence[str], *,
                              batch_size: int = 16, max_length: int = 128) -> list[torch.Tensor]:
    """Per text, S(y_i) = log p_expert(y_i) − log p_amateur(y_i): ``model`` with its active adapters
    (expert) and with every adapter disabled (amateur)."""
    expert = token_log_likelihoods(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    with disabled(model):
        amateur = token_log_likelihoods(model, tokenizer, texts, batch_size=batch_size, max_length=max_length)
    return [e - a for e, a in zip(expert, amateur)]


def contrastive_excess_scores(model: nn.Module, tokenizer: Any, texts: Sequence[str], **kwargs: Any) -> torch.Tensor:
    """Sample score = mean_i S(y_i) (a text with no scored token gets −inf: never kept first)."""
    per = contrastive_excess_tokens(model, tokenizer, texts, **kwargs)
    return torch.tensor([float(s.mean()) if len(s) else float("-inf") for s in per], dtype=torch.float64)


def none_scores(texts: Sequence[str]) -> torch.Tensor:
    return torch.zeros(len(texts), dtype=torch.float64)
