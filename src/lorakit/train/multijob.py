"""Multi-job training: several adapter jobs through one frozen base, one packed forward/backward per step.

LoRAFusion (Zhu et al., EuroSys 2026, arXiv 2510.00206; ``CentML/lorafusion``) and mLoRA (Ye et al.,
VLDB 2025; ``TUDB-Labs/mLoRA``) train K LoRA jobs on one frozen base model by concatenating their
samples into shared micro-batches with per-row adapter ids. Here every job j has its own adapter (any
form and rank, attached under its own name), data, objective, :class:`~lorakit.train.trainer.TrainConfig`
(batch size, LR, schedule, steps, seed), optimizer, checkpoints and log.

**One step** (all active jobs advance by one optimizer step):

1. each job j draws its global batch G_j (``IndexStream(n_j, seed_j).batch(step_j, B_j·grad_accum)``,
   exactly the samples the single-job :class:`~lorakit.train.trainer.Trainer` would draw);
2. :mod:`lorakit.train.planner` packs ⋃_j G_j into token-capped micro-batches, each job's rows one
   contiguous segment (the runtime's sliced segment path, ``AdapterContext.row_segments``);
3. per micro-batch m one forward under an :class:`~lorakit.core.context.AdapterContext` with per-row ids
   and one backward of

       L_m = Σ_j (Σ_{t ∈ m ∩ G_j} ℓ_t) / N_j,        N_j = number of loss terms (rows or tokens) of G_j,

   so Σ_m L_m = Σ_j L_j with L_j the job's own mean over its own global batch (LATER-ROWS §6.7;
   **lorakit's rule**: neither paper's artifact defines one, mLoRA takes each task's mean per batch).
   Job j's adapter receives gradient only from its own rows, so ∇_{θ_j} Σ_m L_m = ∇_{θ_j} L_j: exactly the
   gradient of training j alone on G_j;
4. each job clips its own gradient norm and steps its own optimizer and scheduler (LoRAFusion's
   ``maybe_reduce_grad_and_optimizer_step`` per adapter, here once per global batch).

**Dropout** (LATER-ROWS §6.4: LoRAFusion's multi-LoRA path drops the base input, mLoRA's backward
approximates the mask): on the LoRA input only, as each form's own ``self.dropout`` (the base sees the
undropped x). The trainer swaps each form's ``nn.Dropout`` for :class:`KeyedDropout`, whose mask for a row
is drawn from a generator seeded by (job seed, step, sample index, layer): one mask per step and sample,
saved by autograd for the backward, and independent of which jobs share the micro-batch, of the padded
length (the mask's [T, in] prefix is the same for any T) and of the row's position.

**Admission** (mLoRA's memory model, Eq. 5, reduced to its linear term; lorakit's estimate): a job costs
``16·P_j`` bytes (fp32 parameter, gradient, two AdamW moments) plus ``a·tokens_j`` bytes of activations,
tokens_j = min(cap, B_j·grad_accum·L_j) with L_j its longest sample and ``a`` bytes per token (given, or
``4·layers·hidden·34``: a Llama block keeps ≈ 34 fp32 values of width ``hidden`` per token for backward).
Jobs beyond ``memory_budget`` or ``max_concurrent`` wait in a FIFO queue (``admission="queue"``) or are
refused (``"refuse"``). Jobs join (:meth:`MultiJobTrainer.add_job`) and leave
(:meth:`MultiJobTrainer.remove_job`) between steps; a job with ``resume=True`` continues from its latest
checkpoint on its own.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core import atomic
from lorakit.core.context import AdapterContext, current_context, use_context
from lorakit.core.inject import adapter_modules, mark_trainable, specs
from lorakit.core.spec import AdapterSpec
from lorakit.train import checkpoint as ckpt
from lorakit.train import planner as planner_mod
from lorakit.train.plots import plot_run, read_log
from lorakit.train.sampler import IndexStream
from lorakit.train.schedule import lr_multiplier
from lorakit.train.trainer import RESUME_NEUTRAL, ResumeConfigError, TrainConfig

OptimizerFactory = Callable[[list[nn.Parameter], TrainConfig], torch.optim.Optimizer]


class MultiJobError(ValueError):
    """A multi-job set-up that cannot run (duplicate job names, unsupported objective, bad config)."""


class AdmissionError(MultiJobError):
    """A job refused by memory-aware admission (``admission="refuse"``)."""


# -- objectives as per-row loss sums ------------------------------------------------------------------------

@dataclass(frozen=True)
class RowObjective:
    """What the step needs from a job's objective: a collate and per-row loss sums.

    ``collate(examples)`` returns a right-padded batch with ``input_ids`` and ``attention_mask`` [n, T] plus
    the fields ``row_losses`` reads; ``positions`` is ``"last"`` (the loss reads the logits at
    ``batch["last_index"]``) or ``"all"``; ``row_losses(logits, batch)`` returns (sum of the loss terms per
    row [n], number of terms per row [n]) from logits [n, V] ("last") or [n, T, V] ("all").
    """

    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    row_losses: Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
    positions: str = "all"


def classification_row_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the label token at each row's last position (``Objective`` classification)."""
    loss = F.cross_entropy(logits.float(), batch["label_ids"].to(logits.device), reduction="none")
    return loss, torch.ones_like(loss)


def lm_row_losses(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed per row over labels ≠ -100 (HF's shift: logits t predict labels t+1)."""
    labels = batch["labels"][:, 1:].to(logits.device)
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll.sum(dim=1), (labels != -100).sum(dim=1).to(nll.dtype)


def as_row_objective(objective: Any) -> RowObjective:
    """A :class:`RowObjective`, or one from lorakit's ``Objective`` (classification or causal LM, LM head)."""
    from lorakit.train.objectives import HeadObjective, Objective

    if isinstance(objective, RowObjective):
        return objective
    if isinstance(objective, HeadObjective):
        raise MultiJobError("multi-job training reads the LM head's logits; a classification-head objective "
                            "(head='seq_cls') is not supported")
    if isinstance(objective, Objective):
        if objective.task.kind == "classification":
            return RowObjective(objective.collate, classification_row_losses, "last")
        return RowObjective(objective.collate, lm_row_losses, "all")
    raise MultiJobError(f"a job's objective must be a RowObjective or a lorakit Objective, got "
                        f"{type(objective).__name__}")


# -- dropout keyed by (job, step, sample, layer) ----------------------------------------------------------------

_MASK64 = (1 << 63) - 1


def _mix(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & _MASK64)) * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    return h


class KeyedDropout(nn.Module):
    """Inverted dropout whose mask for row r is drawn from ``Generator(seed = mix(key_r, layer))``.

    The per-row keys come from the per-forward context (``extras["dropout_keys"][adapter]``: one key per
    row of this adapter's segment, in order). Outside such a context (or in eval) it is ``F.dropout``.
    ``mask = rand(x[r].shape) ≥ p`` row by row, ``y = x·mask/(1−p)``; autograd keeps the mask for the
    backward, so forward and backward use the same mask."""

    def __init__(self, p: float, adapter: str, layer: str) -> None:
        super().__init__()
        self.p, self.adapter = float(p), adapter
        self.layer_key = zlib.crc32(layer.encode())

    def mask(self, shape: torch.Size, keys: Sequence[int], device: torch.device) -> torch.Tensor:
        rows = []
        for key in keys:
            g = torch.Generator().manual_seed(_mix(int(key), self.layer_key))
            rows.append(torch.rand(shape[1:], generator=g) >= self.p)
        return torch.stack(rows).to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        ctx = current_context()
        keys = None if ctx is None else (ctx.extras.get("dropout_keys") or {}).get(self.adapter)
        if keys is None:
            return F.dropout(x, self.p, True)
        if len(keys) != x.shape[0]:
            raise MultiJobError(f"dropout keys for {self.adapter!r}: {len(keys)} for {x.shape[0]} rows")
        return x * self.mask(x.shape, keys, x.device).to(x.dtype) / (1 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, adapter={self.adapter!r}"


def key_dropout(model: nn.Module, name: str) -> int:
    """Replace every ``nn.Dropout`` inside adapter ``name``'s forms with :class:`KeyedDropout`; the count."""
    count = 0
    for path, form in adapter_modules(model, name).items():
        for sub, mod in list(form.named_modules()):
            if isinstance(mod, nn.Dropout) and mod.p > 0:
                parent = form.get_submodule(sub.rsplit(".", 1)[0]) if "." in sub else form
                setattr(parent, sub.rsplit(".", 1)[-1], KeyedDropout(mod.p, name, f"{path}.{sub}"))
                count += 1
    return count


# -- jobs --------------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One training job. ``spec``: attached under ``name`` (seeded by ``config.seed``) unless the model
    already has an adapter of that name. ``optimizer(params, config)`` defaults to AdamW as the Trainer."""

    name: str
    data: Sequence[Any]
    objective: Any
    config: TrainConfig = field(default_factory=TrainConfig)
    spec: AdapterSpec | None = None
    optimizer: OptimizerFactory | None = None
    resume: bool = True
    save_adapter: bool = True


@dataclass
class JobResult:
    name: str
    steps: int
    losses: list[float]
    final_loss: float
    resumed_from: int | None
    out_dir: str | None
    status: str


class _Run:
    """A job's live state: parameters, optimizer, scheduler, sampler, step, log."""

    def __init__(self, job: Job, model: nn.Module, trainer: MultiJobTrainer) -> None:
        c = job.config
        self.job, self.config = job, c
        self.objective = as_row_objective(job.objective)
        if c.precision != "fp32":
            raise MultiJobError(f"job {job.name!r}: multi-job training runs in fp32 only (got {c.precision!r})")
        if c.gradient_checkpointing:
            raise MultiJobError(f"job {job.name!r}: gradient checkpointing cannot run under a per-row context")
        if job.name not in specs(model):
            if job.spec is None:
                raise MultiJobError(f"job {job.name!r}: the model has no adapter {job.name!r} and no spec was given")
            from lorakit.api import attach

            attach(model, job.spec, job.name, seed=c.seed)
        # attach() freezes every other adapter; all running jobs train (their own rows only)
        mark_trainable(model, [*trainer.running, job.name])
        key_dropout(model, job.name)
        ids = {id(p) for form in adapter_modules(model, job.name).values() for p in form.parameters()}
        self.named = {n: p for n, p in model.named_parameters() if id(p) in ids and p.requires_grad}
        if not self.named:
            raise MultiJobError(f"job {job.name!r}: adapter has no trainable parameters")
        self.params = list(self.named.values())
        if job.optimizer is not None:
            self.optimizer = job.optimizer(self.params, c)
        else:
            self.optimizer = torch.optim.AdamW([{"params": self.params, "weight_decay": c.weight_decay}], lr=c.lr,
                                               betas=c.betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_multiplier(c.schedule, c.warmup, c.steps, c.min_lr_ratio))
        self.stream = IndexStream(len(job.data), c.seed)
        self.out_dir = Path(c.out_dir) if c.out_dir else None
        self.step = 0
        self.losses: list[float] = []
        self.resumed_from: int | None = None
        self.lengths: dict[int, int] = {}
        self.trainer = trainer
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if job.resume:
            self._resume()
        if self.out_dir is not None:
            self._trim_log()

    @property
    def global_batch(self) -> int:
        return self.config.batch_size * self.config.grad_accum

    @property
    def done(self) -> bool:
        return self.step >= self.config.steps

    def length(self, index: int) -> int:
        if index not in self.lengths:
            batch = self.objective.collate([self.job.data[index]])
            self.lengths[index] = int(batch["attention_mask"].sum())
        return self.lengths[index]

    def sample_indices(self) -> list[int]:
        return self.stream.batch(self.step, self.global_batch)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "job": self.job.name, "config": dataclasses.asdict(self.config),
                "multijob": True}

    def save(self) -> Path | None:
        if self.out_dir is None:
            return None
        return ckpt.save_checkpoint(self.out_dir / "checkpoints", self.step, params=self.named,
                                    optimizer=self.optimizer, scheduler=self.scheduler, trainer_state=self._state(),
                                    strategies={}, rng_per_rank=[ckpt.rng_state()],
                                    keep=self.config.keep_checkpoints)

    def _resume(self) -> None:
        found = ckpt.list_checkpoints(self.out_dir / "checkpoints") if self.out_dir else []
        if not found:
            return
        path = found[-1]
        data = ckpt.load_checkpoint(path)
        state = data["trainer_state"]
        if state.get("job") != self.job.name:
            raise ResumeConfigError(f"{path}: checkpoint of job {state.get('job')!r}, not {self.job.name!r}")
        old = {k: v for k, v in (state.get("config") or {}).items() if k not in RESUME_NEUTRAL}
        new = {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(self.config), default=str)).items()
               if k not in RESUME_NEUTRAL}
        diff = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
        if diff:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items())
            raise ResumeConfigError(f"{path}: job {self.job.name!r} was trained with another config ({listed}); "
                                    "use the recorded values or another out_dir")
        missing = set(self.named) - set(data["params"])
        if missing:
            raise ResumeConfigError(f"{path}: checkpoint lacks tensors {sorted(missing)[:3]}")
        with torch.no_grad():
            for n, p in self.named.items():
                if tuple(p.shape) != tuple(data["params"][n].shape):
                    raise ResumeConfigError(f"{path}: tensor {n} has shape {tuple(data['params'][n].shape)}, the "
                                            f"adapter's {tuple(p.shape)}")
                p.copy_(data["params"][n])
        self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.step = self.resumed_from = int(state["step"])
        self.losses = [float(r["loss"]) for r in read_log(self.out_dir / "log.jsonl")
                       if "loss" in r and r.get("step", 0) <= self.step]

    def _trim_log(self) -> None:
        path = self.out_dir / "log.jsonl"
        kept = [r for r in read_log(path) if r.get("step", 0) <= self.step]
        atomic.write_bytes(path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def log(self, record: dict[str, Any]) -> None:
        if self.out_dir is not None:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def result(self, status: str) -> JobResult:
        return JobResult(self.job.name, self.step, list(self.losses), self.losses[-1] if self.losses else math.nan,
                         self.resumed_from, str(self.out_dir) if self.out_dir else None, status)


@dataclass(frozen=True)
class StepStats:
    """What one multi-job step did: per-job loss, micro-batches, real and computed (padded) tokens, seconds."""

    losses: dict[str, float]
    micro_batches: int
    real_tokens: int
    padded_tokens: int
    seconds: float


class MultiJobTrainer:
    """Train several adapter jobs through one frozen base (see the module docstring).

    ``token_cap``: the planner's cap on a micro-batch's cost (``cost="padded"``: rows·T computed);
    ``planner``: ``"ffd"`` | ``"milp"`` | ``"pad_to_max"`` (mLoRA-style: one micro-batch per step padded to
    the step's longest sample, rounded to ``pad_multiple``); ``memory_budget`` in bytes (None: no limit),
    ``act_bytes_per_token`` for the admission estimate; ``max_concurrent`` jobs (None: no limit).
    """

    def __init__(self, model: nn.Module, jobs: Sequence[Job] = (), *, token_cap: int | None = 4096,
                 planner: str = "ffd", cost: str = "padded", pad_multiple: int = 1,
                 memory_budget: int | None = None, act_bytes_per_token: int | None = None,
                 max_concurrent: int | None = None, admission: str = "queue", progress: bool = False) -> None:
        if planner not in planner_mod.METHODS:
            raise MultiJobError(f"unknown planner {planner!r}; known: {', '.join(planner_mod.METHODS)}")
        if admission not in ("queue", "refuse"):
            raise MultiJobError(f"admission must be 'queue' or 'refuse', got {admission!r}")
        if planner != "pad_to_max" and (token_cap is None or token_cap < 1):
            raise MultiJobError(f"planner {planner!r} needs token_cap >= 1")
        self.model = model
        self.token_cap, self.planner, self.cost = token_cap, planner, cost
        self.pad_multiple = max(1, int(pad_multiple))
        self.memory_budget, self.max_concurrent, self.admission = memory_budget, max_concurrent, admission
        self.act_bytes_per_token = act_bytes_per_token or _default_act_bytes(model)
        self.progress = progress
        self.running: dict[str, _Run] = {}
        self.queued: list[Job] = []
        self.finished: dict[str, JobResult] = {}
        self.step_count = 0
        self.history: list[StepStats] = []
        self._estimates: dict[str, tuple[Job, int]] = {}
        for job in jobs:
            self.add_job(job)

    # -- admission -----------------------------------------------------------------------------------------
    def estimate_job_bytes(self, job: Job, params: int | None = None) -> int:
        """16·P + a·min(cap, B·L_max) bytes (see the module docstring); P from the spec when not attached,
        L_max over the job's first 64 samples."""
        cached = self._estimates.get(job.name)
        explicit = params is not None
        if not explicit and cached is not None and cached[0] is job:
            return cached[1]
        if params is None:
            if job.name in specs(self.model):
                params = sum(p.numel() for f in adapter_modules(self.model, job.name).values()
                             for p in f.parameters() if p.requires_grad)
            else:
                params = _spec_params(self.model, job.spec)
        obj = as_row_objective(job.objective)
        probe = list(range(min(len(job.data), 64)))
        longest = max((int(obj.collate([job.data[i]])["attention_mask"].sum()) for i in probe), default=1)
        tokens = job.config.batch_size * job.config.grad_accum * longest
        if self.token_cap is not None:
            tokens = min(tokens, self.token_cap)
        estimate = 16 * params + self.act_bytes_per_token * tokens
        if not explicit:
            self._estimates[job.name] = (job, estimate)
        return estimate

    def _fits(self, job: Job) -> tuple[bool, str]:
        if self.max_concurrent is not None and len(self.running) >= self.max_concurrent:
            return False, f"{len(self.running)} job(s) running, max_concurrent={self.max_concurrent}"
        if self.memory_budget is None:
            return True, ""
        used = sum(self.estimate_job_bytes(r.job) for r in self.running.values())
        need = self.estimate_job_bytes(job)
        if used + need > self.memory_budget:
            return False, (f"estimated {need / 2**20:.1f} MiB on top of {used / 2**20:.1f} MiB exceeds the budget "
                           f"{self.memory_budget / 2**20:.1f} MiB")
        return True, ""

    def add_job(self, job: Job) -> str:
        """Admit ``job`` now ("running"), queue it ("queued"), or raise AdmissionError (admission="refuse")."""
        names = set(self.running) | {j.name for j in self.queued}
        if job.name in names:
            raise MultiJobError(f"a job named {job.name!r} is already running or queued")
        if job.name in self.finished:
            del self.finished[job.name]  # a finished job added again resumes from its checkpoint
        ok, why = self._fits(job)
        if not ok:
            if self.admission == "refuse":
                raise AdmissionError(f"job {job.name!r} refused: {why}")
            self.queued.append(job)
            return "queued"
        run = _Run(job, self.model, self)
        if run.done:
            self.finished[job.name] = run.result("finished")
            return "finished"
        self.running[job.name] = run
        return "running"

    def remove_job(self, name: str, *, save: bool = True) -> JobResult:
        """Take job ``name`` out (checkpointed when ``save`` and it has an out_dir); queued jobs may then start."""
        if name in self.running:
            run = self.running.pop(name)
            if save and run.step > 0:
                run.save()
            result = run.result("removed")
        else:
            queued = [j for j in self.queued if j.name == name]
            if not queued:
                raise MultiJobError(f"no running or queued job {name!r}")
            self.queued.remove(queued[0])
            result = JobResult(name, 0, [], math.nan, None, queued[0].config.out_dir, "removed")
        self.finished[name] = result
        self._admit_queued()
        return result

    def _admit_queued(self) -> None:
        while self.queued:
            ok, _ = self._fits(self.queued[0])
            if not ok:
                return
            job = self.queued.pop(0)
            run = _Run(job, self.model, self)
            if run.done:
                self.finished[job.name] = run.result("finished")
            else:
                self.running[job.name] = run

    # -- the step ------------------------------------------------------------------------------------------
    def plan_step(self) -> list[list[planner_mod.Item]]:
        """This step's micro-batches: items keyed (job, position in its global batch, data index)."""
        items = []
        for name, run in self.running.items():
            for pos, index in enumerate(run.sample_indices()):
                items.append(planner_mod.Item((name, pos, index), name, run.length(index)))
        return planner_mod.plan(items, self.token_cap, self.planner, cost=self.cost, block=1)

    def _collate_bin(self, bin_items: list[planner_mod.Item]) -> tuple[dict[str, Any], list[tuple[str, int, int]]]:
        segments, parts, start = [], [], 0
        by_job: dict[str, list[planner_mod.Item]] = {}
        for it in bin_items:
            by_job.setdefault(it.adapter, []).append(it)
        for name, its in by_job.items():
            run = self.running[name]
            batch = run.objective.collate([run.job.data[it.key[2]] for it in its])
            parts.append((name, batch, its))
            segments.append((name, start, start + len(its)))
            start += len(its)
        width = max(b["input_ids"].shape[1] for _, b, _ in parts)
        width = -(-width // self.pad_multiple) * self.pad_multiple
        return {"parts": parts, "width": width}, segments

    def accumulate(self) -> StepStats:
        """Plan, forward and backward this step for every running job (gradients accumulate in .grad);
        no optimizer step. The per-job losses are the jobs' own means over their global batches."""
        t0 = time.perf_counter()
        bins = self.plan_step()
        collated = [self._collate_bin(b) for b in bins]
        totals: dict[str, float] = {name: 0.0 for name in self.running}
        for packed, _ in collated:
            for name, batch, _ in packed["parts"]:
                obj = self.running[name].objective
                totals[name] += float(_term_counts(obj, batch).sum())
        losses = {name: 0.0 for name in self.running}
        real = padded = 0
        was_training = self.model.training
        self.model.train()
        try:
            for packed, segments in collated:
                r, p = self._run_micro_batch(packed, segments, totals, losses)
                real, padded = real + r, padded + p
        finally:
            self.model.train(was_training)
        return StepStats(losses, len(bins), real, padded, time.perf_counter() - t0)

    def _run_micro_batch(self, packed: dict[str, Any], segments: list[tuple[str, int, int]],
                         totals: dict[str, float], losses: dict[str, float]) -> tuple[int, int]:
        width = packed["width"]
        ids, masks, names, row_ids, keys = [], [], [], [], {}
        last_rows = all(self.running[n].objective.positions == "last" for n, _, _ in packed["parts"])
        for j, (name, batch, its) in enumerate(packed["parts"]):
            pad = width - batch["input_ids"].shape[1]
            ids.append(F.pad(batch["input_ids"], (0, pad), value=0))
            masks.append(F.pad(batch["attention_mask"], (0, pad), value=0))
            names.append(name)
            row_ids += [j] * len(its)
            run = self.running[name]
            keys[name] = [_mix(run.config.seed, run.step, it.key[1], it.key[2]) for it in its]
        input_ids, attention_mask = torch.cat(ids), torch.cat(masks)
        device = _device(self.model)
        ctx = AdapterContext(names=tuple(names), ids=torch.tensor(row_ids, dtype=torch.long),
                             extras={"dropout_keys": keys})
        split = _split_head(self.model) if not last_rows else None
        if split is not None:
            # mixed "all"/"last" rows: run the decoder once, then the head only where each job reads logits
            # (full-vocab logits for a classification row's every position cost more than its layers)
            decoder, head = split
            with use_context(ctx):
                hidden = decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
                                 ).last_hidden_state
        else:
            kwargs: dict[str, Any] = {}
            if last_rows:
                last = torch.cat([b["last_index"] for _, b, _ in packed["parts"]])
                positions, inverse = torch.unique(last, return_inverse=True)
                kwargs["logits_to_keep"] = positions.to(device)
            with use_context(ctx):
                logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                    **kwargs).logits
        total = torch.zeros((), dtype=torch.float32, device=device)
        for (name, batch, _), (_, start, stop) in zip(packed["parts"], segments, strict=True):
            run = self.running[name]
            rows = torch.arange(stop - start, device=device)
            if split is not None:
                h = hidden[start:stop]
                h = h[rows, batch["last_index"].to(device)] if run.objective.positions == "last" else \
                    h[:, :batch["input_ids"].shape[1]]
                sub = AdapterContext(names=(name,), ids=torch.zeros(stop - start, dtype=torch.long),
                                     extras={"dropout_keys": {name: keys[name]}})
                with use_context(sub):  # an adapted head still sees this job's adapter on these rows
                    part = head(h)
            else:
                part = logits[start:stop]
                if last_rows:
                    part = part[rows, inverse[start:stop].to(device)]
                elif run.objective.positions == "last":
                    part = part[rows, batch["last_index"].to(device)]
                else:
                    part = part[:, :batch["input_ids"].shape[1]]
            sums, _ = run.objective.row_losses(part, batch)
            job_loss = sums.sum() / max(totals[name], 1.0)
            losses[name] += float(job_loss.detach())
            total = total + job_loss
        if total.requires_grad:
            total.backward()
        return int(attention_mask.sum()), int(attention_mask.numel())

    def step(self) -> StepStats:
        """One step of every running job: accumulate, then each job clips and steps its own optimizer."""
        if not self.running:
            self._admit_queued()
        stats = self.accumulate()
        for name, run in list(self.running.items()):
            c = run.config
            grad_norm = None
            if c.max_grad_norm:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(run.params, c.max_grad_norm))
            loss = stats.losses[name]
            if not math.isfinite(loss):
                raise FloatingPointError(f"job {name!r}: loss is {loss} at step {run.step}; lower its lr")
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.step += 1
            run.losses.append(loss)
            record = {"step": run.step, "loss": loss, "lr": run.scheduler.get_last_lr()[0],
                      "epoch": round(run.stream.epoch_of(run.step, run.global_batch), 4)}
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if run.step % c.log_every == 0 or run.done:
                run.log(record)
            if c.save_every and run.step % c.save_every == 0 and not run.done:
                run.save()
            if run.done:
                self._finish(name)
        self.step_count += 1
        self.history.append(stats)
        self._admit_queued()
        return stats

    def _finish(self, name: str) -> None:
        run = self.running.pop(name)
        if run.out_dir is not None:
            run.save()
            if run.job.save_adapter:
                from lorakit.api import save

                save(self.model, run.out_dir / "adapter", run.job.name)
            try:
                plot_run(run.out_dir / "log.jsonl", run.out_dir / "curves.png", title=run.job.name)
            except Exception as e:  # a plot failure must not lose a trained job
                print(f"lorakit: could not plot {name}: {e}", file=sys.stderr)
        self.finished[name] = run.result("finished")

    def run(self, on_step: Callable[[MultiJobTrainer, StepStats], None] | None = None,
            max_steps: int | None = None) -> dict[str, JobResult]:
        """Step until no job runs or waits (or ``max_steps`` steps); ``on_step`` may add or remove jobs."""
        from tqdm.auto import tqdm

        bar = tqdm(desc="train-many", unit="step", disable=not self.progress, file=sys.stderr, dynamic_ncols=True)
        done = 0
        while self.running or self.queued:
            if not self.running:
                self._admit_queued()
                if not self.running:
                    raise AdmissionError(f"queued job(s) {[j.name for j in self.queued]} can never be admitted "
                                         "under the memory budget")
            stats = self.step()
            done += 1
            bar.set_postfix({k: f"{v:.3f}" for k, v in list(stats.losses.items())[:4]})
            bar.update(1)
            if on_step is not None:
                on_step(self, stats)
            if max_steps is not None and done >= max_steps:
                break
        bar.close()
        return self.results()

    def results(self) -> dict[str, JobResult]:
        out = dict(self.finished)
        for name, run in self.running.items():
            out[name] = run.result("running")
        for job in self.queued:
            out[job.name] = JobResult(job.name, 0, [], math.nan, None, job.config.out_dir, "queued")
        return out

    def status(self) -> list[dict[str, Any]]:
        """One row per job: name, status, step/steps, last loss."""
        rows = []
        for name, run in self.running.items():
            rows.append({"job": name, "status": "running", "step": run.step, "steps": run.config.steps,
                         "loss": run.losses[-1] if run.losses else None})
        for job in self.queued:
            rows.append({"job": job.name, "status": "queued", "step": 0, "steps": job.config.steps, "loss": None})
        for name, res in self.finished.items():
            rows.append({"job": name, "status": res.status, "step": res.steps, "steps": None, "loss": res.final_loss})
        return rows


def _term_counts(obj: RowObjective, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if obj.row_losses is classification_row_losses:
        return torch.ones(batch["input_ids"].shape[0])
    if obj.row_losses is lm_row_losses:
        return (batch["labels"][:, 1:] != -100).sum(dim=1).float()
    if obj.counts is None:
        raise MultiJobError("a custom RowObjective needs counts(batch) -> [rows] (terms per row)")
    return obj.counts(batch).float()


# config fields of HF causal LMs whose forward transforms the head's logits (soft-capping, scaling): the
# decoder-then-head split would skip that, so such models take the full forward
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def _split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, lm_head) of a plain HF causal LM (logits = lm_head(decoder(...).last_hidden_state)), or None.
    lorakit's choice: an optimisation for micro-batches that mix whole-sequence and last-token losses."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    cfg = getattr(model, "config", None)
    if not (callable(get_decoder) and callable(get_head)) or cfg is None:
        return None
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_TRANSFORMS):
        return None
    if type(model).__name__ not in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"):
        return None  # architectures whose forward is known to be exactly decoder → lm_head
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    return (decoder, head) if decoder is not None and head is not None else None


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _default_act_bytes(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    layers = getattr(cfg, "num_hidden_layers", None) or 12
    hidden = getattr(cfg, "hidden_size", None) or 768
    return 4 * layers * hidden * 34


def _spec_params(model: nn.Module, spec: AdapterSpec | None) -> int:
    """Trainable parameters ``spec`` would add, estimated as Σ over its target layers of r·(in + out)
    (exact for LoRA; lorakit's estimate for other forms, whose exact count is known once attached)."""
    if spec is None:
        return 0
    from lorakit.core.inject import find_targets
    from lorakit.forms.base import layer_dims

    r = int(spec.form_args.get("r", 8))
    total = 0
    for path in find_targets(model, spec):
        layer = model.get_submodule(path)
        dims = layer_dims(getattr(layer, "base_layer", layer))  # an already adapted layer: its base
        total += r * (dims[0] + dims[1])
    return total
