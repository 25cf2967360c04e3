"""NEAS on LoRA adapters (lorakit.ensemble.neas): MiniLM, 26-way WordNet supersense, SEQ_CLS head.

Searched K-path ensemble vs a single LoRA of (about) equal adapter parameters vs a deep ensemble (K LoRAs
trained independently) vs random K-path architectures, all retrained stand-alone for the same number of
steps; and Kendall τ between supernet-inherited and stand-alone accuracies of a few architectures, for a
supernet trained without and with lorakit's diversity-guided shrinking. A CPU-sized reproduction: short
supernet training, few architectures, one seed; read the numbers as a direction at best.

Run: ``flock /tmp/lorakit-heavy.lock .venv/bin/python bench/ensemble/neas_run.py`` (about 10 CPU-minutes).
"""

from __future__ import annotations

import copy
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/, for the shared bench/_common.py
import _common as common  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's τ-b (ties in either list reduce the denominator)."""
    n, conc, disc, tx, ty = len(x), 0, 0, 0, 0
    for i in range(n):
        for j in range(i + 1, n):
            a, b = x[i] - x[j], y[i] - y[j]
            if a == 0 and b == 0:
                continue
            if a == 0:
                tx += 1
            elif b == 0:
                ty += 1
            elif (a > 0) == (b > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + tx) * (conc + disc + ty))
    return (conc - disc) / denom if denom else float("nan")


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def main() -> None:
    p = common.make_parser(__doc__)
    p.add_argument("--supernet-steps", type=int, default=240)
    p.add_argument("--retrain-steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--n-val", type=int, default=128)
    p.add_argument("--n-test", type=int, default=256)
    p.add_argument("--n-rank", type=int, default=4, help="architectures in the Kendall-τ set (also the random ones)")
    p.add_argument("--shrink-every", type=int, default=80)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--resummarize", type=Path, default=None,
                   help="only rewrite the summary line and PNG of an existing result JSON (no training)")
    args = p.parse_args()
    if args.resummarize is not None:
        import json

        old = json.loads(args.resummarize.read_text())
        old.setdefault("r_single", max(1, round(old["results"]["single_lora"]["adapter_params"]
                                                 / (old["budget_adapter_params"] / 8))))
        old["summary"] = summarize(old)
        common.save_result(args.resummarize.parent, args.resummarize.stem, old, plot)
        return
    common.quiet_warnings()
    common.pin_threads()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lorakit.data.tasks import load_task
    from lorakit.ensemble.neas import Architecture, NEASConfig, NEASSupernet, retrain, search
    from lorakit.models import load_model
    from lorakit.train.objectives import SequenceClassificationCollator

    t_start, load0 = time.perf_counter(), os.getloadavg()
    task = load_task("supersense", seed=args.seed)
    base, tok = load_model("minilm", head="seq_cls", num_labels=len(task.labels), head_seed=args.seed, progress=False)
    collate = SequenceClassificationCollator(tok, task, max_length=args.max_length)
    train = task.train[args.n_val:]
    val_batches = [collate(task.train[i:i + 64]) for i in range(0, args.n_val, 64)]  # held out from training
    test = task.eval[: args.n_test]
    test_batches = [collate(test[i:i + 64]) for i in range(0, len(test), 64)]
    targets = ("query", "value")
    timings: dict[str, float] = {}

    probe = NEASSupernet(copy.deepcopy(base), NEASConfig(paths=2, targets=targets))
    per_rank = sum(probe.costs.dims)  # adapter parameters of one rank-1 LoRA on every layer
    budget = 8 * per_rank  # = a single rank-8 LoRA on q, v of all 6 layers (= two rank-4 LoRAs)
    del probe

    def cfg(shrink: int) -> NEASConfig:
        return NEASConfig(paths=2, choices=(0, 2, 4, 8), targets=targets, budget="params", max_budget=budget,
                          steps=args.supernet_steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          shrink_every=shrink, shrink_samples=12, shrink_lambda=1.0, shrink_drop=1, shrink_min=2,
                          population=12, generations=5, mutation_prob=0.25)

    supernets: dict[str, Any] = {}
    losses: dict[str, list[float]] = {}
    for label, shrink in (("plain", 0), ("shrink", args.shrink_every)):
        t0 = time.perf_counter()
        sn = NEASSupernet(copy.deepcopy(base), cfg(shrink))
        losses[label] = sn.train(train, collate, val_batches)
        supernets[label] = sn
        timings[f"supernet_{label}_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    found = search(supernets["shrink"], val_batches)
    timings["search_s"] = round(time.perf_counter() - t0, 1)
    arch = found.architecture

    def standalone(a: Architecture, seed: int = args.seed) -> dict[str, Any]:
        t = time.perf_counter()
        ens = retrain(copy.deepcopy(base), a, train, collate, steps=args.retrain_steps, batch_size=args.batch_size,
                      lr=args.lr, targets=targets, seed=seed)
        m = ens.evaluate(test_batches)
        return {"arch": a.to_dict(), "params": ens.trainable_params(),
                "adapter_params": supernets["plain"].params(a), "test": m, "ens": ens,
                "seconds": round(time.perf_counter() - t, 1)}

    results: dict[str, Any] = {}
    results["searched"] = standalone(arch)
    r_single = max(1, round(supernets["plain"].params(arch) / per_rank))
    results["single_lora"] = standalone(Architecture(split=0, shared=(), paths=((r_single,) * 6,)))
    members = [standalone(Architecture(split=0, shared=(), paths=((4,) * 6,)), seed=args.seed + 10 + k)
               for k in range(2)]
    with torch.no_grad():  # deep ensemble: mean of the two independently trained models' logits
        correct = count = 0
        for b in test_batches:
            z = torch.stack([mm["ens"].logits(b) for mm in members]).mean(0)
            correct += int((z.argmax(-1) == b["label_index"]).sum())
            count += len(z)
    results["deep_ensemble"] = {"arch": [mm["arch"] for mm in members],
                                "params": sum(mm["params"] for mm in members),
                                "adapter_params": 2 * 4 * per_rank,
                                "test": {"accuracy": correct / count,
                                         "member_accuracy": [mm["test"]["accuracy"] for mm in members]},
                                "seconds": sum(mm["seconds"] for mm in members)}

    # Kendall τ set: random within-budget architectures from the shrunk space (valid in both supernets)
    rng = random.Random(args.seed + 123)
    rank_set: list[Architecture] = []
    while len(rank_set) < args.n_rank:
        a = supernets["shrink"].sample(rng)
        if supernets["shrink"].costs.within(a) and a not in rank_set and a != arch:
            rank_set.append(a)
    ranked = []
    for a in rank_set:
        r = standalone(a)
        ranked.append({"arch": a.to_dict(), "standalone": r["test"]["accuracy"], "params": r["params"],
                       "supernet_plain": supernets["plain"].evaluate(a, val_batches)["accuracy"],
                       "supernet_shrink": supernets["shrink"].evaluate(a, val_batches)["accuracy"],
                       "standalone_val": r["ens"].evaluate(val_batches)["accuracy"]})
    sa = [r["standalone_val"] for r in ranked]
    tau = {"plain": kendall_tau([r["supernet_plain"] for r in ranked], sa),
           "shrink": kendall_tau([r["supernet_shrink"] for r in ranked], sa)}
    tau = {k: None if math.isnan(v) else v for k, v in tau.items()}  # all ties: undefined (JSON null)
    randoms = [r["standalone"] for r in ranked]

    for r in results.values():
        r.pop("ens", None)
    acc = {k: v["test"]["accuracy"] for k, v in results.items()}
    acc["random_mean"] = sum(randoms) / len(randoms)
    result = {
        "benchmark": "neas", "model": "all-MiniLM-L6-v2 (seq_cls)", "task": "supersense",
        "num_labels": len(task.labels),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "budget_adapter_params": budget, "search_space_size": supernets["plain"].space_size(),
        "shrunk_choices": supernets["shrink"].choices,
        "shrink_history": [{"step": h.step, "removed": h.removed} for h in supernets["shrink"].shrink_history],
        "search": {"architecture": arch.to_dict(), "fitness_val": found.fitness, "history": found.history},
        "results": results, "accuracy": acc, "random": ranked, "kendall_tau": tau,
        "supernet_loss_last20": {k: sum(v[-20:]) / max(1, len(v[-20:])) for k, v in losses.items()},
        "timings": {**timings, "total_s": round(time.perf_counter() - t_start, 1)},
        "majority_baseline": task.majority_baseline(), "n_test": len(test),
        "machine": common.machine_with_load(load0), "r_single": r_single,
    }
    result["summary"] = summarize(result)
    args.out.mkdir(parents=True, exist_ok=True)
    common.save_result(args.out, "neas_minilm", result, plot)


def summarize(result: dict[str, Any]) -> str:
    """The summary line. The direction counts as shown only beyond noise: the searched ensemble beats the
    single LoRA by more than 2 binomial standard errors of the test accuracy and is not below the deep
    ensemble by more than one, and shrinking gives a positive τ above the plain supernet's."""
    acc, tau, n = result["accuracy"], result["kendall_tau"], result["n_test"]
    se = math.sqrt(max(acc["searched"] * (1 - acc["searched"]), 1e-12) / n)
    beats = acc["searched"] - acc["single_lora"] > 2 * se and acc["searched"] >= acc["deep_ensemble"] - se
    ranks = None not in tau.values() and tau["shrink"] > max(tau["plain"], 0.0)
    verdict = "shown" if beats and ranks else (f"not shown (accuracy gaps within ~2 SE = {2 * se:.3f}"
                                               f"{'' if ranks else '; tau not positive/raised'})")
    arch = result["search"]["architecture"]
    return (f"neas minilm supersense: searched {acc['searched']:.3f} (split {arch['split']}, "
            f"{common.fmt_params(result['results']['searched']['adapter_params'])} adapter params) vs single LoRA "
            f"r{result['r_single']} {acc['single_lora']:.3f} vs deep ensemble 2xr4 {acc['deep_ensemble']:.3f} vs "
            f"random mean {acc['random_mean']:.3f} (n_test {n}); kendall tau plain {_f(tau['plain'])} shrink "
            f"{_f(tau['shrink'])} (n={len(result['random'])}); paper direction {verdict}")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    acc = result["accuracy"]
    names = ["searched", "single_lora", "deep_ensemble", "random_mean"]
    ax1.bar(names, [acc[n] for n in names], color=["C0", "C1", "C2", "C7"])
    for i, n in enumerate(names):
        ax1.text(i, acc[n], f"{acc[n]:.3f}", ha="center", va="bottom")
    ax1.axhline(result["majority_baseline"], ls=":", color="k", label="majority")
    ax1.set_ylabel("test accuracy (26-way supersense)")
    ax1.set_title("stand-alone retrained, same steps")
    ax1.legend()
    rows = result["random"]
    for key, color in (("supernet_plain", "C3"), ("supernet_shrink", "C0")):
        ax2.scatter([r[key] for r in rows], [r["standalone_val"] for r in rows], color=color,
                    label=f"{key} (tau {_f(result['kendall_tau'][key.split('_')[1]])})")
    ax2.set_xlabel("supernet-inherited val accuracy")
    ax2.set_ylabel("stand-alone val accuracy")
    ax2.set_title("ranking: supernet vs stand-alone")
    ax2.legend()
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
