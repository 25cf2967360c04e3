"""Serving under load: Poisson arrivals through the real HTTP server, many adapters, Zipf vs uniform popularity.

Claim under test (issue 7; S-LoRA, Sheng et al., MLSys 2024, arXiv 2311.03285, Sec. 7, evaluates the same
way: Poisson arrivals, power-law adapter popularity, latency vs request rate): one base model serves
hundreds of adapters with a device pool that holds only a fraction of them; under skewed (Zipf) popularity
the LRU bank mostly hits, under uniform popularity it uploads more; latency stays flat until the engine
saturates, then the bounded queue answers 429 instead of growing without bound.

Setup (default): a random Llama from config (``--hidden`` 256, ``--layers`` 4, 4 heads, intermediate
2.7x, ``--vocab`` 8192, fp32, CPU, ``--threads`` 1 torch thread) and ``--adapters`` 512 random rank-8
LoRA adapters on q,k,v,o, all registered in host memory; the device pool (``AdapterBank``) holds
``--budget-adapters`` 64 of them (bytes budget = 64 adapters' pages), so the rest are evicted and
re-uploaded on demand (LRU). The OpenAI-compatible server (``lorakit.serving.server.create_app``) runs
under uvicorn in a thread of this process on 127.0.0.1 (one engine thread; the client shares the
process, so the numbers include its CPU); an ``httpx`` async client sends streamed greedy
``/v1/completions`` requests at Poisson arrival times, each for an adapter drawn from Zipf(``--zipf``,
P(k) ∝ k^-s) or uniform (s = 0), prompt lengths uniform in [``--prompt-min``, ``--prompt-max``] tokens,
``--max-tokens`` 16 new tokens (EOS ignored), ``--duration`` seconds of arrivals per rate
(at least ``--min-requests``). Rates ``--rates`` req/s; popularities alternate order at every rate
(interleaved); the bank is emptied (cold) and its counters reset before each cell.

Per cell: p50/p99 time to first token (client: send → first streamed token) and end-to-end latency (send →
[DONE]), completed requests/s and output tokens/s over the cell's wall time, 429 rejections, errors, bank
acquires / hits / uploads / evictions and hit rate = hits / (hits + uploads), engine steps, mean rows per
step and the engine-busy fraction (time inside ``engine.step`` / wall).

``--embedded``: the same on the embedded SmolLM2-135M (``lorakit.models.load_model()``, its tokenizer; 32
adapters, pool of 8, rates 0.25,0.5,1, 8 new tokens, 40 s per rate unless given).

Writes ``<out>/serving_load.json`` and ``<out>/serving_load.png`` and prints one summary line.

    python bench/serving_load/run.py --quick                 # smoke, ~20 s
    python bench/serving_load/run.py                         # default: 512 adapters, rates 1..32 (~5 min)
    python bench/serving_load/run.py --embedded --out bench/serving_load/results/embedded
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 64 adapters, 2 rates, 4 s each")
    p.add_argument("--embedded", action="store_true", help="SmolLM2-135M instead of the random Llama")
    p.add_argument("--adapters", type=int, default=None, help="adapters registered (default 512; embedded 32)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--budget-adapters", type=int, default=None,
                   help="device pool size in adapters' worth of bytes (default 64; embedded 8)")
    p.add_argument("--zipf", type=str, default="1.0,0", help="popularity exponents s (0 = uniform), comma list")
    p.add_argument("--rates", type=str, default=None, help="request rates (req/s), comma list "
                   "(default 1,2,4,8,16,32; embedded 0.25,0.5,1)")
    p.add_argument("--duration", type=float, default=None, help="seconds of arrivals per cell (default 15; "
                   "embedded 30)")
    p.add_argument("--min-requests", type=int, default=None, help="per cell (default 30; embedded 10)")
    p.add_argument("--prompt-min", type=int, default=8)
    p.add_argument("--prompt-max", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens per request (default 16; embedded 8)")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the engine thread)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: bench/serving_load/results/default "
                   "(embedded: .../embedded)")
    a = p.parse_args(argv)
    emb = a.embedded
    if a.quick:
        a.adapters = a.adapters or (8 if emb else 64)
        a.budget_adapters = a.budget_adapters or (2 if emb else 8)
        a.rates = a.rates or ("0.5,1" if emb else "4,16")
        a.duration = a.duration or 4.0
        a.min_requests = a.min_requests or 8
    a.adapters = a.adapters or (32 if emb else 512)
    a.budget_adapters = a.budget_adapters or (8 if emb else 64)
    a.rates = [float(r) for r in (a.rates or ("0.25,0.5,1" if emb else "1,2,4,8,16,32")).split(",")]
    a.duration = a.duration or (40.0 if emb else 15.0)
    a.min_requests = a.min_requests or (10 if emb else 30)
    a.max_tokens = a.max_tokens or (8 if emb else 16)
    a.zipf = [float(z) for z in a.zipf.split(",")]
    a.out = a.out or HERE / "results" / ("embedded" if emb else "default")
    return a


def build_model(args):
    if args.embedded:
        from lorakit.models import load_model

        model, tok = load_model(progress=False)
        return model, tok
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.serving.load import IdTokenizer

    h = args.hidden
    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=h, intermediate_size=int(2.6875 * h),
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=1024, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg).float().eval(), IdTokenizer()


def random_state(model, r: int, g: torch.Generator):
    from lorakit.core.spec import AdapterSpec
    from lorakit.core.state import AdapterState

    tensors = {}
    for p, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and p.rpartition(".")[2] in TARGETS:
            tensors[f"{p}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g) * 0.02
            tensors[f"{p}.lora_B.weight"] = torch.randn(m.out_features, r, generator=g) * 0.02
    return AdapterState(spec=AdapterSpec(form="lora", form_args={"r": r, "alpha": 2.0 * r}, targets=TARGETS),
                        tensors=tensors)


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "loadavg_start": os.getloadavg()}


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def cold(bank) -> None:
    for name in list(bank.resident()):
        host = bank.adapters[name]
        if host.in_use == 0 and not host.pinned:
            bank._evict(host)
    for k in bank.stats:
        bank.stats[k] = 0


def run_cell(url, engine, acc, names, probs, rate, args, g) -> dict[str, Any]:
    from lorakit.serving.load import Sent, poisson_arrivals, run_load

    n = max(args.min_requests, int(round(rate * args.duration)))
    times = poisson_arrivals(rate, n, g)
    picks = torch.multinomial(probs.float(), n, replacement=True, generator=g).tolist()
    vocab = engine.model.config.vocab_size
    sends = []
    for t, k in zip(times, picks, strict=True):
        plen = int(torch.randint(args.prompt_min, args.prompt_max + 1, (1,), generator=g))
        sends.append(Sent(at=t, model=names[k], max_tokens=args.max_tokens,
                          prompt=torch.randint(3, vocab, (plen,), generator=g).tolist()))
    cold(engine.bank)
    acc.update(steps=0, rows=0, busy=0.0)
    cpu0 = time.process_time()
    wall = run_load(url, sends, timeout=600.0)
    cpu = time.process_time() - cpu0
    done = [s for s in sends if s.status == 200 and s.error is None and s.latency is not None]
    st = dict(engine.bank.stats)
    ttft = [s.ttft for s in done if s.ttft is not None]
    lat = [s.latency for s in done]
    toks = sum(s.tokens for s in done)
    return {"rate": rate, "requests": n, "completed": len(done), "rejected_429": sum(s.status == 429 for s in sends),
            "errors": sum(s.status not in (200, 429) or (s.status == 200 and s.error is not None) for s in sends),
            "short": sum(s.tokens != s.max_tokens for s in done), "wall_s": wall, "cpu_s": cpu,
            "ttft_p50": pct(ttft, 0.5), "ttft_p99": pct(ttft, 0.99), "e2e_p50": pct(lat, 0.5),
            "e2e_p99": pct(lat, 0.99), "e2e_mean": statistics.fmean(lat) if lat else None,
            "req_per_s": len(done) / wall, "tok_per_s": toks / wall, "distinct_adapters": len(set(picks)),
            "bank": st, "hit_rate": st["hits"] / max(1, st["hits"] + st["uploads"]),
            "engine_steps": acc["steps"], "mean_rows": acc["rows"] / max(1, acc["steps"]),
            "engine_busy": acc["busy"] / wall}


def run(args) -> dict[str, Any]:
    from lorakit.serving import AdapterBank, ServingEngine
    from lorakit.serving.load import ServerThread
    from lorakit.serving.server import create_app

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = build_model(args)
    g = torch.Generator().manual_seed(args.seed)
    probe = AdapterBank.for_model(model, targets=TARGETS, budget_bytes=1 << 30, page_rows=4)
    states = [random_state(model, args.rank, torch.Generator().manual_seed(args.seed * 100003 + i))
              for i in range(1)]
    probe.add("probe", states[0])
    per_adapter = probe.adapters["probe"].nbytes_pages
    del probe, states
    gc.collect()
    bank = AdapterBank.for_model(model, targets=TARGETS, budget_bytes=per_adapter * args.budget_adapters,
                                 page_rows=4)
    names = [f"ad{i:04d}" for i in range(args.adapters)]
    t_add = time.perf_counter()
    for i, name in enumerate(names):
        bank.add(name, random_state(model, args.rank, torch.Generator().manual_seed(args.seed * 100003 + i)))
    add_s = time.perf_counter() - t_add
    engine = ServingEngine(model, bank, max_batch=args.max_batch, max_queue=args.max_queue, max_context=1024,
                           eos_token_id=[], pad_token_id=0)
    acc = {"steps": 0, "rows": 0, "busy": 0.0}
    step = engine.step

    def timed_step():
        t = time.perf_counter()
        ev = step()
        acc["busy"] += time.perf_counter() - t
        acc["steps"] += 1
        acc["rows"] += len(engine.rows)
        return ev

    engine.step = timed_step
    app = create_app(engine, tokenizer)
    cells: dict[str, list[dict[str, Any]]] = {pop_name(s): [] for s in args.zipf}
    with ServerThread(app) as srv:
        from lorakit.serving.load import Sent, run_load

        run_load(srv.url, [Sent(at=0.0, model=names[0], prompt=[5, 6, 7], max_tokens=2)])  # warm-up
        for i, rate in enumerate(args.rates):
            order = args.zipf if i % 2 == 0 else args.zipf[::-1]
            for s in order:
                cell = run_cell(srv.url, engine, acc, names, _zipf(args.adapters, s), rate, args, g)
                cells[pop_name(s)].append(cell)
                print(f"  {pop_name(s):>9} rate {rate:>5g}/s: {cell['completed']}/{cell['requests']} ok, "
                      f"429 {cell['rejected_429']}, TTFT p50 {cell['ttft_p50'] or 0:.3f}s p99 "
                      f"{cell['ttft_p99'] or 0:.3f}s, e2e p50 {cell['e2e_p50'] or 0:.3f}s p99 "
                      f"{cell['e2e_p99'] or 0:.3f}s, {cell['tok_per_s']:.0f} tok/s, hit {cell['hit_rate']:.2f}, "
                      f"rows/step {cell['mean_rows']:.1f}", flush=True)
    cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    return {"config": cfg, "machine": {**machine_info(), "loadavg_end": os.getloadavg()},
            "model": {"params": sum(p.numel() for p in model.parameters()),
                      "name": "SmolLM2-135M" if args.embedded else "random Llama"},
            "bank": {"budget_bytes": bank.budget_bytes, "bytes_per_adapter": per_adapter,
                     "num_pages": bank.num_pages, "adapters": args.adapters, "add_s_total": add_s},
            "cells": cells, "total_s": time.perf_counter() - t0}


def _zipf(n: int, s: float) -> torch.Tensor:
    from lorakit.serving.load import zipf_probs

    return zipf_probs(n, s)


def pop_name(s: float) -> str:
    return "uniform" if s == 0 else f"zipf{s:g}"


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, (pop, cells) in enumerate(result["cells"].items()):
        rates, color = [c["rate"] for c in cells], f"C{i}"
        for ax, key in ((axes[0], "ttft"), (axes[1], "e2e")):
            ax.plot(rates, [c[f"{key}_p50"] for c in cells], "o-", color=color, label=f"{pop} p50")
            ax.plot(rates, [c[f"{key}_p99"] for c in cells], "s--", color=color, label=f"{pop} p99")
        axes[2].plot(rates, [c["hit_rate"] for c in cells], "o-", color=color, label=f"{pop} hit rate")
        axes[2].plot(rates, [c["tok_per_s"] / max(1e-9, max(x["tok_per_s"] for x in cells)) for c in cells], "x:",
                     color=color, label=f"{pop} tok/s (rel.)")
    for ax in axes:
        ax.set_xscale("log", base=2)
    cfg = result["config"]
    for ax, title in ((axes[0], "time to first token"), (axes[1], "end-to-end latency")):
        ax.set_xlabel("request rate (req/s, Poisson)")
        ax.set_ylabel("seconds")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[2].set_xlabel("request rate (req/s)")
    axes[2].set_title("bank hit rate; throughput / its max")
    axes[2].set_ylim(0, 1.05)
    axes[2].legend(fontsize=7)
    fig.suptitle(f"{result['model']['name']}: {cfg['adapters']} rank-{cfg['rank']} adapters, pool of "
                 f"{cfg['budget_adapters']}, {cfg['max_tokens']} new tokens, HTTP loopback", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving_load.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    plot(result, args.out / "serving_load.png")
    parts = []
    for pop, cells in result["cells"].items():
        ok = [c for c in cells if c["rejected_429"] == 0 and c["errors"] == 0]
        best = max(cells, key=lambda c: c["tok_per_s"])
        parts.append(f"{pop}: hit {statistics.fmean(c['hit_rate'] for c in cells):.2f}, max {best['tok_per_s']:.0f} "
                     f"tok/s, TTFT p50 {cells[0]['ttft_p50'] or 0:.3f}s at {cells[0]['rate']:g}/s"
                     + (f", no 429 up to {ok[-1]['rate']:g}/s" if ok else ""))
    print(f"serving_load ({result['model']['name']}, {args.adapters} adapters, pool {args.budget_adapters}): "
          + "; ".join(parts), file=sys.stdout)


if __name__ == "__main__":
    main()
