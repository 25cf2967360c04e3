"""Federated LoRA benchmark: FedAvg (FedIT), FLoRA, FFA-LoRA and LoRA-FAIR, with and without DP-SGD.

10 clients holding Dirichlet(α=0.5) label-skewed shares of the default task (3-class tweet
sentiment), 5 rounds, the embedded SmolLM2-135M-Instruct. Per method and DP setting: the server-side
accuracy after every round, the aggregation gap ‖aggregated ΔW − Σ p_k ΔW_k‖/‖Σ p_k ΔW_k‖ of every
round, the bytes sent per round (server → clients and clients → server) and, with DP, the largest
client ε at δ = 1e-5 (opacus RDP accountant; per-sample clipping C = 1, noise σ = 1).

All runs use the plain single-process loop (``lorakit.federated.run.run_local``), which the tests
show gives the same adapters as Flower's simulation engine; Flower's own overhead is not measured.

Budget (chosen so that the 8 runs finish in about 20 minutes on an idle 2-core CPU): 2 local AdamW steps of
4 examples per client per round (lr 3e-3), at most 48 tokens per example, LoRA r = 8 (α = 16) on
q_proj and v_proj of the last 10 of 30 layers (so backward stops at layer 20), 2,000 training
examples split over the clients, 64 evaluation examples. These are small-scale numbers: the
aggregation gaps are the property under test; accuracy differences of a few points are noise at
this size.

Writes ``<out>/federated.json`` and ``<out>/federated.png`` and prints one summary line.

    python bench/federated/run.py                 # the real model, ~20 min on 2 cores
    python bench/federated/run.py --model tiny    # smoke run on a tiny random model (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
LAST_10_QV = r".*\.layers\.(2[0-9])\.self_attn\.(q_proj|v_proj)"
METHODS = ("fedavg", "flora", "ffa", "lora_fair")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), 'tiny' (smoke run) or a local HF dir")
    p.add_argument("--data", default="sentiment")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--dp", default="off,on", help="comma list of off/on")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--targets", default=f"re:{LAST_10_QV}")
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-eval", type=int, default=64)
    p.add_argument("--dirichlet-alpha", type=float, default=0.5)
    p.add_argument("--dp-noise", type=float, default=1.0)
    p.add_argument("--dp-clip", type=float, default=1.0)
    p.add_argument("--dp-delta", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a busy 2-core box)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="combine the runs of several result folders (e.g. methods run as parallel processes) "
                        "into --out, instead of running")
    return p.parse_args(argv)


ORDER = [f"{m}{d}" for d in ("", "+dp") for m in METHODS]


def merge(folders: list[Path], out: Path) -> dict[str, Any]:
    """One result from several ``federated.json``/``federated.partial.json`` of the same configuration."""
    from lorakit.federated.run import plot_rounds

    merged: dict[str, Any] | None = None
    runs: dict[str, Any] = {}
    walls = []
    for d in folders:
        full = d / "federated.json"
        if full.exists():
            data = json.loads(full.read_text())
            walls.append(data["seconds"])
            merged = merged or data
            keys = ("clients", "rounds", "local_steps", "batch_size", "lr", "n_train", "n_eval", "seed")
            if any(data["config"][k] != merged["config"][k] for k in keys):
                raise SystemExit(f"{d}: another configuration than {folders[0]}")
            runs.update(data["runs"])
        elif (d / "federated.partial.json").exists():
            runs.update(json.loads((d / "federated.partial.json").read_text()))
    if merged is None:
        raise SystemExit("no federated.json among " + ", ".join(map(str, folders)))
    merged["runs"] = {k: runs[k] for k in sorted(runs, key=lambda k: ORDER.index(k) if k in ORDER else 99)}
    merged["seconds"] = round(sum(r["seconds"] for r in runs.values()), 1)  # compute time of all runs
    merged["wall_seconds_parallel"] = max(walls) if walls else None
    merged["merged_from"] = [str(d) for d in folders]
    out.mkdir(parents=True, exist_ok=True)
    plot(merged, out / "federated.png", merged["metric_name"], plot_rounds)
    merged["summary"] = summary_line(merged)
    (out / "federated.json").write_text(json.dumps(merged, indent=2) + "\n")
    print(merged["summary"])
    return merged


def tiny_runtime(cfg):
    """A seeded tiny Llama with a word-level tokenizer and a synthetic 3-label task (smoke runs)."""
    sys.path.insert(0, str(HERE.parents[1] / "tests" / "federated"))
    import tempfile

    from fed_helpers import make_csv, make_tiny_dir

    d = Path(tempfile.mkdtemp(prefix="fedbench-"))
    make_tiny_dir(d / "model")
    make_csv(d / "data.csv", n=600)
    return dataclasses.replace(cfg, model=str(d / "model"), data=str(d / "data.csv"), targets="q_proj,v_proj",
                               n_train=0)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from transformers.utils import logging as hf_logging

    from lorakit.federated import FedConfig
    from lorakit.federated.client import Runtime
    from lorakit.federated.run import plot_rounds, run_local

    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    base = FedConfig(model=args.model, data=args.data, clients=args.clients, rounds=args.rounds,
                     local_steps=args.local_steps, batch_size=args.batch_size, lr=args.lr, rank=args.rank,
                     alpha=args.alpha, targets=args.targets, max_length=args.max_length, n_train=args.n_train,
                     n_eval=args.n_eval, dirichlet_alpha=args.dirichlet_alpha, dp_noise=args.dp_noise,
                     dp_clip=args.dp_clip, dp_delta=args.dp_delta, threads=args.threads, seed=args.seed,
                     min_clients=2, out=str(args.out / "runs"))
    if args.model == "tiny":
        base = tiny_runtime(base)
    t0 = time.perf_counter()
    rt = Runtime.shared(base)
    sizes = [len(p) for p in rt.partitions]
    print(f"federated bench: {rt.task.summary()}; client sizes {sizes}; {len(rt.paths)} adapted modules",
          file=sys.stderr)
    eval0 = None
    runs: dict[str, dict[str, Any]] = {}
    for dp in [m.strip() == "on" for m in args.dp.split(",") if m.strip()]:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            name = f"{method}{'+dp' if dp else ''}"
            cfg = dataclasses.replace(base, method=method, dp=dp, out=str(args.out / "runs" / name))
            res = run_local(cfg, rt, progress=True, write=False, initial_eval=eval0)
            eval0 = res.evals[0]
            s = res.summary()
            traffic = [r.traffic for r in res.reports]
            runs[name] = {
                "method": method, "dp": dp, "metric_by_round": s["metric_by_round"],
                "metric_final": s["metric_final"], "metric_before": s["metric_before"],
                "loss_final": res.evals[max(res.evals)].get("loss"),
                "gap_by_round": s["gap_by_round"], "gap_mean": s["gap_mean"],
                "epsilon": s["epsilon"],
                "bytes_per_round": sum(t["total_bytes"] for t in traffic) / len(traffic),
                "down_bytes_per_client": [t["down_bytes_per_client"] for t in traffic],
                "up_bytes_per_client": [t["up_bytes_per_client"] for t in traffic],
                "fair": {k: [r.info.get(k) for r in res.reports] for k in ("fair_cos_before", "fair_cos_after")}
                if method == "lora_fair" else None,
                "seconds": s["seconds"],
            }
            print(f"  {name:<14} {s['metric_name']} {s['metric_before']:.4f} -> {s['metric_final']:.4f}  "
                  f"gap {s['gap_mean']:.2e}  {runs[name]['bytes_per_round'] / 1e6:.2f} MB/round"
                  + (f"  eps {s['epsilon']:.2f}" if s["epsilon"] is not None else "")
                  + f"  ({s['seconds']:.0f} s)", file=sys.stderr)
            args.out.mkdir(parents=True, exist_ok=True)  # partial results after every run
            (args.out / "federated.partial.json").write_text(json.dumps(runs, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    metric = rt.objective.metric_name
    result = {
        "config": {**base.to_dict(), "methods": args.methods, "dp_modes": args.dp},
        "task": rt.task.summary(), "client_sizes": sizes, "adapted_modules": len(rt.paths),
        "metric_name": metric, "majority_baseline": rt.task.majority_baseline(), "runs": runs,
        "seconds": round(seconds, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
                    "cpu": platform.processor() or platform.machine()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "federated.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "federated.png", metric, plot_rounds)
    line = summary_line(result)
    result["summary"] = line
    (args.out / "federated.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "federated.partial.json").unlink(missing_ok=True)
    print(line)
    return result


def plot(result: dict[str, Any], path: Path, metric: str, plot_rounds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, dp in zip(axes[:2], (False, True)):
        for name, r in result["runs"].items():
            if r["dp"] != dp:
                continue
            pts = sorted((int(k), v) for k, v in r["metric_by_round"].items() if v is not None)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.axhline(result["majority_baseline"], color="grey", ls=":", lw=1, label="majority class")
        ax.set_title(f"{metric} vs round, {'DP-SGD (σ=1, C=1)' if dp else 'no DP'}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[2]
    for name, r in result["runs"].items():
        gaps = [max(g, 1e-9) for g in r["gap_by_round"]]
        ax.semilogy(range(1, len(gaps) + 1), gaps, marker="o", ls="--" if r["dp"] else "-", label=name)
    ax.set_title("aggregation gap per round (log)", fontsize=9)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    c = result["config"]
    fig.suptitle(f"{c['clients']} clients, Dirichlet α={c['dirichlet_alpha']}, {c['rounds']} rounds, "
                 f"{c['local_steps']} local steps × batch {c['batch_size']}; {result['task']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_line(result: dict[str, Any]) -> str:
    runs, m = result["runs"], result["metric_name"]
    plain = [n for n in runs if not runs[n]["dp"]]
    dp = [n for n in runs if runs[n]["dp"]]
    before = next(iter(runs.values()))["metric_before"]
    parts = [f"federated ({result['config']['clients']} clients, {result['config']['rounds']} rounds, "
             f"Dirichlet {result['config']['dirichlet_alpha']}): {m} before {before:.3f}; final "
             + " ".join(f"{n} {runs[n]['metric_final']:.3f}" for n in plain)]
    if dp:
        eps = max(runs[n]["epsilon"] or 0 for n in dp)
        parts.append(f"with DP (eps<={eps:.2f}) " + " ".join(f"{runs[n]['method']} {runs[n]['metric_final']:.3f}"
                                                          for n in dp))
    parts.append("gap " + " ".join(f"{n} {runs[n]['gap_mean']:.1e}" for n in plain))
    parts.append("MB/round " + " ".join(f"{n} {runs[n]['bytes_per_round'] / 1e6:.1f}" for n in plain))
    return "; ".join(parts) + f" ({result['seconds']:.0f} s)"


if __name__ == "__main__":
    main()
