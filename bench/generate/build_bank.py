"""Build the generators' task bank: 26 WordNet noun supersenses × the last M checkpoints of a LoRA each.

SmolLM2-135M-Instruct (embedded), LoRA r=2 (alpha 4) on q_proj, v_proj (115,200 parameters), trained by
``lorakit.train.Trainer`` as causal-LM on the glosses of one supersense (``lorakit.generate.tasks``);
:class:`lorakit.generate.collect.KeepLastStates` records the adapter after each of the last ``--keep``
steps (ICM-LoRA's late-training checkpoints; SG-LoRA's last-M prototype). Every task starts from the same
adapter init (seed 0) and sees its own data order (seed = task index), so within-task spread is the late
trajectory and between-task distance is what the data taught. Writes ``--out`` (a CheckpointBank folder,
not committed: ~9 MB per 20 checkpoints × 26 tasks) and ``results/bank_build.json`` (per task: perplexity of
the base and of the final adapter on ``--n-eval`` held-out glosses, seconds).

    python bench/generate/build_bank.py --steps 60 --keep 20 --out /tmp/lorakit-gen-bank
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import lorakit  # noqa: E402
from _common import machine_info, quiet_warnings  # noqa: E402
from lorakit.core.spec import AdapterSpec  # noqa: E402
from lorakit.generate import CheckpointBank  # noqa: E402
from lorakit.generate.collect import KeepLastStates  # noqa: E402
from lorakit.generate.tasks import SUPERSENSE_DESCRIPTIONS, supersense_gloss_task, supersense_task_sizes  # noqa: E402
from lorakit.models.loading import load_model, set_threads  # noqa: E402
from lorakit.train import TrainConfig, Trainer  # noqa: E402
from lorakit.train.objectives import make_objective  # noqa: E402

SPEC = AdapterSpec(form_args={"r": 2, "alpha": 4}, targets=["q_proj", "v_proj"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--keep", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--n-eval", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=48)
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--out", default="/tmp/lorakit-gen-bank")
    args = ap.parse_args()
    quiet_warnings()
    set_threads(1)
    model, tok = load_model(progress=False)
    names = list(SUPERSENSE_DESCRIPTIONS) if args.tasks == "all" else args.tasks.split(",")
    entries, rows = [], []
    t_all = time.perf_counter()
    parts = Path(f"{args.out}.parts")  # one finished task per folder: a crashed or stopped build resumes
    sizes = supersense_task_sizes()
    for i, name in enumerate(names):
        t0 = time.perf_counter()
        if (parts / name / "bank.json").is_file():
            done = CheckpointBank.load(parts / name)
            entries.append((name, SUPERSENSE_DESCRIPTIONS[name], None, done))
            rows.append(done.tasks[0].meta)
            print(f"[{i + 1}/{len(names)}] {name}: already built", flush=True)
            continue
        n_eval = min(args.n_eval, max(8, sizes[name] // 5))  # noun.motive has 42 glosses, noun.Tops 51
        task = supersense_gloss_task(name, seed=0, n_eval=n_eval)
        lorakit.attach(model, SPEC, name="default", seed=0)
        obj = make_objective(task, tok, max_length=args.max_length, eval_batch_size=32)
        keep = KeepLastStates(args.steps, args.keep)
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, seed=i, progress=False,
                          eval_at_start=True)
        res = Trainer(model, task.train, obj.collate, obj.loss, cfg, eval_fn=obj.evaluate,
                      strategies=[keep]).train(resume=False)
        rows.append({"task": name, "n_train": len(task.train), "n_eval": n_eval,
                     "ppl_base": res.eval_before.get("perplexity"), "ppl_adapter": res.eval_after.get("perplexity"),
                     "final_loss": res.final_loss, "seconds": round(time.perf_counter() - t0, 1)})
        one = CheckpointBank.from_states([(name, SUPERSENSE_DESCRIPTIONS[name], list(keep.states))])
        one.tasks[0].meta = rows[-1]
        one.save(parts / name)
        entries.append((name, SUPERSENSE_DESCRIPTIONS[name], None, one))
        print(f"[{i + 1}/{len(names)}] {name}: ppl {rows[-1]['ppl_base']:.2f} -> {rows[-1]['ppl_adapter']:.2f} "
              f"({rows[-1]['seconds']} s)", flush=True)
        lorakit.delete(model, "default")
    layout = entries[0][3].layout
    bank = CheckpointBank(layout, [e[3].tasks[0] for e in entries])
    for e in entries:
        if e[3].layout.slots != layout.slots:
            raise SystemExit(f"{e[0]}: its checkpoints do not align with the others")
    bank.save(args.out)
    spread = bank.spread()
    out = {"config": vars(args), "spec": SPEC.to_dict(), "dim": bank.layout.dim, "tasks": rows, "spread": spread,
           "bank_bytes": bank.nbytes(), "seconds": round(time.perf_counter() - t_all, 1),
           "machine": machine_info()}
    Path(__file__).with_name("results").mkdir(exist_ok=True)
    (Path(__file__).with_name("results") / "bank_build.json").write_text(json.dumps(out, indent=1))
    gain = sum(r["ppl_base"] / r["ppl_adapter"] for r in rows) / len(rows)
    print(f"bank: {len(rows)} tasks x {args.keep} checkpoints, D={bank.layout.dim}; mean ppl ratio base/adapter "
          f"{gain:.3f}; within-task rms {spread['within_task_rms']:.4f} vs between-task "
          f"{spread['between_task_mean']:.4f} -> {args.out}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
