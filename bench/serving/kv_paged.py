"""Paged vs dense KV cache in the serving engine: decode throughput and peak KV bytes under joins/leaves.

Claim under test (issue 7; vLLM PagedAttention, arXiv 2309.06180; S-LoRA unified paging, arXiv
2311.03285): a paged KV cache stores no padding and lets requests join and leave without copying the
batch's cache, so it holds fewer KV bytes than the dense left-padded ``DynamicCache`` with mixed
lengths, at similar decode speed (in pure PyTorch both paths copy K/V each step: the paged one gathers
the rows' pages, the dense one re-concatenates the cache).

Setup (defaults): random Llama from config (hidden 512, 8 layers, 8 heads, 8 KV heads, intermediate
1376, vocab 32000, fp32, CPU, 1 torch thread), 8 LoRA adapters of rank 8 on q,k,v,o (random weights);
a workload of ``--requests`` requests submitted at once, prompt lengths uniform in [8, 128], max_new_tokens
uniform in [8, 64] (seeded), adapters round-robin with every 4th request on the base model, ``--max-batch``
rows, greedy; requests join as others finish (continuous batching). Variants ``dense`` and ``paged``
(``page_tokens`` 16) run the same workload, interleaved over ``--rounds`` rounds (order alternates;
one unrecorded warm-up round). Decode tok/s = decoded tokens / process CPU time spent in decode steps
(median over rounds; wall times in the JSON); peak KV bytes = max over steps of the bytes holding K/V
(dense: the cache tensors, padding included; paged: pages in use), plus the paged pool's physical size and
the reserved bytes (admission reserves prompt + max_new_tokens per request). Greedy tokens of both
variants are compared.

Writes ``<out>/kv_paged.json`` and ``<out>/kv_paged.png``; prints one summary line.

    python bench/serving/kv_paged.py --quick   # seconds, tiny model
    python bench/serving/kv_paged.py           # default (about a CPU-minute or two)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_model(vocab: int, hidden: int, layers: int, heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().eval()


def random_adapter(model, rank: int, seed: int):
    from lorakit.core.spec import AdapterSpec
    from lorakit.core.state import AdapterState

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and path.rpartition(".")[2] in TARGETS:
            tensors[f"{path}.lora_A.weight"] = torch.randn(rank, mod.in_features, generator=g) * 0.02
            tensors[f"{path}.lora_B.weight"] = torch.randn(mod.out_features, rank, generator=g) * 0.02
    spec = AdapterSpec(form="lora", form_args={"r": rank, "alpha": 2.0 * rank}, targets=TARGETS)
    return AdapterState(spec=spec, tensors=tensors)


def workload(n: int, vocab: int, n_adapters: int, seed: int, prompt_range, new_range):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        plen, new = rng.randint(*prompt_range), rng.randint(*new_range)
        adapter = None if i % 4 == 3 else f"ad{i % n_adapters}"
        out.append(([rng.randrange(3, vocab) for _ in range(plen)], adapter, new))
    return out


def run_variant(model, bank, kv: str, reqs, args) -> dict:
    from lorakit.serving import Request, ServingEngine

    eng = ServingEngine(model, bank, max_batch=args.max_batch, kv=kv, page_tokens=args.page_tokens)
    timers = {"decode": [0.0, 0.0], "prefill": [0.0, 0.0]}
    counts = {"decode": 0, "prefill": 0}

    def timed(name, fn):
        def wrapper(*a):
            c0, w0 = time.process_time(), time.perf_counter()
            ev = fn(*a)
            timers[name][0] += time.process_time() - c0
            timers[name][1] += time.perf_counter() - w0
            counts[name] += len(ev)
            return ev
        return wrapper

    eng._decode = timed("decode", eng._decode)
    eng._prefill = timed("prefill", eng._prefill)
    # CPU time inside the cache's update (dense: torch.cat of the cache; paged: scatter + gather of pages)
    from transformers.cache_utils import DynamicLayer

    from lorakit.serving.kv import PagedKVCache

    owner, attr = (PagedKVCache, "_update") if kv == "paged" else (DynamicLayer, "update")
    original = getattr(owner, attr)
    kv_time = [0.0]

    def timed_update(*a, **k):
        c = time.process_time()
        try:
            return original(*a, **k)
        finally:
            kv_time[0] += time.process_time() - c

    setattr(owner, attr, timed_update)
    objs = [Request(p, a, max_new_tokens=m, ignore_eos=True) for p, a, m in reqs]
    for r in objs:
        eng.submit(r)
    peak, peak_rows, c0, w0 = 0, 0, time.process_time(), time.perf_counter()
    try:
        while not eng.idle:
            eng.step()
            peak = max(peak, eng.kv_bytes_in_use())
            peak_rows = max(peak_rows, len(eng.rows))
    finally:
        setattr(owner, attr, original)
    res = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0,
           "decode_cpu_s": timers["decode"][0], "decode_wall_s": timers["decode"][1],
           "prefill_cpu_s": timers["prefill"][0], "decode_tokens": counts["decode"],
           "prefill_tokens": sum(len(p) for p, _, _ in reqs), "peak_kv_bytes": peak, "peak_rows": peak_rows,
           "kv_update_cpu_s": kv_time[0], "tokens": [r.tokens for r in objs]}
    res["decode_tok_s"] = res["decode_tokens"] / max(res["decode_cpu_s"], 1e-9)
    res["decode_tok_s_wall"] = res["decode_tokens"] / max(res["decode_wall_s"], 1e-9)
    if kv == "paged":
        res["pool_bytes"] = eng.kv_cache.pool.pool_bytes
        res["peak_reserved_bytes"] = eng.kv_stats["peak_reserved_bytes"]
        res["pages_leaked"] = eng.kv_cache.pool.used_pages
    return res


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(summary)
    axes[0].bar(names, [summary[n]["decode_tok_s"] for n in names], color=["tab:gray", "tab:blue"])
    axes[0].set_ylabel("decode tok/s (CPU time)")
    axes[1].bar(names, [summary[n]["peak_kv_bytes"] / 2**20 for n in names], color=["tab:gray", "tab:blue"])
    axes[1].set_ylabel("peak KV MiB in use")
    fig.suptitle("serving engine: dense (left-padded DynamicCache) vs paged KV cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model and workload (seconds)")
    p.add_argument("--requests", type=int, default=48, help="requests in the workload")
    p.add_argument("--max-batch", type=int, default=16, help="engine max_batch (rows)")
    p.add_argument("--page-tokens", type=int, default=16, help="tokens per KV page (paged)")
    p.add_argument("--rounds", type=int, default=3, help="recorded rounds (plus one warm-up)")
    p.add_argument("--adapters", type=int, default=8, help="distinct adapters (rank --rank)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "results" / "default")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    if args.quick:
        vocab, hidden, layers, heads = 1000, 128, 2, 4
        args.requests, args.rounds, args.max_batch = 8, 1, 4
        prange, nrange = (4, 24), (2, 8)
        args.out = args.out.parent / "quick" if args.out.name == "default" else args.out
    else:
        vocab, hidden, layers, heads = 32000, 512, 8, 8
        prange, nrange = (8, 128), (8, 64)
    from lorakit.serving import AdapterBank

    model = build_model(vocab, hidden, layers, heads)
    bank = AdapterBank.for_model(model, budget_bytes=64 << 20, page_rows=4)
    for i in range(args.adapters):
        bank.add(f"ad{i}", random_adapter(model, args.rank, seed=i))
    reqs = workload(args.requests, vocab, args.adapters, 0, prange, nrange)
    rounds: dict[str, list[dict]] = {"dense": [], "paged": []}
    for rnd in range(args.rounds + 1):
        order = ["dense", "paged"] if rnd % 2 == 0 else ["paged", "dense"]
        for kv in order:
            res = run_variant(model, bank, kv, reqs, args)
            if rnd > 0:
                rounds[kv].append(res)
    identical = all(a["tokens"] == b["tokens"] for a, b in zip(rounds["dense"], rounds["paged"], strict=True))
    summary = {}
    for kv, rs in rounds.items():
        timed = ("decode_tok_s", "decode_tok_s_wall", "cpu_s", "wall_s", "decode_cpu_s", "prefill_cpu_s",
                 "kv_update_cpu_s")
        s = {k: statistics.median(r[k] for r in rs) for k in timed}
        for k in ("peak_kv_bytes", "decode_tokens", "prefill_tokens", "peak_rows", "pool_bytes",
                  "peak_reserved_bytes", "pages_leaked"):
            if k in rs[0]:
                s[k] = max(r[k] for r in rs)
        summary[kv] = s
    ratio_speed = summary["paged"]["decode_tok_s"] / summary["dense"]["decode_tok_s"]
    ratio_kv = summary["paged"]["peak_kv_bytes"] / summary["dense"]["peak_kv_bytes"]
    out = {"config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                      "vocab": vocab, "hidden": hidden, "layers": layers, "heads": heads,
                      "prompt_range": prange, "new_range": nrange},
           "machine": {"host": platform.platform(), "torch": torch.__version__, "cpus": os.cpu_count(),
                       "loadavg_start": load0},
           "summary": summary, "paged_over_dense_decode_tok_s": ratio_speed,
           "paged_over_dense_peak_kv_bytes": ratio_kv, "greedy_tokens_identical": identical,
           "rounds": {kv: [{k: v for k, v in r.items() if k != "tokens"} for r in rs] for kv, rs in rounds.items()}}
    out["machine"]["loadavg_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kv_paged.json").write_text(json.dumps(out, indent=1))
    plot(summary, args.out / "kv_paged.png")
    d, pg = summary["dense"], summary["paged"]
    print(f"kv_paged: decode tok/s dense {d['decode_tok_s']:.1f} paged {pg['decode_tok_s']:.1f} "
          f"(x{ratio_speed:.2f}); peak KV MiB dense {d['peak_kv_bytes'] / 2**20:.1f} paged "
          f"{pg['peak_kv_bytes'] / 2**20:.1f} (x{ratio_kv:.2f}); KV-update CPU s dense {d['kv_update_cpu_s']:.2f} "
          f"paged {pg['kv_update_cpu_s']:.2f}; tokens identical: {identical}")


if __name__ == "__main__":
    main()
