"""Every adapter form of the catalog fine-tuned the same way: trainable parameters, accuracy, step time.

Each form in ``lorakit.core.registry.entries("form")`` (new forms join automatically) is attached to the
embedded SmolLM2-135M (``lorakit.models.load_model()``) on the same targets (q_proj, v_proj) and trained
with ``lorakit.train.Trainer`` on the default task (3-class tweet sentiment, ``load_task("sentiment")``,
next-token label scoring via ``make_objective``) for the same steps, batch size, seed and data order
(the trainer's seeded index stream), with AdamW + 5% warmup + cosine decay and gradient clipping at 1.
All forms share one base model (one adapter per form, only the running one active), one torch thread.

Per form: trainable parameters, eval accuracy (and label cross-entropy) before and after training on
the same eval subset, the final train loss (last step and mean of the last 10), and the median training
step time relative to LoRA, measured in the same process:

- the runs are **interleaved step by step**: each form's Trainer runs in its own thread, and a turn
  table lets exactly one of them compute at a time, stepping through the runs round-robin with the
  order rotated every round (step k of every form happens within the same round, so a change of
  machine load hits all forms alike). The threads only take turns; nothing runs concurrently.
- a step is timed from the trainer's ``on_step_start`` to its ``on_step_end`` hook (forward, backward,
  clipping, optimizer and scheduler step, strategy hooks); the first step (optimizer state allocation)
  is dropped. Headline clock: process CPU time (robust to other jobs on the cores); wall time is
  recorded too. The ratio to LoRA is the median over steps k of t_form[k] / t_lora[k] (paired: the two
  steps are at most one round apart).
- each run keeps its own torch RNG stream (saved and restored around its steps), so a form's result
  (dropout masks, routing noise) does not depend on which other forms run beside it.

Hyper-parameters: each form's paper-default ``Args`` where they fit a 135M model, a shared rank
(``--rank``, 8) where the form has one, and a per-form learning rate from a sweep on this task, documented
in ``SETUPS`` below. The sweep selected on eval examples [0, 100); the reported accuracy uses the next
``--n-eval`` examples (``--eval-offset`` 100), so the LR choice is not fitted to the reported numbers.
Forms without an entry there run with their default ``Args`` (r set to ``--rank`` if they have an ``r``)
at ``DEFAULT_LR`` and are marked "untuned".

Budget: the default (32 steps x batch 4, 100 eval examples, 17 forms) costs about 17 x 32 x 1.4 s of
training plus 21 evaluations of ~15 s, about 20 minutes of one core; more load means more wall time. At
this budget (128 training examples per form) most forms have only learned to answer with a label word
at about the label prior (eval cross-entropy near ln 3); ``--steps 60 --batch-size 8 --n-eval 200``
(about 4x the cost) is where LoRA reaches ~0.65.

Outputs ``<out>/forms_quality.json`` and ``<out>/forms_quality.png`` (accuracy after training vs
trainable parameters, log x; step time vs LoRA) and prints one summary line.

    python bench/forms_quality/run.py                        # all forms (~20 min of one core)
    python bench/forms_quality/run.py --quick                # smoke test: every form, 3 steps
    python bench/forms_quality/run.py --forms lora,dora,shira
    python bench/forms_quality/run.py --forms nola --lr-mults 0.3,1,3 --eval-offset 0   # LR sweep (SETUPS)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import resource
import statistics
import sys
import time
import traceback
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
REFERENCE = "lora"  # step times are reported relative to this form (always run)
DEFAULT_LR = 1e-3  # forms missing from SETUPS

common.quiet_warnings()


# ------------------------------------------------------------------------------ per-form setup
@dataclass(frozen=True)
class Setup:
    """How one form is trained here: its ``Args`` overrides (given the shared rank), LR and why."""

    args: Callable[[int], dict[str, Any]]
    lr: float
    lr_source: str
    args_note: str = ""
    strategies: tuple[str, ...] = ()  # catalog strategies that are part of the form's method


# Learning rates: from an LR sweep run with this script (``--lr-mults 0.3,1,3`` around a first guess, then
# single ``--lr`` runs past any edge; 32 steps x batch 4, seed 0, the default settings), picked by the eval
# label cross-entropy on eval examples [0, 100) -- the reported accuracy uses the disjoint examples from
# ``--eval-offset`` 100 on. Each entry lists "LR: eval CE" of the sweep (ln 3 = 1.10 is a uniform guess over
# the three labels); JSONs in results/lr_sweep_{a..e}/. Paper LRs are for 7B models over 1-5 epochs and are
# 10-100x too small for 32 steps here (e.g. Bone/MiSS 2e-5, RandLoRA 1e-4, SLoRA 2e-4); they are named for
# reference only where the sweep moved away from them.
SETUPS: dict[str, Setup] = {
    "lora": Setup(lambda r: {"r": r, "alpha": 2.0 * r}, 1e-3,
                  "sweep 3e-4: 1.62, 1e-3: 1.04, 3e-3: 1.11", "alpha = 2r (lorakit finetune default, s = 2)"),
    "ffa": Setup(lambda r: {"r": r, "alpha": 2.0 * r}, 9e-3,
                 "sweep 9e-4: 1.30, 3e-3: 1.09, 9e-3: 1.09 (flat at the top; the FFA paper also tunes a "
                 "larger LR than LoRA's)", "as lora, A frozen at its seeded init"),
    "dora": Setup(lambda r: {"r": r, "alpha": 2.0 * r}, 1e-3,
                  "sweep 3e-4: 1.60, 1e-3: 1.05, 3e-3: 1.11 (the paper uses LoRA's LR)",
                  "alpha = 2r and dropout 0.05 as the paper's r=32/alpha=64 runs"),
    "lora_xs": Setup(lambda r: {"r": r}, 3e-2,
                     "sweep 9e-4: 3.27, 3e-3: 1.82, 9e-3: 1.13, 3e-2: 0.99, 1e-1: 1.80 (paper: 4e-3, 7B)",
                     "alpha = r (paper), R ~ N(0, 1e-5^2); only R (r x r) trains"),
    "slora": Setup(lambda r: {"r": r, "alpha": float(r)}, 3e-3,
                   "sweep 3e-4: 3.05, 1e-3: 1.10, 3e-3: 1.04, 1e-2: 1.04 (paper: 2e-4, 7B)",
                   "alpha = r as the paper's r = alpha = 128"),
    "nlora": Setup(lambda r: {"r": r, "alpha": float(r)}, 1e-3,
                   "sweep 3e-4: 2.61, 1e-3: 1.05, 3e-3: 1.11 (paper: 2e-4, 7B)",
                   "alpha = r as the paper; Nystrom init, not the identity at init"),
    "inttune": Setup(lambda r: {"r": r, "alpha": float(r)}, 3e-2,
                     "sweep 3e-3: 3.67, 1e-2: 1.27, 3e-2: 1.22, 1e-1: 1.27",
                     "alpha = r; NLoRA init, only the r x r middle matrix trains"),
    "dylora": Setup(lambda r: {"r": r, "alpha": 2.0 * r}, 1e-3, "LoRA's (same factors, init and alpha)",
                    "r_max = r, alpha = 2r as LoRA, evaluated at b = r_max; trained with the dylora "
                    "rank-sampling strategy (b ~ U{1..r} per step)", strategies=("dylora",)),
    "loldu": Setup(lambda r: {"r": r}, 0.3,
                   "sweep 9e-3: 4.11, 3e-2: 2.72, 9e-2: 1.53, 3e-1: 1.22, 1.0: 5.16 (diverges)",
                   "alpha = 1 (official default, s = 1/r); only the r diagonal entries z train"),
    "block_lora": Setup(lambda r: {"r": r}, 3e-2,
                        "sweep 3e-3: 1.15, 1e-2: 1.05, 3e-2: 0.98, 1e-1: 1.10",
                        "alpha = 1, dropout 0.25, n_blk = 8 (CLIP-LoRA/Block-LoRA defaults), so s = 1/r"),
    "bone": Setup(lambda r: {"r": r}, 3e-3,
                  "sweep 3e-4: 1.06, 1e-3: 1.14, 3e-3: 0.98, 1e-2: 1.46 (paper: 2e-5, 7B)",
                  "block size r (paper default 64)"),
    "miss": Setup(lambda r: {"r": r}, 3e-4,
                  "sweep 9e-5: 1.90, 3e-4: 1.09, 9e-4: 1.10 (paper: 2e-5, 7B)",
                  "shard size r (paper default 64)"),
    "shira": Setup(lambda r: {"r": r}, 3e-3,
                   "sweep 9e-5: 3.97, 3e-4: 2.36, 9e-4: 1.20, 3e-3: 1.07, 1e-2: 1.14",
                   "k = r(m+n) entries (LoRA-r budget), random mask"),
    "flylora": Setup(lambda r: {"k": r}, 1e-2,
                     "sweep 3e-4: 2.46, 1e-3: 1.18, 3e-3: 1.07, 1e-2: 1.05, 3e-2: 1.06 (paper: 3e-4, 8B)",
                     "paper r = 32 experts, k = shared rank active (paper k = 8), alpha = 64"),
    "smora": Setup(lambda r: {"k": r}, 3e-3,
                   "sweep 3e-4: 1.28, 1e-3: 1.06, 3e-3: 0.98, 1e-2: 1.11 (paper: 1e-4, 7B)",
                   "paper r = 64 rank-experts, k = shared rank active (paper k = 8), alpha = 16"),
    "nola": Setup(lambda r: {"r": r}, 3e-3,
                  "sweep 1e-3: 1.78, 3e-3: 1.02, 1e-2: 1.03, 3e-2: 1.05 (paper: 5e-3, GPT-2 M)",
                  "alpha = r, k = l = 512 bases (paper's GPT-2 setting)"),
    "randlora": Setup(lambda r: {}, 3e-4,
                      "sweep 9e-5: 1.62, 3e-4: 1.05, 9e-4: 1.06 (official: 1e-4)",
                      "PEFT defaults r = 32, alpha = 640 (s = 20): its r is a basis rank, not the "
                      "update's (full rank); r = 32 gives about LoRA-8's parameter count here"),
}


def setup_for(form: str, rank: int) -> tuple[dict[str, Any], Setup | None]:
    """(form_args, Setup or None for a form this script has no entry for)."""
    from lorakit.core import registry

    s = SETUPS.get(form)
    if s is not None:
        return s.args(rank), s
    fields = {f.name for f in dataclasses.fields(registry.get("form", form).Args)}
    return ({"r": rank} if "r" in fields else {}), None


# ------------------------------------------------------------------------------ turn taking
class _TurnEnter(Strategy):
    """First strategy of a run: waits for the run's turn, activates its adapter, starts the clocks."""

    name = "bench_turn_enter"

    def __init__(self, run: Run, table: common.TurnTable) -> None:
        self.run, self.table = run, table

    def on_step_start(self, trainer: Any, step: int) -> None:
        import lorakit

        self.table.wait(self.run.key)
        lorakit.set_active(trainer.model, self.run.key)
        trainer.model.train()  # another run's final evaluation may have left the model in eval mode
        if self.run.rng_state is not None:
            torch.set_rng_state(self.run.rng_state)
        self.run.t0 = {c: clock() for c, clock in common.CLOCKS.items()}


class _TurnExit(Strategy):
    """Last strategy of a run: stops the clocks and gives the turn on (kept after the final step, so
    the trainer's final evaluation still runs alone)."""

    name = "bench_turn_exit"

    def __init__(self, run: Run, table: common.TurnTable, bar: tqdm) -> None:
        self.run, self.table, self.bar = run, table, bar

    def on_step_end(self, trainer: Any, step: int, logs: dict[str, Any]) -> None:
        for c, clock in common.CLOCKS.items():
            self.run.step_times[c].append(clock() - self.run.t0[c])
        self.run.rng_state = torch.get_rng_state()
        self.bar.update()
        if step < trainer.config.steps:
            self.table.give_on(self.run.key)
        else:
            self.bar.set_postfix_str(f"evaluating {self.run.label}")


@dataclass
class Run:
    key: str  # adapter name
    form: str
    label: str
    lr: float
    lr_mult: float
    lr_source: str
    form_args: dict[str, Any]
    args_note: str
    strategy_names: tuple[str, ...]
    identity_at_init: bool
    trainable: int = 0
    trainer: Any = None
    result: Any = None
    error: str | None = None
    rng_state: torch.Tensor | None = None
    t0: dict[str, float] = field(default_factory=dict)
    step_times: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in common.CLOCKS})


# ------------------------------------------------------------------------------ building
def plan_runs(forms: list[str], rank: int, lr_mults: list[float], lr_over: dict[str, float]) -> list[Run]:
    from lorakit.core import registry
    from lorakit.core.caps import Cap

    runs = []
    for form in forms:
        args, setup = setup_for(form, rank)
        base_lr = lr_over.get(form, setup.lr if setup else DEFAULT_LR)
        source = ("--lr override" if form in lr_over else setup.lr_source if setup
                  else "untuned default: form not in this script's SETUPS table")
        for mult in lr_mults:
            label = form if len(lr_mults) == 1 else f"{form}@x{mult:g}"
            runs.append(Run(key=f"run{len(runs)}_{form}", form=form, label=label, lr=base_lr * mult,
                            lr_mult=mult, lr_source=source, form_args=args,
                            args_note=setup.args_note if setup else "default Args",
                            strategy_names=setup.strategies if setup else (),
                            identity_at_init=Cap.IDENTITY_AT_INIT in registry.get("form", form).caps))
    return runs


def build_trainers(model: nn.Module, runs: list[Run], objective: Any, train_data: list, eval_data: list,
                   args: argparse.Namespace, table: common.TurnTable, bar: tqdm) -> None:
    """Attach every run's adapter and build its Trainer (optimizer over that adapter only)."""
    from accelerate import Accelerator

    import lorakit
    from lorakit.core import registry
    from lorakit.train import TrainConfig, Trainer

    accelerator = Accelerator(cpu=True)  # one for all trainers: they share the model
    eval_fn = lambda m: objective.evaluate(m, eval_data)
    for run in tqdm(runs, desc="attaching", unit="form", file=sys.stderr, leave=False):
        spec = lorakit.AdapterSpec(form=run.form, form_args=run.form_args, targets=args.targets)
        lorakit.attach(model, spec, name=run.key, seed=args.seed)
        params = lorakit.mark_trainable(model, run.key)  # the Trainer takes what requires grad now
        run.trainable = sum(p.numel() for p in params)
        strategies = [registry.get("strategy", s)(seed=args.seed) for s in run.strategy_names]
        config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=run.lr, seed=args.seed,
                             schedule="cosine", warmup_ratio=0.05, max_grad_norm=1.0,
                             eval_at_start=not run.identity_at_init, progress=False)
        run.trainer = Trainer(model, train_data, objective.collate, objective.loss, config, eval_fn=eval_fn,
                              strategies=[_TurnEnter(run, table), *strategies, _TurnExit(run, table, bar)],
                              accelerator=accelerator)
    # every adapter trains in its own turn, so all of them require grad from here on
    lorakit.mark_trainable(model, [r.key for r in runs])


def worker(model: nn.Module, run: Run, table: common.TurnTable, bar: tqdm) -> None:
    import lorakit

    torch.set_num_threads(1)
    try:
        table.wait(run.key)
        lorakit.set_active(model, run.key)
        if not run.identity_at_init:
            bar.set_postfix_str(f"evaluating {run.label} before training")
        run.result = run.trainer.train(resume=False)
    except Exception as e:  # one failing form must not stop the others; it is reported
        run.error = f"{type(e).__name__}: {e}"
        traceback.print_exc(file=sys.stderr)
    finally:
        table.give_on(run.key, finished=True)


def train_interleaved(model: nn.Module, runs: list[Run], table: common.TurnTable, bar: tqdm) -> None:
    common.run_in_threads(worker, [(r.key, (model, r, table, bar)) for r in runs])


# ------------------------------------------------------------------------------ results
def timing(run: Run, ref: Run | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in common.CLOCKS:
        ts = run.step_times[c][1:] or run.step_times[c]  # the first step allocates optimizer state
        entry: dict[str, Any] = {"median_s": common.median_or_none(ts), "min_s": min(ts, default=None),
                                 "max_s": max(ts, default=None), "steps_timed": len(ts)}
        if ref is not None and ref.step_times[c] and ts:
            rs = ref.step_times[c][1:] or ref.step_times[c]
            paired = [a / b for a, b in zip(ts, rs) if b > 0]
            entry["ratio_vs_lora"] = common.median_or_none(paired)
            entry["ratio_of_medians_vs_lora"] = entry["median_s"] / statistics.median(rs)
        out[c] = entry
    return out


def run_record(run: Run, ref: Run | None, base_eval: dict[str, float]) -> dict[str, Any]:
    res = run.result
    before = (res.eval_before if res and res.eval_before else base_eval if run.identity_at_init else {})
    after = res.eval_after if res else {}
    losses = list(res.losses) if res else []
    finite = all(math.isfinite(x) for x in losses)
    return {
        "form": run.form, "label": run.label, "adapter": run.key,
        "form_args": run.form_args, "args_note": run.args_note, "strategies": list(run.strategy_names),
        "lr": run.lr, "lr_mult": run.lr_mult, "lr_source": run.lr_source,
        "trainable_params": run.trainable,
        "identity_at_init": run.identity_at_init,
        "eval_before": before,
        "eval_before_source": ("measured" if res and res.eval_before else
                               "base model (form declares IDENTITY_AT_INIT)" if run.identity_at_init else None),
        "eval_after": after,
        "accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
        "eval_loss_after": after.get("loss"),
        "final_train_loss": losses[-1] if losses else None,
        "train_loss_last10": statistics.fmean(losses[-10:]) if losses and finite else None,
        "train_loss_first10": statistics.fmean(losses[:10]) if losses and finite else None,
        "losses": losses,
        "train_seconds": res.train_seconds if res else None,
        "step_time": timing(run, ref),
        "error": run.error,
    }


def summary_line(result: dict[str, Any]) -> str:
    clock = result["headline_clock"]
    cfg = result["config"]
    parts = []
    for r in result["runs"]:
        if r["error"]:
            parts.append(f"{r['label']} FAILED ({r['error'][:60]})")
            continue
        ratio = r["step_time"][clock].get("ratio_vs_lora")
        acc = r["accuracy_after"]
        parts.append(f"{r['label']} {acc:.2f} ({common.fmt_params(r['trainable_params'])} params, "
                     f"{ratio:.2f}x)" if ratio is not None else
                     f"{r['label']} {acc:.2f} ({common.fmt_params(r['trainable_params'])} params)")
    base = result["base_eval"].get("accuracy")
    return (f"forms_quality: {len(result['runs'])} runs, {cfg['steps']} steps x {cfg['batch_size']}, "
            f"{cfg['n_eval']} eval (base {base:.2f}, majority {result['majority_baseline']:.2f}; "
            f"step time vs lora, {clock} time): " + " | ".join(parts))


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if not r["error"] and r["accuracy_after"] is not None]
    clock = result["headline_clock"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 6), gridspec_kw={"width_ratios": [3, 2]})
    for r in runs:
        color = "tab:red" if r["form"] == REFERENCE else "tab:blue"
        ax.scatter(r["trainable_params"], r["accuracy_after"], color=color, zorder=3)
        ax.annotate(r["label"], (r["trainable_params"], r["accuracy_after"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
        if r["accuracy_before"] is not None and not r["identity_at_init"]:  # starts away from the base
            ax.scatter(r["trainable_params"], r["accuracy_before"], color=color, marker="x", alpha=0.5)
    ax.axhline(result["base_eval"]["accuracy"], color="0.4", ls="--", lw=1, label="base model (before)")
    ax.axhline(result["majority_baseline"], color="0.7", ls=":", lw=1, label="majority class")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel(f"eval accuracy after training ({result['config']['n_eval']} examples)")
    ax.legend(fontsize=8, loc="lower right")
    cfg = result["config"]
    ax.set_title(f"{cfg['steps']} steps x batch {cfg['batch_size']}, targets {','.join(cfg['targets'])}, "
                 f"shared rank {cfg['rank']}; x = accuracy at init (non-identity forms)", fontsize=9)
    ordered = sorted(runs, key=lambda r: r["step_time"][clock].get("ratio_vs_lora") or 0)
    ratios = [r["step_time"][clock].get("ratio_vs_lora") or 0 for r in ordered]
    bars = bx.barh([r["label"] for r in ordered], ratios,
                   color=["tab:red" if r["form"] == REFERENCE else "tab:blue" for r in ordered])
    bx.bar_label(bars, labels=[f"{x:.2f}" for x in ratios], fontsize=7, padding=2)
    bx.axvline(1.0, color="k", lw=0.8)
    bx.set_xlabel(f"median training step time / LoRA's ({clock} time, paired by step)")
    bx.tick_params(axis="y", labelsize=8)
    fig.suptitle("forms_quality: SmolLM2-135M, tweet sentiment, one torch thread, interleaved", fontsize=11)
    common.save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.make_parser(__doc__)
    p.add_argument("--forms", default="all", help="comma-separated form names, or 'all' (the catalog)")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--n-eval", type=int, default=100, help="eval examples (the same ones for every form)")
    p.add_argument("--eval-offset", type=int, default=100,
                   help="first eval example used; the LR sweep behind SETUPS selected on [0, 100), so the "
                        "default reports on disjoint examples (use 0 to rerun the sweep)")
    p.add_argument("--rank", type=int, default=8, help="shared rank for forms that have one")
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--lr", action="append", default=[], metavar="FORM=LR", help="override a form's LR")
    p.add_argument("--lr-mults", default="1",
                   help="comma-separated multipliers of each form's LR; >1 value = an LR sweep (one run each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clock", choices=tuple(common.CLOCKS), default="cpu", help="headline clock of the step ratios")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 steps of batch 4, 16 eval examples")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.n_eval = 3, 4, 16
    if args.steps < 1 or args.batch_size < 1 or args.n_eval < 1 or args.rank < 1 or args.eval_offset < 0:
        p.error("--steps, --batch-size, --n-eval and --rank must be >= 1, --eval-offset >= 0")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.lr_mults = [float(x) for x in args.lr_mults.split(",")]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    common.limit_malloc_arenas()
    common.pin_threads()
    args.out.mkdir(parents=True, exist_ok=True)

    from lorakit.core import registry
    from lorakit.data import load_task
    from lorakit.models import load_model
    from lorakit.train.objectives import make_objective

    known = [e.name for e in registry.entries("form")]
    forms = known if args.forms == "all" else [f.strip() for f in args.forms.split(",") if f.strip()]
    unknown = [f for f in forms if f not in known]
    if unknown:
        raise SystemExit(f"unknown form(s) {unknown}; known: {', '.join(known)}")
    lr_over = common.parse_lr_overrides(args.lr)
    runs = plan_runs(forms, args.rank, args.lr_mults, lr_over)
    if REFERENCE not in forms:  # the step-time reference always runs (once, at its own LR)
        runs = plan_runs([REFERENCE], args.rank, [1.0], lr_over) + runs
        runs[0].key, runs[0].label = f"ref_{REFERENCE}", REFERENCE

    model, tokenizer = load_model(progress=False)
    task = load_task("sentiment", seed=args.seed)
    objective = make_objective(task, tokenizer, max_length=args.max_length, eval_batch_size=args.eval_batch_size)
    eval_data = common.eval_slice(task, objective, args.eval_offset, args.n_eval)
    load_avg_start = os.getloadavg()

    t_eval = time.perf_counter()
    model.eval()
    with torch.no_grad():
        base_eval = objective.evaluate(model, eval_data)
    base_eval_s = time.perf_counter() - t_eval

    table = common.TurnTable([r.key for r in runs], rounds=args.steps)
    bar = tqdm(total=len(runs) * args.steps, desc="training (interleaved)", unit="step", file=sys.stderr,
               dynamic_ncols=True)
    build_trainers(model, runs, objective, task.train, eval_data, args, table, bar)
    t_train = time.perf_counter()
    train_interleaved(model, runs, table, bar)
    bar.close()
    train_wall_s = time.perf_counter() - t_train

    ref = next((r for r in runs if r.form == REFERENCE and r.lr_mult == 1.0 and not r.error),
               next((r for r in runs if r.form == REFERENCE and not r.error), None))
    records = [run_record(r, ref, base_eval) for r in runs]
    result: dict[str, Any] = {
        "benchmark": "forms_quality",
        "config": {
            "model": "SmolLM2-135M-Instruct (embedded, lorakit.models.load_model())",
            "task": task.name, "task_source": task.source, "task_license": task.license,
            "n_train": len(task.train), "n_eval": len(eval_data), "eval_offset": args.eval_offset,
            "steps": args.steps,
            "batch_size": args.batch_size, "rank": args.rank, "targets": args.targets,
            "max_length": args.max_length, "seed": args.seed, "lr_mults": args.lr_mults,
            "optimizer": "AdamW (betas 0.9/0.999, no weight decay), 5% linear warmup, cosine to 0, "
                         "grad-norm clip 1.0 (lorakit.train.TrainConfig)",
            "data_order": "lorakit.train.sampler.IndexStream(seed): the same batches for every form",
            "threads": torch.get_num_threads(),
            "interleaving": "one thread per run taking turns (one computes at a time), round-robin by "
                            "step, order rotated every round; per-run torch RNG state",
            "timing": "on_step_start -> on_step_end hooks; first step dropped; ratio = median over steps "
                      "of t_form[k] / t_lora[k]",
        },
        "headline_clock": args.clock,
        "machine": common.machine_with_load(load_avg_start),
        "catalog_forms": known,
        "base_eval": base_eval,
        "base_eval_seconds": base_eval_s,
        "majority_baseline": task.majority_baseline(),
        "eval_label_counts": {lab: sum(e.label == lab for e in eval_data) for lab in task.labels},
        "reference_run": ref.label if ref else None,
        "runs": records,
        "train_wall_s": train_wall_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    result["wall_s"] = time.perf_counter() - t_start
    result["summary"] = summary_line(result)
    common.save_result(args.out, "forms_quality", result, plot)


if __name__ == "__main__":
    main()
