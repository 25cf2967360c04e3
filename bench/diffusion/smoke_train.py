"""Smoke run of the testbed base training (a few steps; shows the loss falls and measures s/step).

    flock /tmp/lorakit-heavy.lock .venv/bin/python bench/diffusion/smoke_train.py --steps 60
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lorakit.diffusion.testbed import train_base


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", default="bench/diffusion/results/smoke_train.json")
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        start = time.perf_counter()
        r = train_base(d, steps=a.steps, batch_size=a.batch_size, save_every=a.steps // 2, progress=False,
                       device="cpu")
        wall = time.perf_counter() - start
        # resume: a second call at the same step count finds the finished run and trains nothing more
        again = train_base(d, steps=a.steps, batch_size=a.batch_size, save_every=a.steps // 2, progress=False,
                           device="cpu")
    losses = r["losses"]
    k = max(len(losses) // 5, 1)
    out = {"steps": r["steps"], "batch_size": a.batch_size, "seconds": r["seconds"], "wall_seconds": wall,
           "s_per_step": r["seconds"] / max(r["steps"], 1), "loss_first": sum(losses[:k]) / k,
           "loss_last": sum(losses[-k:]) / k, "resumed_steps": again["steps"], "threads": 1}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
