"""Parameter generators on the supersense bank, leave-tasks-out: can a description replace training?

Bank: ``build_bank.py`` (26 WordNet noun supersenses, SmolLM2-135M, LoRA r=2 on q,v, the last M steps'
checkpoints of each task). Conditions: all-MiniLM-L6-v2 embeddings of the lexnames one-line descriptions.
Two folds of 4 held-out tasks; for each fold every generator is fitted on the other 22 tasks only.

Arms, scored by perplexity on each task's held-out glosses (the split the bank's adapters never saw):

- ``base``: no adapter;                       ``oracle``: the task's own last checkpoint (trained on it);
- ``model_soup``: mean of all bank prototypes; ``adapter_soup``: uniform mean of the top-k by description;
- ``topk_weighted``: SG-LoRA's μ* (softmax(cos/τ)-weighted top-k prototypes; deterministic);
- ``sg_lora`` (prior mean, and the mean perplexity of ``--samples`` samples; the decoder outputs x as the
  paper), ``sg_lora_residual`` (lorakit's option: the decoder outputs x − μ*), ``icm_lora``
  (text-conditioned, samples), ``icm_lora_uncond`` (the unconditional VAE, p-diff style), ``text_to_lora``
  (the T2L-style hypernetwork trained by reconstruction);
- controls: ``sg_lora_random_desc`` (a random unit vector instead of the description embedding) and
  ``matched_random`` (a random adapter with the bank's per-tensor mean and std).

Also, on 4 SEEN tasks (fitted on them): each generator's adapter for its own description vs the oracle
(ICM-LoRA's claim is reconstruction of seen tasks), and the parameter-space cosine to the oracle.
Reported: the within-task spread of checkpoints vs the between-task distance (generation vs
memorisation), generator bytes vs the stored checkpoint bytes. JSON + PNG + one summary line.

    python bench/generate/build_bank.py --out /work/gen-bank
    python bench/generate/run.py --bank /work/gen-bank
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lorakit  # noqa: E402
from _common import machine_info, quiet_warnings  # noqa: E402
from lorakit.core import registry  # noqa: E402
from lorakit.generate import BankTask, CheckpointBank  # noqa: E402
from lorakit.generate import baselines as B  # noqa: E402
from lorakit.generate.conditions import text_encoder  # noqa: E402
from lorakit.generate.tasks import supersense_gloss_task  # noqa: E402
from lorakit.models.loading import load_model, set_threads  # noqa: E402
from lorakit.train.objectives import make_objective  # noqa: E402

FOLDS = (("noun.plant", "noun.food", "noun.person", "noun.time"),
         ("noun.body", "noun.feeling", "noun.location", "noun.substance"))
SEEN = ("noun.animal", "noun.artifact", "noun.act", "noun.communication")
RESULTS = Path(__file__).with_name("results")


def perplexity(model: Any, tok: Any, state: Any, task_id: str, n_eval: int, cache: dict[str, Any]) -> float:
    if task_id not in cache:
        task = supersense_gloss_task(task_id, seed=0, n_eval=n_eval)
        cache[task_id] = make_objective(task, tok, max_length=48, eval_batch_size=32)
    obj = cache[task_id]
    if state is not None:
        lorakit.apply_state(model, state, "gen")
    try:
        return float(obj.evaluate(model)["perplexity"])
    finally:
        if state is not None:
            lorakit.delete(model, "gen")


def fit(method: str, bank: CheckpointBank, conds: torch.Tensor, budget: dict[str, int], rng_seed: int,
        **args: Any) -> Any:
    """Fit one generator; ``budget`` holds ``steps`` and/or ``epochs`` (passed where ``fit`` takes them)."""
    cls = registry.get("generate", method)
    gen = cls.for_embeddings(bank.layout, conds.shape[1], "minilm", **args)
    torch.manual_seed(rng_seed)
    accepted = inspect.signature(gen.fit).parameters
    t0 = time.perf_counter()
    report = gen.fit(bank, conds, **{k: v for k, v in budget.items() if k in accepted})
    print(f"  fitted {method} {args or ''} in {time.perf_counter() - t0:.0f} s", flush=True)
    return gen.eval(), report


def thin(bank: CheckpointBank, every: int) -> CheckpointBank:
    """Every ``every``-th checkpoint of each task (ICM-LoRA's conv CVAE costs ~1 s per batch on 1 CPU thread)."""
    return CheckpointBank(bank.layout, [BankTask(t.task_id, t.description, t.vectors[every - 1::every].clone())
                                        for t in bank.tasks])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bank", default="/work/gen-bank")
    ap.add_argument("--steps", type=int, default=200, help="SG-LoRA and T2L training steps")
    ap.add_argument("--icm-epochs", type=int, default=15, help="ICM-LoRA epochs (over the thinned bank)")
    ap.add_argument("--icm-every", type=int, default=6, help="ICM-LoRA trains on every k-th checkpoint")
    ap.add_argument("--n-eval", type=int, default=48)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--folds", default=";".join(",".join(f) for f in FOLDS),
                    help="held-out task groups: 'a,b;c,d' (one generator fit per group)")
    ap.add_argument("--seen", default=",".join(SEEN), help="seen tasks scored in every fold")
    ap.add_argument("--sg-hidden", type=int, default=64, help="SG-LoRA MLP width (D=115,200 makes it the cost)")
    args = ap.parse_args()
    quiet_warnings()
    set_threads(1)
    t_start = time.perf_counter()
    full = CheckpointBank.load(args.bank)
    enc = text_encoder("minilm")
    emb = dict(zip(full.task_ids, enc.encode(full.descriptions)))
    model, tok = load_model(progress=False)
    model.eval()
    cache: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    sizes: dict[str, int] = {}
    g = torch.Generator().manual_seed(0)
    random_emb = torch.nn.functional.normalize(torch.randn(emb[full.task_ids[0]].shape[0], generator=g), dim=0)

    def score(arm: str, task_id: str, state: Any, fold: int, kind: str, extra: dict[str, Any] | None = None) -> None:
        ppl = perplexity(model, tok, state, task_id, args.n_eval, cache)
        row = {"fold": fold, "kind": kind, "task": task_id, "arm": arm, "ppl": ppl, **(extra or {})}
        if state is not None:
            oracle = full.task(task_id).vectors[-1]
            v = full.layout.flatten(state)
            row["cos_to_oracle"] = float(torch.nn.functional.cosine_similarity(v, oracle, dim=0))
        rows.append(row)
        print(f"  fold {fold} {kind:8s} {task_id:20s} {arm:22s} ppl {ppl:9.3f}", flush=True)

    folds = [tuple(f.split(",")) for f in args.folds.split(";") if f]
    seen = tuple(t for t in args.seen.split(",") if t)
    for fold, held in enumerate(folds):
        bank = full.without(held)
        conds = torch.stack([emb[t] for t in bank.task_ids])
        task_embs = conds
        print(f"fold {fold}: fitting generators on {len(bank.tasks)} tasks (held out {', '.join(held)})", flush=True)
        t0 = time.perf_counter()
        steps, icm = {"steps": args.steps, "seed": fold}, {"epochs": args.icm_epochs}
        thinned = thin(bank, args.icm_every)
        gens = {"sg_lora": fit("sg_lora", bank, conds, steps, fold, k=args.k, tau=args.tau, hidden=args.sg_hidden,
                               cond_proj=args.sg_hidden)[0],
                "sg_lora_residual": fit("sg_lora", bank, conds, steps, fold, k=args.k, tau=args.tau,
                                        hidden=args.sg_hidden, cond_proj=args.sg_hidden, residual=True)[0],
                "icm_lora": fit("icm_lora", thinned, conds, icm, fold, seed=fold)[0],
                "icm_lora_uncond": fit("icm_lora", thinned, conds, icm, fold, seed=fold, conditional=False)[0],
                "text_to_lora": fit("text_to_lora", bank, conds, steps, fold, seed=fold)[0]}
        fit_seconds = time.perf_counter() - t0
        sizes.update({k: g_.nbytes() for k, g_ in gens.items()})
        for kind, tasks in (("held_out", held), ("seen", seen)):
            for task_id in tasks:
                q = emb[task_id]
                score("base", task_id, None, fold, kind)
                score("oracle", task_id, full.layout.unflatten(full.task(task_id).vectors[-1]), fold, kind)
                score("model_soup", task_id, B.model_soup(bank), fold, kind)
                score("adapter_soup", task_id, B.adapter_soup(bank, q, task_embs, args.k), fold, kind)
                score("topk_weighted", task_id, B.topk_weighted(bank, q, task_embs, args.k, args.tau), fold, kind)
                score("matched_random", task_id, B.matched_random(bank, seed=fold), fold, kind)
                score("sg_lora", task_id, gens["sg_lora"].generate(embedding=q, mode="mean"), fold, kind)
                score("sg_lora_residual", task_id, gens["sg_lora_residual"].generate(embedding=q, mode="mean"),
                      fold, kind)
                score("sg_lora_random_desc", task_id, gens["sg_lora"].generate(embedding=random_emb, mode="mean"),
                      fold, kind)
                for arm in ("sg_lora_sample", "icm_lora", "icm_lora_uncond"):
                    gen = gens["sg_lora" if arm == "sg_lora_sample" else arm]
                    ppls = []
                    for s in range(args.samples):
                        ppls.append(perplexity(model, tok, gen.generate(embedding=q, seed=s), task_id, args.n_eval,
                                               cache))
                    rows.append({"fold": fold, "kind": kind, "task": task_id, "arm": arm,
                                 "ppl": sum(ppls) / len(ppls), "ppl_samples": ppls})
                    print(f"  fold {fold} {kind:8s} {task_id:20s} {arm:22s} ppl {rows[-1]['ppl']:9.3f} "
                          f"(samples {', '.join(f'{p:.2f}' for p in ppls)})", flush=True)
                score("text_to_lora", task_id, gens["text_to_lora"].generate(embedding=q, mode="mean"), fold, kind)
        rows.append({"fold": fold, "kind": "timing", "fit_seconds": round(fit_seconds, 1)})

    arms = [a for a in dict.fromkeys(r["arm"] for r in rows if "arm" in r)]
    table: dict[str, dict[str, float]] = {}
    for kind in ("held_out", "seen"):
        table[kind] = {}
        for arm in arms:
            v = [r["ppl"] for r in rows if r.get("kind") == kind and r.get("arm") == arm]
            if v:  # geometric mean over tasks (perplexities differ by an order of magnitude between tasks)
                table[kind][arm] = math.exp(sum(math.log(x) for x in v) / len(v))
    spread = full.spread()
    stored = full.nbytes()
    out = {"config": vars(args), "folds": folds, "seen": seen, "rows": rows,
           "geomean_ppl": table, "spread": spread, "generator_bytes": sizes, "bank_bytes": stored,
           "checkpoints_per_task": len(full.tasks[0].vectors), "dim": full.layout.dim,
           "seconds": round(time.perf_counter() - t_start, 1), "machine": machine_info()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "generate.json").write_text(json.dumps(out, indent=1))
    plot(table)
    h, s = table["held_out"], table["seen"]
    print(f"generate: held-out geo-mean ppl base {h['base']:.2f}, model soup {h['model_soup']:.2f}, top-k μ* "
          f"{h['topk_weighted']:.2f}, SG-LoRA {h['sg_lora']:.2f}, ICM-LoRA {h['icm_lora']:.2f}, T2L "
          f"{h['text_to_lora']:.2f}, oracle {h['oracle']:.2f}; seen: ICM-LoRA {s['icm_lora']:.2f} vs oracle "
          f"{s['oracle']:.2f}; within/between spread {spread['ratio']:.3f}")


def plot(table: dict[str, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=False)
    for ax, kind in zip(axes, ("held_out", "seen")):
        arms = list(table[kind])
        vals = [table[kind][a] for a in arms]
        colors = ["#888" if a in ("base", "oracle") else "#c44" if "random" in a else "#36c" for a in arms]
        ax.bar(range(len(arms)), vals, color=colors)
        ax.set_xticks(range(len(arms)), arms, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{kind.replace('_', '-')} tasks: geo-mean perplexity (lower is better)")
        ax.set_ylim(min(vals) * 0.95, max(vals) * 1.02)
    fig.tight_layout()
    fig.savefig(RESULTS / "generate.png", dpi=120)


if __name__ == "__main__":
    main()
