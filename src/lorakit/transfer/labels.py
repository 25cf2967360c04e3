"""Label-string distributions: the carrier of Trans-LoRA's distillation across tokenizers.

Trans-LoRA (Wang et al., NeurIPS 2024, arXiv 2405.17258) distils the source model M_s+θ_s into the
target M_t+θ_t. Across model families the vocabularies differ (SmolLM2: 49,152 tokens, Gemma-3:
262,144), so token logits cannot be compared. For a classification task with label strings
y_1..y_L, each model scores each label STRING under its OWN tokenizer (lorakit's choice, see
LATER-ROWS §1.4; the paper distils on text):

    s(y_l | x) = Σ_{j=1..|t(y_l)|} log p(t_j(y_l) | prompt(x), t_<j(y_l))       (sum of token log-probs)
    q(l | x)   = softmax_l s(y_l | x)                                            (restricted to the labels)

where t(·) is the model's tokenization of ``" " + y_l`` appended to the prompt's tokens. When every
label is one token the sum is the single log-prob at the answer position and one forward scores all
labels (``logits_to_keep``: only the answer position is projected onto the vocabulary).

Distillation loss (soft labels, lorakit's choice of the KL direction as in Hinton-style KD):
    L_KD = KL(p_teacher(·|x) || q_student(·|x)) = Σ_l p_l (log p_l − log q_l)
and the hard-label variant  L_CE = −log q_student(argmax_l p_l | x).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.data.collate import _bos, _encode, _pad, _pad_id
from lorakit.data.tasks import Example, Task
from lorakit.train.objectives import last_token_logits


class LabelScoringError(ValueError):
    """Labels that cannot be scored under a tokenizer (a label with no tokens, a prompt too long)."""


@dataclass(frozen=True)
class SoftExample:
    """A text with the teacher's distribution over the task's labels (in ``task.labels`` order)."""

    text: str
    probs: tuple[float, ...]

    @property
    def label_index(self) -> int:
        return max(range(len(self.probs)), key=lambda i: self.probs[i])


class LabelStringCollator:
    """Examples (``Example`` with a label, ``SoftExample`` or plain ``str``) -> batches for label-string scoring.

    Rows are ``prompt(x)`` (right padded, BOS by hand as ``ClassificationCollator``). Single-token label
    sets give one row per example and ``label_ids``; otherwise each example expands into L rows
    ``prompt + t(y_l)[:-1]`` with ``score_pos`` (positions whose logits predict the label tokens),
    ``score_tok`` and ``score_mask``. ``teacher_probs`` [B, L] and ``label_index`` [B] ride along.
    """

    def __init__(self, tokenizer: Any, task: Task, max_length: int = 128) -> None:
        if task.kind != "classification" or len(task.labels) < 2:
            raise LabelScoringError(f"task {task.name!r} needs >= 2 label strings for label scoring")
        self.tokenizer, self.task, self.max_length = tokenizer, task, max_length
        self.label_tokens = _encode(tokenizer, [" " + label for label in task.labels])
        empty = [lab for lab, t in zip(task.labels, self.label_tokens) if not t]
        if empty:
            raise LabelScoringError(f"label(s) {empty} encode to no tokens under this tokenizer")
        self.single = all(len(t) == 1 for t in self.label_tokens) and len(
            {t[0] for t in self.label_tokens}) == len(self.label_tokens)
        self._bos, self._pad_id = _bos(tokenizer), _pad_id(tokenizer)
        self._tail_ids: list[int] | None = None
        self.longest_label = max(len(t) for t in self.label_tokens)

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of ``task.prompt(text)``; over-long prompts lose the end of the text, never the cue."""
        head, tail = self.task.prompt_parts(text)
        ids = self._bos + _encode(self.tokenizer, [head + tail])[0]
        room = self.max_length - (0 if self.single else self.longest_label - 1)
        if len(ids) <= room:
            return ids
        if self._tail_ids is None:
            self._tail_ids = _encode(self.tokenizer, [tail])[0] if tail else []
        keep = room - len(self._tail_ids)
        if keep < 1:
            raise LabelScoringError(f"max_length={self.max_length} cannot hold the prompt's answer cue")
        return ids[:keep] + self._tail_ids

    def __call__(self, examples: Sequence[Example | SoftExample | str]) -> dict[str, Any]:
        prompts = [self.encode_prompt(ex if isinstance(ex, str) else ex.text) for ex in examples]
        batch: dict[str, Any] = {"n_labels": len(self.task.labels), "single": self.single}
        if self.single:
            ids, mask = _pad(prompts, self._pad_id)
            batch |= {"input_ids": ids, "attention_mask": mask, "last_index": mask.sum(dim=1) - 1,
                      "label_ids": torch.tensor([t[0] for t in self.label_tokens], dtype=torch.long)}
        else:
            rows, pos, tok = [], [], []
            width = self.longest_label
            for p in prompts:
                for lt in self.label_tokens:
                    rows.append(p + lt[:-1])
                    pos.append([len(p) - 1 + j for j in range(len(lt))] + [len(p) - 1] * (width - len(lt)))
                    tok.append(lt + [lt[0]] * (width - len(lt)))
            ids, mask = _pad(rows, self._pad_id)
            lens = [len(t) for t in self.label_tokens] * len(prompts)
            batch |= {"input_ids": ids, "attention_mask": mask,
                      "score_pos": torch.tensor(pos, dtype=torch.long),
                      "score_tok": torch.tensor(tok, dtype=torch.long),
                      "score_mask": torch.tensor([[1.0] * n + [0.0] * (width - n) for n in lens])}
        soft = [ex for ex in examples if isinstance(ex, SoftExample)]
        if len(soft) == len(examples) and soft:
            batch["teacher_probs"] = torch.tensor([ex.probs for ex in soft], dtype=torch.float32)
            batch["label_index"] = torch.tensor([ex.label_index for ex in soft], dtype=torch.long)
        elif all(isinstance(ex, Example) and ex.label is not None for ex in examples):
            batch["label_index"] = torch.tensor([self.task.label_index(ex.label) for ex in examples],  # type: ignore[union-attr]
                                                dtype=torch.long)
        return batch


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def label_log_scores(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """[B, L] s(y_l | x): summed log-probs of each label string's tokens under ``model`` (with grad)."""
    device = _device(model)
    b = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if b["single"]:
        logp = F.log_softmax(last_token_logits(model, b).float(), dim=-1)
        return logp[:, b["label_ids"]]
    pos = b["score_pos"]
    keep, inverse = torch.unique(pos, return_inverse=True)
    rows = torch.arange(pos.shape[0], device=device)[:, None]
    try:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], logits_to_keep=keep).logits
        at = inverse
    except TypeError:  # a model without logits_to_keep: full logits, gather the positions directly
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        at = pos
    logp = F.log_softmax(logits.float(), dim=-1)
    per_token = logp[rows, at, b["score_tok"]] * b["score_mask"]
    return per_token.sum(dim=-1).view(-1, b["n_labels"])


def distill_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """KL(p_teacher || q_student) over the label strings, mean over the batch."""
    logq = F.log_softmax(label_log_scores(model, batch), dim=-1)
    p = batch["teacher_probs"].to(logq.device)
    return (torch.xlogy(p, p) - p * logq).sum(dim=-1).mean()


def hard_label_loss(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Cross-entropy of the label-string distribution against hard labels (teacher argmax or gold)."""
    scores = label_log_scores(model, batch)
    return F.cross_entropy(scores, batch["label_index"].to(scores.device))


@torch.no_grad()
def label_distribution(model: nn.Module, tokenizer: Any, task: Task, texts: Sequence[str], *,
                       batch_size: int = 16, max_length: int = 128) -> torch.Tensor:
    """[N, L] q(l | x) = softmax over the label strings' summed log-probs, for each text (eval mode)."""
    collate = LabelStringCollator(tokenizer, task, max_length=max_length)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            out.append(F.softmax(label_log_scores(model, collate(list(texts[start:start + batch_size]))), dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, len(task.labels))


def label_accuracy(model: nn.Module, tokenizer: Any, task: Task, examples: Sequence[Example], *,
                   batch_size: int = 16, max_length: int = 128) -> float:
    """Accuracy of argmax_l q(l | x) against the examples' gold labels."""
    probs = label_distribution(model, tokenizer, task, [ex.text for ex in examples], batch_size=batch_size,
                               max_length=max_length)
    gold = torch.tensor([task.label_index(ex.label) for ex in examples])  # type: ignore[arg-type]
    return float((probs.argmax(dim=-1) == gold).float().mean()) if len(examples) else 0.0


def soft_examples(texts: Sequence[str], probs: torch.Tensor) -> list[SoftExample]:
    """Pair texts with rows of a [N, L] distribution."""
    return [SoftExample(t, tuple(float(x) for x in row)) for t, row in zip(texts, probs.tolist())]
