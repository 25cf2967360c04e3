"""Peak training memory and throughput: lorakit vs PEFT, fp32 / bf16 / bf16 + gradient checkpointing /
nf4 + bf16 + gradient checkpointing (QLoRA), LoRA r=16 (alpha 32) on all linear layers of SmolLM2-135M.

Every (library, setting) runs in a fresh subprocess, one after another: load the base (the nf4 setting loads
it through bitsandbytes, compute dtype bf16, as a QLoRA user does), read every weight, trim the heap, take the
RSS as the baseline and reset the kernel's high-water mark (/proc/self/clear_refs), then build the adapter and
run ``--warmup`` + ``--steps`` training steps (forward + causal-LM loss + backward + AdamW on the adapter).
Peak = VmHWM − baseline: activations, autograd buffers, adapter, gradients and optimizer state (the base's own
bytes are in the baseline, reported separately as ``base_rss_mb`` and ``base_weight_bytes``). Tokens/s is
batch × seq_len over the median timed step. Both libraries get the same base, batches and loop; only the
adapter library differs.

Writes ``<out>/memory.json`` + ``<out>/memory.png`` and prints one summary line.

    flock /tmp/lorakit-heavy.lock python bench/memory/run.py --batch-size 2 --seq-len 256   # CPU, ~6 min
    python bench/memory/run.py                          # the issue's 8 x 512 (a GPU, or patience on a CPU)
    python bench/memory/run.py --model tiny             # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/, for the shared bench/_common.py
import _common as common  # noqa: E402

HERE = Path(__file__).resolve().parent
LIBS = ("lorakit", "peft")
# setting -> (autocast dtype or None, gradient checkpointing, quantization)
SETTINGS: dict[str, tuple[str | None, bool, str | None]] = {
    "fp32": (None, False, None),
    "bf16": ("bf16", False, None),
    "bf16_gc": ("bf16", True, None),
    "nf4_bf16_gc": ("bf16", True, "nf4"),
}
RANK, ALPHA = 16, 32
TARGET_VS_PEFT = 1.05  # the issue: lorakit within 5 % of PEFT's memory and time in every setting
TARGET_NF4_RATIO = 0.3  # nf4 base weights <= 0.3 x the fp32 base (the quantized linear layers)

common.quiet_warnings()


def _status_kb(key: str) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return None


def _trim_heap() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def load_base(model: str, quantize: str | None) -> Any:
    from lorakit.models.loading import load_model, quantize_model, tiny_llama

    if model == "tiny":
        base = tiny_llama(hidden=256, layers=4, heads=8, kv_heads=4, vocab=2048, max_positions=1024, seed=0)
        if quantize:
            quantize_model(base, quantize, compute_dtype=torch.bfloat16)
    else:
        # QLoRA: 4-bit linears computing in bf16, the rest bf16 too; the dense settings keep an fp32 base
        dtype = torch.bfloat16 if quantize else torch.float32
        base, _ = load_model(None if model == "smollm2" else model, progress=False, quantize=quantize, dtype=dtype)
    base.requires_grad_(False)
    base.config.use_cache = False
    return base


def weight_bytes(model: Any) -> dict[str, int]:
    """Bytes of the base as stored: all of it, and its (possibly quantized) non-head linear layers alone."""
    from torch import nn

    from lorakit.core.quant import quantized_bytes

    head = model.get_output_embeddings()
    linear = nn.Module()
    for i, m in enumerate(m for m in model.modules() if isinstance(m, nn.Linear) and m is not head):
        linear.add_module(str(i), m)
    return {"total": quantized_bytes(model), "linear": quantized_bytes(linear)}


def attach(lib: str, model: Any) -> Any:
    if lib == "lorakit":
        import lorakit

        return lorakit.attach(model, lorakit.AdapterSpec(targets="all-linear",
                                                         form_args={"r": RANK, "alpha": ALPHA}), seed=0)
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))


def child(args: argparse.Namespace) -> None:
    """One (library, setting) in this fresh process; prints one JSON line."""
    common.pin_threads()
    import peft  # noqa: F401  (both libraries imported before the baseline)

    import lorakit  # noqa: F401

    lib, setting = args.child.split(":")
    precision, checkpointing, quantize = SETTINGS[setting]
    from lorakit.models.loading import tiny_llama

    for name in LIBS:  # both libraries' lazy imports and first-call set-up happen before the baseline
        attach(name, tiny_llama(hidden=64, layers=1, vocab=64))
    base = load_base(args.model, quantize)
    vocab = base.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=g) for _ in range(2)]
    with torch.no_grad():
        for t in (*base.parameters(), *base.buffers()):
            t.float().sum()  # page in mmapped weights: the baseline holds them, the peak does not
    bytes_ = weight_bytes(base)
    gc.collect()
    _trim_heap()
    baseline_kb = _status_kb("VmRSS") or 0
    reset = _reset_peak()
    model = attach(lib, base)
    if checkpointing:  # HF's own switch, the same call for both libraries (non-reentrant: no input grads needed)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params), "adapter (master) weights must be fp32"
    opt = torch.optim.AdamW(params, lr=1e-4)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        ids = batches[step % len(batches)]
        t0 = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.float().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak_kb = _status_kb("VmHWM") if reset else None
    if peak_kb is None:
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step_s = statistics.median(times)
    print(json.dumps({
        "lib": lib, "setting": setting, "peak_delta_mb": (peak_kb - baseline_kb) / 1024,
        "peak_rss_mb": peak_kb / 1024, "base_rss_mb": baseline_kb / 1024,
        "peak_method": "VmHWM reset via /proc/self/clear_refs" if reset else "ru_maxrss (process lifetime)",
        "step_s": step_s, "step_times_s": times, "tokens_per_s": args.batch_size * args.seq_len / step_s,
        "losses": losses, "trainable_params": sum(p.numel() for p in params),
        "base_weight_bytes": bytes_["total"], "base_linear_bytes": bytes_["linear"],
    }))


def run_child(args: argparse.Namespace, lib: str, setting: str) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", f"{lib}:{setting}", "--model", args.model,
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"lib": lib, "setting": setting, "error": f"timed out after {args.child_timeout} s"}
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"lib": lib, "setting": setting, "error": f"exit code {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(SETTINGS)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, lib in enumerate(LIBS):
        runs = [result["runs"][f"{lib}:{s}"] for s in settings]
        xs = [i + (k - 0.5) * 0.4 for i in range(len(settings))]
        color = "tab:blue" if lib == "lorakit" else "tab:orange"
        axes[0].bar(xs, [r.get("peak_delta_mb", 0) for r in runs], width=0.4, color=color, label=lib)
        axes[1].bar(xs, [r.get("tokens_per_s", 0) for r in runs], width=0.4, color=color, label=lib)
    for ax, label in zip(axes, ("peak RSS over the loaded base (MiB)", "tokens/s"), strict=True):
        ax.set_xticks(range(len(settings)), settings)
        ax.set_ylabel(label)
        ax.legend()
    cfg = result["config"]
    fig.suptitle(f"{cfg['model']}: LoRA r={RANK} all-linear, batch {cfg['batch_size']} x {cfg['seq_len']}, "
                 f"1 thread, fresh process per run")
    common.save_figure(fig, path, dpi=120)


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in SETTINGS:
        a, b = runs[f"lorakit:{s}"], runs[f"peft:{s}"]
        if "error" in a or "error" in b:
            out[s] = {"error": a.get("error") or b.get("error")}
            continue
        out[s] = {"memory_lorakit_over_peft": a["peak_delta_mb"] / b["peak_delta_mb"],
                  "time_lorakit_over_peft": a["step_s"] / b["step_s"],
                  "lorakit_peak_delta_mb": a["peak_delta_mb"], "peft_peak_delta_mb": b["peak_delta_mb"],
                  "lorakit_tokens_per_s": a["tokens_per_s"], "peft_tokens_per_s": b["tokens_per_s"]}
    fp32, nf4 = runs.get("lorakit:fp32", {}), runs.get("lorakit:nf4_bf16_gc", {})
    if "base_linear_bytes" in fp32 and "base_linear_bytes" in nf4:
        out["nf4_linear_bytes_over_fp32"] = nf4["base_linear_bytes"] / fp32["base_linear_bytes"]
        out["nf4_total_bytes_over_fp32"] = nf4["base_weight_bytes"] / fp32["base_weight_bytes"]
    return out


def summary_line(result: dict[str, Any]) -> str:
    s = result["summary"]
    parts = []
    for name in SETTINGS:
        r = s[name]
        if "error" in r:
            parts.append(f"{name}: error")
            continue
        parts.append(f"{name} mem {r['lorakit_peak_delta_mb']:.0f}/{r['peft_peak_delta_mb']:.0f} MiB "
                     f"({r['memory_lorakit_over_peft']:.2f}x) tok/s {r['lorakit_tokens_per_s']:.0f}/"
                     f"{r['peft_tokens_per_s']:.0f} ({r['time_lorakit_over_peft']:.2f}x time)")
    nf4 = s.get("nf4_linear_bytes_over_fp32")
    cfg = result["config"]
    return (f"memory (lorakit/peft, {cfg['model']} {cfg['batch_size']}x{cfg['seq_len']}): " + " | ".join(parts)
            + (f" | nf4 linear weights {nf4:.3f}x fp32 (whole base {s['nf4_total_bytes_over_fp32']:.3f}x)"
               if nf4 is not None else ""))


def main(argv: list[str] | None = None) -> None:
    p = common.make_parser(__doc__)
    p.add_argument("--model", default="smollm2", help="'smollm2' (embedded), 'tiny' or a local HF dir")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (after the warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (AdamW state allocated)")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma list of settings to run")
    p.add_argument("--child-timeout", type=int, default=600)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    wanted = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(wanted) - set(SETTINGS))
    if unknown or min(args.batch_size, args.seq_len, args.steps) < 1:
        p.error(f"unknown settings {unknown}" if unknown else "--batch-size, --seq-len, --steps must be >= 1")
    t0 = time.perf_counter()
    load = os.getloadavg()
    runs = {}
    args.out.mkdir(parents=True, exist_ok=True)
    for s in wanted:  # interleaved per setting, one process at a time (their RSS must not overlap)
        for lib in LIBS:
            runs[f"{lib}:{s}"] = run_child(args, lib, s)
            r = runs[f"{lib}:{s}"]
            print(f"{lib:8s} {s:12s} " + (r["error"] if "error" in r else
                  f"peak +{r['peak_delta_mb']:.0f} MiB, {r['tokens_per_s']:.0f} tok/s"), file=sys.stderr)
            common.write_json(args.out / "memory.partial.json", runs)  # what is done survives a kill
    for s in set(SETTINGS) - set(wanted):
        for lib in LIBS:
            runs[f"{lib}:{s}"] = {"lib": lib, "setting": s, "error": "not run (--settings)"}
    result = {
        "benchmark": "memory",
        "machine": common.machine_with_load(load, packages=("transformers", "peft", "bitsandbytes")),
        "config": {"model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len,
                   "steps": args.steps, "warmup": args.warmup, "rank": RANK, "alpha": ALPHA,
                   "targets": "all-linear", "settings": {k: list(v) for k, v in SETTINGS.items()},
                   "loss": "causal-LM loss over every token of seeded random ids", "threads": 1,
                   "optimizer": "torch.optim.AdamW(lr=1e-4) on the adapter",
                   "nf4": "transformers BitsAndBytesConfig nf4, compute dtype bf16, rest of the base bf16"},
        "targets": {"lorakit_over_peft_max": TARGET_VS_PEFT, "nf4_linear_bytes_over_fp32_max": TARGET_NF4_RATIO},
        "runs": runs,
    }
    result["summary"] = summarize(runs)
    result["wall_s"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    common.write_json(args.out / "memory.json", result)
    (args.out / "memory.partial.json").unlink(missing_ok=True)
    if all("error" not in r for r in runs.values()):
        common.atomic_write(args.out / "memory.png", lambda path: plot(result, path))
    print(summary_line(result))


if __name__ == "__main__":
    main()
