"""Window early-exit cascade of two LoRA adapters on MiniLM (WordNet supersense, OOD = fortunes).

Xia & Bouganis, ICCV 2023, arXiv 2303.08010, mapped to adapters on one base (LATER-ROWS §5.4, the cheaper
MiniLM variant). Two LoRA adapters (r 8, alpha 16, on every linear map of the upper ``--from-layer``..5
encoder layers, plus each adapter's own classification-head copy, ``modules_to_save``) are trained on the
8-class supersense task (``load_task("supersense")``: the 8 most frequent of WordNet's noun lexicographer
files) with different seeds (LoRA init, head init and data order), then loaded on one frozen MiniLM base.

Splits: val = the first ``--n-val`` and test = the next ``--n-test`` examples of the task's eval split at
size n_val + n_test (split seed 0, held out of training); OOD = ``--n-ood`` fortunes quotations scored as
if they were noun glosses.

Methods, for each target task (cov@10 and risk@80 with MSP, FPR@95 with energy; the code's pairing):

- single: member 1; ensemble: both members on every row (log of the mean softmax, the code's);
- window: τ on val for the target, the ±10-percentile window of member-1 val scores around it; rows inside
  go on to member 2 (stage-2 score: MSP of the averaged probabilities, ``_ens``, or the mean of the
  members' energies); OOD metrics also with the shift guard (window recomputed on the unlabelled
  test ∪ OOD pool, 1:1);
- single_threshold and random: cascades at the window's ID pass rate (exit above the val quantile; a
  random subset of that size).

Reported: the targeted metric, AURC, AUROC (ID test vs OOD), FPR@95, accuracy, ID pass rate and the
estimated cost relative to member 1 (FLOPs, ``Ensemble.flops``; with prefix reuse the second member
resumes at the first adapted layer). Metrics are computed offline from cached logits, as the official code
does; one real window-cascade run (rows cut out of the batch) checks that it gives the same predictions and
measures its wall time against member 1 alone.

Direction shown (LATER-ROWS §5.4) if the window cascade keeps ≥ 70 % of the ensemble's gain on the
targeted metric at ≤ 1.25x cost and beats both other cascades on it.

    flock /tmp/lorakit-heavy.lock python bench/ensemble/run.py            # ~4 min on the shared 2-core box
    python bench/ensemble/run.py --quick                                  # smoke test
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/, for the shared bench/_common.py
import _common as common  # noqa: E402

HERE = Path(__file__).resolve().parent
TARGETS = (("cov@10", "msp"), ("risk@80", "msp"), ("FPR@95", "energy"))


def _args() -> Any:
    p = common.make_parser(__doc__)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--from-layer", type=int, default=3, help="adapt encoder layers >= this (MiniLM has 6)")
    p.add_argument("--n-val", type=int, default=600)
    p.add_argument("--n-test", type=int, default=600)
    p.add_argument("--n-ood", type=int, default=600)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--work", default="/tmp/lorakit-bench-ensemble", help="where the trained adapters go")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--quick", action="store_true", help="smoke test: 3 steps, 40 examples per split")
    return p.parse_args()


def _train(task: Any, seed: int, a: Any, out: Path) -> dict[str, Any]:
    import lorakit
    from lorakit.models import load_model
    from lorakit.train.objectives import make_objective
    from lorakit.train.run import head_modules
    from lorakit.train.trainer import TrainConfig, Trainer

    base, tok = load_model("minilm", head="seq_cls", num_labels=len(task.labels), head_seed=seed, progress=False)
    layers = "".join(str(i) for i in range(a.from_layer, 6))
    spec = lorakit.AdapterSpec(form_args={"r": 8, "alpha": 16},
                               targets=rf"bert\.encoder\.layer\.[{layers}]\..*(query|key|value|dense)",
                               modules_to_save=head_modules(base))
    lorakit.attach(base, spec, seed=seed)
    objective = make_objective(task, tok, max_length=a.max_length, head="seq_cls")
    config = TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=seed, out_dir=str(out / "run"),
                         progress=False, eval_at_start=False)
    t0 = time.perf_counter()
    result = Trainer(base, task.train, objective.collate, objective.loss, config).train(resume=False)
    seconds = time.perf_counter() - t0
    lorakit.save(base, out, meta={"head": {"head": "seq_cls", "model": "minilm", "num_labels": len(task.labels),
                                           "labels": list(task.labels), "seed": seed,
                                           "max_length": a.max_length}})
    return {"seed": seed, "train_seconds": round(seconds, 1), "final_loss": result.final_loss,
            "steps": a.steps}


def _rows(val_labels: torch.Tensor, member_logits: dict[str, torch.Tensor], labels: torch.Tensor,
          flops: dict[str, float], target: str, uncertainty: str, seed: int) -> dict[str, Any]:
    """Every method's metrics on one target task, offline from the cached logits."""
    from lorakit.ensemble import metrics as M
    from lorakit.ensemble.cascade import (
        RandomCascade,
        SingleThresholdCascade,
        WindowCascade,
        cascade_outputs,
        confidence,
    )

    val, test, ood = member_logits["val"], member_logits["test"], member_logits["ood"]
    n_id = test.shape[1]
    both = torch.cat([test, ood], dim=1)
    score = "ens" if uncertainty == "msp" else "mean"

    def evaluate(passed_id: torch.Tensor, passed_ood: torch.Tensor) -> dict[str, Any]:
        logits, conf = cascade_outputs(both, torch.cat([passed_id, passed_ood]), "mean_probs", uncertainty, score)
        correct = logits[:n_id].argmax(-1) == labels
        rate = float(passed_id.double().mean())
        return {target: M.target_metric(target, correct, conf[:n_id], conf[n_id:]),
                "AURC": M.aurc(correct, conf[:n_id]), "AUROC": M.auroc(conf[:n_id], conf[n_id:]),
                "FPR@95": M.fpr_at_tpr(conf[:n_id], conf[n_id:], 0.95),
                "accuracy": float(correct.double().mean()), "pass_rate": rate,
                "pass_rate_ood": float(passed_ood.double().mean()),
                "cost_vs_single": 1 + rate * flops["second"] / flops["first"],
                "cost_vs_single_prefix": 1 + rate * flops["second_prefix"] / flops["first"]}

    none_id, none_ood = torch.zeros(n_id, dtype=torch.bool), torch.zeros(ood.shape[1], dtype=torch.bool)
    rows = {"single": evaluate(none_id, none_ood), "ensemble": evaluate(~none_id, ~none_ood)}
    window = WindowCascade(target=target, uncertainty=uncertainty, shift_guard=False).fit(val[0], val_labels)
    c1_id, c1_ood = confidence(test[0], uncertainty), confidence(ood[0], uncertainty)
    rows["window"] = evaluate(window.pass_mask(c1_id), window.pass_mask(c1_ood))
    guarded = WindowCascade(target=target, uncertainty=uncertainty, shift_guard=True).fit(val[0], val_labels)
    pool = torch.cat([c1_id, c1_ood])
    rows["window_shift_guard"] = evaluate(guarded.pass_mask(c1_id, pool=pool), guarded.pass_mask(c1_ood, pool=pool))
    rate = rows["window"]["pass_rate"]
    single = SingleThresholdCascade(pass_fraction=rate, uncertainty=uncertainty).fit(val[0], val_labels)
    rows["single_threshold"] = evaluate(single.pass_mask(c1_id), single.pass_mask(c1_ood))
    rand = RandomCascade(pass_rate=rate, seed=seed)
    rows["random"] = evaluate(rand.pass_mask(c1_id), RandomCascade(pass_rate=rate, seed=seed + 1).pass_mask(c1_ood))
    better = (lambda x, y: x > y) if M.higher_is_better(target) else (lambda x, y: x < y)
    s, e, w = rows["single"][target], rows["ensemble"][target], rows["window"][target]
    kept = (w - s) / (e - s) if e != s else float("nan")
    direction = (kept >= 0.7 and rows["window"]["cost_vs_single"] <= 1.25
                 and better(w, rows["single_threshold"][target]) and better(w, rows["random"][target]))
    return {"target": target, "uncertainty": uncertainty, "stage2_score": score, "tau": window.tau,
            "window": window.window, "window_shift_guard": guarded.last_window, "rows": rows,
            "gain_kept": kept, "ensemble_gain": e - s, "direction_shown": bool(direction)}


def main() -> None:
    a = _args()
    if a.quick:
        a.steps, a.n_val, a.n_test, a.n_ood = 3, 40, 40, 40
    os.environ.setdefault("LORAKIT_THREADS", "1")
    common.pin_threads()
    common.quiet_warnings()
    import lorakit
    from lorakit.data import Example, load_task
    from lorakit.ensemble import Ensemble
    from lorakit.ensemble.cascade import WindowCascade, cascade_outputs
    from lorakit.models import load_model
    from lorakit.train.objectives import make_objective

    t_start, load0 = time.perf_counter(), os.getloadavg()
    task = load_task("supersense", seed=0, n_eval=a.n_val + a.n_test)
    val, test = task.eval[:a.n_val], task.eval[a.n_val:]
    ood = [Example(ex.text, task.labels[0]) for ex in load_task("fortunes", seed=0, n_eval=a.n_ood).eval]
    # sorted by length: batches carry less padding; the order does not change any metric
    val, test, ood = (sorted(x, key=lambda ex: len(ex.text)) for x in (val, test, ood))
    work = Path(a.work)
    seeds = [int(s) for s in a.seeds.split(",")]
    training = [_train(task, s, a, work / f"m{k + 1}") for k, s in enumerate(seeds)]

    base, tok = load_model("minilm", head="seq_cls", num_labels=len(task.labels), head_seed=0, progress=False)
    # each adapter carries its own head copy (modules_to_save), which replaces this base's freshly seeded head:
    # the fingerprint check sees a different head and warns, but the outputs are the trained ones
    warnings.filterwarnings("ignore", message=".*base model weights differ.*")
    names = []
    for k in range(len(seeds)):
        lorakit.load(base, work / f"m{k + 1}", name=f"m{k + 1}")
        names.append(f"m{k + 1}")
    ens = Ensemble(base.eval(), names, "mean_probs", head="seq_cls")
    collate = make_objective(task, tok, max_length=a.max_length, head="seq_cls").collate
    logits, timing = {}, {}
    for split, rows in (("val", val), ("test", test), ("ood", ood)):
        t0 = time.perf_counter()
        logits[split] = ens.predict_examples(rows, collate, batch_size=32).member_logits.double()
        timing[f"{split}_both_members_seconds"] = round(time.perf_counter() - t0, 2)
    labels = torch.tensor([task.label_index(ex.label) for ex in test])
    val_labels = torch.tensor([task.label_index(ex.label) for ex in val])
    sample = collate(test[:32])
    tokens = ens._tokens(sample)
    level = ens.prefix_layer
    flops = {"first": ens.flops("m1", tokens, 32), "second": ens.flops("m2", tokens, 32),
             "second_prefix": ens.flops("m2", tokens, 32, start=level)}
    targets = [_rows(val_labels, logits, labels, flops, t, u, seed=0) for t, u in TARGETS]

    # one real run: rows cut out of the batch, member 2 (resuming at the first adapted layer) on them only
    cas = WindowCascade(target="cov@10", shift_guard=False, prefix_reuse=level > 0).fit(logits["val"][0], val_labels)
    t0 = time.perf_counter()
    real = cas.run(ens, test, collate, batch_size=32)
    real_seconds = time.perf_counter() - t0
    offline, _ = cascade_outputs(logits["test"], real.passed, "mean_probs", "msp", "ens")
    real_run = {"pass_rate": real.pass_rate, "seconds": round(real_seconds, 2),
                "stage1_seconds": round(real.stage1.seconds, 2), "stage2_seconds": round(real.stage2.seconds, 2),
                "time_vs_single": (real.stage1.seconds + real.stage2.seconds) / real.stage1.seconds,
                "flops_vs_single": real.cost_vs_single, "prefix_layer": level,
                "stage2_rows": real.stage2.rows,
                "max_abs_diff_vs_offline": float((real.logits - offline).abs().max()),
                "prediction_agreement_vs_offline": float((real.logits.argmax(-1) == offline.argmax(-1))
                                                         .double().mean())}
    head = targets[0]
    r = head["rows"]
    shown = [t["target"] for t in targets if t["direction_shown"]]
    summary = (f"ensemble window cascade (MiniLM LoRA x2, supersense, OOD fortunes): cov@10 single "
               f"{r['single']['cov@10']:.3f} ensemble {r['ensemble']['cov@10']:.3f} window "
               f"{r['window']['cov@10']:.3f} (single-threshold {r['single_threshold']['cov@10']:.3f}, random "
               f"{r['random']['cov@10']:.3f}) at pass {r['window']['pass_rate']:.2f}, cost "
               f"{r['window']['cost_vs_single']:.2f}x ({r['window']['cost_vs_single_prefix']:.2f}x with prefix "
               f"reuse); gain kept {head['gain_kept']:.0%}; direction shown on: {', '.join(shown) or 'none'}")
    result = {
        "benchmark": "ensemble", "paper": "Xia & Bouganis, ICCV 2023, arXiv 2303.08010",
        "config": {k: v for k, v in vars(a).items() if k not in ("out", "work")},
        "task": task.summary(), "n_ood": len(ood), "training": training,
        "accuracy_members": [float((logits["test"][k].argmax(-1) == labels).double().mean())
                             for k in range(len(names))],
        "flops_per_32_rows": flops, "timing": timing, "targets": targets, "real_run": real_run,
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "machine": common.machine_with_load(load0), "summary": summary,
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    common.save_result(out, "ensemble" if not a.quick else "ensemble_quick", result, _plot)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = result["targets"]
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(4.2 * (len(targets) + 1), 3.6))
    colors = {"single": "tab:gray", "ensemble": "tab:green", "window": "tab:red", "window_shift_guard": "tab:pink",
              "single_threshold": "tab:blue", "random": "tab:orange"}
    for ax, t in zip(axes, targets, strict=False):
        for name, row in t["rows"].items():
            ax.scatter(row["cost_vs_single"], row[t["target"]], color=colors[name], label=name, s=40)
        ax.set_xlabel("cost vs single (FLOPs)")
        ax.set_ylabel(f"{t['target']} ({t['uncertainty']})")
        ax.set_title(f"{t['target']}: gain kept {t['gain_kept']:.0%}" if t["gain_kept"] == t["gain_kept"]
                     else t["target"])
    axes[0].legend(fontsize=7)
    ax = axes[-1]
    names = list(targets[0]["rows"])
    ax.bar(range(len(names)), [targets[0]["rows"][n]["AUROC"] for n in names],
           color=[colors[n] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("AUROC ID vs fortunes (MSP)")
    lo = min(targets[0]["rows"][n]["AUROC"] for n in names)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
