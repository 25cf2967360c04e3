"""Where does multi-adapter decode time go? torch.profiler breakdown of one decode step, base vs lorakit.

Same setup as ``bench/serving/run.py`` (its ``build_model`` and ``random_states``): random Llama (hidden 512,
8 layers, vocab 32000, fp32), 32 rows, 32 distinct rank-``--rank`` adapters on q,k,v,o, a ``--context``-token
prefilled DynamicCache, 1 torch thread. Variants, interleaved over ``--rounds``: ``base`` (served model,
every row on the base) and ``lorakit`` (batched kernels, BGMV path). Each LoRA update
(``batched_lora`` in the 32 served layers (PagedSource)). Two ablations of lorakit: ``lorakit_nocache`` gathers
every row's adapter pages at every step (no reuse of the step's plan and gathered weights across decode
steps, ``ServingContext(gather_cache_bytes=0)``), and ``lorakit_advidx`` also does that gather by advanced
indexing ``pool[pages]`` instead of ``index_select`` (the kernel before this profile).
Each LoRA update is wrapped in a ``record_function("lora_delta")`` and the
per-step RowPlan build in ``record_function("row_plan")`` so their inclusive CPU time is reported.

Writes ``<out>/profile_decode.json`` and prints per-step tables (self CPU ms per op, top ``--top``) and
a one-line summary.

    python bench/serving/profile_decode.py --quick     # 2 steps x 1 round
    python bench/serving/profile_decode.py             # 8 steps x 4 rounds x 4 variants (~2 min)
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="profiled decode steps per round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--path", default="auto", help="kernel path: auto (BGMV for decode), bgmv, sgmv")
    p.add_argument("--out", type=Path, default=HERE / "results")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.rounds = 2, 1
    return a


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from run import build_model, random_states
    from transformers import DynamicCache

    import lorakit.serving.engine as eng
    import lorakit.serving.kernels.torch_ref as ref
    from lorakit.serving import AdapterBank
    from lorakit.serving.engine import ServingContext, serve_model

    inner_lora, inner_set_rows = eng.batched_lora, ServingContext.set_rows

    def lora_delta(*a, **k):
        with torch.profiler.record_function("lora_delta"):
            return inner_lora(*a, **k)

    def set_rows(self, *a, **k):
        with torch.profiler.record_function("row_plan"):
            return inner_set_rows(self, *a, **k)

    eng.batched_lora, ServingContext.set_rows = lora_delta, set_rows
    base = build_model()
    served = copy.deepcopy(base)
    states = random_states(base, args.rows, "all8" if args.rank == 8 else "mixed", seed=11)
    bank = AdapterBank.for_model(served, budget_bytes=64 << 20, page_rows=4, max_rank=64)
    for i, st in enumerate(states):
        bank.add(f"x{i}", st)
    ctx = serve_model(served, bank, ServingContext(path=args.path))
    slots = bank.slots([f"x{i}" for i in range(args.rows)])
    none = torch.full_like(slots, -1)
    vocab = base.config.vocab_size
    ids = torch.randint(3, vocab, (args.rows, args.context), generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def prefilled(sl):
        cache = DynamicCache()
        ctx.set_rows(sl, args.context)
        out = served(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        ctx.plan = None
        return cache, out.logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def decode(sl, cache, nxt, steps):
        for _ in range(steps):
            ctx.set_rows(sl, 1)
            out = served(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1)
            ctx.plan = None
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        return nxt

    variants = {"base": none, "lorakit": slots, "lorakit_nocache": slots, "lorakit_advidx": slots}
    fast_gather = ref.gather_pages

    def adv_gather(pool, pages):
        return pool[pages]
    self_us = {v: collections.Counter() for v in variants}
    incl_us = {v: collections.Counter() for v in variants}
    counts = {v: collections.Counter() for v in variants}
    cpu_s = {v: [] for v in variants}
    decode(slots, *prefilled(slots), 2)  # warm-up
    for rnd in range(args.rounds):
        for v in (list(variants) if rnd % 2 == 0 else list(variants)[::-1]):
            ref.gather_pages = adv_gather if v == "lorakit_advidx" else fast_gather
            ctx.gather_cache_bytes = (64 << 20) if v == "lorakit" else 0
            ctx._last = None
            cache, nxt = prefilled(variants[v])
            c0 = time.process_time()
            decode(variants[v], cache, nxt, args.steps)  # unprofiled timing
            cpu_s[v].append((time.process_time() - c0) / args.steps)
            cache, nxt = prefilled(variants[v])
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                decode(variants[v], cache, nxt, args.steps)
            for e in prof.key_averages():
                self_us[v][e.key] += e.self_cpu_time_total
                incl_us[v][e.key] += e.cpu_time_total
                counts[v][e.key] += e.count
    ref.gather_pages = fast_gather
    n = args.rounds * args.steps
    per_step = {v: {k: self_us[v][k] / n / 1000 for k in self_us[v]} for v in variants}
    total = {v: sum(per_step[v].values()) for v in variants}
    cpu_ms = {v: 1000 * sorted(cpu_s[v])[len(cpu_s[v]) // 2] for v in variants}
    lora_ms = incl_us["lorakit"]["lora_delta"] / n / 1000
    lora_nocache_ms = incl_us["lorakit_nocache"]["lora_delta"] / n / 1000
    plan_ms = {v: incl_us[v]["row_plan"] / n / 1000 for v in variants}
    keys = sorted(set().union(*per_step.values()),
                  key=lambda k: -(per_step["lorakit_advidx"].get(k, 0) - per_step["base"].get(k, 0)))
    rows = [{"op": k, "base_ms": per_step["base"].get(k, 0.0), "lorakit_ms": per_step["lorakit"].get(k, 0.0),
             "advidx_ms": per_step["lorakit_advidx"].get(k, 0.0),
             "nocache_ms": per_step["lorakit_nocache"].get(k, 0.0),
             "calls_per_step_lorakit": counts["lorakit"][k] / n,
             "calls_per_step_nocache": counts["lorakit_nocache"][k] / n} for k in keys
            if k not in ("lora_delta", "row_plan")]
    result = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "loadavg": os.getloadavg()},
              "step_cpu_ms_unprofiled": cpu_ms, "step_self_cpu_ms_profiled": total,
              "lora_delta_ms_per_step": lora_ms, "lora_delta_ms_per_step_nocache": lora_nocache_ms,
              "row_plan_ms_per_step": plan_ms,
              "lorakit_vs_base_unprofiled": cpu_ms["base"] / cpu_ms["lorakit"],
              "advidx_vs_base_unprofiled": cpu_ms["base"] / cpu_ms["lorakit_advidx"],
              "nocache_vs_base_unprofiled": cpu_ms["base"] / cpu_ms["lorakit_nocache"],
              "cpu_ms_all_rounds": {v: [1000 * x for x in cpu_s[v]] for v in variants}, "ops": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_decode.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| op | base | lorakit | no cache | no cache + advanced-index gather | calls/step (no cache) |\n"
          "|---|---:|---:|---:|---:|---:|")
    for r in rows[:args.top]:
        print(f"| {r['op']} | {r['base_ms']:.2f} | {r['lorakit_ms']:.2f} | {r['nocache_ms']:.2f} "
              f"| {r['advidx_ms']:.2f} | {r['calls_per_step_nocache']:.0f} |")
    print(f"| **total self CPU, profiled (ms/step)** | {total['base']:.2f} | {total['lorakit']:.2f} | "
          f"{total['lorakit_nocache']:.2f} | {total['lorakit_advidx']:.2f} | |")
    print(f"| **step CPU, unprofiled (ms, median)** | {cpu_ms['base']:.2f} | {cpu_ms['lorakit']:.2f} | "
          f"{cpu_ms['lorakit_nocache']:.2f} | {cpu_ms['lorakit_advidx']:.2f} | |")
    print(f"profile_decode: step CPU {cpu_ms['base']:.1f} ms base vs {cpu_ms['lorakit']:.1f} ms lorakit "
          f"({result['lorakit_vs_base_unprofiled']:.0%} of base throughput; no cache "
          f"{cpu_ms['lorakit_nocache']:.1f} ms, {result['nocache_vs_base_unprofiled']:.0%}; + advanced-index gather "
          f"{cpu_ms['lorakit_advidx']:.1f} ms, {result['advidx_vs_base_unprofiled']:.0%}); "
          f"lora_delta {lora_ms:.2f} ms/step "
          f"(inclusive), row_plan {plan_ms['lorakit']:.2f} ms/step")


if __name__ == "__main__":
    main()
