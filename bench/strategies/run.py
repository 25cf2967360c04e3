"""Every training strategy of the catalog against vanilla LoRA at equal steps, measured side by side.

Each strategy (allora, lora_pro, lisa, increlora, diffora, loraprune, loram and DyLoRA rank sampling) is
trained on the embedded SmolLM2-135M (``lorakit.models.load_model()``) on the default task (3-class tweet
sentiment, ``load_task("sentiment")``, next-token label scoring via ``make_objective``) with
``lorakit.train.Trainer`` and the strategy in its hook list, exactly as ``lorakit train --strategy NAME``
composes it, for the same steps, batch size, seed and data order (the trainer's seeded index stream) as a
vanilla LoRA run (r=8, alpha=16 on q_proj,v_proj, the lorakit default), with AdamW + 5% warmup + cosine
decay and gradient clipping at 1. One torch thread.

Per strategy: eval accuracy and label cross-entropy after training on a fixed eval slice (``--n-eval``
examples from ``--eval-offset`` 100; the LoRA LR was swept on [0, 100) by bench/forms_quality), the loss
curve, trainable parameters, the median step time relative to LoRA, the peak training memory relative
to LoRA, and for LoRAPrune and LoRAM the parameter count of the resulting model and its metric (LoRAM
also the pruned training model's metric before recovery).

Interleaving (as bench/forms_quality, with the shared ``bench/_common.TurnTable``): every run has its own
model and Trainer in its own thread; a turn table lets exactly one run compute at a time, round-robin by
step with the order rotated every round, so step k of every run happens within the same round and a
change of machine load hits all runs alike. Each run keeps its own torch RNG stream. Runs whose strategy
leaves the base weights alone share the base tensors (a module-tree copy whose frozen weights are the
same tensors); lisa (trains them), loraprune and loram (slice them) get a private copy.

Step time: from the trainer's ``on_step_start`` to its ``on_step_end`` hook (forward, backward, clipping,
optimizer and scheduler step, the strategy's hooks), process CPU time (wall time recorded too); the
first and last steps are dropped (optimizer state allocation; loraprune's physical pruning, loram's
recovery). Ratio = median over steps k of t_run[k] / t_lora[k].

Peak memory (CPU: the runs share one process, so RSS cannot be split per run; what is measured is the
bytes of the tensors training holds, counted per run, each storage once):

    weights      all parameters of the run's model (the shared base counts in full for every run)
    grads        .grad of every parameter after backward (before any strategy clears them)
    optimizer    the trainer optimizer's state (Adam moments) at the end of the step
    strategy     tensors the strategy object holds beyond these (LoRA-Pro's full m x n Adam moments,
                 DiffoRA's architecture weights and their Adam state, LoRAPrune's scores, ...);
                 LoRAM's CPU stash of the removed base weights (kept only to recover in place; the
                 publisher keeps W0 on disk) is reported apart and not counted
    activations  tensors autograd saved for backward during the forward (a ``saved_tensors_hooks``
                 pack hook; parameters excluded), e.g. IncreLoRA's materialized delta W is in here

peak = max over steps of (weights + grads + optimizer + strategy + activations); ``peak vs LoRA`` is the
ratio of the two peaks, ``train-state vs LoRA`` the same without the weights. The process's max RSS is
recorded too.

Hyper-parameters: ``SETUPS`` below (paper defaults, with the schedules that assume thousands of steps
scaled to the run so that they act within it; each entry says how and from where).

Budget: the default (40 steps x batch 4, 100 eval examples, 10 runs) is about 10 x 40 x ~1.5 s of
training plus 12 evaluations of ~15 s, about 15-20 minutes of one core.

Outputs ``<out>/strategies.json``, ``<out>/strategies.png`` (loss curves, accuracy / CE, step time and
memory vs LoRA) and ``<out>/table.md`` (README table); prints one summary line (``--markdown``: the
table too).

    python bench/strategies/run.py --out bench/strategies/results/default      # full run (~20 min)
    python bench/strategies/run.py --quick                                     # smoke: 3 steps, every strategy
    python bench/strategies/run.py --strategies lora_pro,lisa --markdown
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import resource
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lorakit.strategies.base import Strategy

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/, for the shared bench/_common.py
import _common as common  # noqa: E402

HERE = Path(__file__).resolve().parent
REFERENCE = "lora"
LORA_LR = 1e-3  # bench/forms_quality SETUPS["lora"]: sweep 3e-4: 1.62, 1e-3: 1.04, 3e-3: 1.11 (eval CE)

common.quiet_warnings()


# ------------------------------------------------------------------------------ per-strategy setup
@dataclass(frozen=True)
class Ctx:
    """What a setup may scale by: steps, the shared rank, the number of adapted modules, the blocks."""

    steps: int
    rank: int
    n_modules: int
    n_blocks: int


@dataclass(frozen=True)
class Setup:
    form: str
    form_args: Callable[[int], dict[str, Any]]
    strategy: str | None
    strategy_args: Callable[[Ctx], dict[str, Any]]
    lr: float
    note: str  # hyper-parameters and their sources
    targets: tuple[str, ...] | None = None  # None: the shared --targets
    own_base: bool = False  # the strategy changes the base weights: private copy


def _lora(r: int) -> dict[str, Any]:
    return {"r": r, "alpha": 2.0 * r}


def _increlora_args(c: Ctx) -> dict[str, Any]:
    warm = max(0, round(0.1 * c.steps))
    interval = max(1, round(0.05 * c.steps))
    add_r = max(1, c.rank // 2)
    r0 = max(1, c.rank // 2)
    needed = math.ceil((c.rank - r0) * c.n_modules / add_r)  # growths to reach the budget
    rounds = max(1, sum(1 for t in range(1, max(2, int(0.6 * c.steps)) + 1) if t > warm and t % interval == 0))
    return {"target_rank": c.rank, "top_h": max(1, math.ceil(needed / rounds)), "init_warmup": warm,
            "interval": interval, "orth_reg": 0.1, "beta1": 0.85, "beta2": 0.85}


SETUPS: dict[str, Setup] = {
    "lora": Setup("lora", _lora, None, lambda c: {}, LORA_LR,
                  "reference: r=8, alpha=16 (s=2), dropout 0; LR from bench/forms_quality's sweep"),
    "allora": Setup("lora", lambda r: {"r": r, "alpha": float(r), "dropout": 0.0}, "allora",
                    lambda c: {"eta": 4.0, "granularity": "row"}, LORA_LR,
                    "no dropout, alpha=r (s=1) as the paper; eta=4, per-row coefficient (lorakit defaults: "
                    "no official code or value); LoRA's LR (the paper claims to remove tuning)"),
    "lora_pro": Setup("lora", _lora, "lora_pro", lambda c: {"mode": "adam"}, LORA_LR,
                      "mode=adam (official code's lora-pro-full path, Adam moments on the equivalent "
                      "gradient); LoRA's LR (the paper trains LoRA-Pro at LoRA's LR, 2e-5 for Llama-2-7B)"),
    "lisa": Setup("lora", _lora, "lisa",
                  lambda c: {"gamma": 2, "interval": max(1, c.steps // 4), "seed": 0, "save_full": False}, 1e-4,
                  "gamma=2 of 30 blocks (LMFlow default); K=20 in LMFlow for runs of thousands of steps, "
                  "scaled to K=steps/4 (4 samplings); full-parameter LR 1e-4 (LMFlow's script: 2e-5 for a 3B "
                  "model; a 135M model and 40 steps take a larger one; our choice, not swept); embedding, "
                  "norm and tied head always train; the attached LoRA stays frozen at init",
                  own_base=True),
    "increlora": Setup("increlora", lambda r: {"r": max(1, r // 2), "alpha": 2.0 * r, "add_r": max(1, r // 2)},
                       "increlora", _increlora_args, LORA_LR,
                       "start at rank r/2=4, add_r=4 (code's {8:4}[target_rank]), target_rank=8 (the budget "
                       "is LoRA's total rank); alpha=16 (NLU scripts 16-32), beta 0.85, orth_reg 0.1 (code); "
                       "schedule scaled: init_warmup=interval=100 of ~7k steps in the code (budget met at about "
                       "half of training) become init_warmup=10% and interval=5% of the steps, top_h chosen so "
                       "the budget is met by 60% of the steps (paper top_h 2-3)"),
    "diffora": Setup("lora", _lora, "diffora",
                     lambda c: {"search_ratio": 0.2, "select_ratio": 0.5, "relaxation": "sigmoid",
                                "schedule": "alternate", "arch_lr": 3e-2}, LORA_LR,
                     "search 20% of the steps, keep 50% of the modules, sigmoid gates, alternating "
                     "first-order updates (lorakit defaults; no official code); arch Adam betas (0.5, 0.999), "
                     "wd 1e-3 (DARTS); arch_lr 3e-4 (DARTS, thousands of arch steps) scaled x100 to 3e-2 "
                     "for the run's 4 architecture steps"),
    "loraprune": Setup("lora", _lora, "loraprune",
                       lambda c: {"ratio": 0.5, "prune_freq": max(1, c.steps // 10), "warmup_ratio": 0.1,
                                  "cooldown_ratio": 0.1, "ema": 0.9}, LORA_LR,
                       "ratio 0.5, r=8, alpha=16, EMA 0.9, cubic schedule with 10% warm-up/cool-down "
                       "(script/prune.sh, utils.py); LoRA on all 7 projections as the paper (importance needs "
                       "LoRA on a module: on q,v only, MLP channels would never be scored); prune_freq=10 of "
                       "~780 steps (78 mask updates) scaled to steps/10 (10 updates); first 10% and last "
                       "block kept (code); with 3 kv groups per layer, 0.5 removes 1 kv group",
                       targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                       own_base=True),
    "loram": Setup("lora", _lora, "loram",
                   lambda c: {"ratio": 0.5, "method": "magnitude", "fill": "zero", "seed": 0}, LORA_LR,
                   "ratio 0.5 (METHODS.md CPU-scale experiment; 0.85 for 70B), structured magnitude "
                   "pruning (LoRAM-Stru uses LLM-Pruner masks), no alignment (optional, publisher side), "
                   "zero fill on recovery (code's zeroA); r=8, alpha=16 (paper); targets q,v as LoRA",
                   own_base=True),
    "dylora": Setup("dylora", _lora, "dylora", lambda c: {"seed": 0}, LORA_LR,
                    "form dylora r_max=8, alpha=16, b ~ U{1..8} per step (paper); evaluated at b=r_max; "
                    "LoRA's LR (same factors, init and alpha)"),
}
ORDER = tuple(SETUPS)
# IncreLoRA at LoRA's LR (its paper's LRs are LoRA-like) barely leaves its init in 40 steps: E starts at 0 and
# A, B at N(0, 0.02), so delta W grows cubically slowly (12-step check: train loss 6.0 -> 6.6, grad norm 0.2,
# while LoRA went 5.9 -> 1.2). The default run adds IncreLoRA at 10x as a sensitivity row (not swept, and not
# selected on the reported eval slice: both rows are reported).
DEFAULT_EXTRA = ["increlora=1e-2"]
STASH = {("loram", "saved")}  # strategy attributes reported apart from the memory peak (see the docstring)


# ------------------------------------------------------------------------------ measuring
def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _storage_bytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def tensors_in(obj: Any, depth: int = 0, seen: set[int] | None = None) -> list[torch.Tensor]:
    """Tensors reachable from ``obj`` through dicts, lists, tuples, optimizers and plain objects; modules
    (the model's parts) are not entered."""
    seen = set() if seen is None else seen
    if depth > 5 or id(obj) in seen:
        return []
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (nn.Module, str, bytes, int, float, bool, type(None))):
        return []
    if isinstance(obj, torch.optim.Optimizer):
        return tensors_in(dict(obj.state), depth + 1, seen) + tensors_in(
            [g["params"] for g in obj.param_groups], depth + 1, seen)
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in tensors_in(k, depth + 1, seen) + tensors_in(v, depth + 1, seen)]
    if isinstance(obj, (list, tuple, set)):
        return [t for v in obj for t in tensors_in(v, depth + 1, seen)]
    if hasattr(obj, "__dict__") and not callable(obj):
        return tensors_in(vars(obj), depth + 1, seen)
    return []


def unique_bytes(tensors: list[torch.Tensor], exclude: set[int]) -> int:
    total = 0
    for t in tensors:
        k = _storage_key(t)
        if k not in exclude and t.device.type != "meta":
            exclude.add(k)
            total += _storage_bytes(t)
    return total


@dataclass
class Memory:
    weights: int = 0
    grads: int = 0
    optimizer: int = 0
    strategy: int = 0
    activations: int = 0
    stash: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.strategy + self.activations


# ------------------------------------------------------------------------------ runs and hooks
@dataclass
class Run:
    key: str
    setup: Setup
    lr: float
    name: str = ""  # strategy name (the key carries an LR multiplier in a sweep)
    model: nn.Module | None = None
    strategy: Strategy | None = None
    strategy_args: dict[str, Any] = field(default_factory=dict)
    trainer: Any = None
    result: Any = None
    error: str | None = None
    rng_state: torch.Tensor | None = None
    t0: dict[str, float] = field(default_factory=dict)
    step_times: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in common.CLOCKS})
    logs: list[dict[str, Any]] = field(default_factory=list)
    mem_steps: list[Memory] = field(default_factory=list)
    trainable: list[int] = field(default_factory=list)  # parameters with a gradient, per step
    params_start: int = 0
    pruned_eval: dict[str, float] | None = None
    _saved: Any = None
    _act: int = 0
    _act_seen: set[int] = field(default_factory=set)
    _param_keys: set[int] = field(default_factory=set)
    _mem: Memory | None = None


class _Enter(Strategy):
    """First strategy of a run: waits for its turn, restores its RNG, starts the clocks and the probes."""

    name = "bench_enter"

    def __init__(self, run: Run, table: Any) -> None:
        self.run, self.table = run, table

    def on_step_start(self, trainer: Any, step: int) -> None:
        self.table.wait(self.run.key)
        trainer.model.train()
        if self.run.rng_state is not None:
            torch.set_rng_state(self.run.rng_state)
        run = self.run
        run._param_keys = {_storage_key(p) for p in trainer.model.parameters()}
        run._act, run._act_seen = 0, set()

        def pack(t: torch.Tensor) -> torch.Tensor:
            k = _storage_key(t)
            if k not in run._param_keys and k not in run._act_seen:
                run._act_seen.add(k)
                run._act += _storage_bytes(t)
            return t

        run._saved = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        run._saved.__enter__()
        run.t0 = {c: clock() for c, clock in common.CLOCKS.items()}

    def on_after_backward(self, trainer: Any, step: int) -> None:
        run = self.run
        if run._saved is not None:
            run._saved.__exit__(None, None, None)
            run._saved = None
        seen: set[int] = set()
        params = list(trainer.model.parameters())
        mem = Memory(weights=unique_bytes(params, seen), activations=run._act)
        with_grad = [p for p in params if p.grad is not None]
        mem.grads = unique_bytes([p.grad for p in with_grad], seen)
        run.trainable.append(sum(p.numel() for p in with_grad))
        run._mem = mem


class _PrunedEval(Strategy):
    """Evaluates the model at the end of the last step, before the next strategies' on_step_end
    (placed before loram: the pruned model + LoRA, before recovery)."""

    name = "bench_pruned_eval"

    def __init__(self, run: Run) -> None:
        self.run = run

    def on_step_end(self, trainer: Any, step: int, logs: dict[str, Any]) -> None:
        if step == trainer.config.steps:
            self.run.pruned_eval = trainer.evaluate()
            self.run.pruned_eval["params"] = sum(p.numel() for p in trainer.model.parameters())
            trainer.model.train()


class _Exit(Strategy):
    """Last strategy of a run: stops the clocks, reads optimizer/strategy memory, gives the turn on."""

    name = "bench_exit"

    def __init__(self, run: Run, table: Any, bar: tqdm) -> None:
        self.run, self.table, self.bar = run, table, bar

    def on_step_end(self, trainer: Any, step: int, logs: dict[str, Any]) -> None:
        run = self.run
        for c, clock in common.CLOCKS.items():
            run.step_times[c].append(clock() - run.t0[c])
        mem = run._mem or Memory()
        seen = {_storage_key(p) for p in trainer.model.parameters()}
        seen |= {_storage_key(p.grad) for p in trainer.model.parameters() if p.grad is not None}
        mem.optimizer = unique_bytes(tensors_in(dict(trainer.optimizer.state)), seen)
        if run.strategy is not None:
            for attr, value in vars(run.strategy).items():
                b = unique_bytes(tensors_in(value), seen)
                if (run.strategy.name, attr) in STASH:
                    mem.stash += b
                else:
                    mem.strategy += b
        run.mem_steps.append(mem)
        run._mem = None
        run.logs.append({k: v for k, v in logs.items() if isinstance(v, (int, float, str, list))})
        run.rng_state = torch.get_rng_state()
        self.bar.update()
        if step < trainer.config.steps:
            self.table.give_on(run.key)
        else:
            self.bar.set_postfix_str(f"evaluating {run.key}")


# ------------------------------------------------------------------------------ building
def plan(names: list[str], lr_mults: list[float], lr_over: dict[str, float],
         extra: list[tuple[str, float]] = ()) -> list[Run]:
    runs = [] if REFERENCE in names else [Run(key=REFERENCE, setup=SETUPS[REFERENCE], lr=SETUPS[REFERENCE].lr,
                                              name=REFERENCE)]
    for n in names:
        base_lr = lr_over.get(n, SETUPS[n].lr)
        mults = [1.0] if n == REFERENCE else lr_mults
        for m in mults:
            key = n if len(mults) == 1 else f"{n}@x{m:g}"
            runs.append(Run(key=key, setup=SETUPS[n], lr=base_lr * m, name=n))
    for n, lr in extra:  # sensitivity rows: a strategy again at another LR
        if n in names:
            runs.append(Run(key=f"{n}@lr{lr:g}", setup=SETUPS[n], lr=lr, name=n))
    return runs


def build(base: nn.Module, runs: list[Run], objective: Any, train_data: list, eval_data: list,
          args: argparse.Namespace, table: Any, bar: tqdm) -> None:
    from accelerate import Accelerator

    import lorakit
    from lorakit.core import registry
    from lorakit.core.inject import adapter_modules
    from lorakit.train import TrainConfig, Trainer

    accelerator = Accelerator(cpu=True)
    eval_fn = lambda m: objective.evaluate(m, eval_data)
    shared = {id(p): p for p in base.parameters()}
    n_blocks = len(base.model.layers)
    for run in tqdm(runs, desc="building", unit="run", file=sys.stderr, leave=False):
        s = run.setup
        model = copy.deepcopy(base) if s.own_base else copy.deepcopy(base, memo=dict(shared))
        targets = list(s.targets or args.targets)
        spec = lorakit.AdapterSpec(form=s.form, form_args=s.form_args(args.rank), targets=targets)
        lorakit.attach(model, spec, name="default", seed=args.seed)
        n_modules = len(adapter_modules(model, "default"))
        run.params_start = sum(p.numel() for p in model.parameters())
        hooks: list[Strategy] = []
        if s.strategy is not None:
            run.strategy_args = s.strategy_args(Ctx(args.steps, args.rank, n_modules, n_blocks))
            run.strategy = registry.get("strategy", s.strategy)(**run.strategy_args)
            hooks = [_PrunedEval(run), run.strategy] if s.strategy == "loram" else [run.strategy]
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=run.lr, seed=args.seed,
                             schedule="cosine", warmup_ratio=0.05, max_grad_norm=1.0, eval_at_start=False,
                             progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # lisa: "the attached adapter is frozen" (intended)
            run.trainer = Trainer(model, train_data, objective.collate, objective.loss, config, eval_fn=eval_fn,
                                  strategies=[_Enter(run, table), *hooks, _Exit(run, table, bar)],
                                  accelerator=accelerator)
        run.model = model


def worker(run: Run, table: Any) -> None:
    torch.set_num_threads(1)
    try:
        table.wait(run.key)
        run.result = run.trainer.train(resume=False)
    except Exception as e:  # one failing strategy must not stop the others; it is reported
        run.error = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
        if run._saved is not None:
            run._saved.__exit__(None, None, None)
            run._saved = None
    finally:
        table.give_on(run.key, finished=True)


def train_interleaved(runs: list[Run], table: Any) -> None:
    common.run_in_threads(worker, [(r.key, (r, table)) for r in runs])


# ------------------------------------------------------------------------------ results
def _timed(ts: list[float]) -> list[float]:
    return ts[1:-1] if len(ts) > 3 else ts[1:] or ts


def timing(run: Run, ref: Run | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in common.CLOCKS:
        ts = _timed(run.step_times[c])
        entry: dict[str, Any] = {"median_s": common.median_or_none(ts), "steps_timed": len(ts)}
        if ref is not None and ref.step_times[c] and ts:
            rs = _timed(ref.step_times[c])
            entry["ratio_vs_lora"] = common.median_or_none([a / b for a, b in zip(ts, rs) if b > 0])
        out[c] = entry
    return out


def memory_record(run: Run, ref: Run | None) -> dict[str, Any]:
    if not run.mem_steps:
        return {}
    peak = max(run.mem_steps, key=lambda m: m.total)
    rec: dict[str, Any] = {"peak_bytes": peak.total, "components_at_peak": vars(peak) | {},
                           "train_state_bytes": peak.total - peak.weights,
                           "max_activation_bytes": max(m.activations for m in run.mem_steps),
                           "max_optimizer_bytes": max(m.optimizer for m in run.mem_steps),
                           "stash_bytes": max(m.stash for m in run.mem_steps)}
    if ref is not None and ref.mem_steps:
        rpeak = max(ref.mem_steps, key=lambda m: m.total)
        rec["peak_vs_lora"] = peak.total / rpeak.total
        rec["train_state_vs_lora"] = (peak.total - peak.weights) / max(1, rpeak.total - rpeak.weights)
    return rec


def run_record(run: Run, ref: Run | None) -> dict[str, Any]:
    res = run.result
    after = res.eval_after if res else {}
    losses = list(res.losses) if res else []
    params_end = sum(p.numel() for p in run.model.parameters()) if run.model is not None else None
    rec: dict[str, Any] = {
        "strategy": run.key, "name": run.name, "form": run.setup.form, "form_args": run.setup.form_args(RANK[0]),
        "targets": list(run.setup.targets or TARGETS[0]), "strategy_args": run.strategy_args,
        "lr": run.lr, "setup_note": run.setup.note,
        "accuracy": after.get("accuracy"), "eval_ce": after.get("loss"), "eval_after": after,
        "trainable_params_last_step": run.trainable[-1] if run.trainable else None,
        "trainable_params_max": max(run.trainable) if run.trainable else None,
        "model_params_start": run.params_start, "model_params_end": params_end,
        "final_train_loss": losses[-1] if losses else None,
        "train_loss_last10": statistics.fmean(losses[-10:]) if losses and all(map(math.isfinite, losses)) else None,
        "losses": losses,
        "train_seconds": res.train_seconds if res else None,
        "step_time": timing(run, ref),
        "memory": memory_record(run, ref),
        "logs": run.logs,
        "error": run.error,
    }
    if run.strategy is not None:  # what the strategy decided (lisa blocks, increlora ranks, diffora modules)
        rec["strategy_state"] = {a: getattr(run.strategy, a) for a in ("history", "selected", "budget", "sparsity")
                                 if isinstance(getattr(run.strategy, a, None), (list, int, float))}
    if run.name == "loram" and run.strategy is not None:
        rec["loram"] = {"params_full": run.strategy.params_full, "params_pruned_training": run.strategy.params_pruned,
                        "pruned_eval": run.pruned_eval, "recovered": run.strategy.recovered}
    if run.name == "loraprune" and run.strategy is not None:
        rec["loraprune"] = {"params_before": run.params_start, "params_after": params_end,
                            "final_sparsity": run.strategy.sparsity, "physically_pruned": run.strategy.pruned}
    return rec


RANK: list[int] = [8]
TARGETS: list[list[str]] = [["q_proj", "v_proj"]]


def _fmt_mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.0f} MB"


def _fmt_params(n: int | None) -> str:
    return "-" if n is None else common.fmt_params(n)


def resulting_params(r: dict[str, Any]) -> str:
    if "loraprune" in r:
        p = r["loraprune"]
        return f"{_fmt_params(p['params_after'])} (from {_fmt_params(p['params_before'])}, pruned model)"
    if "loram" in r:
        p = r["loram"]
        pe = p.get("pruned_eval") or {}
        acc = f", pruned+LoRA acc {pe['accuracy']:.2f} / CE {pe['loss']:.3f}" if "accuracy" in pe else ""
        return (f"{_fmt_params(r['model_params_end'])} (full model + recovered LoRA; trained on "
                f"{_fmt_params(p['params_pruned_training'])}{acc})")
    return ""


def markdown_table(result: dict[str, Any]) -> str:
    clock = result["headline_clock"]
    cfg = result["config"]
    lines = [f"Strategies vs LoRA on SmolLM2-135M, tweet sentiment, {cfg['steps']} steps x batch "
             f"{cfg['batch_size']}, accuracy / label CE on {cfg['n_eval']} eval examples (from offset "
             f"{cfg['eval_offset']}; base model {result['base_eval']['accuracy']:.2f} / "
             f"{result['base_eval']['loss']:.3f}, majority class {result['majority_baseline']:.2f}); step time "
             f"({clock} time) and peak training memory (weights + grads + optimizer + strategy state + saved "
             f"activations; in brackets without the weights) relative to LoRA in the same interleaved run.",
             "",
             "| strategy | accuracy | eval CE | trainable params | step time vs LoRA | peak memory vs LoRA "
             "| resulting model params |",
             "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if r["error"]:
            lines.append(f"| {r['strategy']} | failed: {r['error'][:80]} | | | | | |")
            continue
        t = r["step_time"][clock].get("ratio_vs_lora")
        m = r["memory"]
        tr = _fmt_params(r["trainable_params_last_step"])
        if r["trainable_params_max"] != r["trainable_params_last_step"]:
            tr += f" (max {_fmt_params(r['trainable_params_max'])})"
        mem = (f"{m['peak_vs_lora']:.2f}x ({m['train_state_vs_lora']:.2f}x)" if "peak_vs_lora" in m else "-")
        lines.append(f"| {r['strategy']} | {r['accuracy']:.2f} | {r['eval_ce']:.3f} | {tr} | "
                     f"{t:.2f}x | {mem} | {resulting_params(r)} |" if t is not None else
                     f"| {r['strategy']} | {r['accuracy']:.2f} | {r['eval_ce']:.3f} | {tr} | - | {mem} | "
                     f"{resulting_params(r)} |")
    ref = next((r for r in result["runs"] if r["strategy"] == REFERENCE and not r["error"]), None)
    if ref and ref["memory"]:
        lines += ["", f"LoRA itself: {ref['step_time'][clock]['median_s']:.2f} s/step ({clock}), peak "
                      f"{_fmt_mb(ref['memory']['peak_bytes'])} (train state "
                      f"{_fmt_mb(ref['memory']['train_state_bytes'])})."]
    return "\n".join(lines) + "\n"


def summary_line(result: dict[str, Any]) -> str:
    clock = result["headline_clock"]
    cfg = result["config"]
    parts = []
    for r in result["runs"]:
        if r["error"]:
            parts.append(f"{r['strategy']} FAILED ({r['error'][:60]})")
            continue
        t = r["step_time"][clock].get("ratio_vs_lora")
        m = r["memory"].get("peak_vs_lora")
        extra = ""
        if "loraprune" in r:
            extra = f", {_fmt_params(r['loraprune']['params_after'])} params after pruning"
        if "loram" in r and (r["loram"].get("pruned_eval") or {}).get("accuracy") is not None:
            extra = f", pruned {r['loram']['pruned_eval']['accuracy']:.2f}"
        parts.append(f"{r['strategy']} {r['accuracy']:.2f}/{r['eval_ce']:.2f} "
                     f"({t:.2f}x time, {m:.2f}x mem{extra})" if t is not None and m is not None else
                     f"{r['strategy']} {r['accuracy']:.2f}/{r['eval_ce']:.2f}")
    return (f"strategies: {len(result['runs'])} runs, {cfg['steps']} steps x {cfg['batch_size']}, "
            f"{cfg['n_eval']} eval (base {result['base_eval']['accuracy']:.2f}, majority "
            f"{result['majority_baseline']:.2f}; acc/CE, {clock} step time and peak memory vs lora): "
            + " | ".join(parts))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if not r["error"]]
    clock = result["headline_clock"]
    cmap = plt.get_cmap("tab10")
    colors = {r["strategy"]: ("k" if r["strategy"] == REFERENCE else cmap(i % 10)) for i, r in enumerate(runs)}
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0][0]
    for r in runs:
        xs = list(range(1, len(r["losses"]) + 1))
        ax.plot(xs, r["losses"], color=colors[r["strategy"]], alpha=0.25, lw=0.8)
        w = max(1, min(5, len(r["losses"]) // 4))
        sm = [statistics.fmean(r["losses"][max(0, i - w + 1): i + 1]) for i in range(len(r["losses"]))]
        ax.plot(xs, sm, color=colors[r["strategy"]], lw=2 if r["strategy"] == REFERENCE else 1.4,
                label=r["strategy"])
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (label CE; faint: per step, bold: running mean)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("loss curves")
    bx = axes[0][1]
    names = [r["strategy"] for r in runs]
    bars = bx.bar(names, [r["accuracy"] for r in runs], color=[colors[n] for n in names])
    bx.bar_label(bars, labels=[f"{r['accuracy']:.2f}\n{r['eval_ce']:.2f}" for r in runs], fontsize=7)
    bx.axhline(result["base_eval"]["accuracy"], color="0.4", ls="--", lw=1, label="base model")
    bx.axhline(result["majority_baseline"], color="0.7", ls=":", lw=1, label="majority class")
    bx.set_ylabel(f"eval accuracy ({result['config']['n_eval']} examples; label: acc / CE)")
    bx.tick_params(axis="x", rotation=30, labelsize=8)
    bx.legend(fontsize=8)
    for ax_, key, title in ((axes[1][0], "time", f"median step time / LoRA's ({clock}, paired by step)"),
                            (axes[1][1], "mem", "peak training memory / LoRA's (hatched: without weights)")):
        if key == "time":
            vals = [r["step_time"][clock].get("ratio_vs_lora") or 0 for r in runs]
            bars = ax_.bar(names, vals, color=[colors[n] for n in names])
            ax_.bar_label(bars, labels=[f"{v:.2f}" for v in vals], fontsize=7)
        else:
            vals = [r["memory"].get("peak_vs_lora") or 0 for r in runs]
            vals2 = [r["memory"].get("train_state_vs_lora") or 0 for r in runs]
            x = range(len(names))
            b1 = ax_.bar([i - 0.2 for i in x], vals, width=0.4, color=[colors[n] for n in names])
            b2 = ax_.bar([i + 0.2 for i in x], vals2, width=0.4, color=[colors[n] for n in names], hatch="//",
                         alpha=0.5)
            ax_.bar_label(b1, labels=[f"{v:.2f}" for v in vals], fontsize=7)
            ax_.bar_label(b2, labels=[f"{v:.1f}" for v in vals2], fontsize=7)
            ax_.set_xticks(list(x), names)
            ax_.set_yscale("log")
        ax_.axhline(1.0, color="k", lw=0.8)
        ax_.set_title(title, fontsize=10)
        ax_.tick_params(axis="x", rotation=30, labelsize=8)
    cfg = result["config"]
    fig.suptitle(f"strategies vs LoRA: SmolLM2-135M, tweet sentiment, {cfg['steps']} steps x batch "
                 f"{cfg['batch_size']}, r={cfg['rank']}, one torch thread, interleaved", fontsize=11)
    common.save_figure(fig, path, dpi=110)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.make_parser(__doc__)
    p.add_argument("--strategies", default="all",
                   help=f"comma-separated subset of {','.join(ORDER)} (lora always runs)")
    p.add_argument("--lr", action="append", default=[], metavar="NAME=LR", help="override a strategy's LR")
    p.add_argument("--extra-lr", action="append", default=None, metavar="NAME=LR",
                   help="also run strategy NAME at LR as an extra row (default: increlora=1e-2, see SETUPS; "
                        "'none' for no extra rows)")
    p.add_argument("--lr-mults", default="1",
                   help="comma-separated multipliers of each strategy's LR (not lora's); >1 value = an LR sweep")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-eval", type=int, default=100)
    p.add_argument("--eval-offset", type=int, default=100,
                   help="first eval example used (bench/forms_quality's LR sweep selected on [0, 100))")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj", help="shared targets (loraprune: all 7, see SETUPS)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=tuple(common.CLOCKS), default="cpu", help="headline clock of the step ratios")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 steps of batch 2, 8 eval examples")
    p.add_argument("--markdown", action="store_true", help="also print the README table")
    p.add_argument("--out", type=Path, default=HERE / "results" / "last")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.n_eval = 3, 2, 8
    if args.steps < 1 or args.batch_size < 1 or args.n_eval < 1 or args.rank < 2 or args.eval_offset < 0:
        p.error("--steps, --batch-size, --n-eval must be >= 1, --rank >= 2, --eval-offset >= 0")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    names = list(ORDER) if args.strategies == "all" else [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        p.error(f"unknown strategies {unknown}; known: {', '.join(ORDER)}")
    args.names = [n for n in ORDER if n in names]
    args.lr_mults = [float(x) for x in args.lr_mults.split(",")]
    args.lr_over = common.parse_lr_overrides(args.lr)
    extra = DEFAULT_EXTRA if args.extra_lr is None else [e for e in args.extra_lr if e != "none"]
    args.extra = list(common.parse_lr_overrides(extra).items())
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    RANK[0], TARGETS[0] = args.rank, args.targets
    t_start = time.perf_counter()
    common.limit_malloc_arenas()
    common.pin_threads()
    args.out.mkdir(parents=True, exist_ok=True)

    from lorakit.core import registry
    from lorakit.data import load_task
    from lorakit.models import load_model
    from lorakit.train.objectives import make_objective

    catalog = [e.name for e in registry.entries("strategy")]
    missing = [n for n in ORDER if n != REFERENCE and n not in catalog]
    if missing:
        raise SystemExit(f"strategies {missing} are not in the catalog ({catalog})")
    runs = plan(args.names, args.lr_mults, args.lr_over, args.extra)
    base, tokenizer = load_model(progress=False)
    task = load_task("sentiment", seed=args.seed)
    objective = make_objective(task, tokenizer, max_length=args.max_length, eval_batch_size=args.eval_batch_size)
    eval_data = common.eval_slice(task, objective, args.eval_offset, args.n_eval)
    load_avg_start = os.getloadavg()
    base.eval()
    with torch.no_grad():
        base_eval = objective.evaluate(base, eval_data)

    table = common.TurnTable([r.key for r in runs], rounds=args.steps)
    bar = tqdm(total=len(runs) * args.steps, desc="training (interleaved)", unit="step", file=sys.stderr,
               dynamic_ncols=True)
    build(base, runs, objective, task.train, eval_data, args, table, bar)
    t_train = time.perf_counter()
    train_interleaved(runs, table)
    bar.close()
    train_wall_s = time.perf_counter() - t_train

    ref = next((r for r in runs if r.key == REFERENCE and not r.error), None)
    result: dict[str, Any] = {
        "benchmark": "strategies",
        "config": {
            "model": "SmolLM2-135M-Instruct (embedded, lorakit.models.load_model())",
            "task": task.name, "task_source": task.source, "n_train": len(task.train),
            "n_eval": len(eval_data), "eval_offset": args.eval_offset, "steps": args.steps,
            "batch_size": args.batch_size, "rank": args.rank, "targets": args.targets,
            "max_length": args.max_length, "seed": args.seed,
            "optimizer": "AdamW (betas 0.9/0.999, no weight decay), 5% linear warmup, cosine to 0, grad-norm clip 1.0",
            "data_order": "lorakit.train.sampler.IndexStream(seed): the same batches for every run",
            "interleaving": "one thread per run taking turns (one computes at a time), round-robin by step, "
                            "order rotated every round; per-run torch RNG state; one model per run (frozen base "
                            "tensors shared unless the strategy changes them)",
            "timing": "on_step_start -> on_step_end; first and last steps dropped; ratio = median over steps of "
                      "t_run[k] / t_lora[k]",
            "memory": "per run, max over steps of weights + grads + optimizer state + strategy-held tensors + "
                      "autograd-saved activations (unique storages; loram's stash of removed weights apart)",
        },
        "headline_clock": args.clock,
        "machine": common.machine_with_load(load_avg_start),
        "base_eval": base_eval,
        "majority_baseline": task.majority_baseline(),
        "runs": [run_record(r, ref) for r in runs],
        "train_wall_s": train_wall_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    result["wall_s"] = time.perf_counter() - t_start
    result["summary"] = summary_line(result)
    md = markdown_table(result)
    if args.markdown:
        print(md)
    common.save_result(args.out, "strategies", result, plot, texts={"table.md": md})
    return result


if __name__ == "__main__":
    main()
