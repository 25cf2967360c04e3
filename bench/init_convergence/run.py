"""Do data-driven initializations speed up training? LoRA vs rsLoRA, LoRA-GA, EVA, PiSSA, LoRA-SB.

LoRA-GA (Wang et al., NeurIPS 2024, arXiv 2407.05000) claims 2–4× faster convergence than vanilla LoRA
(its Fig. 1 and Sec. 4: "converges 2–4 times faster"); PiSSA (arXiv 2404.02948), EVA (arXiv 2410.07170)
and LoRA-SB (arXiv 2411.19557) claim faster convergence too. This benchmark measures it at small scale.

Setup: the embedded SmolLM2-135M (``lorakit.models.load_model()``), the default task (3-class tweet
sentiment, ``load_task("sentiment")``, next-token label scoring via ``make_objective``), adapters on
q_proj,v_proj (``--targets``), rank 8, the same LR, schedule (AdamW, 5% warmup, cosine, clip 1.0),
steps and data order (``TrainConfig(seed)``: the trainer's seeded index stream) for every variant, one
torch thread. Variants (``VARIANTS`` below):

- ``lora``: LoRA, α = 2r (s = 2; the LoRA setting whose LR 1e-3 was tuned in bench/forms_quality), Kaiming A, B = 0.
- ``rslora``: the same with rsLoRA scaling s = α/√r.
- ``lora_ga``, ``lora_ga_peft``: LoRA-GA, official formula and PEFT's variant, with rsLoRA (the paper's setting).
- ``eva``: EVA (ρ = 2, τ = 0.99), ranks redistributed under the same total budget, α = 2r (rescaled per layer).
- ``pissa``: PiSSA (exact SVD), α = 2r.
- ``lora_sb``: LoRA-SB, the LoRA-XS form (frozen A, B; trained R ∈ R^{r_sb×r_sb}) with r_sb chosen so that
  r_sb² ≈ the mean over target layers of LoRA's r(m+n): the same trainable budget (r_sb = 88 for
  q_proj,v_proj of SmolLM2, 1.008× LoRA's parameters). The init's η₁ = lr / warmup_steps as the paper.
- ``lora_sb_r8`` (not in the default set): LoRA-SB at rank 8 (r² = 64 parameters per layer), its own budget row.

Data-driven inits get the same calibration data: ``--calib-batches`` batches of ``--calib-batch-size``
examples drawn (seeded) from the TRAIN split, and ``objective.loss`` (the classification loss) as
``loss_fn``. The init cost is the wall (and CPU) time of ``lorakit.attach`` (calibration + SVDs + base
rewrite), reported in seconds, in equivalent training steps and relative to one epoch of the train split
(``ceil(n_train / batch_size)`` steps at LoRA's measured time per step, same seed).

Metric: per-step train losses (``TrainResult.losses``), smoothed by a bias-corrected EMA (``--ema``).
Target = vanilla LoRA's smoothed loss at its last step (same seed); "steps to target" = the first step
where a variant's smoothed loss is ≤ the target (None if never); speed-up = LoRA's own first step at its
target / the variant's. Eval accuracy (and label cross-entropy) at the end on the first ``--n-eval``
examples of the eval split (fixed subset). The base weights are restored after each run (base-rewriting
inits) and checked.

Writes ``<out>/init_convergence.json`` and ``<out>/init_convergence.png`` and prints one summary line.

    python bench/init_convergence/run.py          # 7 variants x 2 seeds x 30 steps (~30 min at ~3.5 s CPU/step)
    python bench/init_convergence/run.py --quick      # smoke: 3 steps, 1 seed, tiny calibration
    python bench/init_convergence/run.py --variants lora,lora_ga --seeds 0,1,2 --steps 100
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
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
PAPER_SPEEDUP = (2.0, 4.0)  # LoRA-GA: "converges 2-4 times faster than vanilla LoRA" (abstract, Fig. 1)
DEFAULT_VARIANTS = ("lora", "rslora", "lora_ga", "lora_ga_peft", "eva", "pissa", "lora_sb")

common.quiet_warnings()


# ------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    form: str
    init: str
    form_args: Callable[[argparse.Namespace, int], dict[str, Any]]  # (args, r_sb) -> form_args
    init_args: Callable[[argparse.Namespace, int], dict[str, Any]]  # (args, warmup steps) -> init_args
    note: str


def _lora(a: argparse.Namespace, _: int, **extra: Any) -> dict[str, Any]:
    return {"r": a.rank, "alpha": 2.0 * a.rank, **extra}


VARIANTS: dict[str, Variant] = {
    "lora": Variant("lora", "default", _lora, lambda a, w: {},
                    "LoRA (Hu et al. 2021): A Kaiming-uniform, B = 0, alpha = 2r"),
    "rslora": Variant("lora", "default", lambda a, r: _lora(a, r, rslora=True), lambda a, w: {},
                      "rsLoRA (Kalajdzievski 2023): s = alpha/sqrt(r), alpha = 2r"),
    "lora_ga": Variant("lora", "lora_ga", lambda a, r: _lora(a, r, rslora=True),
                       lambda a, w: {"variant": "official"},
                       "LoRA-GA official formula (A = c V_r^T, B = c U_{r:2r}, gamma 16), rsLoRA, base offset"),
    "lora_ga_peft": Variant("lora", "lora_ga", lambda a, r: _lora(a, r, rslora=True),
                            lambda a, w: {"variant": "peft"},
                            "LoRA-GA as PEFT 0.21.2 (A = V_r^T, B = c U_{r:2r} S_{r:2r}), rsLoRA, base offset"),
    "eva": Variant("lora", "eva", _lora, lambda a, w: {"max_batches": a.eva_max_batches, "progress": False},
                   "EVA: rho 2, tau 0.99, ranks redistributed under the total budget, alpha rescaled (PEFT)"),
    "pissa": Variant("lora", "pissa", _lora, lambda a, w: {},
                     "PiSSA: principal SVD part in the adapter, residual base (exact SVD), alpha = 2r"),
    "lora_sb": Variant("lora_xs", "lora_sb", lambda a, r: {"r": r}, lambda a, w: {"lr": a.lr, "warmup_steps": w},
                       "LoRA-SB: LoRA-XS form (only R r_sb x r_sb trains), r_sb^2 ~ LoRA's r(m+n) per layer; "
                       "sign update, eta_1 = lr / warmup, alpha = r_sb (s = 1), no base offset (paper)"),
    "lora_sb_r8": Variant("lora_xs", "lora_sb", lambda a, r: {"r": a.rank},
                          lambda a, w: {"lr": a.lr, "warmup_steps": w},
                          "LoRA-SB at rank r (r^2 params per layer): its own, much smaller budget"),
}


def lora_sb_rank(model: nn.Module, targets: list[str], r: int) -> tuple[int, dict[str, Any]]:
    """r_sb with r_sb² ≈ mean over target layers of r(m+n) (LoRA's per-layer parameters)."""
    import lorakit

    paths = lorakit.find_targets(model, lorakit.AdapterSpec(targets=targets))
    shapes = [tuple(model.get_submodule(p).weight.shape) for p in paths]
    lora_params = [r * (m + n) for m, n in shapes]
    r_sb = round(math.sqrt(statistics.fmean(lora_params)))
    r_sb = min(r_sb, min(min(s) for s in shapes))
    return r_sb, {"r_sb": r_sb, "lora_params_per_layer": sorted(set(lora_params)),
                  "lora_sb_params_per_layer": r_sb * r_sb, "layers": len(paths),
                  "rule": "r_sb = round(sqrt(mean over target layers of r(m+n))), capped at min(m, n)"}


# ------------------------------------------------------------------------------ helpers
def ema(xs: list[float], beta: float) -> list[float]:
    """Bias-corrected exponential moving average (as Adam's m̂)."""
    out, m = [], 0.0
    for t, x in enumerate(xs, 1):
        m = beta * m + (1 - beta) * x
        out.append(m / (1 - beta**t))
    return out


def first_reach(curve: list[float], target: float) -> int | None:
    """1-based first step whose value is <= target."""
    return next((t for t, v in enumerate(curve, 1) if v <= target), None)


class _StepBar(Strategy):
    name = "bench_step_bar"

    def __init__(self, bar: tqdm, label: str) -> None:
        self.bar, self.label = bar, label

    def on_step_end(self, trainer: Any, step: int, logs: dict[str, Any]) -> None:
        self.bar.update()
        self.bar.set_postfix_str(f"{self.label} loss {logs['loss']:.3f}")


def snapshot(model: nn.Module, targets: list[str]) -> dict[str, torch.Tensor]:
    import lorakit

    paths = lorakit.find_targets(model, lorakit.AdapterSpec(targets=targets))
    return {p: model.get_submodule(p).weight.detach().clone() for p in paths}


def restore(model: nn.Module, base: dict[str, torch.Tensor]) -> float:
    """Copy the original target weights back; returns max |W - W0| found before restoring."""
    worst = 0.0
    with torch.no_grad():
        for path, w0 in base.items():
            w = model.get_submodule(path).weight
            worst = max(worst, (w - w0).abs().max().item())
            w.copy_(w0)
    return worst


def calibration_batches(task: Any, objective: Any, n: int, size: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(10_000 + seed)
    idx = rng.sample(range(len(task.train)), n * size)
    return [objective.collate([task.train[i] for i in idx[k * size:(k + 1) * size]]) for k in range(n)]


# ------------------------------------------------------------------------------ one run
def run_one(model: nn.Module, name: str, seed: int, r_sb: int, args: argparse.Namespace, objective: Any,
            task: Any, eval_data: list, calib: list, accelerator: Any, bar: tqdm) -> dict[str, Any]:
    import lorakit
    from lorakit.core.inject import specs
    from lorakit.train import TrainConfig, Trainer

    v = VARIANTS[name]
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed,
                         schedule="cosine", warmup_ratio=0.05, max_grad_norm=1.0, log_every=1,
                         eval_at_start=False, progress=False)
    warmup = max(config.warmup, 1)
    form_args, init_args = v.form_args(args, r_sb), v.init_args(args, warmup)
    spec = lorakit.AdapterSpec(form=v.form, form_args=form_args, init=v.init, init_args=init_args,
                               targets=args.targets)
    key = f"{name}_s{seed}"
    data_driven = v.init not in ("default", "pissa")
    bar.set_postfix_str(f"{key}: init")
    w0, c0 = time.perf_counter(), time.process_time()
    lorakit.attach(model, spec, name=key, seed=seed, batches=calib if data_driven else None,
                   loss_fn=objective.loss if data_driven else None)
    init_wall, init_cpu = time.perf_counter() - w0, time.process_time() - c0
    lorakit.set_active(model, key)
    params = lorakit.mark_trainable(model, key)
    trainable = sum(p.numel() for p in params)
    module_args = specs(model)[key].module_args or {}
    eva_ranks = None
    if v.init == "eva":
        ranks = [a.get("r") for a in module_args.values() if isinstance(a, dict) and "r" in a]
        eva_ranks = {"per_module_overrides": len(module_args), "min": min(ranks, default=None),
                     "max": max(ranks, default=None),
                     "removed": len(specs(model)[key].exclude or ()) if hasattr(specs(model)[key], "exclude")
                     else None}
    trainer = Trainer(model, task.train, objective.collate, objective.loss, config,
                      eval_fn=lambda m: objective.evaluate(m, eval_data), strategies=[_StepBar(bar, key)],
                      accelerator=accelerator)
    w1, c1 = time.perf_counter(), time.process_time()
    res = trainer.train(resume=False)
    train_wall, train_cpu = time.perf_counter() - w1, time.process_time() - c1
    lorakit.delete(model, key)
    drift = restore(model, BASE)
    return {"variant": name, "seed": seed, "form": v.form, "init": v.init, "form_args": form_args,
            "init_args": init_args, "note": v.note, "trainable_params": trainable,
            "calibration": (f"{len(calib)} batches x {args.calib_batch_size} (train split)"
                            if data_driven else None),
            "init_wall_s": init_wall, "init_cpu_s": init_cpu, "eva_ranks": eva_ranks,
            "losses": list(res.losses), "final_loss": res.final_loss,
            "train_wall_s": res.train_seconds, "train_and_eval_wall_s": train_wall,
            "train_and_eval_cpu_s": train_cpu, "step_wall_s": res.train_seconds / res.steps,
            "eval_after": res.eval_after, "accuracy": res.eval_after.get("accuracy"),
            "base_max_abs_change_before_restore": drift, "error": None}


BASE: dict[str, torch.Tensor] = {}


# ------------------------------------------------------------------------------ analysis
def analyse(runs: list[dict[str, Any]], args: argparse.Namespace, n_train: int) -> dict[str, Any]:
    epoch_steps = math.ceil(n_train / args.batch_size)
    refs = {r["seed"]: r for r in runs if r["variant"] == REFERENCE and not r["error"]}
    for r in runs:
        if r["error"]:
            continue
        r["ema"] = ema(r["losses"], args.ema)
        ref = refs.get(r["seed"])
        step_s = (ref or r)["step_wall_s"]
        r["epoch_steps"] = epoch_steps
        r["epoch_wall_s_est"] = epoch_steps * step_s
        r["init_over_epoch"] = r["init_wall_s"] / r["epoch_wall_s_est"]
        r["init_in_steps"] = r["init_wall_s"] / step_s
        if ref is None:
            r["target"] = r["steps_to_target"] = r["speedup_vs_lora"] = None
            continue
        ref_ema = ema(ref["losses"], args.ema)
        target = ref_ema[-1]
        ref_steps = first_reach(ref_ema, target)
        r["target"] = target
        r["steps_to_target"] = first_reach(r["ema"], target)
        r["lora_steps_to_target"] = ref_steps
        r["speedup_vs_lora"] = (ref_steps / r["steps_to_target"]) if r["steps_to_target"] else None
        r["final_ema"] = r["ema"][-1]
    table = []
    for name in dict.fromkeys(r["variant"] for r in runs):
        rs = [r for r in runs if r["variant"] == name and not r["error"]]
        errs = [r["error"] for r in runs if r["variant"] == name and r["error"]]
        if not rs:
            table.append({"variant": name, "error": errs[0] if errs else "no run"})
            continue

        def mean(key: str, rs: list = rs) -> float | None:
            xs = [r[key] for r in rs if r.get(key) is not None]
            return statistics.fmean(xs) if xs else None

        table.append({
            "variant": name, "trainable_params": rs[0]["trainable_params"], "seeds": [r["seed"] for r in rs],
            "init_wall_s": mean("init_wall_s"), "init_over_epoch": mean("init_over_epoch"),
            "init_in_steps": mean("init_in_steps"),
            "steps_to_target": [r.get("steps_to_target") for r in rs],
            "lora_steps_to_target": [r.get("lora_steps_to_target") for r in rs],
            "speedup_vs_lora": [r.get("speedup_vs_lora") for r in rs],
            "final_loss_ema": mean("final_ema"), "final_loss_last": mean("final_loss"),
            "accuracy": mean("accuracy"), "accuracy_per_seed": [r["accuracy"] for r in rs],
            "step_wall_s": mean("step_wall_s"), "errors": errs,
        })
    return {"epoch_steps": epoch_steps, "table": table}


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec) if isinstance(x, float) else str(x)


def summary_line(result: dict[str, Any]) -> str:
    cfg = result["config"]
    parts = []
    for row in result["analysis"]["table"]:
        if row.get("error"):
            parts.append(f"{row['variant']} FAILED")
            continue
        steps = "/".join("never" if s is None else str(s) for s in row["steps_to_target"])
        parts.append(f"{row['variant']} {steps} steps, loss {_fmt(row['final_loss_ema'], '.3f')}, "
                     f"acc {_fmt(row['accuracy'])}, init {_fmt(row['init_wall_s'], '.1f')} s "
                     f"({_fmt(row['init_in_steps'], '.1f')} steps)")
    return (f"init_convergence: {cfg['steps']} steps x {cfg['batch_size']}, seeds {cfg['seeds']}, lr {cfg['lr']:g}, "
            f"steps to LoRA's final EMA loss: " + " | ".join(parts)
            + f" (LoRA-GA paper: {PAPER_SPEEDUP[0]:g}-{PAPER_SPEEDUP[1]:g}x faster; "
            f"1 epoch = {result['analysis']['epoch_steps']} steps)")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result["runs"] if not r["error"]]
    names = list(dict.fromkeys(r["variant"] for r in runs))
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(14, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    for n in names:
        rs = [r for r in runs if r["variant"] == n]
        for r in rs:
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], color=colors[n], alpha=0.12, lw=0.8)
        curves = [r["ema"] for r in rs]
        mean_curve = [statistics.fmean(c) for c in zip(*curves)]
        ax.plot(range(1, len(mean_curve) + 1), mean_curve, color=colors[n], lw=2 if n == REFERENCE else 1.5,
                label=n, ls="-" if n == REFERENCE or "ga" in n else "--")
    targets = [r["target"] for r in runs if r["variant"] == REFERENCE and r.get("target") is not None]
    if targets:
        ax.axhline(statistics.fmean(targets), color="k", ls=":", lw=1, label="LoRA final (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel(f"train loss (faint: raw; bold: EMA beta={result['config']['ema']}, mean over seeds)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    cfg = result["config"]
    ax.set_title(f"SmolLM2-135M, sentiment, {','.join(cfg['targets'])}, r={cfg['rank']}, lr {cfg['lr']:g}, "
                 f"batch {cfg['batch_size']}, seeds {cfg['seeds']}", fontsize=9)
    table = [row for row in result["analysis"]["table"] if not row.get("error")]
    y = range(len(table))
    init = [row["init_in_steps"] or 0 for row in table]
    bx.barh([i + 0.2 for i in y], init, height=0.4, color="tab:gray", label="init cost (equivalent train steps)")
    reach = [statistics.fmean([s if s is not None else cfg["steps"] + 1 for s in row["steps_to_target"]])
             for row in table]
    bx.barh([i - 0.2 for i in y], reach, height=0.4, color=[colors[row["variant"]] for row in table],
            label=f"steps to LoRA's final loss (mean; {cfg['steps'] + 1} = never)")
    bx.set_yticks(list(y), [row["variant"] for row in table])
    bx.axvline(cfg["steps"], color="k", lw=0.8)
    bx.set_xlabel("steps")
    bx.legend(fontsize=8)
    fig.suptitle("init_convergence: does a data-driven init reach LoRA's final loss sooner?", fontsize=11)
    common.save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.make_parser(__doc__)
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {', '.join(VARIANTS)}; 'lora' always runs (the reference)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (adapter init, data order, calibration)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3, help="one LR for every variant")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--calib-batch-size", type=int, default=8)
    p.add_argument("--eva-max-batches", type=int, default=32,
                   help="cap on EVA's calibration forwards (it cycles the batches until its PCA converges)")
    p.add_argument("--n-eval", type=int, default=100, help="eval examples (the same first N for every run)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--ema", type=float, default=0.9, help="EMA beta of the smoothed loss curves")
    p.add_argument("--quick", action="store_true", help="smoke test: 3 steps, seed 0, 2x4 calibration, 16 eval")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.seeds, args.calib_batches, args.calib_batch_size = 3, "0", 2, 4
        args.n_eval, args.eva_max_batches = 16, 4
    if min(args.steps, args.batch_size, args.rank, args.calib_batches, args.calib_batch_size, args.n_eval) < 1:
        p.error("--steps, --batch-size, --rank, --calib-* and --n-eval must be >= 1")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if REFERENCE not in args.variants:
        args.variants.insert(0, REFERENCE)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    common.pin_threads()
    args.out.mkdir(parents=True, exist_ok=True)

    from accelerate import Accelerator

    from lorakit.core import registry
    from lorakit.data import load_task
    from lorakit.models import load_model
    from lorakit.train.objectives import make_objective

    catalog_inits = {e.name for e in registry.entries("init")}
    skipped = {n: f"init {VARIANTS[n].init!r} is not in the catalog (lorakit methods --axis init)"
               for n in args.variants if VARIANTS[n].init not in catalog_inits}
    variants = [n for n in args.variants if n not in skipped]

    model, tokenizer = load_model(progress=False)
    model.requires_grad_(False)
    task = load_task("sentiment", seed=0)
    objective = make_objective(task, tokenizer, max_length=args.max_length)
    eval_data = sorted(task.eval[: args.n_eval], key=lambda ex: len(objective.collate.encode_prompt(ex.text)))
    BASE.update(snapshot(model, args.targets))
    r_sb, budget = lora_sb_rank(model, args.targets, args.rank)
    accelerator = Accelerator(cpu=True)
    load_start = os.getloadavg()
    with torch.no_grad():
        model.eval()
        base_eval = objective.evaluate(model, eval_data)

    runs: list[dict[str, Any]] = []
    bar = tqdm(total=len(variants) * len(args.seeds) * args.steps, desc="init_convergence", unit="step",
               file=sys.stderr, dynamic_ncols=True)
    for seed in args.seeds:
        calib = calibration_batches(task, objective, args.calib_batches, args.calib_batch_size, seed)
        for name in variants:
            try:
                runs.append(run_one(model, name, seed, r_sb, args, objective, task, eval_data, calib,
                                    accelerator, bar))
            except Exception as e:  # one failing variant must not stop the others; it is reported
                traceback.print_exc(file=sys.stderr)
                from lorakit.core.inject import specs

                key = f"{name}_s{seed}"
                if key in specs(model):
                    import lorakit

                    lorakit.delete(model, key)
                restore(model, BASE)
                runs.append({"variant": name, "seed": seed, "error": f"{type(e).__name__}: {e}"})
    bar.close()

    result: dict[str, Any] = {
        "benchmark": "init_convergence",
        "config": {
            "model": "SmolLM2-135M-Instruct (embedded, lorakit.models.load_model())", "task": task.name,
            "n_train": len(task.train), "n_eval": len(eval_data), "eval_subset": "first n_eval of the eval split",
            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "rank": args.rank,
            "targets": args.targets, "seeds": args.seeds, "max_length": args.max_length, "ema": args.ema,
            "variants_requested": args.variants, "variants_run": variants, "variants_skipped": skipped,
            "calibration": {"batches": args.calib_batches, "batch_size": args.calib_batch_size,
                            "source": "train split, seeded sample (random.Random(10000 + seed)), same for "
                                      "every data-driven init of a seed", "loss_fn": "objective.loss",
                            "eva_max_batches": args.eva_max_batches},
            "budget": budget,
            "optimizer": "AdamW (no weight decay), 5% linear warmup, cosine to 0, grad-norm clip 1.0",
            "data_order": "TrainConfig(seed=seed): lorakit's seeded IndexStream, identical for all variants",
            "quick": args.quick, "threads": torch.get_num_threads(),
            "metric": "first step where the bias-corrected EMA of the train loss <= LoRA's EMA at its last "
                      "step (same seed); speedup = LoRA's own first step at that value / the variant's",
            "init_cost": "wall time of lorakit.attach (calibration, SVDs, base rewrite); epoch = "
                         "ceil(n_train / batch_size) steps at LoRA's measured wall time per step",
        },
        "machine": common.machine_with_load(load_start),
        "base_eval": base_eval, "majority_baseline": task.majority_baseline(),
        "runs": runs,
    }
    result["analysis"] = analyse(runs, args, len(task.train))
    result["wall_s"] = time.perf_counter() - t_start
    result["summary"] = summary_line(result)
    common.save_result(args.out, "init_convergence", result, plot)


if __name__ == "__main__":
    main()
