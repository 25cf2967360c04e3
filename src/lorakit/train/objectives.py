"""Loss and evaluation for a Task: next-token label scoring (classification) or causal LM with a
language-model head (``head="lm"``); cross-entropy on a classification head's logits (``head="seq_cls"``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lorakit.data import ClassificationCollator, Example, LMCollator, Task
from lorakit.models.loading import HEADS


def last_token_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, vocab] logits at each row's last real token (right padding).

    Asks the model for the logits of the distinct last positions only (``logits_to_keep``), so the
    head does not run over every position of every row.
    """
    last = batch["last_index"]
    positions, inverse = torch.unique(last, return_inverse=True)
    device = batch["input_ids"].device
    try:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    logits_to_keep=positions.to(device))
        return out.logits[torch.arange(last.shape[0], device=device), inverse.to(device)]
    except TypeError:  # model without logits_to_keep
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits[torch.arange(last.shape[0], device=device), last.to(device)]


@dataclass
class Objective:
    """What the trainer needs for one task."""

    task: Task
    collate: Any
    max_length: int
    eval_batch_size: int = 16
    progress: bool = False

    @property
    def metric_name(self) -> str:
        return "accuracy" if self.task.kind == "classification" else "perplexity"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = _to(batch, _device(model))
        if self.task.kind == "classification":
            logits = last_token_logits(model, batch)
            return F.cross_entropy(logits.float(), batch["label_ids"])
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list | None = None) -> dict[str, float]:
        """Accuracy and label cross-entropy (classification) or perplexity (LM) on the eval split."""
        examples = self.task.eval if examples is None else examples
        if not examples:
            return {}
        device = _device(model)
        correct, loss_sum, count, tokens = 0, 0.0, 0, 0
        chunks = range(0, len(examples), self.eval_batch_size)
        for start in tqdm(chunks, desc="eval", unit="batch", leave=False, disable=not self.progress):
            batch = _to(self.collate(examples[start:start + self.eval_batch_size]), device)
            if self.task.kind == "classification":
                logits = last_token_logits(model, batch).float()
                loss_sum += F.cross_entropy(logits, batch["label_ids"], reduction="sum").item()
                label_ids = torch.as_tensor(self.collate.label_token_ids, device=device)
                pred = logits[:, label_ids].argmax(dim=-1)
                correct += (pred == batch["label_index"]).sum().item()
                count += len(pred)
            else:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(),
                                      ignore_index=-100, reduction="sum")
                loss_sum += nll.item()
                tokens += int((labels != -100).sum())
        if self.task.kind == "classification":
            return {"accuracy": correct / count, "loss": loss_sum / count}
        return {"perplexity": math.exp(loss_sum / max(tokens, 1)), "loss": loss_sum / max(tokens, 1)}


class SequenceClassificationCollator:
    """Examples -> padded batches of the raw texts for a model with a classification head.

    The tokenizer adds its special tokens ([CLS] ... [SEP] for BERT), pads to the longest row (on the side
    the tokenizer pads) and truncates to ``max_length``; returns the tokenizer's model inputs
    (``input_ids``, ``attention_mask``, ``token_type_ids`` where it makes them) and ``label_index``
    (the label's position in ``task.labels``: the head's class id).
    """

    def __init__(self, tokenizer: Any, task: Task, max_length: int = 128) -> None:
        if task.kind != "classification":
            raise ValueError(f"task {task.name!r} is a {task.kind!r} task; a classification head needs a "
                             "classification task (text + label)")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        index = []
        for ex in examples:
            if ex.label is None:
                raise ValueError(f"example without label in classification batch: {ex.text[:60]!r}")
            index.append(self.task.label_index(ex.label))
        enc = self.tokenizer([ex.text for ex in examples], padding=True, truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        batch = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        batch["label_index"] = torch.tensor(index, dtype=torch.long)
        return batch


def head_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[batch, num_labels] logits of a sequence-classification model (everything but the labels goes in)."""
    return model(**{k: v for k, v in batch.items() if k != "label_index"}).logits


@dataclass
class HeadObjective(Objective):
    """Classification through the model's own head: cross-entropy over the task's label ids, accuracy."""

    @property
    def metric_name(self) -> str:
        return "accuracy"

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        batch = _to(batch, _device(model))
        return F.cross_entropy(head_logits(model, batch).float(), batch["label_index"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list | None = None) -> dict[str, float]:
        """Accuracy and mean cross-entropy over the eval split."""
        examples = self.task.eval if examples is None else examples
        if not examples:
            return {}
        device = _device(model)
        correct, loss_sum, count = 0, 0.0, 0
        chunks = range(0, len(examples), self.eval_batch_size)
        for start in tqdm(chunks, desc="eval", unit="batch", leave=False, disable=not self.progress):
            batch = _to(self.collate(examples[start:start + self.eval_batch_size]), device)
            logits = head_logits(model, batch).float()
            loss_sum += F.cross_entropy(logits, batch["label_index"], reduction="sum").item()
            correct += (logits.argmax(dim=-1) == batch["label_index"]).sum().item()
            count += len(logits)
        return {"accuracy": correct / count, "loss": loss_sum / count}


def make_objective(task: Task, tokenizer: Any, *, max_length: int = 128, eval_batch_size: int = 16,
                   progress: bool = False, head: str = "lm") -> Objective:
    """The objective for ``task`` on a model with ``head``: ``"lm"`` scores label words with the LM head
    (or tunes the LM on text tasks); ``"seq_cls"`` trains a classification head (classification tasks only)."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; known: {', '.join(HEADS)}")
    if head == "seq_cls":
        return HeadObjective(task, SequenceClassificationCollator(tokenizer, task, max_length=max_length),
                             max_length, eval_batch_size, progress)
    collate = (ClassificationCollator(tokenizer, task, max_length=max_length)
               if task.kind == "classification" else LMCollator(tokenizer, max_length=max_length))
    return Objective(task, collate, max_length, eval_batch_size, progress)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
