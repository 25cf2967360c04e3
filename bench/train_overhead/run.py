"""Training-step overhead: lorakit vs peft vs the frozen base's forward+backward (the floor).

Same model, same batches, same LoRA config (r=8 and r=16 on all linear layers), every variant
interleaved in one process with 1 torch thread. Step = forward + loss + backward + AdamW step on the
adapter parameters; the floor is forward + backward w.r.t. the input embeddings' activations with
every weight frozen and no optimizer (what any adapter method must pay at least).

Peak memory is measured per variant in a fresh subprocess (see ``_memory_child``), because RSS
inside one long-lived process cannot be attributed to one variant.

Writes ``<out>/train_overhead.json`` and ``<out>/train_overhead.png`` and prints one summary line.

    python bench/train_overhead/run.py                 # embedded SmolLM2-135M, ~5 min on 2 cores
    python bench/train_overhead/run.py --model tiny    # quick smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

sys.path.append(str(Path(__file__).resolve().parents[1]))  # bench/, for the shared bench/_common.py
import _common as common  # noqa: E402

HERE = Path(__file__).resolve().parent
RANKS = (8, 16)
FLOOR = "floor"
VARIANTS = (FLOOR, "lorakit_r8", "peft_r8", "lorakit_r16", "peft_r16")
# bf16 autocast (adapter weights fp32, as lorakit's Trainer with precision="bf16"), r=16; --no-bf16 skips them
BF16 = "_bf16"
BF16_VARIANTS = ("lorakit_r16" + BF16, "peft_r16" + BF16)
# The targets: lorakit no slower than peft, and within 10% of the frozen base's fwd+bwd.
TARGET_VS_PEFT = 1.0
TARGET_VS_FLOOR = 1.10
# A "moderately sized" llama for --model tiny: big enough that matmuls, not Python, dominate a
# little, small enough for a smoke run in seconds. The vocab is the real tokenizer's (set at build).
TINY_CONFIG: dict[str, int] = {"hidden": 256, "layers": 4, "heads": 8, "kv_heads": 4}
N_BATCHES = 4  # distinct batches cycled by every variant in the same order

# peft and transformers warn about deprecations on every model build; they are noise here.
common.quiet_warnings()


# --------------------------------------------------------------------------------------- setup
def load_base(model: str, vocab: int | None = None) -> nn.Module:
    """The frozen base model: the embedded SmolLM2 (fp32 cache) or a seeded tiny llama."""
    from lorakit.models import load_model, tiny_llama

    if model == "tiny":
        if vocab is None:
            raise ValueError("the tiny model needs the tokenizer's vocab size")
        base = tiny_llama(vocab=vocab, max_positions=1024, seed=0, **TINY_CONFIG)
    else:
        base, _ = load_model(None if model == "smollm2" else model, progress=False)
    base.requires_grad_(False)
    return base


def make_batches(seq_len: int, batch_size: int) -> tuple[list[dict[str, torch.Tensor]], int]:
    """``N_BATCHES`` real sentiment batches right-padded to exactly ``seq_len`` tokens (+ vocab size)."""
    from lorakit.data import ClassificationCollator, load_task
    from lorakit.models import load_model

    # The tokenizer comes with the embedded model (also for --model tiny: real token ids).
    _, tokenizer = load_model(progress=False)
    task = load_task("sentiment", seed=0)
    collate = ClassificationCollator(tokenizer, task, max_length=seq_len)
    batches = []
    for i in range(N_BATCHES):
        raw = collate(task.train[i * batch_size:(i + 1) * batch_size])
        width = raw["input_ids"].shape[1]
        # Fixed width: every variant and every step does the same amount of work.
        ids = F.pad(raw["input_ids"], (0, seq_len - width), value=collate._pad_id)
        mask = F.pad(raw["attention_mask"], (0, seq_len - width), value=0)
        positions, inverse = torch.unique(raw["last_index"], return_inverse=True)
        batches.append({"input_ids": ids, "attention_mask": mask, "label_ids": raw["label_ids"],
                        "positions": positions, "inverse": inverse})
    return batches, len(tokenizer)


def shared_copy(base: nn.Module) -> nn.Module:
    """A structural copy whose (frozen) weight tensors are the base's own: N variants, 1x weights."""
    memo: dict[int, Any] = {id(p): p for p in base.parameters()}
    memo.update({id(b): b for b in base.buffers()})
    return copy.deepcopy(base, memo)


@dataclass
class Variant:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None  # None: the floor (activation gradients only)
    embeds: list[torch.Tensor] | None = None  # the floor's leaf input embeddings, one per batch
    steps: int = 0

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def build_variant(name: str, base: nn.Module, batches: list[dict[str, torch.Tensor]]) -> Variant:
    """Wrap a shared-weight copy of ``base`` as the named variant."""
    model = shared_copy(base)
    if name == FLOOR:
        emb = model.get_input_embeddings()
        with torch.no_grad():
            embeds = [emb(b["input_ids"]) for b in batches]
        # Leaves that require grad: backward runs through every layer down to the embeddings.
        model.train()
        return Variant(name, model, None, [e.requires_grad_(True) for e in embeds])
    lib, _, rank = name.removesuffix(BF16).partition("_r")
    r = int(rank)
    if lib == "lorakit":
        import lorakit

        lorakit.attach(model, lorakit.AdapterSpec(targets="all-linear", form_args={"r": r, "alpha": 2 * r}),
                       seed=0)
    else:
        import peft

        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")
        model = peft.get_peft_model(model, config)
    model.train()  # dropout is 0 in both configs; train() only so the mode matches real training
    params = [p for p in model.parameters() if p.requires_grad]
    return Variant(name, model, torch.optim.AdamW(params, lr=1e-4))


def forward_loss(v: Variant, i: int, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Label cross-entropy at each row's last real token (the lorakit classification objective)."""
    # logits_to_keep: the head runs only at the distinct last positions, as lorakit's objective.
    kwargs = {"attention_mask": batch["attention_mask"], "logits_to_keep": batch["positions"]}
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if v.name.endswith(BF16)
                else contextlib.nullcontext())
    with autocast:
        if v.embeds is not None:
            out = v.model(inputs_embeds=v.embeds[i], **kwargs)
        else:
            out = v.model(input_ids=batch["input_ids"], **kwargs)
    logits = out.logits[torch.arange(batch["label_ids"].shape[0]), batch["inverse"]]
    return F.cross_entropy(logits.float(), batch["label_ids"])


def train_step(v: Variant, batches: list[dict[str, torch.Tensor]]) -> float:
    """One training step; every variant walks the batches in the same order."""
    i = v.steps % len(batches)
    loss = forward_loss(v, i, batches[i])
    loss.backward()
    if v.optimizer is not None:
        v.optimizer.step()
        v.optimizer.zero_grad(set_to_none=True)
    else:
        assert v.embeds is not None
        v.embeds[i].grad = None
    v.steps += 1
    return loss.item()


# ------------------------------------------------------------------------------- sanity check
def _lorakit_forms(model: nn.Module) -> dict[str, nn.Module]:
    from lorakit.core.inject import adapter_modules

    return adapter_modules(model, "default")


@torch.no_grad()
def check_equivalence(variants: dict[str, Variant], batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Give lorakit and peft the same non-zero adapter weights and assert the same step-0 loss.

    B = 0 at init would make both equal to the base trivially; random B (seeded) checks that the
    targets, scaling and factor layout agree. Both then train from identical weights.
    """
    gen = torch.Generator().manual_seed(0)
    report: dict[str, Any] = {"floor_loss": forward_loss(variants[FLOOR], 0, batches[0]).item()}
    for r in RANKS:
        lk, pf = variants[f"lorakit_r{r}"], variants[f"peft_r{r}"]
        forms = _lorakit_forms(lk.model)
        inner = pf.model.get_base_model()  # type: ignore[operator]
        for path, form in forms.items():
            form.lora_B.copy_(torch.randn(form.lora_B.shape, generator=gen) * 0.02)
            layer = inner.get_submodule(path)
            layer.lora_A["default"].weight.copy_(form.lora_A)
            layer.lora_B["default"].weight.copy_(form.lora_B)
        n_peft = sum(1 for n, _ in inner.named_modules() if n.endswith("lora_A.default"))
        assert n_peft == len(forms), f"r={r}: peft adapts {n_peft} modules, lorakit {len(forms)}"
        assert lk.trainable == pf.trainable, f"r={r}: trainable {lk.trainable} vs {pf.trainable} (peft)"
        a, b = forward_loss(lk, 0, batches[0]).item(), forward_loss(pf, 0, batches[0]).item()
        assert abs(a - b) <= 1e-4 * max(1.0, abs(a)), f"r={r}: step-0 loss lorakit {a} != peft {b}"
        assert abs(a - report["floor_loss"]) > 1e-6, f"r={r}: adapter has no effect on the loss"
        report[f"r{r}"] = {"lorakit_loss": a, "peft_loss": b, "abs_diff": abs(a - b),
                           "adapted_modules": len(forms), "trainable_params": lk.trainable}
    return report


def saved_tensors_mb(v: Variant, batch: dict[str, torch.Tensor]) -> float:
    """MiB that autograd keeps for backward after one forward (unique storages, weights excluded).

    Exact and allocator-independent, unlike RSS: the activation memory a variant adds.
    """
    weights = {p.untyped_storage().data_ptr() for p in v.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        # Detached: returning an op's own output from a pack hook makes a graph <-> tensor
        # reference cycle that is never freed. The detached view still keeps the storage alive
        # until the graph goes, so no freed address is reused and double-counted as "new".
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward_loss(v, 0, batch)  # the graph is dropped unused
    return sum(seen.values()) / 2**20


# ------------------------------------------------------------------------------------- timing


def time_interleaved(variants: dict[str, Variant], batches: list[dict[str, torch.Tensor]], *,
                     warmup: int, rounds: int, steps: int) -> dict[str, dict[str, list[list[float]]]]:
    """Per clock, per variant, per round: the time of each timed step."""
    times: dict[str, dict[str, list[list[float]]]] = {c: {n: [] for n in variants} for c in common.CLOCKS}
    wall, cpu = common.CLOCKS["wall"], common.CLOCKS["cpu"]
    total = len(variants) * (warmup + rounds * steps)
    with tqdm(total=total, desc="timing", unit="step", file=sys.stderr) as bar:
        for name, v in variants.items():  # warm-up: allocator, AdamW state, first-call paths
            bar.set_postfix_str(f"warm-up {name}")
            for _ in range(warmup):
                train_step(v, batches)
                bar.update()
        for k, order in common.rotations(tuple(variants), rounds):
            for name in order:
                bar.set_postfix_str(f"round {k + 1}/{rounds} {name}")
                v = variants[name]
                gc.collect()  # so no collection of a previous variant's garbage lands in this block
                walls, cpus = [], []
                for _ in range(steps):
                    w0, c0 = wall(), cpu()
                    train_step(v, batches)
                    cpus.append(cpu() - c0)
                    walls.append(wall() - w0)
                    bar.update()
                times["wall"][name].append(walls)
                times["cpu"][name].append(cpus)
    return times


def summarize_times(times: dict[str, list[list[float]]], tokens: int) -> dict[str, dict[str, Any]]:
    out = {}
    for name, blocks in times.items():
        round_means = [statistics.fmean(b) for b in blocks]
        flat = [t for b in blocks for t in b]
        med = statistics.median(round_means)
        out[name] = {"median_s": med, "min_s": min(flat), "max_s": max(flat),
                     "round_means_s": round_means, "step_times_s": blocks, "tokens_per_s": tokens / med}
    return out


def ratios(timing: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Ratios of medians (the headline) and medians of per-round paired ratios (drift-robust)."""
    def paired(a: str, b: str) -> float:
        pairs = zip(timing[a]["round_means_s"], timing[b]["round_means_s"])
        return statistics.median(x / y for x, y in pairs)

    out = {}
    for r in RANKS:
        lk, pf = f"lorakit_r{r}", f"peft_r{r}"
        out[f"r{r}"] = {
            "lorakit_over_peft": timing[lk]["median_s"] / timing[pf]["median_s"],
            "lorakit_over_floor": timing[lk]["median_s"] / timing[FLOOR]["median_s"],
            "peft_over_floor": timing[pf]["median_s"] / timing[FLOOR]["median_s"],
            "paired_lorakit_over_peft": paired(lk, pf),
            "paired_lorakit_over_floor": paired(lk, FLOOR),
        }
    lk, pf = BF16_VARIANTS
    if lk in timing and pf in timing:
        out["r16_bf16"] = {
            "lorakit_over_peft": timing[lk]["median_s"] / timing[pf]["median_s"],
            "paired_lorakit_over_peft": paired(lk, pf),
            "lorakit_bf16_over_fp32": timing[lk]["median_s"] / timing["lorakit_r16"]["median_s"],
            "peft_bf16_over_fp32": timing[pf]["median_s"] / timing["peft_r16"]["median_s"],
        }
    return out


# ------------------------------------------------------------------------------------- memory
def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    # Hand freed heap pages back to the OS, so memory freed while loading is not silently reused
    # by activations (which would hide them from an RSS delta).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _memory_child(args: argparse.Namespace) -> None:
    """Entry point of a fresh process measuring one variant's peak RSS; prints one JSON line."""
    common.pin_threads()
    batches, vocab = torch.load(args.batches, weights_only=True)
    # Import both libraries before the baseline so an import's own memory is not charged to a variant.
    import peft  # noqa: F401

    import lorakit  # noqa: F401

    base = load_base(args.model, vocab)
    with torch.no_grad():
        # The weights may be mmapped from the safetensors cache and paged in only when first
        # read; read them all now so the baseline holds them and the peak does not.
        for t in (*base.parameters(), *base.buffers()):
            t.sum()
    gc.collect()
    _trim_heap()
    baseline_kb = _proc_status_kb("VmRSS") or 0
    reset = _reset_peak()
    maxrss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    v = build_variant(args.memory_child, base, batches)
    after_build_kb = _proc_status_kb("VmRSS") or 0
    for _ in range(args.memory_steps):
        train_step(v, batches)
    peak_kb = _proc_status_kb("VmHWM") if reset else None
    if peak_kb is None:  # no clear_refs: process-lifetime peak, which may include the model load
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({
        "variant": args.memory_child,
        "method": "VmHWM reset via /proc/self/clear_refs" if reset else "ru_maxrss (not reset)",
        "baseline_rss_mb": baseline_kb / 1024,
        "baseline_rss_file_mb": (_proc_status_kb("RssFile") or 0) / 1024,  # file-backed (mmapped) part
        "adapter_setup_mb": (after_build_kb - baseline_kb) / 1024,
        "peak_delta_mb": (peak_kb - baseline_kb) / 1024,
        "peak_rss_mb": peak_kb / 1024,
        "maxrss_at_baseline_mb": maxrss_before_kb / 1024,
        "trainable_params": v.trainable,
    }))


def measure_memory(args: argparse.Namespace, batches_file: Path) -> dict[str, dict[str, Any]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1"}

    def child(name: str) -> dict[str, Any]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", name,
               "--batches", str(batches_file), "--model", args.model,
               "--memory-steps", str(args.memory_steps)]
        # A failed child (OOM-killed on a shared box, say) is recorded, not fatal: the timings stand.
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False,
                                  timeout=args.memory_timeout)
        except subprocess.TimeoutExpired:
            return {"variant": name, "error": f"timed out after {args.memory_timeout} s"}
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-3:]
            print(f"memory child for {name} failed (rc {proc.returncode}): {tail}", file=sys.stderr)
            return {"variant": name, "error": f"exit code {proc.returncode}: {' | '.join(tail)}"}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    # Each child's RSS is its own, so children may run side by side (timing is already done).
    with ThreadPoolExecutor(max_workers=args.memory_jobs) as pool:
        futures = {name: pool.submit(child, name) for name in variant_names(args)}
        bar = tqdm(as_completed(futures.values()), total=len(futures), desc="memory (1 process each)",
                   unit="variant", file=sys.stderr)
        for _ in bar:
            pass
    return {name: f.result() for name, f in futures.items()}


# ------------------------------------------------------------------------------------- output
def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["config"].get("variants", VARIANTS))
    colors = ["0.6" if n == FLOOR else "tab:blue" if n.startswith("lorakit") else "tab:orange" for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    x = range(len(names))
    for k, (clock, hatch) in enumerate((("cpu", ""), ("wall", "//"))):
        timing = result["timing"][clock]
        med = [timing[n]["median_s"] for n in names]
        lo = [m - min(timing[n]["round_means_s"]) for m, n in zip(med, names)]
        hi = [max(timing[n]["round_means_s"]) - m for m, n in zip(med, names)]
        axes[0].bar([i + (k - 0.5) * 0.4 for i in x], med, width=0.4, yerr=[lo, hi], color=colors,
                    hatch=hatch, edgecolor="k", capsize=3, label=f"{clock} time")
    axes[0].set_xticks(list(x), names)
    axes[0].legend(loc="upper left")
    axes[0].set_ylabel("s/step (median; whiskers: round min..max)")
    axes[0].set_title("training step time")
    bars = [("saved for backward", "", result["saved_for_backward_mb"])]
    if result.get("memory"):
        bars.append(("peak RSS over loaded model", "//",
                     {n: result["memory"][n].get("peak_delta_mb", 0.0) for n in names}))
    width = 0.8 / len(bars)
    for k, (label, hatch, values) in enumerate(bars):
        axes[1].bar([i + (k - (len(bars) - 1) / 2) * width for i in x], [values[n] for n in names],
                    width=width, color=colors, hatch=hatch, edgecolor="k", label=label)
    axes[1].set_xticks(list(x), names)
    axes[1].legend(loc="upper left")
    for ax in axes:  # headroom, so the legends do not cover the bars
        ax.set_ylim(top=ax.get_ylim()[1] * 1.25)
    axes[1].set_ylabel("MiB")
    axes[1].set_title("memory (RSS: a fresh process per variant)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    cfg = result["config"]
    fig.suptitle(f"{cfg['model']}: batch {cfg['batch_size']} x {cfg['seq_len']} tokens, LoRA all-linear, "
                 f"1 thread, {cfg['rounds']} rounds")
    common.save_figure(fig, path, dpi=120)


def summary_line(result: dict[str, Any]) -> str:
    clock = result["headline_clock"]
    rat, other = result["ratios"][clock], result["ratios"]["wall" if clock == "cpu" else "cpu"]
    parts = [f"r={r} lorakit/peft={rat[f'r{r}']['lorakit_over_peft']:.2f} "
             f"lorakit/floor={rat[f'r{r}']['lorakit_over_floor']:.2f}" for r in RANKS]
    alt = " ".join(f"{other[f'r{r}']['lorakit_over_peft']:.2f}/{other[f'r{r}']['lorakit_over_floor']:.2f}"
                   for r in RANKS)
    if "r16_bf16" in rat:
        parts.append(f"r=16 bf16 lorakit/peft={rat['r16_bf16']['lorakit_over_peft']:.2f} "
                     f"bf16/fp32={rat['r16_bf16']['lorakit_bf16_over_fp32']:.2f}")
    cfg = result["config"]
    return (f"train_overhead: {' | '.join(parts)} (median of {cfg['rounds']} rounds, 1 thread, {clock} time, "
            f"{cfg['model']}, floor {result['timing'][clock][FLOOR]['median_s']:.2f} s/step; "
            f"{'wall' if clock == 'cpu' else 'cpu'} time: {alt})")


# --------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.make_parser(__doc__)
    p.add_argument("--model", default="smollm2",
                   help="'smollm2' (embedded SmolLM2-135M), 'tiny' (seeded small llama) or a local HF dir")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds; every variant runs in each")
    p.add_argument("--steps-per-round", type=int, default=1, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before round 1")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (right-padded)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    # 2 steps: the second runs with the AdamW state allocated, so its peak is the steady-state one.
    p.add_argument("--memory-steps", type=int, default=2, help="steps per memory subprocess (0: skip memory)")
    # 1 by default: each child peaks near 3.5 GB on SmolLM2, and the box may be shared.
    p.add_argument("--memory-jobs", type=int, default=1, help="memory subprocesses run at once")
    p.add_argument("--memory-timeout", type=int, default=600, help="seconds before a memory child is given up")
    p.add_argument("--clock", choices=tuple(common.CLOCKS), default="cpu",
                   help="clock of the headline ratios (both are recorded); cpu resists load from other jobs")
    p.add_argument("--profile", action="store_true",
                   help="also write torch.profiler tables of one lorakit and one peft r=16 step")
    p.add_argument("--out", type=Path, default=HERE / "results", help="folder for the JSON and PNG")
    # Internal: run as the memory subprocess of one variant.
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                   help="also time lorakit and peft r=16 under bf16 autocast (fp32 adapter weights)")
    p.add_argument("--memory-child", choices=VARIANTS + BF16_VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--batches", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("rounds", "steps_per_round", "seq_len", "batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.memory_steps < 0 or args.memory_jobs < 1:
        p.error("--warmup and --memory-steps must be >= 0, --memory-jobs >= 1")
    return args


def variant_names(args: argparse.Namespace) -> tuple[str, ...]:
    return VARIANTS + (BF16_VARIANTS if args.bf16 else ())


def profile_steps(variants: dict[str, Variant], batches: list[dict[str, torch.Tensor]],
                  out: Path) -> list[str]:
    """torch.profiler op tables of one step each, to locate any overhead.

    The profiler's "CPU time" is wall time inside each op, so compare tables only from an idle
    machine; the op counts are exact either way.
    """
    from torch.profiler import ProfilerActivity, profile

    written = []
    for name in ("lorakit_r16", "peft_r16", FLOOR):
        v = variants[name]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step(v, batches)
        path = out / f"profile_{name}.txt"
        path.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
        written.append(str(path))
    return written


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.memory_child:
        _memory_child(args)
        return
    t_start = time.perf_counter()
    common.pin_threads()
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()

    batches, vocab = make_batches(args.seq_len, args.batch_size)
    base = load_base(args.model, vocab)
    variants = {}
    for name in tqdm(variant_names(args), desc="building variants", unit="variant", file=sys.stderr):
        variants[name] = build_variant(name, base, batches)
    sanity = check_equivalence(variants, batches)
    saved = {name: saved_tensors_mb(v, batches[0]) for name, v in variants.items()}

    times = time_interleaved(variants, batches, warmup=args.warmup, rounds=args.rounds,
                             steps=args.steps_per_round)
    # Same weights, data and optimizer: lorakit and peft should still agree after training.
    last_loss = {n: forward_loss(v, 0, batches[0]).item() for n, v in variants.items()}
    profiles = profile_steps(variants, batches, args.out) if args.profile else []
    load_after_timing = os.getloadavg()
    variants_trainable = {name: v.trainable for name, v in variants.items()}
    del variants, base
    gc.collect()
    _trim_heap()  # the memory subprocesses come next; give them the RAM this process no longer needs

    tokens = args.batch_size * args.seq_len
    timing = {clock: summarize_times(t, tokens) for clock, t in times.items()}
    ratio = {clock: ratios(t) for clock, t in timing.items()}
    head = ratio[args.clock]
    result: dict[str, Any] = {
        "benchmark": "train_overhead",
        "machine": {**common.machine_info(packages=("transformers", "peft")), "loadavg_start": load_before,
                    "loadavg_after_timing": load_after_timing},
        "config": {
            "model": args.model, "tiny_config": TINY_CONFIG if args.model == "tiny" else None,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "distinct_batches": N_BATCHES,
            "data": "sentiment train split (seed 0), right-padded to seq_len",
            "ranks": list(RANKS), "targets": "all-linear", "alpha": "2*r", "dropout": 0.0,
            "optimizer": "torch.optim.AdamW(lr=1e-4), default (for-loop) CPU implementation",
            "loss": "cross-entropy of the label token at each row's last real position (logits_to_keep)",
            "floor": "frozen base, inputs_embeds leaf with requires_grad, forward+backward, no optimizer",
            "warmup_steps": args.warmup, "rounds": args.rounds, "steps_per_round": args.steps_per_round,
            "order": "variants rotate their position every round; gc.collect() before each block",
            "weights": "all variants share the base weight tensors (structural deep copies)",
            "threads": 1, "memory_steps": args.memory_steps, "memory_jobs": args.memory_jobs,
            "variants": list(variant_names(args)),
            "bf16": "torch.autocast('cpu', bfloat16) around forward and loss; adapter weights stay fp32",
        },
        "step_time_method": ("median over rounds of the per-round mean step time; 'cpu' = process CPU "
                             "time (time.process_time), 'wall' = perf_counter"),
        "headline_clock": args.clock,
        "timing": timing,
        "ratios": ratio,
        "targets": {
            f"r{r}": {"lorakit_over_peft_max": TARGET_VS_PEFT, "lorakit_over_floor_max": TARGET_VS_FLOOR,
                      "met": (head[f"r{r}"]["lorakit_over_peft"] <= TARGET_VS_PEFT
                              and head[f"r{r}"]["lorakit_over_floor"] <= TARGET_VS_FLOOR)}
            for r in RANKS},
        "memory_method": (
            "one fresh subprocess per variant: load the base, read every weight (pages in mmapped weights), "
            "malloc_trim, baseline = VmRSS; reset the RSS "
            "high-water mark (/proc/self/clear_refs = 5); build the variant and run --memory-steps steps; "
            "peak_delta = VmHWM - baseline (activations, autograd buffers, adapter params, grads, "
            "AdamW state)"),
        "memory": {},
        "saved_for_backward_mb": saved,
        "saved_for_backward_method": ("torch.autograd.graph.saved_tensors_hooks over one forward: bytes of "
                                      "the unique storages autograd keeps for backward, weights excluded"),
        "adapter_state_mb": {name: variants_trainable[name] * 4 * 4 / 2**20 for name in variant_names(args)},
        "adapter_state_method": "trainable params x 4 bytes x (param, grad, AdamW exp_avg, exp_avg_sq)",
        "sanity": {**sanity, "loss_after_training": last_loss},
        "profiles": profiles,
    }
    json_path, png_path = args.out / "train_overhead.json", args.out / "train_overhead.png"

    def write() -> None:
        result["wall_s"] = time.perf_counter() - t_start
        common.write_json(json_path, result)
        common.atomic_write(png_path, lambda p: plot(result, p))

    write()  # the timings are safe on disk before the memory subprocesses start
    if args.memory_steps > 0:
        with tempfile.TemporaryDirectory() as tmp:
            # The children get the parent's exact tensors (no re-tokenizing, same vocab).
            batches_file = Path(tmp) / "batches.pt"
            torch.save((batches, vocab), batches_file)
            result["memory"] = measure_memory(args, batches_file)
        write()
    print(summary_line(result))


if __name__ == "__main__":
    main()
