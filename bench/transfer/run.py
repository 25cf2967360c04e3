"""Trans-LoRA benchmark: SmolLM2-135M-Instruct + LoRA (r8, q,v) on tweet sentiment -> Gemma-3-270M base.

Arms (LATER-ROWS §1.5): target base few-shot; target LoRA on the 5 seeds only; on teacher-labelled
fortunes (unrelated text); on unfiltered synthetic; on discriminator-filtered synthetic (Trans-LoRA);
optionally on TiTok contrastive-excess-filtered synthetic; oracle on real training tweets; the source
adapter's own accuracy. Plus MMD² (RBF, median bandwidth) of filtered / unfiltered synthetic vs real
tweets on MiniLM embeddings (Table 9 analog).

    flock /tmp/lorakit-heavy.lock .venv/bin/python bench/transfer/run.py --seeds 0 --n-candidates 300 --keep 100

Writes bench/transfer/results/transfer.json (with the summary line) and transfer.png; prints the line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def mmd2_rbf(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD² with k(a, b) = exp(−‖a−b‖² / (2h²)), h² = median pairwise squared distance of x ∪ y."""
    x, y = x.double(), y.double()
    z = torch.cat([x, y])
    d = torch.cdist(z, z).pow(2)
    h2 = d[torch.triu(torch.ones_like(d, dtype=torch.bool), 1)].median().clamp(min=1e-12)
    k = torch.exp(-d / (2 * h2))
    n, m = len(x), len(y)
    kxx, kyy, kxy = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kxx.sum() - kxx.diag().sum()) / (n * (n - 1)) + (kyy.sum() - kyy.diag().sum()) / (m * (m - 1))
                 - 2 * kxy.mean())


def few_shot_task(task, seeds):
    demos = "\n".join(f"{task.input_name}: {e.text}\n{task.answer_prefix}: {e.label}" for e in seeds)
    return dataclasses.replace(task, instruction=f"{task.instruction}\n{demos}\n")


def run_seed(seed: int, a: argparse.Namespace, gemma, gtok, encoder) -> dict:
    import lorakit
    from lorakit.core.inject import delete
    from lorakit.core.spec import AdapterSpec
    from lorakit.data import load_task
    from lorakit.models import load_model
    from lorakit.train.objectives import make_objective
    from lorakit.train.trainer import TrainConfig, Trainer
    from lorakit.transfer import (
        contrastive_excess_scores,
        generate_candidates,
        label_accuracy,
        label_distribution,
        select,
        train_discriminator,
        train_student,
    )
    from lorakit.transfer.labels import soft_examples

    out: dict = {"seed": seed, "timings": {}}
    T = out["timings"]
    task = load_task("sentiment", seed=seed, n_eval=a.n_eval)
    rng = random.Random(seed)
    seeds = rng.sample(task.train, 5)
    evals = task.eval
    # ---- source: SmolLM2 + LoRA r8 q,v on the real data (the client's side)
    t = time.perf_counter()
    src, stok = load_model("smollm2", progress=False)
    lorakit.attach(src, AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 8, "alpha": 16}), seed=seed)
    obj = make_objective(task, stok)
    Trainer(src, task.train, obj.collate, obj.loss,
            TrainConfig(steps=a.source_steps, batch_size=8, lr=1e-3, warmup_steps=5, seed=seed, progress=False,
                        eval_at_start=False)).train(resume=False)
    src.eval()
    T["source_train_s"] = round(time.perf_counter() - t, 1)
    out["source_acc"] = label_accuracy(src, stok, task, evals)
    say(f"seed {seed}: source LoRA accuracy {out['source_acc']:.3f} ({T['source_train_s']} s)")
    # ---- discriminator at source-training time: SmolLM2+θ_s synthetic vs real training tweets
    t = time.perf_counter()
    fake = generate_candidates(src, stok, [e.text for e in seeds], a.n_disc, max_new_tokens=a.max_new_tokens,
                               input_name="Tweet", seed=seed + 1, max_batch=a.gen_batch)
    real = [e.text for e in task.train[5:5 + a.n_disc]]
    disc = train_discriminator(real, fake, kind="embedding", encoder=encoder, seed=seed)
    T["discriminator_s"] = round(time.perf_counter() - t, 1)
    out["discriminator"] = {"n_real": len(real), "n_fake": len(fake), **disc.info}
    say(f"seed {seed}: discriminator train acc {disc.info['train_accuracy']} ({T['discriminator_s']} s)")
    # ---- transfer time: Gemma candidates
    t = time.perf_counter()
    cands = generate_candidates(gemma, gtok, [e.text for e in seeds], a.n_candidates, max_new_tokens=a.max_new_tokens,
                                input_name="Tweet", seed=seed + 2, max_batch=a.gen_batch,
                                progress=lambda d, n: say(f"  candidates {d}/{n}"))
    T["generate_s"] = round(time.perf_counter() - t, 1)
    say(f"seed {seed}: {len(cands)} Gemma candidates in {T['generate_s']} s")
    p_real = disc.prob_real(cands)
    keep = min(a.keep, len(cands))
    filtered = [cands[i] for i in select(p_real, keep)]
    unfiltered = cands[:keep]  # generation order is random: a random subset of the same size
    out["p_real_mean"] = {"all": float(p_real.mean()), "filtered": float(disc.prob_real(filtered).mean()),
                          "unfiltered": float(disc.prob_real(unfiltered).mean())}
    sets = {"filtered": filtered, "unfiltered": unfiltered}
    if a.titok:
        ce = contrastive_excess_scores(src, stok, cands)
        sets["contrastive_excess"] = [cands[i] for i in select(ce, keep)]
    from lorakit.data import load_task as lt
    fort = lt("fortunes", seed=seed).train
    sets["fortunes"] = [" ".join(e.text.split())[:280] for e in rng.sample(fort, keep)]
    # ---- teacher labels over label strings (SmolLM2 tokenizer)
    t = time.perf_counter()
    labelled = {k: soft_examples(v, label_distribution(src, stok, task, v)) for k, v in sets.items()}
    T["label_s"] = round(time.perf_counter() - t, 1)
    out["teacher_label_counts"] = {k: torch.bincount(torch.tensor([e.label_index for e in v]), minlength=3).tolist()
                                   for k, v in labelled.items()}
    out["examples"] = {k: v[:5] for k, v in sets.items()}
    # ---- MMD on MiniLM embeddings vs real (eval) tweets
    real_e = encoder([e.text for e in evals])
    out["mmd2"] = {k: mmd2_rbf(encoder(sets[k]), real_e) for k in sets}
    out["mmd2"]["source_synthetic"] = mmd2_rbf(encoder(fake), real_e)
    # ---- target arms on Gemma
    acc = {}
    t = time.perf_counter()
    acc["target_base_few_shot"] = label_accuracy(gemma, gtok, few_shot_task(task, seeds), evals, batch_size=8,
                                                   max_length=640)
    acc["target_base_zero_shot"] = label_accuracy(gemma, gtok, task, evals)
    _partial(a, out | {"accuracy": dict(acc)})
    say(f"seed {seed}: Gemma base few-shot {acc['target_base_few_shot']:.3f}, zero-shot "
        f"{acc['target_base_zero_shot']:.3f} ({time.perf_counter() - t:.0f} s)")
    arms = {"seeds_only": ("ce", list(seeds)), "fortunes_teacher": ("kl", labelled["fortunes"]),
            "unfiltered_synthetic": ("kl", labelled["unfiltered"]),
            "filtered_synthetic_trans_lora": ("kl", labelled["filtered"])}
    if a.oracle:
        arms["oracle_real"] = ("ce", task.train[5:5 + max(keep, 8)])
    if a.titok:  # last: the first arm dropped when the time budget runs out
        arms["contrastive_excess_titok"] = ("kl", labelled["contrastive_excess"])
    out["skipped_arms"] = []
    for name, (loss, data) in arms.items():
        if name in ("oracle_real", "contrastive_excess_titok") and time.monotonic() > a.deadline:
            out["skipped_arms"].append(name)
            say(f"seed {seed}: time budget spent, {name} skipped")
            continue
        t = time.perf_counter()
        train_student(gemma, gtok, task, data, loss=loss, steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=seed,
                      name=name)
        acc[name] = label_accuracy(gemma, gtok, task, evals)
        delete(gemma, name)
        _partial(a, out | {"accuracy": dict(acc)})
        T[f"arm_{name}_s"] = round(time.perf_counter() - t, 1)
        say(f"seed {seed}: {name}: accuracy {acc[name]:.3f} ({T[f'arm_{name}_s']} s)")
    acc["source_lora"] = out["source_acc"]
    out["accuracy"] = acc
    del src
    return out


# (seconds needed on one shared CPU thread, sizes): measured ~4.6 s per Gemma step, 0.23 s per eval tweet
PRESETS = [(1500, None),
           (880, {"n_eval": 100, "steps": 16, "n_candidates": 96, "keep": 48, "n_disc": 64, "source_steps": 30,
                  "titok": False}),
           (500, {"n_eval": 60, "steps": 10, "n_candidates": 48, "keep": 24, "n_disc": 40, "source_steps": 24,
                  "titok": False, "oracle": False})]


def _autosize(a: argparse.Namespace, left: float) -> None:
    """Pick the largest preset that fits the time left (the given sizes if they fit); exit if none does."""
    for need, sizes in PRESETS:
        if left >= need:
            for k, v in (sizes or {}).items():
                setattr(a, k, min(getattr(a, k), v) if isinstance(v, int) and not isinstance(v, bool) else v)
            say(f"autosize: {left:.0f} s left -> {sizes or 'as given'}")
            return
    say(f"autosize: only {left:.0f} s left, not enough for the smallest run; exiting")
    raise SystemExit(3)


def _partial(a: argparse.Namespace, run: dict) -> None:
    """Write what one seed has so far (replaced by the full result at the end)."""
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "transfer.json").write_text(json.dumps({"partial": True, "run": run}, indent=2) + "\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["runs"][0]["accuracy"])
    vals = [[r["accuracy"][n] for r in result["runs"]] for n in names]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    means = [sum(v) / len(v) for v in vals]
    ax[0].barh(names, means, color=["#888" if "base" in n else "#c44" if "trans_lora" in n else "#48c" for n in names])
    for i, v in enumerate(vals):
        ax[0].scatter(v, [i] * len(v), color="k", s=10, zorder=3)
    ax[0].axvline(result["majority_baseline"], ls="--", color="gray", lw=1)
    ax[0].set_xlabel(f"accuracy on {result['n_eval']} held-out tweets (dashed: majority)")
    ax[0].set_title("SmolLM2-135M + LoRA -> Gemma-3-270M (Trans-LoRA arms)")
    keys = [k for k in result["runs"][0]["mmd2"]]
    ax[1].bar(range(len(keys)), [sum(r["mmd2"][k] for r in result["runs"]) / len(result["runs"]) for k in keys])
    ax[1].set_xticks(range(len(keys)), keys, rotation=45, ha="right", fontsize=8)
    ax[1].set_title("MMD² to real tweets (MiniLM)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--n-candidates", type=int, default=300)
    p.add_argument("--keep", type=int, default=100)
    p.add_argument("--n-disc", type=int, default=200, help="real and source-synthetic texts for the discriminator")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--source-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--n-eval", type=int, default=300)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--titok", action="store_true", help="also the TiTok contrastive-excess arm")
    p.add_argument("--no-oracle", dest="oracle", action="store_false")
    p.add_argument("--budget-s", type=float, default=1500, help="optional arms (oracle, TiTok) are skipped past this")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--finish-by", default=None, help="UTC HH:MM: optional arms are skipped after this too")
    p.add_argument("--autosize", action="store_true", help="with --finish-by: shrink the run to the time left")
    a = p.parse_args()
    a.deadline = time.monotonic() + a.budget_s
    if a.finish_by:
        import datetime as dt

        now = dt.datetime.now(dt.UTC)
        hh, mm = map(int, a.finish_by.split(":"))
        end = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        left = (end - now).total_seconds()
        a.deadline = min(a.deadline, time.monotonic() + left)
        if a.autosize:
            _autosize(a, left)
    torch.set_num_threads(int(os.environ.get("LORAKIT_THREADS", "1")))
    from lorakit.models.gemma import load_gemma
    from lorakit.transfer import MiniLMEncoder

    t0 = time.perf_counter()
    gemma, gtok = load_gemma(progress=False)
    encoder = MiniLMEncoder()
    runs = [run_seed(s, a, gemma, gtok, encoder) for s in a.seeds]
    from lorakit.data import load_task

    task = load_task("sentiment", seed=a.seeds[0], n_eval=a.n_eval)
    result = {"benchmark": "trans_lora", "source": "SmolLM2-135M-Instruct + LoRA r8 a16 q,v",
              "target": "Gemma-3-270M base (Q4_K_M GGUF dequantized to fp32)", "task": "sentiment",
              "n_eval": a.n_eval, "majority_baseline": task.majority_baseline(),
              "args": {k: v for k, v in vars(a).items() if k != "deadline"} | {"out": str(a.out)},
              "runs": runs, "wall_s": round(time.perf_counter() - t0, 1), "threads": torch.get_num_threads()}
    mean = {k: sum(r["accuracy"][k] for r in runs) / len(runs) for k in runs[0]["accuracy"]}
    mmd = {k: sum(r["mmd2"][k] for r in runs) / len(runs) for k in runs[0]["mmd2"]}
    f, u, s = mean["filtered_synthetic_trans_lora"], mean["unfiltered_synthetic"], mean["seeds_only"]
    result["mean_accuracy"], result["mean_mmd2"] = mean, mmd
    result["direction"] = {"filtered_ge_source": f >= mean["source_lora"], "filtered_gt_unfiltered": f > u,
                           "unfiltered_gt_seeds_only": u > s,
                           "mmd_filtered_lt_unfiltered": mmd["filtered"] < mmd["unfiltered"]}
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, a.out / "transfer.png")
    line = (f"trans_lora SmolLM2->Gemma-3-270M sentiment ({len(runs)} seed(s), {a.n_candidates} cand, keep {a.keep}, "
            f"{a.steps} steps): " + ", ".join(f"{k}={v:.3f}" for k, v in mean.items())
            + f"; MMD2 filtered={mmd['filtered']:.4f} unfiltered={mmd['unfiltered']:.4f}; {result['wall_s']:.0f} s")
    result["summary"] = line
    (a.out / "transfer.json").write_text(json.dumps(result, indent=2) + "\n")
    print(line)


if __name__ == "__main__":
    main()
