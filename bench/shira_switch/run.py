"""Adapter switching on a fused model: SHiRA scatter vs LoRA merge/unmerge at equal parameter budget.

SHiRA (Bhardwaj et al., NeurIPS 2024, arXiv 2406.13175) claims that loading a sparse adapter into a
base model is 5–16× faster than LoRA fusion on a CPU: switching touches only the k = r·(m+n) masked
entries of each weight, while LoRA has to compute and add a dense m×n product B·A (O(m·n·r)).

Setup: the embedded SmolLM2-135M (``lorakit.models.load_model()``), every linear layer of its 30
blocks (210 layers), two adapters per method ("a" and "b") with random values, and for each budget r
a LoRA of rank r and a SHiRA with k = r·(m+n) entries per layer (the same number of parameters).
A *switch* goes from adapter a fused to adapter b fused (and back): unmerge the current adapter,
merge the next one, over all 210 layers. Two ways for each method:

- ``*_inplace``: straight on the weight tensors, what a serving engine would do. SHiRA: restore the k
  recorded entries of the old adapter (bit-exact), scatter the new one recording what it overwrites
  (``Shira.unmerge_from_`` / ``merge_into_``). LoRA: ``W.addmm_(B_old, A_old, alpha=-s)`` then
  ``W.addmm_(B_new, A_new, alpha=s)``.
- ``shira_add``: the bare scatter-add W[mask] −= s_old, W[mask] += s_new (``merge_into_(exact=False)``,
  one read-modify-write pass per adapter; not bit-exact, like LoRA).
- ``*_api``: ``lorakit.unmerge(model, [old])`` + ``lorakit.merge(model, [new])``, the generic path
  (each form returns a new weight that the layer copies in).

All variants are timed side by side in one process with 1 torch thread, in interleaved rounds (the
order rotates every round), each round timing both directions; the headline is the median switch
time in process CPU time (robust to other jobs sharing the cores), wall time is reported too.
Before timing, every in-place switch is checked against W + ΔW. After timing, each in-place variant
runs 2·rounds switches from the exact base and unmerges; the weights are then compared with the
untouched base: exact SHiRA returns to it bit for bit, scatter-add SHiRA and LoRA accumulate rounding
drift (SHiRA's only on the masked entries).

Writes ``<out>/shira_switch.json`` and ``<out>/shira_switch.png`` and prints one summary line.

    python bench/shira_switch/run.py                  # SmolLM2-135M, ~2 min on a shared 2-core box
    python bench/shira_switch/run.py --model tiny     # smoke run in seconds
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/, for the shared bench/_common.py
import _common as common  # noqa: E402

HERE = Path(__file__).resolve().parent
VARIANTS = ("shira_inplace", "shira_add", "lora_inplace", "shira_api", "lora_api")
PAPER_SPEEDUP = (5.0, 16.0)  # "loading SHiRA ... 5x-16x faster than LoRA fusion on a CPU" (abstract)

common.quiet_warnings()


# --------------------------------------------------------------------------------------- setup
def load_base(model: str) -> nn.Module:
    from lorakit.models import load_model, tiny_llama

    if model == "tiny":
        base = tiny_llama(hidden=256, layers=4, heads=8, kv_heads=4, seed=0)
    else:
        base, _ = load_model(None if model == "smollm2" else model, progress=False)
    base.requires_grad_(False)
    return base.float().eval()


def attach_pair(model: nn.Module, form: str, r: int, seed: int) -> tuple[str, str]:
    """Adapters ``<form><r>a`` and ``<form><r>b`` on every linear layer, random values (not zero)."""
    import lorakit

    names = (f"{form}{r}a", f"{form}{r}b")
    form_args = {"r": r, "alpha": 2.0 * r} if form == "lora" else {"r": r}
    for i, name in enumerate(names):
        spec = lorakit.AdapterSpec(form=form, form_args=form_args, targets="all-linear")
        lorakit.attach(model, spec, name=name, seed=seed + i, trainable=False)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in adapted(model):
            for name in names:
                for p in layer.adapters[name].parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return names


def adapted(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from lorakit.core.inject import adapted_layers

    return list(adapted_layers(model))


# -------------------------------------------------------------------------------------- switches
def shira_inplace(model: nn.Module, old: str, new: str) -> None:
    with torch.no_grad():
        for _, layer in adapted(model):
            w = layer.base_layer.weight
            layer.adapters[old].unmerge_from_(w)
            layer.adapters[new].merge_into_(w)


def shira_add(model: nn.Module, old: str, new: str) -> None:
    with torch.no_grad():
        for _, layer in adapted(model):
            w = layer.base_layer.weight
            layer.adapters[old].unmerge_from_(w)
            layer.adapters[new].merge_into_(w, exact=False)


def lora_inplace(model: nn.Module, old: str, new: str) -> None:
    with torch.no_grad():
        for _, layer in adapted(model):
            w = layer.base_layer.weight
            fo, fn = layer.adapters[old], layer.adapters[new]
            w.addmm_(fo.lora_B, fo.lora_A, alpha=-fo.scaling)
            w.addmm_(fn.lora_B, fn.lora_A, alpha=fn.scaling)


def api_switch(model: nn.Module, old: str, new: str) -> None:
    import lorakit

    lorakit.unmerge(model, [old])
    lorakit.merge(model, [new])


SWITCH = {"shira_inplace": shira_inplace, "shira_add": shira_add, "lora_inplace": lora_inplace,
          "shira_api": api_switch, "lora_api": api_switch}


def check_inplace(model: nn.Module, names: tuple[str, str], switch: Callable,
                  base: dict[str, torch.Tensor]) -> float:
    """Max |W − (W0 + ΔW_b)| after an in-place a→b switch (a merged via lorakit first)."""
    import lorakit

    a, b = names
    lorakit.merge(model, [a])
    switch(model, a, b)
    worst = 0.0
    with torch.no_grad():
        for path, layer in adapted(model):
            expected = base[path] + layer.adapters[b].delta_weight()
            worst = max(worst, (layer.base_layer.weight - expected).abs().max().item())
    switch(model, b, a)
    lorakit.unmerge(model, [a])
    return worst


def drift(model: nn.Module, base: dict[str, torch.Tensor]) -> dict[str, Any]:
    worst, changed = 0.0, 0
    for path, layer in adapted(model):
        diff = (layer.base_layer.weight - base[path]).abs()
        worst = max(worst, diff.max().item())
        changed += int(torch.count_nonzero(diff))
    return {"max_abs": worst, "entries_changed": changed}


# ---------------------------------------------------------------------------------------- timing
def run_budget(models: dict[str, nn.Module], r: int, rounds: int, seed: int,
               base: dict[str, torch.Tensor], bar: tqdm) -> dict[str, Any]:
    """Attach a/b adapters of budget r to both models, time all variants interleaved, clean up."""
    import lorakit

    pairs = {"shira": attach_pair(models["shira"], "shira", r, seed),
             "lora": attach_pair(models["lora"], "lora", r, seed + 100)}
    family = {v: v.split("_")[0] for v in VARIANTS}
    checks = {v: check_inplace(models[family[v]], pairs[family[v]], SWITCH[v], base)
              for v in VARIANTS if not v.endswith("_api")}
    for fam, (a, _) in pairs.items():
        lorakit.merge(models[fam], [a])
    for v in VARIANTS:  # warm-up: first-call paths, allocator
        a, b = pairs[family[v]]
        SWITCH[v](models[family[v]], a, b)
        SWITCH[v](models[family[v]], b, a)
    times: dict[str, dict[str, list[float]]] = {c: {v: [] for v in VARIANTS} for c in common.CLOCKS}
    for k, order in common.rotations(VARIANTS, rounds):
        for v in order:
            bar.set_postfix_str(f"r={r} round {k + 1}/{rounds} {v}")
            model, (a, b) = models[family[v]], pairs[family[v]]
            gc.collect()
            for old, new in ((a, b), (b, a)):
                w0, c0 = common.CLOCKS["wall"](), common.CLOCKS["cpu"]()
                SWITCH[v](model, old, new)
                times["cpu"][v].append(common.CLOCKS["cpu"]() - c0)
                times["wall"][v].append(common.CLOCKS["wall"]() - w0)
            bar.update()
    for fam, (a, _) in pairs.items():
        lorakit.unmerge(models[fam], [a])
        restore(models[fam], base)
    # drift: from the exact base, merge a, switch a->b->a ... (2·rounds switches), unmerge a
    switches = 2 * rounds
    after = {}
    for v in ("shira_inplace", "shira_add", "lora_inplace"):
        model, (a, b) = models[family[v]], pairs[family[v]]
        lorakit.merge(model, [a])
        for i in range(switches):
            SWITCH[v](model, *((a, b) if i % 2 == 0 else (b, a)))
        lorakit.unmerge(model, [a])
        after[v] = drift(model, base)
        restore(model, base)
    for fam, names in pairs.items():  # start the next budget from the exact base weights
        for name in names:
            lorakit.delete(models[fam], name)
        restore(models[fam], base)
    params = sum(r * sum(w.shape) for w in base.values())
    weights = sum(w.numel() for w in base.values())
    timing = {c: {v: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
                      "switch_times_s": ts} for v, ts in per.items()} for c, per in times.items()}
    speedup = {c: {"inplace": timing[c]["lora_inplace"]["median_s"] / timing[c]["shira_inplace"]["median_s"],
                   "add": timing[c]["lora_inplace"]["median_s"] / timing[c]["shira_add"]["median_s"],
                   "api": timing[c]["lora_api"]["median_s"] / timing[c]["shira_api"]["median_s"]}
               for c in common.CLOCKS}
    return {"r": r, "adapter_params": params, "density": params / weights, "timing": timing,
            "speedup_lora_over_shira": speedup, "inplace_check_max_abs": checks,
            "drift_after_switches": {"switches_per_variant": switches, **after}}


def restore(model: nn.Module, base: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for path, w in base.items():
            model.get_submodule(path).weight.copy_(w)


def linear_paths(model: nn.Module) -> list[str]:
    import lorakit

    return lorakit.find_targets(model, lorakit.AdapterSpec(targets="all-linear"))


# ---------------------------------------------------------------------------------------- output
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = result["budgets"]
    clock = result["headline_clock"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = {"shira_inplace": "tab:green", "shira_add": "tab:cyan", "lora_inplace": "tab:red",
              "shira_api": "tab:olive", "lora_api": "tab:orange"}
    width = 0.16
    for i, v in enumerate(VARIANTS):
        xs = [j + (i - (len(VARIANTS) - 1) / 2) * width for j in range(len(budgets))]
        med = [b["timing"][clock][v]["median_s"] * 1e3 for b in budgets]
        lo = [m - b["timing"][clock][v]["min_s"] * 1e3 for m, b in zip(med, budgets)]
        hi = [b["timing"][clock][v]["max_s"] * 1e3 - m for m, b in zip(med, budgets)]
        ax.bar(xs, med, width=width, yerr=[lo, hi], capsize=3, color=colors[v], edgecolor="k", label=v)
    ax.set_yscale("log")
    ax.set_xticks(range(len(budgets)),
                  [f"r={b['r']} ({b['adapter_params'] / 1e6:.2f}M params, {100 * b['density']:.1f}% of W)\n"
                   f"LoRA/SHiRA: in-place {b['speedup_lora_over_shira'][clock]['inplace']:.1f}x, "
                   f"add {b['speedup_lora_over_shira'][clock]['add']:.1f}x, "
                   f"api {b['speedup_lora_over_shira'][clock]['api']:.1f}x" for b in budgets], fontsize=8)
    ax.set_ylabel(f"ms per switch ({clock} time, median; whiskers min..max)")
    cfg = result["config"]
    ax.set_title(f"adapter switch a->b, SHiRA vs LoRA at equal budget: {cfg['model']}, "
                 f"{cfg['layers']} linear layers, 1 thread, {cfg['rounds']} rounds", fontsize=10)
    ax.legend(fontsize=8)
    common.save_figure(fig, path, dpi=120)


def summary_line(result: dict[str, Any]) -> str:
    clock = result["headline_clock"]
    parts = []
    for b in result["budgets"]:
        t = b["timing"][clock]
        s = b["speedup_lora_over_shira"][clock]
        ms = {v: t[v]["median_s"] * 1e3 for v in VARIANTS}
        parts.append(f"r={b['r']} ({100 * b['density']:.1f}% of W): LoRA {ms['lora_inplace']:.0f} ms "
                     f"vs SHiRA exact {ms['shira_inplace']:.0f} ms ({s['inplace']:.1f}x) / scatter-add "
                     f"{ms['shira_add']:.0f} ms ({s['add']:.1f}x); lorakit.merge/unmerge "
                     f"{ms['lora_api']:.0f} vs {ms['shira_api']:.0f} ms ({s['api']:.1f}x)")
    d = result["budgets"][0]["drift_after_switches"]
    cfg = result["config"]
    return (f"shira_switch: {' | '.join(parts)} (median of {2 * cfg['rounds']} switches, 1 thread, "
            f"{clock} time, {cfg['model']}, {cfg['layers']} layers; "
            f"paper: {PAPER_SPEEDUP[0]:g}-{PAPER_SPEEDUP[1]:g}x; "
            f"max |W - W0| after {d['switches_per_variant']} switches: SHiRA exact "
            f"{d['shira_inplace']['max_abs']:.1g}, scatter-add {d['shira_add']['max_abs']:.1g}, "
            f"LoRA {d['lora_inplace']['max_abs']:.1g})")


# ------------------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.make_parser(__doc__)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded SmolLM2-135M), 'tiny' (seeded small llama) or a local HF dir")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8],
                   help="budgets: LoRA rank r = SHiRA k/(m+n)")
    p.add_argument("--rounds", type=int, default=7, help="rounds; each times a->b and b->a per variant")
    p.add_argument("--clock", choices=tuple(common.CLOCKS), default="cpu", help="headline clock")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.pin_threads()
    base_model = load_base(args.model)
    paths = linear_paths(base_model)
    base = {p: base_model.get_submodule(p).weight.detach().clone() for p in paths}
    models = {"shira": base_model, "lora": copy.deepcopy(base_model)}
    budgets = []
    with tqdm(total=len(args.ranks) * args.rounds * len(VARIANTS), desc="switching", unit="variant",
              file=sys.stderr) as bar:
        for r in args.ranks:
            budgets.append(run_budget(models, r, args.rounds, args.seed, base, bar))
    result = {
        "benchmark": "shira_switch",
        "claim": "loading SHiRA on a base model is 5x-16x faster than LoRA fusion on a CPU "
                 "(arXiv 2406.13175)",
        "config": {"model": args.model, "layers": len(paths), "ranks": args.ranks, "rounds": args.rounds,
                   "seed": args.seed, "switch": "unmerge old + merge new over all layers, fp32"},
        "headline_clock": args.clock,
        "machine": common.machine_info(packages=()),
        "budgets": budgets,
    }
    result["summary"] = summary_line(result)
    args.out.mkdir(parents=True, exist_ok=True)
    common.atomic_write(args.out / "shira_switch.json",
                  lambda p: p.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n"))
    common.atomic_write(args.out / "shira_switch.png", lambda p: plot(result, p))
    print(result["summary"])


if __name__ == "__main__":
    main()
