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


def describe(caps: Cap) -> str:
    """Comma-separated lower-case names of the set flags."""
    return ",".join(f.name.lower() for f in Cap if f and f in caps and f.name) or "-"
