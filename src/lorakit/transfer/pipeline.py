"""Trans-LoRA: move a LoRA from a source model to a target model (another family, another tokenizer)
without the task data, through filtered synthetic inputs and the source model as teacher.

Wang et al., "Trans-LoRA: towards data-free Transferable Parameter Efficient Finetuning", NeurIPS 2024,
arXiv 2405.17258 (Fig. 1/2). Transfer time, with the seeds S and the discriminator kept from source
training (:mod:`lorakit.transfer.discriminator`):

1. generate: M_t, prompted few-shot with S, samples candidate inputs x̃ (:mod:`.generate`);
2. filter: keep the top ``keep`` candidates by score (discriminator P(real|x̃), TiTok's contrastive
   excess S̄(x̃), or none) (:mod:`.filters`);
3. label: the teacher M_s+θ_s gives p(l | x̃) over the task's label STRINGS under its own tokenizer;
4. train: a fresh θ_t on M_t minimises KL(p(·|x̃) || q_{M_t+θ_t}(·|x̃)), q scored under M_t's tokenizer
   (or CE on argmax_l p) (:mod:`.labels`). No logits are compared across vocabularies.

Each stage is a plain callable that can be swapped (``generator``, ``scorer``, ``labeller``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState
from lorakit.data.tasks import Example, Task
from lorakit.transfer.filters import FILTERS, FilterError, contrastive_excess_scores, none_scores, select
from lorakit.transfer.labels import (
    LabelStringCollator,
    SoftExample,
    distill_loss,
    hard_label_loss,
    label_distribution,
    soft_examples,
)

LOSSES = ("kl", "ce")


@dataclass(frozen=True)
class TransferArgs:
    """Trans-LoRA knobs (defaults: LATER-ROWS §1.5's CPU reproduction, lorakit's choice where it gives none)."""

    n_candidates: int = 600
    keep: float = 200  # >= 1: count; (0, 1): fraction of the candidates
    threshold: float | None = None  # discriminator: only P(real) >= threshold is eligible
    filter: str = "discriminator"
    temperature: float = 1.0
    top_p: float = 0.95
    max_new_tokens: int = 40
    shots: int | None = None  # seeds shown per prompt (None: all, shuffled)
    input_name: str = "Text"
    gen_batch: int = 32
    loss: str = "kl"
    steps: int = 60
    batch_size: int = 8
    lr: float = 5e-4
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    max_length: int = 128
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        if self.filter not in FILTERS:
            raise FilterError(f"unknown filter {self.filter!r}; known: {', '.join(FILTERS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; known: {', '.join(LOSSES)}")
        if self.n_candidates < 1 or self.keep <= 0:
            raise ValueError(f"n_candidates must be >= 1 and keep > 0, got {self.n_candidates}, {self.keep}")


@dataclass
class TransferResult:
    state: AdapterState
    report: dict[str, Any]
    candidates: list[str] = field(default_factory=list)
    kept: list[SoftExample] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)


def train_student(model: nn.Module, tokenizer: Any, task: Task, examples: Sequence[SoftExample | Example], *,
                  loss: str = "kl", steps: int = 60, batch_size: int = 8, lr: float = 5e-4, r: int = 8,
                  alpha: float = 16.0, targets: Sequence[str] = ("q_proj", "v_proj"), seed: int = 0,
                  max_length: int = 128, progress: bool = False, name: str = "default",
                  out_dir: str | None = None) -> AdapterState:
    """Attach a fresh LoRA ``name`` to ``model`` and train it on ``examples`` with lorakit's Trainer:
    ``loss="kl"`` against the examples' teacher distributions, ``"ce"`` on hard labels (teacher argmax for
    ``SoftExample``, the gold label for ``Example``). Returns the trained adapter's state (left attached)."""
    import lorakit
    from lorakit.core.extract import extract_state
    from lorakit.train.trainer import TrainConfig, Trainer

    if not examples:
        raise ValueError("no training examples for the target adapter (every candidate was filtered out?)")
    if loss == "kl" and not all(isinstance(e, SoftExample) for e in examples):
        raise ValueError("loss 'kl' needs teacher distributions (SoftExample); use loss 'ce' for labelled examples")
    spec = AdapterSpec(targets=list(targets), form_args={"r": r, "alpha": alpha})
    lorakit.attach(model, spec, name, seed=seed)
    collate = LabelStringCollator(tokenizer, task, max_length=max_length)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                         eval_at_start=False, out_dir=out_dir)
    loss_fn = distill_loss if loss == "kl" else hard_label_loss
    Trainer(model, list(examples), collate, loss_fn, config).train(resume=False)
    model.eval()
    return extract_state(model, name)


class Transfer:
    """The Trans-LoRA pipeline: generate → filter → label → train (see the module doc).

    ``source_model`` carries θ_s attached and active (the teacher; with adapters disabled it is the
    contrastive-excess amateur). ``discriminator``: an object with ``prob_real(texts)`` (needed by the
    ``discriminator`` filter). Stages can be replaced: ``generator(seeds, n) -> texts``,
    ``scorer(texts) -> scores`` (higher keeps), ``labeller(texts) -> [N, L] probabilities``.
    """

    name = "trans_lora"
    Args = TransferArgs

    def __init__(self, source_model: nn.Module, source_tokenizer: Any, target_model: nn.Module, target_tokenizer: Any,
                 task: Task, args: TransferArgs | None = None, *, discriminator: Any = None,
                 generator: Callable[[Sequence[str], int], list[str]] | None = None,
                 scorer: Callable[[Sequence[str]], torch.Tensor] | None = None,
                 labeller: Callable[[Sequence[str]], torch.Tensor] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.args = args or TransferArgs()
        if self.args.filter == "discriminator" and discriminator is None and scorer is None:
            raise FilterError("filter 'discriminator' needs a discriminator (train one next to the source adapter "
                              "with train_discriminator / prepare_source), or use filter 'contrastive_excess' or "
                              "'none'")
        self.source_model, self.source_tokenizer = source_model, source_tokenizer
        self.target_model, self.target_tokenizer = target_model, target_tokenizer
        self.task, self.discriminator = task, discriminator
        self.generator = generator or self._generate
        self.scorer = scorer or self._scorer()
        self.labeller = labeller or self._label
        self.log = log or (lambda msg: None)

    # -- default stages ----------------------------------------------------------------------
    def _generate(self, seeds: Sequence[str], n: int) -> list[str]:
        from lorakit.transfer.generate import generate_candidates

        a = self.args
        return generate_candidates(self.target_model, self.target_tokenizer, seeds, n, temperature=a.temperature,
                                   top_p=a.top_p, max_new_tokens=a.max_new_tokens, shots=a.shots,
                                   input_name=a.input_name, seed=a.seed, max_batch=a.gen_batch)

    def _scorer(self) -> Callable[[Sequence[str]], torch.Tensor]:
        if self.args.filter == "discriminator":
            return lambda texts: self.discriminator.prob_real(texts)
        if self.args.filter == "contrastive_excess":
            return lambda texts: contrastive_excess_scores(self.source_model, self.source_tokenizer, texts,
                                                           max_length=self.args.max_length)
        return none_scores

    def _label(self, texts: Sequence[str]) -> torch.Tensor:
        return label_distribution(self.source_model, self.source_tokenizer, self.task, texts,
                                  max_length=self.args.max_length)

    # -- the pipeline --------------------------------------------------------------------------
    def run(self, seeds: Sequence[Example], out_dir: str | Path | None = None, *,
            base_model_name: str | None = None) -> TransferResult:
        """Run all four stages; with ``out_dir`` save the target adapter there (PEFT layout + lorakit.json
        whose meta records the transfer report)."""
        import lorakit

        a, times = self.args, {}
        seed_texts = [e.text for e in seeds]
        t = time.perf_counter()
        candidates = list(self.generator(seed_texts, a.n_candidates))
        times["generate_s"] = time.perf_counter() - t
        self.log(f"generated {len(candidates)} candidates in {times['generate_s']:.1f} s")
        t = time.perf_counter()
        scores = self.scorer(candidates) if candidates else torch.empty(0)
        threshold = a.threshold if a.filter == "discriminator" else None
        idx = select(torch.as_tensor(scores), a.keep, threshold)
        kept_texts = [candidates[i] for i in idx]
        times["filter_s"] = time.perf_counter() - t
        self.log(f"filter {a.filter}: kept {len(kept_texts)} of {len(candidates)}")
        t = time.perf_counter()
        probs = self.labeller(kept_texts) if kept_texts else torch.empty(0, len(self.task.labels))
        kept = soft_examples(kept_texts, probs)
        times["label_s"] = time.perf_counter() - t
        t = time.perf_counter()
        state = train_student(self.target_model, self.target_tokenizer, self.task, kept, loss=a.loss, steps=a.steps,
                              batch_size=a.batch_size, lr=a.lr, r=a.r, alpha=a.alpha, targets=a.targets, seed=a.seed,
                              max_length=a.max_length, progress=a.progress)
        times["train_s"] = time.perf_counter() - t
        all_scores = torch.as_tensor(scores, dtype=torch.float64)
        teacher_hist = torch.bincount(probs.argmax(-1), minlength=len(self.task.labels)).tolist() if len(probs) else []
        report = {"method": "trans_lora", "arxiv": "2405.17258", "args": dataclasses.asdict(self.args),
                  "n_seeds": len(seeds), "n_candidates": len(candidates), "n_kept": len(kept),
                  "teacher_label_counts": dict(zip(self.task.labels, teacher_hist)),
                  "kept_score_mean": _finite_mean(all_scores[idx]) if idx else None,
                  "candidate_score_mean": _finite_mean(all_scores),
                  "timings": {k: round(v, 2) for k, v in times.items()}}
        if out_dir is not None:
            lorakit.save(self.target_model, out_dir, base_model_name=base_model_name, meta={"trans_lora": report})
            report["adapter_dir"] = str(out_dir)
        return TransferResult(state, report, candidates, kept, [float(s) for s in torch.as_tensor(scores)])


def _finite_mean(x: torch.Tensor) -> float | None:
    """Mean of the finite entries (a JSON report holds no inf), None if there are none."""
    x = x[torch.isfinite(x)]
    return float(x.mean()) if len(x) else None
