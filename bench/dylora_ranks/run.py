"""DyLoRA's figure in small: eval accuracy vs serving rank, one DyLoRA adapter vs a truncated LoRA.

DyLoRA (Valipour et al., EACL 2023, arXiv 2210.07558) trains one adapter of rank r_max while sampling a
rank b ~ U{1..r_max} every step (the ``dylora`` strategy), so that every prefix B[:, :b]·A[:b] is a usable
adapter: one training run serves all ranks. The paper's baseline is a LoRA trained at r_max and cut to
rank b after training, which degrades quickly below r_max because LoRA's components carry no order.

Setup: the embedded SmolLM2-135M, q_proj and v_proj, the default task (3-class tweet sentiment, label
token scoring). Two adapters with the same rank r_max = 8, alpha = 16, LR, steps, seed and data order
(``lorakit.train.Trainer`` with AdamW, 5% warmup, cosine): LoRA (form ``lora``) and DyLoRA (form
``dylora`` + strategy ``dylora``). Then, at every serving rank b = 1..r_max, on the same eval subset:

- ``dylora``: the DyLoRA adapter at ``set_rank(b)``: ΔW_b = (α/b)·B[:, :b]·A[:b] (the paper's scale).
- ``lora_cut``: the trained LoRA cut to its first b components at the scale it was trained with,
  ΔW_b = (α/r_max)·B[:, :b]·A[:b] (the b leading terms of its own ΔW; the headline LoRA curve).
- ``lora_cut_rescaled``: the same components at DyLoRA's scale α/b (what a LoRA of rank b with the
  same α would compute); b = r_max equals ``lora_cut``, so it is not evaluated twice.
- ``lora_svd`` (``--svd``): the best rank-b approximation of the trained LoRA's ΔW per layer (SVD), a
  stronger post-hoc baseline than the paper's.
- ``lora_trained`` (``--lora-ranks 1,2,4``): LoRA adapters trained separately at those ranks (alpha = 2b),
  the "search over ranks" that DyLoRA avoids; off by default for time.

Writes ``<out>/dylora_ranks.json`` and ``<out>/dylora_ranks.png`` and prints one summary line.

    python bench/dylora_ranks/run.py            # ~15 min on 2 shared cores
    python bench/dylora_ranks/run.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/, for the shared bench/_common.py
import _common as common  # noqa: E402

HERE = Path(__file__).resolve().parent
CURVES = ("dylora", "lora_cut", "lora_cut_rescaled", "lora_svd", "lora_trained")
HEADLINE = ("dylora", "lora_cut")
# LoRA's LR in bench/forms_quality (its sweep, at 32 steps x 4: 3e-4/1e-3/3e-3 gave eval CE 1.62/1.04/1.11);
# an earlier probe at 20 steps x 8 also preferred 1e-3 to 3e-3. DyLoRA uses the same (same factors, init).
DEFAULT_LR = 1e-3

common.quiet_warnings()


# ------------------------------------------------------------------------------ training
def train_adapter(model: nn.Module, name: str, form: str, form_args: dict[str, Any], strategies: list[Any],
                  objective: Any, train_data: list, args: argparse.Namespace) -> dict[str, Any]:
    """Attach adapter ``name`` and train it alone (only it active and trainable)."""
    import lorakit
    from lorakit.train import TrainConfig, Trainer

    spec = lorakit.AdapterSpec(form=form, form_args=form_args, targets=args.targets)
    lorakit.attach(model, spec, name=name, seed=args.seed)  # activates it, marks only it trainable
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         schedule="cosine", warmup_ratio=0.05, max_grad_norm=1.0, eval_at_start=False,
                         progress=True)
    result = Trainer(model, train_data, objective.collate, objective.loss, config, strategies=strategies).train(
        resume=False)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    losses = result.losses
    return {"adapter": name, "form": form, "form_args": form_args, "strategies": [s.name for s in strategies],
            "trainable_params": trainable, "train_seconds": result.train_seconds,
            "final_train_loss": losses[-1], "train_loss_last10": statistics.fmean(losses[-10:]),
            "losses": losses}


# ------------------------------------------------------------------------------ rank-b adapters
def lora_from_factors(model: nn.Module, name: str, src: str, b: int, alpha: float,
                      factors: Callable[[nn.Module, int], tuple[torch.Tensor, torch.Tensor]],
                      targets: list[str]) -> None:
    """Attach a rank-b LoRA ``name`` whose (A, B) per layer are ``factors(src_form, b)``."""
    import lorakit
    from lorakit.core.inject import adapter_modules

    lorakit.attach(model, lorakit.AdapterSpec(form="lora", form_args={"r": b, "alpha": alpha}, targets=targets),
                   name=name, trainable=False)
    source = adapter_modules(model, src)
    with torch.no_grad():
        for path, form in adapter_modules(model, name).items():
            a, bm = factors(source[path], b)
            form.lora_A.copy_(a)
            form.lora_B.copy_(bm)


def cut(src: nn.Module, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return src.lora_A[:b], src.lora_B[:, :b]


def svd_rank(src: nn.Module, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-b factors of the source's ΔW (scale folded in; use with alpha = b, i.e. s = 1)."""
    u, s, vh = torch.linalg.svd(src.delta_weight().double(), full_matrices=False)
    root = s[:b].sqrt()
    return (root[:, None] * vh[:b]).float(), (u[:, :b] * root).float()


# ------------------------------------------------------------------------------ output
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    style = {"dylora": ("tab:green", "o", "DyLoRA (one adapter, set_rank(b), α/b)"),
             "lora_cut": ("tab:red", "s", "LoRA r=8 cut to b (α/8, as trained)"),
             "lora_cut_rescaled": ("tab:orange", "^", "LoRA r=8 cut to b, rescaled to α/b"),
             "lora_svd": ("tab:purple", "D", "LoRA r=8, best rank-b SVD of ΔW"),
             "lora_trained": ("tab:blue", "*", "LoRA trained at rank b")}
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for key, metric, label in (("accuracy", "accuracy", "eval accuracy"),
                               ("loss", "loss", "eval label cross-entropy")):
        ax = axes[0] if key == "accuracy" else axes[1]
        for curve, points in result["curves"].items():
            if not points:
                continue
            ranks = sorted(int(b) for b in points)
            color, marker, name = style[curve]
            lw = 2.2 if curve in HEADLINE else 1.2
            ax.plot(ranks, [points[str(b)][metric] for b in ranks], marker=marker, color=color, lw=lw, label=name)
        ax.axhline(result["base_eval"][metric], color="0.4", ls="--", lw=1, label="base model")
        if key == "accuracy":
            ax.axhline(result["majority_baseline"], color="0.7", ls=":", lw=1, label="majority class")
        ax.set_xlabel("serving rank b")
        ax.set_ylabel(label)
        ax.set_xticks(range(1, result["config"]["r_max"] + 1))
    axes[0].legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"dylora_ranks: SmolLM2-135M q,v, tweet sentiment, {cfg['steps']} steps x {cfg['batch_size']}, "
                 f"r_max={cfg['r_max']}, α={cfg['alpha']:g}, lr={cfg['lr']:g}, {cfg['n_eval']} eval examples",
                 fontsize=10)
    common.save_figure(fig, path, dpi=120)


def summary_line(result: dict[str, Any]) -> str:
    c = result["curves"]
    r_max = result["config"]["r_max"]
    ranks = [str(b) for b in range(1, r_max + 1)]

    def row(curve: str) -> str:
        return " ".join(f"{c[curve][b]['accuracy']:.2f}" if b in c[curve] else "-" for b in ranks)

    parts = [f"dylora {row('dylora')}", f"lora cut {row('lora_cut')}"]
    if c.get("lora_cut_rescaled"):
        parts.append(f"lora cut α/b {row('lora_cut_rescaled')}")
    if c.get("lora_svd"):
        parts.append(f"lora svd {row('lora_svd')}")
    if c.get("lora_trained"):
        parts.append("lora trained " + " ".join(f"b={b}:{v['accuracy']:.2f}" for b, v in c["lora_trained"].items()))
    gap = result["mean_gap_dylora_minus_lora_cut"]
    cfg = result["config"]
    return (f"dylora_ranks: accuracy at b=1..{r_max} ({cfg['steps']} steps x {cfg['batch_size']}, "
            f"{cfg['n_eval']} eval, base {result['base_eval']['accuracy']:.2f}): " + " | ".join(parts)
            + f" | mean dylora - lora cut over b<{r_max}: {gap:+.3f}")


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.make_parser(__doc__)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-eval", type=int, default=100, help="eval examples (the same ones at every rank)")
    p.add_argument("--eval-offset", type=int, default=100,
                   help="first eval example used ([0, 100) selected the LR in bench/forms_quality)")
    p.add_argument("--r-max", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0, help="alpha of both adapters (scale α/b, α/r_max)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--no-rescaled", action="store_true", help="skip the α/b-rescaled LoRA cut")
    p.add_argument("--svd", action="store_true", help="also evaluate the best rank-b SVD of LoRA's ΔW")
    p.add_argument("--lora-ranks", default="", help="comma-separated ranks to also train LoRA at (e.g. 1,2,4)")
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke test: 3 steps of batch 4, 16 eval examples")
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.n_eval = 3, 4, 16
    if min(args.steps, args.batch_size, args.n_eval, args.r_max) < 1 or args.eval_offset < 0:
        p.error("--steps, --batch-size, --n-eval and --r-max must be >= 1, --eval-offset >= 0")
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.lora_ranks = [int(x) for x in args.lora_ranks.split(",") if x.strip()]
    if any(not 1 <= b <= args.r_max for b in args.lora_ranks):
        p.error(f"--lora-ranks must lie in 1..{args.r_max}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()
    common.pin_threads()
    args.out.mkdir(parents=True, exist_ok=True)

    import lorakit
    from lorakit.core import registry
    from lorakit.data import load_task
    from lorakit.forms.dylora import set_rank
    from lorakit.models import load_model
    from lorakit.train.objectives import make_objective

    model, tokenizer = load_model(progress=False)
    task = load_task("sentiment", seed=args.seed)
    objective = make_objective(task, tokenizer, max_length=args.max_length, eval_batch_size=args.eval_batch_size)
    eval_data = common.eval_slice(task, objective, args.eval_offset, args.n_eval)
    load_avg_start = os.getloadavg()

    def evaluate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            return objective.evaluate(model, eval_data)

    base_eval = evaluate()
    r, alpha = args.r_max, args.alpha
    trained = {
        "lora": train_adapter(model, "lora", "lora", {"r": r, "alpha": alpha}, [], objective, task.train, args),
        "dylora": train_adapter(model, "dylora", "dylora", {"r": r, "alpha": alpha},
                                [registry.get("strategy", "dylora")(seed=args.seed)], objective, task.train,
                                args),
    }
    for b in args.lora_ranks:
        trained[f"lora_r{b}"] = train_adapter(model, f"lora_r{b}", "lora", {"r": b, "alpha": alpha * b / r}, [],
                                              objective, task.train, args)

    curves: dict[str, dict[str, dict[str, float]]] = {c: {} for c in CURVES}
    jobs: list[tuple[str, int]] = [("dylora", b) for b in range(1, r + 1)]
    jobs += [("lora_cut", b) for b in range(1, r + 1)]
    if not args.no_rescaled:
        jobs += [("lora_cut_rescaled", b) for b in range(1, r)]
    if args.svd:
        jobs += [("lora_svd", b) for b in range(1, r + 1)]
    jobs += [("lora_trained", b) for b in args.lora_ranks]
    # Sanity: the rank-r_max cut must reproduce the trained LoRA (checked on the logits of one batch).
    probe = objective.collate(eval_data[:4])
    with torch.no_grad():
        lorakit.set_active(model, "lora")
        ref_logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    check: dict[str, float] = {}
    for curve, b in tqdm(jobs, desc="evaluating ranks", unit="eval", file=sys.stderr):
        if curve == "dylora":
            lorakit.set_active(model, "dylora")
            set_rank(model, b, adapter="dylora")
            curves[curve][str(b)] = evaluate()
            continue
        if curve == "lora_trained":
            lorakit.set_active(model, f"lora_r{b}")
            curves[curve][str(b)] = evaluate()
            continue
        name = f"{curve}{b}"
        if curve == "lora_cut":
            lora_from_factors(model, name, "lora", b, alpha * b / r, cut, args.targets)  # scale α/r_max
        elif curve == "lora_cut_rescaled":
            lora_from_factors(model, name, "lora", b, alpha, cut, args.targets)  # scale α/b
        else:
            lora_from_factors(model, name, "lora", b, float(b), svd_rank, args.targets)  # scale 1, folded
        lorakit.set_active(model, name)
        if b == r and curve == "lora_cut":
            with torch.no_grad():
                logits = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
            check["lora_cut_rmax_max_abs_logit_diff"] = float((logits - ref_logits).abs().max())
        curves[curve][str(b)] = evaluate()
        lorakit.delete(model, name)
    set_rank(model, r, adapter="dylora")

    below = [str(b) for b in range(1, r)]
    gap = statistics.fmean(curves["dylora"][b]["accuracy"] - curves["lora_cut"][b]["accuracy"] for b in below) \
        if below else 0.0
    result: dict[str, Any] = {
        "benchmark": "dylora_ranks",
        "claim": "one DyLoRA adapter serves every rank b <= r_max; a LoRA cut to rank b degrades "
                 "(Valipour et al., EACL 2023, arXiv 2210.07558)",
        "config": {
            "model": "SmolLM2-135M-Instruct (embedded)", "task": task.name, "n_eval": len(eval_data),
            "eval_offset": args.eval_offset,
            "steps": args.steps, "batch_size": args.batch_size, "r_max": r, "alpha": alpha, "lr": args.lr,
            "targets": args.targets, "seed": args.seed, "max_length": args.max_length,
            "optimizer": "AdamW, 5% warmup, cosine, grad clip 1.0 (lorakit.train.TrainConfig)",
            "dylora_strategy": "b ~ U{1..r_max} per step, one rank model-wide, frozen=False (official code)",
            "lora_cut_scale": "alpha/r_max (as trained): the b leading terms of the trained ΔW",
            "lora_cut_rescaled_scale": "alpha/b (DyLoRA's scale at rank b)",
            "lora_trained_alpha": "alpha*b/r_max (same scale alpha/r_max as the r_max adapters)",
            "threads": torch.get_num_threads(),
        },
        "machine": common.machine_with_load(load_avg_start, packages=()),
        "base_eval": base_eval,
        "majority_baseline": task.majority_baseline(),
        "trained": trained,
        "curves": {c: v for c, v in curves.items() if v},
        "mean_gap_dylora_minus_lora_cut": gap,
        "sanity": check,
    }
    result["wall_s"] = time.perf_counter() - t_start
    result["summary"] = summary_line(result)
    common.save_result(args.out, "dylora_ranks", result, plot)


if __name__ == "__main__":
    main()
