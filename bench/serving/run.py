"""Multi-adapter serving: lorakit's paged AdapterBank + batched kernels vs base-only vs PEFT mixed batches.

Claim under test (issue 7, after S-LoRA, arXiv 2311.03285, and Punica, arXiv 2310.18547): serving a
batch whose rows use different LoRA adapters should cost little more than the base model alone
(LoRA adds ~1-2% FLOPs), and attaching an adapter should take constant time however many are loaded.
PEFT's mixed batches (``adapter_names=``) loop over adapters in Python per layer, and its attach
time grows with the number attached.

Setup: a random Llama from config (hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 32000, fp32)
on CPU with 1 torch thread; LoRA adapters with random weights on q,k,v,o; ranks all-8 or mixed
(uniform in {4..64}). Variants, timed interleaved in rounds (order rotates each round; one unrecorded warm-up round):

- ``base``: the served model with every row on the base model (the ceiling);
- ``lorakit``: 32 rows, 32 distinct adapters (drawn uniformly from N_decode loaded), batched kernels;
- ``peft``: the same 32 adapters in a ``PeftModel``, ``forward(..., adapter_names=...)``.

Decode: a 32-row batch prefilled with a ``--context``-token prompt, then ``--steps`` one-token steps
(HF DynamicCache); throughput = rows·steps / time. Prefill: 8 rows × ``--prefill-len`` tokens, 8
distinct adapters. Attach: per-adapter host→device upload time (``AdapterBank.acquire`` of a new
adapter, CPU time, median of 5) with N already loaded and resident, for N in the sweep; PEFT's
``add_adapter`` time with N attached for the smaller N (PEFT takes seconds per adapter there).
Throughputs use process CPU time (medians over rounds), robust to other jobs on a shared machine;
wall times are in the JSON. Bytes: device bytes per adapter
(pages) vs the bytes of its A and B tensors.

Writes ``<out>/serving.json`` and ``<out>/serving.png`` and prints one summary line.

    python bench/serving/run.py --quick      # ~2 CPU-minutes (N up to 1024 for rank 8, 64 mixed)
    python bench/serving/run.py              # full sweep (N up to 1024; more memory)
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
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


def build_model(vocab: int = 32000, hidden: int = 512, layers: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=1376, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024,
                      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().eval()


def random_states(model, n: int, ranks: str, seed: int, dtype=torch.float32):
    """n random LoRA AdapterStates on q,k,v,o (one rank per adapter)."""
    from lorakit.core.spec import AdapterSpec
    from lorakit.core.state import AdapterState

    g = torch.Generator().manual_seed(seed)
    paths = [(p, m) for p, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and p.rpartition(".")[2] in TARGETS]
    out = []
    for _ in range(n):
        r = 8 if ranks == "all8" else int(torch.randint(4, 65, (1,), generator=g))
        tensors = {}
        for p, m in paths:
            tensors[f"{p}.lora_A.weight"] = (torch.randn(r, m.in_features, generator=g) * 0.02).to(dtype)
            tensors[f"{p}.lora_B.weight"] = (torch.randn(m.out_features, r, generator=g) * 0.02).to(dtype)
        out.append(AdapterState(spec=AdapterSpec(form="lora", form_args={"r": r, "alpha": 2.0 * r}, targets=TARGETS),
                                tensors=tensors))
    return out


def peft_model_with(base, states):
    from peft import LoraConfig, get_peft_model

    model = None
    for i, st in enumerate(states):
        r = st.spec.form_args["r"]
        cfg = LoraConfig(r=r, lora_alpha=2.0 * r, target_modules=TARGETS)
        if model is None:
            model = get_peft_model(copy.deepcopy(base), cfg, adapter_name=f"a{i}")
        else:
            model.add_adapter(f"a{i}", cfg)
        sd = {f"base_model.model.{k.replace('.weight', f'.a{i}.weight')}": v for k, v in st.tensors.items()}
        missing = model.load_state_dict(sd, strict=False).unexpected_keys
        assert not missing, missing[:3]
    return model.eval()


def timed(fn) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


@torch.no_grad()
def decode_run(forward, rows: int, context: int, steps: int, vocab: int) -> tuple[float, float]:
    """Prefill (untimed) then time ``steps`` decode steps; returns (wall, cpu) seconds."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (rows, context), generator=g)
    cache = DynamicCache()
    out = forward(ids, cache, context)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)

    def run():
        nonlocal nxt, cache
        for _ in range(steps):
            o = forward(nxt, cache, 1)
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)

    return timed(run)


@torch.no_grad()
def prefill_run(forward, rows: int, length: int, vocab: int) -> tuple[float, float]:
    from transformers import DynamicCache

    ids = torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(2))
    return timed(lambda: forward(ids, DynamicCache(), length))


def attach_sweep(model, ns: list[int], ranks: str, dtype, probes: int = 5) -> dict[str, Any]:
    """Median upload time of a new adapter with N loaded+resident; bytes per adapter."""
    from lorakit.serving import AdapterBank

    res: dict[str, Any] = {"n": [], "attach_ms": [], "attach_ms_p90": [], "add_ms": []}
    nmax = max(ns) + probes

    def state(i: int):  # generated on demand (seeded per index) so only the bank holds adapters
        return random_states(model, 1, ranks, seed=1000 + i)[0]

    mean_rank = 8 if ranks == "all8" else 34
    per_adapter = sum(mean_rank * (m.in_features + m.out_features) for p, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and p.rpartition(".")[2] in TARGETS)
    elt = torch.empty((), dtype=dtype).element_size()
    slack = 1.05 if ranks == "all8" else 1.3  # page padding of mixed ranks
    bank = AdapterBank.for_model(model, budget_bytes=int(slack * nmax * per_adapter * elt), page_rows=4,
                                 max_rank=64, dtype=dtype)
    loaded = 0
    for n in sorted(ns):
        add_t = []
        while loaded < n:
            t0 = time.perf_counter()
            bank.add(f"x{loaded}", state(loaded))
            add_t.append(time.perf_counter() - t0)
            bank.acquire(f"x{loaded}")
            bank.release(f"x{loaded}")
            loaded += 1
        times, walls = [], []
        for j in range(probes):
            name = f"p{n}_{j}"
            bank.add(name, state(nmax - 1 - j))
            wall, cpu = timed(lambda b=bank, n=name: b.acquire(n))
            times.append(cpu)  # CPU time: robust to other jobs on a shared box
            walls.append(wall)
            bank.release(name)
            bank.remove(name)
        res["n"].append(n)
        res["attach_ms"].append(1e3 * statistics.median(times))
        res["attach_ms_p90"].append(1e3 * sorted(times)[int(0.9 * (len(times) - 1))])
        res.setdefault("attach_wall_ms", []).append(1e3 * statistics.median(walls))
        res["add_ms"].append(1e3 * statistics.median(add_t) if add_t else None)
    hosts = list(bank.adapters.values())
    res["bytes_pages_mean"] = statistics.mean(h.nbytes_pages for h in hosts)
    res["bytes_tensors_mean"] = statistics.mean(h.nbytes_tensors for h in hosts)
    res["bytes_overhead"] = res["bytes_pages_mean"] / res["bytes_tensors_mean"] - 1
    del bank
    gc.collect()
    return res


def peft_attach_sweep(base, ns: list[int]) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)
    model = get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0")
    res: dict[str, Any] = {"n": [], "attach_ms": []}
    count = 1
    for n in sorted(ns):
        while count < n:
            model.add_adapter(f"a{count}", cfg)
            count += 1
        wall, cpu = timed(lambda m=model, n=n: m.add_adapter(f"probe{n}", cfg))
        res["n"].append(n)
        res["attach_ms"].append(1e3 * cpu)
        res.setdefault("attach_wall_ms", []).append(1e3 * wall)
        model.delete_adapter(f"probe{n}")
    del model
    gc.collect()
    return res


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lorakit.serving import AdapterBank
    from lorakit.serving.engine import ServingContext, serve_model

    torch.set_num_threads(args.threads)
    base = build_model()
    vocab = base.config.vocab_size
    result: dict[str, Any] = {"config": vars(args) | {"out": str(args.out)}, "decode": {}, "prefill": {},
                              "attach": {}, "host": platform.platform(), "torch": torch.__version__}
    forwards: dict[str, dict[str, Any]] = {}
    rng = torch.Generator().manual_seed(3)
    for ranks in args.ranks:
        served = copy.deepcopy(base)  # one served copy per rank setting, each bound to its own bank
        ctx = ServingContext()
        states = random_states(base, args.n_decode, ranks, seed=11 if ranks == "all8" else 12)
        pick = torch.randperm(args.n_decode, generator=rng)[:args.rows].tolist()
        bank = AdapterBank.for_model(served, budget_bytes=int(1.3 * sum(
            sum(t.numel() for t in s.tensors.values()) for s in states)) * 4, page_rows=4, max_rank=64)
        for i, st in enumerate(states):
            bank.add(f"x{i}", st)
        serve_model(served, bank, ctx)
        slots = bank.slots([f"x{i}" for i in pick])
        pslots = bank.slots([f"x{i}" for i in pick[:args.prefill_rows]])
        peft = peft_model_with(base, [states[i] for i in pick])
        names = [f"a{j}" for j in range(args.rows)]

        def lk(ids, cache, t, _m=served, _c=ctx, _s=slots, _p=pslots):
            _c.set_rows(_s if ids.shape[0] == _s.numel() else _p, t)
            try:
                return _m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            finally:
                _c.plan = None

        def bs(ids, cache, t, _m=served):
            return _m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)

        def pf(ids, cache, t, _m=peft, _n=names):
            return _m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                      adapter_names=_n[:ids.shape[0]])

        forwards[ranks] = {"base": bs, "lorakit": lk, "peft": pf, "_keep": (bank, peft)}
        result["decode"][ranks] = {v: [] for v in ("base", "lorakit", "peft")}
        result["prefill"][ranks] = {v: [] for v in ("base", "lorakit", "peft")}
        result["decode"][ranks]["mean_rank"] = statistics.mean(states[i].spec.form_args["r"] for i in pick)
        del states
    variants = ["base", "lorakit", "peft"]
    for rnd in range(-1, args.rounds):  # round -1 warms up (allocator, caches) and is not recorded
        order = variants[rnd % 3:] + variants[:rnd % 3]
        for ranks in args.ranks:
            for v in order:
                fw = forwards[ranks][v]
                steps = 2 if rnd < 0 else args.steps
                wall, cpu = decode_run(fw, args.rows, args.context, steps, vocab)
                if rnd >= 0:
                    result["decode"][ranks][v].append({"wall": wall, "cpu": cpu})
                wall, cpu = prefill_run(fw, args.prefill_rows, args.prefill_len, vocab)
                if rnd >= 0:
                    result["prefill"][ranks][v].append({"wall": wall, "cpu": cpu})
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    for kind, count in (("decode", args.rows * args.steps), ("prefill", args.prefill_rows * args.prefill_len)):
        for ranks in args.ranks:
            d = result[kind][ranks]
            for v in variants:
                d[f"{v}_tok_s"] = count / statistics.median(x["cpu"] for x in d[v])
            d["lorakit_vs_base"] = d["lorakit_tok_s"] / d["base_tok_s"]
            d["peft_vs_base"] = d["peft_tok_s"] / d["base_tok_s"]
    forwards.clear()
    gc.collect()
    for ranks in args.ranks:
        ns = [n for n in args.n_attach if ranks == "all8" or n <= args.n_attach_mixed_max]
        result["attach"][ranks] = attach_sweep(base, ns, ranks, torch.float32)
        print(f"attach sweep {ranks} done", file=sys.stderr, flush=True)
    result["attach"]["peft_all8"] = peft_attach_sweep(base, args.n_attach_peft)
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ranks = list(result["decode"])
    x = range(len(ranks))
    for i, v in enumerate(("base", "lorakit", "peft")):
        axes[0].bar([k + 0.27 * (i - 1) for k in x], [result["decode"][r][f"{v}_tok_s"] for r in ranks], 0.27,
                    label=v)
    axes[0].set_xticks(list(x), [f"decode, ranks {r}" for r in ranks])
    axes[0].set_ylabel("tokens / CPU-second")
    axes[0].set_title("decode, 32 rows, 32 distinct adapters")
    axes[0].legend()
    for key, res in result["attach"].items():
        axes[1].plot(res["n"], res["attach_ms"], marker="o", label=key if key.startswith("peft") else f"lorakit {key}")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("adapters already loaded (N)")
    axes[1].set_ylabel("attach time per adapter (ms)")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small N sets and fewer rounds")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--context", type=int, default=16)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prefill-rows", type=int, default=8)
    p.add_argument("--prefill-len", type=int, default=32)
    p.add_argument("--n-decode", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ranks", nargs="+", default=["all8", "mixed"])
    p.add_argument("--out", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.n_attach, args.n_attach_mixed_max, args.n_attach_peft = [1, 8, 64, 256, 1024], 64, [1, 8, 32]
        args.rounds = min(args.rounds, 3)
    else:
        args.n_attach, args.n_attach_mixed_max, args.n_attach_peft = [1, 8, 64, 256, 1024], 256, [1, 8, 64]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    result = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n")
    plot(result, args.out / "serving.png")
    parts = []
    for ranks in result["decode"]:
        d, pf = result["decode"][ranks], result["prefill"][ranks]
        parts.append(f"{ranks}: decode lorakit {d['lorakit_vs_base']:.0%} / peft {d['peft_vs_base']:.0%} of base, "
                     f"prefill lorakit {pf['lorakit_vs_base']:.0%} / peft {pf['peft_vs_base']:.0%}")
    a = result["attach"]["all8"]
    parts.append("attach all8 " + ", ".join(f"N={n}: {t:.2f} ms" for n, t in zip(a["n"], a["attach_ms"], strict=True)))
    pa = result["attach"]["peft_all8"]
    parts.append("peft attach " + ", ".join(f"N={n}: {t:.0f} ms" for n, t in zip(pa["n"], pa["attach_ms"],
                                                                                   strict=True)))
    print("serving: " + "; ".join(parts))


if __name__ == "__main__":
    main()
