"""bench/multijob: K ∈ {1, 2, 4, 8} adapter jobs with different length distributions on one frozen base.

Arms (LoRAFusion, arXiv 2510.00206, vs mLoRA, VLDB 2025, LATER-ROWS §6.6–6.7):

- ``sequential``: each job alone, one after another (its own padded batches): also each job's single-job twin;
- ``mlora``: all jobs' global batches as one batch per step padded to the step's longest sample (rounded to
  8, mLoRA's ``_align_batch_tokens``), one forward/backward;
- ``packed``: the FFD planner packs the step's samples into micro-batches of at most ``--cap`` padded tokens
  (rows × length), each job's rows one contiguous segment.

Jobs cycle over tasks with different lengths: sentiment (tweets, short), supersense (glosses), fortunes,
chatterbot; job i has lr = base·(1.5^i). Metrics per (K, arm): makespan, real (unpadded) tokens/s, padding
ratio (1 − real / computed tokens), peak RSS of the arm's own process, per-job loss curves (and the max
relative difference of each multi-job curve from its sequential twin). Every arm runs in a fresh
subprocess (its own peak RSS), arms interleaved per K (rotated order), 1 torch thread.

Run: ``flock /tmp/lorakit-heavy.lock .venv/bin/python bench/multijob/run.py`` (writes results/ JSON + PNG and
prints one summary line).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TASKS = ["sentiment", "supersense", "fortunes", "chatterbot"]
ARMS = ["sequential", "mlora", "packed"]


def build(args):
    import torch

    import lorakit
    from lorakit.data.tasks import load_task
    from lorakit.models.loading import load_model
    from lorakit.train import TrainConfig
    from lorakit.train.multijob import Job
    from lorakit.train.objectives import make_objective

    torch.set_num_threads(1)
    model, tok = load_model(args.model, progress=False)
    if args.layers and hasattr(model, "model") and len(model.model.layers) > args.layers:
        model.model.layers = model.model.layers[:args.layers]  # the first layers of the real model (speed)
        model.config.num_hidden_layers = args.layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:args.layers]
    jobs = []
    for i in range(args.k):
        task = load_task(TASKS[i % len(TASKS)], seed=0, n_train=200, n_eval=10)
        obj = make_objective(task, tok, max_length=args.max_length)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr * 1.5 ** i, seed=i, warmup_steps=0,
                          schedule="constant", progress=False, eval_at_start=False)
        spec = lorakit.AdapterSpec(form_args={"r": 8, "alpha": 16, "dropout": 0.05})
        jobs.append(Job(f"job{i}-{task.name}", task.train, obj, cfg, spec))
    return model, jobs


def worker(args) -> dict:
    from lorakit.train.multijob import MultiJobTrainer

    model, jobs = build(args)
    t0 = time.perf_counter()
    stats, curves = [], {}
    if args.arm == "sequential":
        for job in jobs:
            tr = MultiJobTrainer(model, [job], planner="pad_to_max", token_cap=None)
            curves.update({k: v.losses for k, v in tr.run().items()})
            stats += tr.history
    else:
        planner = "pad_to_max" if args.arm == "mlora" else "ffd"
        tr = MultiJobTrainer(model, jobs, planner=planner, token_cap=args.cap if planner == "ffd" else None,
                             pad_multiple=8 if args.arm == "mlora" else 1)
        curves = {k: v.losses for k, v in tr.run().items()}
        stats = tr.history
    seconds = time.perf_counter() - t0
    real = sum(s.real_tokens for s in stats)
    padded = sum(s.padded_tokens for s in stats)
    return {"k": args.k, "arm": args.arm, "makespan_s": seconds, "real_tokens": real, "computed_tokens": padded,
            "tokens_per_s": real / seconds, "padding_ratio": 1 - real / padded,
            "micro_batches": sum(s.micro_batches for s in stats),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "curves": curves}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted({r["k"] for r in results})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm in ARMS:
        rows = sorted((r for r in results if r["arm"] == arm), key=lambda r: r["k"])
        axes[0].plot([r["k"] for r in rows], [r["makespan_s"] for r in rows], "o-", label=arm)
        axes[1].plot([r["k"] for r in rows], [r["padding_ratio"] for r in rows], "o-", label=arm)
    axes[0].set(xlabel="jobs K", ylabel="makespan (s)", xticks=ks, title="makespan")
    axes[1].set(xlabel="jobs K", ylabel="padding ratio", xticks=ks, title="padding (1 - real/computed)")
    axes[0].legend()
    kmax = max(ks)
    twin = next(r for r in results if r["k"] == kmax and r["arm"] == "sequential")["curves"]
    for arm, style in (("mlora", "x"), ("packed", "+")):
        curves = next(r for r in results if r["k"] == kmax and r["arm"] == arm)["curves"]
        for i, (_name, c) in enumerate(sorted(curves.items())):
            axes[2].plot(range(1, len(c) + 1), c, style, color=f"C{i}", label=None)
    for i, (name, c) in enumerate(sorted(twin.items())):
        axes[2].plot(range(1, len(c) + 1), c, "-", color=f"C{i}", label=name)
    axes[2].set(xlabel="step", ylabel="loss", title=f"K={kmax}: single-job twins (lines), mLoRA x, packed +")
    axes[2].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--layers", type=int, default=8, help="keep the first N layers (0 = all)")
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--cap", type=int, default=512)
    ap.add_argument("--budget-s", type=float, default=700)
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--arm", default="packed")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, t_start = [], time.perf_counter()
    env = {**os.environ, "LORAKIT_THREADS": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    for n, k in enumerate(int(x) for x in args.ks.split(",")):
        order = ARMS[n % 3:] + ARMS[:n % 3]  # interleave: rotate the arm order per K
        for arm in order:
            if time.perf_counter() - t_start > args.budget_s:
                print(f"budget reached; skipping K={k} {arm}", file=sys.stderr)
                continue
            cmd = [sys.executable, __file__, "--worker", "--k", str(k), "--arm", arm, "--model", args.model,
                   "--layers", str(args.layers), "--steps", str(args.steps), "--batch", str(args.batch),
                   "--lr", str(args.lr), "--max-length", str(args.max_length), "--cap", str(args.cap)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"worker K={k} {arm} failed")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"K={k} {arm:<10} makespan {r['makespan_s']:7.1f}s  tok/s {r['tokens_per_s']:7.1f}  "
                  f"padding {r['padding_ratio']:.2f}  rss {r['peak_rss_mb']:.0f} MB", file=sys.stderr)
    for r in results:  # each multi-job curve against its sequential single-job twin
        twin = next((t for t in results if t["k"] == r["k"] and t["arm"] == "sequential"), None)
        if twin is not None:
            diffs = [abs(a - b) / abs(b) for name, c in r["curves"].items() for a, b in zip(c, twin["curves"][name],
                                                                                           strict=True)]
            r["max_rel_diff_vs_twin"] = max(diffs) if diffs else 0.0
    meta = {"model": args.model, "layers": args.layers, "steps": args.steps, "batch": args.batch,
            "max_length": args.max_length, "cap": args.cap, "threads": 1, "tasks": TASKS,
            "total_s": time.perf_counter() - t_start}
    (out / "multijob.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, out / "multijob.png")
    kmax = max(r["k"] for r in results)
    by = {r["arm"]: r for r in results if r["k"] == kmax}
    if {"sequential", "packed", "mlora"} <= set(by):
        s, p, m = by["sequential"], by["packed"], by["mlora"]
        print(f"multijob K={kmax}: makespan sequential {s['makespan_s']:.1f}s, mLoRA pad-to-max {m['makespan_s']:.1f}s "
              f"(padding {m['padding_ratio']:.0%}), packed {p['makespan_s']:.1f}s (padding {p['padding_ratio']:.0%}); "
              f"packed vs sequential {s['makespan_s'] / p['makespan_s']:.2f}x, vs mLoRA "
              f"{m['makespan_s'] / p['makespan_s']:.2f}x; curves = twins within "
              f"{max(p['max_rel_diff_vs_twin'], m['max_rel_diff_vs_twin']):.1e}")


if __name__ == "__main__":
    main()
