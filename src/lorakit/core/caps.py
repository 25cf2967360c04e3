"""Capability flags that methods declare so generic code can decide what to do without name checks."""

from __future__ import annotations

from enum import Flag, auto


class Cap(Flag):
    """What a method can do or needs. Generic code checks these, never class names."""

    NONE = 0
    FACTORED_AB = auto()  # ΔW = s·B·A with tensors `lora_A` (r, in) and `lora_B` (out, r)
    MERGEABLE = auto()  # ΔW does not depend on the input: merge/unmerge into the base weight is exact
    RANK_MUTABLE = auto()  # implements resize(rank)
    RANK_GROWTH = auto()  # grows by whole ranks while training: grow(n), track_importance (IncreLoRA's form)
    NESTED_RANKS = auto()  # serves any prefix rank b <= r_max: set_rank(b), rank, r_max (DyLoRA's form)
    FROZEN_A = auto()  # A is fixed by design (only B trains: FFA-LoRA)
    NEEDS_DATA = auto()  # an init that reads calibration activations
    NEEDS_GRAD = auto()  # an init that reads gradients of the frozen base weights
    ROUTED = auto()  # output depends on a per-token gate (not mergeable)
    REWRITES_BASE = auto()  # an init that changes the base weight (export must account for it)
    CONV1D_OK = auto()  # works on HF Conv1D (GPT-2 style, weight stored (in, out))
    IDENTITY_AT_INIT = auto()  # output equals the base output right after init
    # ΔW = s·B·M·A with `lora_A` (r, in), `lora_B` (out, r) and an (r, r) middle matrix M whose
    # attribute name is the form's `middle_name` (e.g. "lora_N", "lora_R")
    FACTORED_BMA = auto()
    # holds model-level tensors shared by all layers of one adapter (Form.shared_names, built by
    # Form.build_shared, stored once per adapter; e.g. RandLoRA's random bases)
    SHARED_TENSORS = auto()
    # works on nn.Conv2d (groups=1): ΔW in the weight's (out, in, kh, kw) layout, forward by convolution
    CONV2D_OK = auto()
    # works on nn.Embedding: ΔW in (embedding_dim, num_embeddings) layout, forward by a lookup of ids
    EMBEDDING_OK = auto()
    # a sparse form whose support is chosen from scores: implements select_top(scores (out, in))
    SPARSE_MASK = auto()
    # works over a quantized (bitsandbytes nf4/fp4/int8) base layer: a form's forward is the quantized
    # base output plus its delta and it reads W only dequantized; an init reads W only dequantized and
    # neither rewrites W nor needs gradients of W; a strategy never writes or trains base weights
    QUANTIZED_OK = auto()
    # works in reduced precision: under the trainer's bf16/fp16 autocast with fp32 adapter (master)
    # weights (forms, strategies: hooks that read gradients see them unscaled), or on a bf16/fp16 base
    # weight (inits: their linear algebra runs in fp32)
    LOW_PRECISION_OK = auto()


def describe(caps: Cap) -> str:
    """Comma-separated lower-case names of the set flags."""
    return ",".join(f.name.lower() for f in Cap if f and f in caps and f.name) or "-"


# what each hardware requirement needs, and how a refusal names it
_HARDWARE = {"quantized": (Cap.QUANTIZED_OK, "a quantized (4-/8-bit) base"),
             "low_precision": (Cap.LOW_PRECISION_OK, "reduced precision (bf16/fp16)")}


def declared(method: object) -> Cap:
    """The capabilities a form, init or strategy (class or instance) declares: its ``caps``."""
    caps = getattr(method, "caps", Cap.NONE)
    return caps if isinstance(caps, Cap) else Cap.NONE


def require(methods: list[tuple[str, object]], need: str) -> None:
    """Refuse, naming every method that lacks the capability, when ``need`` ("quantized" or
    "low_precision") is not declared by all ``(axis, method)`` pairs. Checked once, before any work."""
    cap, what = _HARDWARE[need]
    lacking = [f"{axis} {getattr(m, 'name', type(m).__name__)!r}" for axis, m in methods if cap not in declared(m)]
    if lacking:
        raise ValueError(f"{', '.join(lacking)} cannot run on {what} (not declared: Cap.{cap.name}); "
                         + ("load the base unquantized (no --quantize)" if need == "quantized"
                            else "train in fp32 (--precision fp32)"))
