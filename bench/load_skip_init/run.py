"""Load time of a LoRA-XS adapter with and without running the forms' init on load.

``lorakit.load`` builds the forms inside ``lorakit.forms.base.skip_init()``: LoRA-XS then runs no SVD
per layer (its A, B come from the file). The "init" variant reproduces the old behaviour by replacing
that context with a no-op for the duration of its loads (each form then runs its SVD and the file
overwrites the result). Both variants load the same saved adapter onto a fresh copy of the same base
model (the copy is made outside the timed region); the runs are interleaved (init, skip, skip, init, ...)
in one process, one torch thread, and the loaded outputs are checked equal.

Models: ``tiny`` is ``lorakit.models.tiny_llama()`` (hidden 32, 2 layers: the test model); ``small`` is
``tiny_llama(hidden=512, layers=4)`` (attention 512x512, MLP 512x1024), where the SVDs start to cost.
LoRA-XS with its paper default r = 64 where the layer allows it (``--rank``; capped at the smallest
side of the targeted layers), targets all linear layers.

Outputs ``<out>/load_skip_init.json`` and ``<out>/load_skip_init.png`` and prints one summary line.

    python bench/load_skip_init/run.py            # tiny and small, 30 loads per variant (~1 min)
    python bench/load_skip_init/run.py --quick    # smoke test: tiny only, 3 loads
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import lorakit
import lorakit.api
from lorakit.models import tiny_llama

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/, for the shared bench/_common.py
import _common as common  # noqa: E402

MODELS = {"tiny": {}, "small": {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 4}}


def count_svd() -> list[int]:
    calls: list[int] = []
    real = torch.linalg.svd

    def svd(*a: Any, **kw: Any) -> Any:
        calls.append(1)
        return real(*a, **kw)

    torch.linalg.svd = svd
    return calls


def bench_model(kind: str, rank: int, reps: int, tmp: Path, svd_calls: list[int]) -> dict[str, Any]:
    base = tiny_llama(seed=0, **MODELS[kind])
    model = copy.deepcopy(base)
    sides = [min(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    r = min(rank, min(sides))
    lorakit.attach(model, lorakit.AdapterSpec(form="lora_xs", form_args={"r": r}, targets="all-linear"), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    adapter = tmp / kind
    lorakit.save(model, adapter)
    n_layers = len(lorakit.core.inject.adapter_modules(model, "default"))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    times: dict[str, dict[str, list[float]]] = {v: {"wall": [], "cpu": []} for v in ("init", "skip")}
    svds: dict[str, int] = {}
    real_skip = lorakit.api.skip_init
    for i in range(reps + 1):  # the first round warms up (imports, allocator) and is dropped
        order = ("init", "skip") if i % 2 == 0 else ("skip", "init")
        for variant in order:
            fresh = copy.deepcopy(base)
            lorakit.api.skip_init = real_skip if variant == "skip" else contextlib.nullcontext
            svd_calls.clear()
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                lorakit.load(fresh, adapter)
            finally:
                lorakit.api.skip_init = real_skip
            w1, c1 = time.perf_counter(), time.process_time()
            if i == 0:
                svds[variant] = len(svd_calls)
                with torch.no_grad():
                    assert torch.equal(fresh(ids).logits, expected), f"{kind}/{variant}: loaded output differs"
                continue
            times[variant]["wall"].append(w1 - w0)
            times[variant]["cpu"].append(c1 - c0)
    med = {v: {c: statistics.median(times[v][c]) for c in ("wall", "cpu")} for v in times}
    return {"model": kind, "model_args": MODELS[kind], "rank": r, "adapted_layers": n_layers,
            "svd_calls_per_load": svds, "median_s": med,
            "speedup_wall": med["init"]["wall"] / med["skip"]["wall"],
            "speedup_cpu": med["init"]["cpu"] / med["skip"]["cpu"], "times_s": times}


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(results))
    w = 0.38
    for k, (variant, label) in enumerate([("init", "forms run their init (before)"), ("skip", "skip_init (after)")]):
        ax.bar([x + (k - 0.5) * w for x in xs], [1e3 * r["median_s"][variant]["wall"] for r in results], w,
               label=label)
    ax.set_xticks(list(xs), [f"{r['model']} ({r['adapted_layers']} layers, r={r['rank']})" for r in results])
    ax.set_yscale("log")
    ax.set_ylabel("lorakit.load, median ms (wall, log)")
    ax.set_title("LoRA-XS adapter load time")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,small", help=f"comma list of {list(MODELS)} (default: tiny,small)")
    ap.add_argument("--rank", type=int, default=64, help="LoRA-XS r, capped per model (default 64, the paper's)")
    ap.add_argument("--reps", type=int, default=30, help="timed loads per variant and model (default 30)")
    ap.add_argument("--quick", action="store_true", help="smoke test: tiny model, 3 loads")
    ap.add_argument("--out", default="bench/load_skip_init/results/default", help="output folder")
    a = ap.parse_args()
    torch.set_num_threads(1)
    models, reps = (["tiny"], 3) if a.quick else (a.models.split(","), a.reps)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    svd_calls = count_svd()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_model(m, a.rank, reps, Path(tmp), svd_calls) for m in models]
    data = {"config": {"models": models, "rank": a.rank, "reps": reps, "quick": a.quick,
                       "clock": "median of per-load wall and process CPU time, first round dropped"},
            "machine": common.machine_with_load(load_start),
            "results": results}
    common.write_json(out / "load_skip_init.json", data)
    common.atomic_write(out / "load_skip_init.png", lambda p: plot(results, p))
    print("load_skip_init: " + "; ".join(
        f"{r['model']}: {1e3 * r['median_s']['init']['wall']:.1f} ms -> {1e3 * r['median_s']['skip']['wall']:.1f} ms "
        f"({r['speedup_wall']:.2f}x, SVDs per load {r['svd_calls_per_load']['init']} -> "
        f"{r['svd_calls_per_load']['skip']})" for r in results))


if __name__ == "__main__":
    main()
