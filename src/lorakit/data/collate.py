"""Batching for classification-by-next-token and causal-LM tuning, and the matching metrics.

Classification is scored by the logit of each label word's first token at the last real
position of the prompt. Batches are RIGHT padded: with left padding and no position ids the
real tokens get shifted positions, which cost 0.19 accuracy in one SmolLM2 run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lorakit.data.tasks import Example, Task

__all__ = [
    "ClassificationCollator",
    "LMCollator",
    "classification_accuracy",
    "classification_loss",
    "classification_predictions",
    "gather_last",
    "label_token_ids",
    "model_inputs",
]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _bos(tokenizer: Any) -> list[int]:
    # Special tokens are added by hand so that no EOS/SEP ever ends a prompt.
    if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is not None:
        return [int(tokenizer.bos_token_id)]
    return []


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def label_token_ids(tokenizer: Any, labels: Sequence[str]) -> list[int]:
    """Vocab id of the first token of ``" " + label`` for each label.

    Raises ``ValueError`` if two labels share a first token (they could not be told apart).
    """
    ids: list[int] = []
    owner: dict[int, str] = {}
    for label, tokens in zip(labels, _encode(tokenizer, [" " + label for label in labels])):
        if not tokens:
            raise ValueError(f"label {label!r} encodes to no tokens")
        tid = int(tokens[0])
        if tid in owner:
            raise ValueError(
                f"labels {owner[tid]!r} and {label!r} share their first token {tid}; "
                "rename one so that ' '+label starts with a distinct token"
            )
        owner[tid] = label
        ids.append(tid)
    return ids


class ClassificationCollator:
    """Turn :class:`Example` lists into right-padded prompt batches for next-token scoring.

    Returns ``input_ids``, ``attention_mask``, ``last_index`` (last real token per row),
    ``label_ids`` (vocab id of the label token) and ``label_index`` (index in ``task.labels``).
    Over-long prompts lose the end of the text, never the answer cue that ends the prompt.
    """

    def __init__(self, tokenizer: Any, task: Task, max_length: int = 128) -> None:
        if task.kind != "classification":
            raise ValueError(f"task {task.name!r} is a {task.kind!r} task, not classification")
        self.tokenizer = tokenizer
        self.task = task
        self.max_length = max_length
        self.label_token_ids = label_token_ids(tokenizer, task.labels)
        self._bos = _bos(tokenizer)
        self._pad_id = _pad_id(tokenizer)
        self._tail_cache: dict[str, list[int]] = {}

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of ``task.prompt(text)``, truncated to ``max_length`` keeping the tail."""
        head, tail = self.task.prompt_parts(text)
        ids = self._bos + _encode(self.tokenizer, [head + tail])[0]
        if len(ids) <= self.max_length:
            return ids
        if tail not in self._tail_cache:
            self._tail_cache[tail] = _encode(self.tokenizer, [tail])[0] if tail else []
        tail_ids = self._tail_cache[tail]
        keep = self.max_length - len(tail_ids)
        if keep < 1:
            raise ValueError(f"max_length={self.max_length} cannot hold the prompt's answer cue")
        return ids[:keep] + tail_ids

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        rows = [self.encode_prompt(ex.text) for ex in examples]
        index = []
        for ex in examples:
            if ex.label is None:
                raise ValueError(f"example without label in classification batch: {ex.text[:60]!r}")
            index.append(self.task.label_index(ex.label))
        input_ids, attention_mask = _pad(rows, self._pad_id)
        label_index = torch.tensor(index, dtype=torch.long)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "last_index": attention_mask.sum(dim=1) - 1,
            "label_ids": torch.tensor(self.label_token_ids, dtype=torch.long)[label_index],
            "label_index": label_index,
        }


class LMCollator:
    """Right-padded causal-LM batches: ``input_ids``, ``attention_mask`` and ``labels``.

    ``labels`` equal ``input_ids`` with -100 on padding (HF models shift them internally).
    An EOS is appended (when the tokenizer has one) so the model learns where texts end.
    """

    def __init__(self, tokenizer: Any, max_length: int = 128, add_eos: bool = True) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        eos = getattr(tokenizer, "eos_token_id", None)
        self._eos = [int(eos)] if add_eos and eos is not None else []
        self._bos = _bos(tokenizer)
        self._pad_id = _pad_id(tokenizer)

    def __call__(self, examples: Sequence[Example | str]) -> dict[str, torch.Tensor]:
        texts = [ex if isinstance(ex, str) else ex.text for ex in examples]
        rows = [(self._bos + ids + self._eos)[: self.max_length] for ids in _encode(self.tokenizer, texts)]
        input_ids, attention_mask = _pad(rows, self._pad_id)
        # Mask by attention, not by pad id: pad often equals EOS, and the real EOS must be learned.
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The keys a HF model's forward accepts (drops the scoring-only ones)."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if k in batch}


def gather_last(logits: torch.Tensor, last_index: torch.Tensor) -> torch.Tensor:
    """``[batch, vocab]`` logits at ``last_index``; ``[batch, vocab]`` input passes through."""
    if logits.dim() == 2:
        return logits
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, last_index.to(logits.device)]


def classification_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of the full-vocab logits at ``last_index`` against ``label_ids``."""
    last = gather_last(logits, batch["last_index"]).float()
    return F.cross_entropy(last, batch["label_ids"].to(last.device))


def classification_predictions(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], label_token_ids: Sequence[int]
) -> torch.Tensor:
    """Index of the best label per row, comparing only the label tokens' logits."""
    last = gather_last(logits, batch["last_index"])
    ids = torch.as_tensor(list(label_token_ids), dtype=torch.long, device=last.device)
    return last[:, ids].argmax(dim=-1)


def classification_accuracy(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], label_token_ids: Sequence[int]
) -> float:
    """Fraction of rows whose best label token matches ``label_index``."""
    pred = classification_predictions(logits, batch, label_token_ids)
    if pred.numel() == 0:
        return 0.0
    return (pred == batch["label_index"].to(pred.device)).float().mean().item()
