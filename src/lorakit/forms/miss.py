"""Bone (block-affine, "weight guide") and MiSS (shared shard) forms.

Jiale Kang. "Bone: Block-Affine Adaptation of Large Language Models", arXiv 2409.15371 (2024); later
versions of the same arXiv id: "DiSHA: Dimension-Sharding Adaptation ..." and "MiSS: Balancing LoRA
Performance and Efficiency with Simple Shard Sharing". Official code: JL-er/Bone (RWKV-PEFT
``merge/merge_bone.py``), JL-er/MiSS (``finetune.py`` + scripts); PEFT 0.21.2 ``tuners/miss``
(``MissConfig``), which replaced PEFT's earlier ``BoneConfig``.

Notation: base weight W ∈ R^{m×n} (out × in), blocks of size r.

``bone`` — the block-affine "weight guide" form (the paper's v1 Bone; PEFT ``init_weights="bat"``).
Cut W into r×r blocks W_{a,b} (a < m/r output-row blocks, b < n/r input-column blocks). One trainable
Bn_a ∈ R^{r×r} per output-row block, zero-initialized, and

    ΔW_{a,b} = W_{a,b} · Bn_a + Bn_a,            i.e.  W'_{a,b} = W_{a,b} (I + Bn_a) + Bn_a.

The update reads W (the "weight guide"), so the fast path has to materialize ΔW from the current
base weight (O(m·n·r) per call, like the official code and PEFT); there is no cheaper factored form.
Unmerge inverts the affine map per block: W_{a,b} = (W'_{a,b} − Bn_a)(I + Bn_a)^{-1}, solved in float64
(``torch.linalg.solve``, no explicit inverse), so merge→unmerge restores W to ~1e-7 in fp32 where
I + Bn_a is well conditioned. The solve amplifies the rounding of the stored W' by cond(I + Bn_a)
(random Bn of std 0.3 on 8×8 blocks reach cond ~5e4: errors ~5e-4), so a merge checks its own
round trip and records, for the output-row blocks that would not come back within a few ulps, the
pre-merge rows and the rows it wrote (only those blocks; nothing for a well-conditioned adapter).
Unmerge puts the recorded rows back bit-exactly when the weight still holds what the merge wrote
there (else it solves, as for the other blocks).
m·r trainable parameters per layer (tensor ``miss_block``, shape (m/r, r, r)); m and n must be
divisible by r. Block sharing: PEFT and the official merge script share Bn along the output-row
block a (``rearrange(W, '(a r1)(b r2) -> b a r1 r2') @ bone``); that is what PEFT files store and the
only orientation offered here (the alternative "one Bn per input-column block" that some versions
describe is not in any code we read and PEFT cannot store it).

``miss`` — the W-free shared-shard form (the later Bone/MiSS default, PEFT ``init_weights=True``).
Trainable D ∈ R^{r×m}, zero-initialized; the input is cut into n/r shards of size r (zero-padded when
r does not divide n) that all share D:

    y = W x + (Σ_j x[j·r:(j+1)·r]) D,      ΔW = Dᵀ [I_r I_r … I_r]  (ΔW[o, c] = D[c mod r, o]),

rank ≤ r, r·m parameters, O(n + r·m) per token (ΔW never materialized). ``mini_r`` selects PEFT's
"mini" variant: D ∈ R^{r×mini_r} tiled m/mini_r times along the output (r·mini_r parameters; m must
be divisible by mini_r). ``dropout`` is applied to x before the shard sum (PEFT ``miss_dropout``).

Defaults: r = 64 (PEFT ``MissConfig`` default and the official MetaMathQA scripts ``--bone_r 64``);
dropout 0 (PEFT; the scripts set none); mini_r unset (balance variant, PEFT ``init_weights=True``).

Paper vs code: the seed abstract (v1) describes Bone = the block-affine form; the later versions and
PEFT make the W-free shard form the default and call the block-affine one "Bat". Both are offered,
as two forms (``bone`` = Bat, ``miss`` = default/mini), sharing PEFT's peft_type "MISS":
``peft_accepts`` routes ``init_weights="bat"`` to ``bone`` and everything else to ``miss``.

Pitfalls handled:
- Bone-era PEFT files (peft_type "BONE", tensor key ``bone_block``, same shapes and math) load as
  MISS: ``peft_type_aliases`` + ``split_key`` map them; lorakit writes them back as MISS.
- bat's ΔW is bilinear in (W, Bn): two stacked bat adapters do not add, and an unmerged bat adapter
  reads the *current* base weight (other merged adapters included), exactly as PEFT does.
- PEFT's MiSS does not support ``scale_layer``; these forms have no α either.
- MiSS with r ∤ n: the trailing shard is zero-padded, i.e. ΔW's last columns use the first n mod r
  rows of D, as PEFT.
- GPT-2 ``Conv1D`` (weight stored (in, out)): both forms work in the (out, in) layout (bone's blocks
  and merges read and write the transposed view, miss never reads W), so they declare CONV1D_OK.
  PEFT's MiSS only wraps ``nn.Linear`` (``peft_conv1d = False``): PEFT export of an adapter on Conv1D
  layers is refused with a clear message (no adapter_config.json; lorakit's own files still load).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.core.caps import Cap
from lorakit.core.checks import check_common
from lorakit.forms.base import Form

_BLOCK = "miss_block"
_LEGACY_BLOCK = "bone_block"  # PEFT BoneConfig era (peft_type "BONE")


def _check_bias(config: dict[str, Any]) -> None:
    if config.get("bias", "none") not in (None, "none"):
        raise ValueError(f"PEFT option bias={config['bias']!r} (trained base biases) is not supported")


class _MissFamily(Form):
    """Shared PEFT plumbing of the two MiSS variants (same peft_type, same tensor key)."""

    peft_type = "MISS"
    peft_type_aliases: ClassVar[tuple[str, ...]] = ("BONE",)
    peft_conv1d = False  # PEFT 0.21.2 MissModel: "only `torch.nn.Linear` (optionally quantized) is supported"
    file_keys = {_BLOCK: _BLOCK}

    @classmethod
    def split_key(cls, key: str) -> tuple[str, str]:
        for suffix in (_BLOCK, _LEGACY_BLOCK):
            if key.endswith("." + suffix):
                return key[: -len(suffix) - 1], _BLOCK
        return super().split_key(key)


# ----------------------------------------------------------------------------------------- bone
@dataclass(frozen=True)
class BoneArgs:
    r: int = 64

    def __post_init__(self) -> None:
        check_common("bone", self, "block size r")


class Bone(_MissFamily):
    """Block-affine Bone ("Bat"): ΔW_{a,b} = W_{a,b}·Bn_a + Bn_a (see the module docstring)."""

    name = "bone"
    Args = BoneArgs
    caps = Cap.MERGEABLE | Cap.IDENTITY_AT_INIT | Cap.CONV1D_OK
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)

    def __init__(self, base_layer: nn.Module, args: BoneArgs) -> None:
        super().__init__(base_layer, args)
        m, n, r = self.out_features, self.in_features, args.r
        if m % r or n % r:
            raise ValueError(f"bone: the weight ({m}×{n}, out×in) must split into r×r blocks; "
                             f"r={r} divides neither or only one of its sides")
        device = base_layer.weight.device
        self.miss_block = nn.Parameter(torch.zeros(m // r, r, r, device=device))
        # (row-block ids, their pre-merge rows, the rows the merge wrote) for ill-conditioned blocks
        self._merge_record: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.miss_block)

    def _blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """(m, n) -> (m/r, n/r, r, r) with [a, b] = W_{a,b}."""
        r = self.args.r
        m, n = weight.shape
        return weight.reshape(m // r, r, n // r, r).transpose(1, 2)

    @staticmethod
    def _unblocks(blocks: torch.Tensor) -> torch.Tensor:
        a, b, r, _ = blocks.shape
        return blocks.transpose(1, 2).reshape(a * r, b * r)

    def _delta(self, weight: torch.Tensor) -> torch.Tensor:
        bn = self.miss_block.unsqueeze(1)  # (m/r, 1, r, r): one Bn per output-row block
        return self._unblocks(self._blocks(weight.to(bn.dtype)) @ bn + bn)

    def delta_weight(self) -> torch.Tensor:
        return self._delta(self.base_weight.detach())

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        # W' = W(I + Bn) + Bn evaluated in float64 and rounded once, so the stored W' carries only
        # its own rounding into the unmerge (which amplifies it by ‖(I + Bn)^{-1}‖)
        bn = self.miss_block.detach().to(torch.float64).unsqueeze(1)
        w = self._blocks(weight.to(torch.float64))
        merged = self._unblocks(w @ bn + bn + w).to(weight.dtype)
        self._record(weight, merged)
        return merged

    def _record(self, weight: torch.Tensor, merged: torch.Tensor) -> None:
        """Keep the rows of the blocks whose solve would not restore ``weight`` within a few ulps."""
        r = self.args.r
        stored_dtype = self._base_layer.weight.dtype  # what the base layer will hold (e.g. bf16)
        stored = merged if stored_dtype == merged.dtype else merged.to(stored_dtype).to(merged.dtype)
        err = (self._solve(stored) - weight).abs().reshape(-1, r * weight.shape[1]).amax(1)
        size = torch.maximum(weight.abs(), stored.abs()).reshape(-1, r * weight.shape[1]).amax(1)
        bad = torch.nonzero(err > 4 * torch.finfo(weight.dtype).eps * size.clamp_min(1e-30)).flatten()
        if bad.numel() == 0:
            self._merge_record = None
            return
        rows = (bad[:, None] * r + torch.arange(r, device=bad.device)).flatten()
        self._merge_record = (rows, weight[rows].detach().clone(), stored[rows].detach().clone())

    def _solve(self, weight: torch.Tensor) -> torch.Tensor:
        bn = self.miss_block.detach().to(torch.float64).unsqueeze(1)
        eye = torch.eye(self.args.r, dtype=torch.float64, device=bn.device)
        # W (I + Bn) = W' − Bn  ⇒  W = (W' − Bn)(I + Bn)^{-1}, solved from the right per block
        blocks = torch.linalg.solve(eye + bn, self._blocks(weight.to(torch.float64)) - bn, left=False)
        return self._unblocks(blocks).to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        out = self._solve(weight)
        record = self._merge_record
        if record is not None and record[2].dtype == weight.dtype:
            rows, original, written = record
            if torch.equal(weight[rows], written):  # still what the merge wrote: restore bit for bit
                out[rows] = original
        return out

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: BoneArgs) -> int:
        return out_features * args.r

    @classmethod
    def examples(cls) -> list[BoneArgs]:
        return [BoneArgs(r=8), BoneArgs(r=4)]

    @classmethod
    def peft_accepts(cls, config: dict[str, Any]) -> bool:
        return config.get("init_weights") == "bat"

    @classmethod
    def peft_config(cls, args: BoneArgs) -> dict[str, Any]:
        return {"r": args.r, "init_weights": "bat", "mini_r": 1, "miss_dropout": 0.0, "bias": "none",
                "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def args_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        if config.get("init_weights") != "bat":
            raise ValueError(f"form 'bone' reads MiSS adapters with init_weights='bat', "
                             f"got {config.get('init_weights')!r} (use form 'miss')")
        _check_bias(config)
        return {"r": int(config.get("r", 64))}


# ----------------------------------------------------------------------------------------- miss
@dataclass(frozen=True)
class MiSSArgs:
    r: int = 64
    mini_r: int | None = None  # PEFT "mini": D is (r, mini_r), tiled along the output
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_common("miss", self, "shard size r")
        if self.mini_r is not None and self.mini_r < 1:
            raise ValueError(f"miss: mini_r must be >= 1 (None: the balance variant), got {self.mini_r}")


class MiSS(_MissFamily):
    """MiSS / Bone v2: y += (Σ_j x_j) D with input shards x_j of size r (see the module docstring)."""

    name = "miss"
    Args = MiSSArgs
    caps = Cap.MERGEABLE | Cap.IDENTITY_AT_INIT | Cap.CONV1D_OK
    caps |= Cap.QUANTIZED_OK | Cap.LOW_PRECISION_OK  # hardware: quantized base, bf16/fp16 (issue 17)

    def __init__(self, base_layer: nn.Module, args: MiSSArgs) -> None:
        super().__init__(base_layer, args)
        m, n, r = self.out_features, self.in_features, args.r
        if r > n:
            raise ValueError(f"miss: shard size r={r} exceeds in_features={n}")
        cols = m
        if args.mini_r is not None:
            if m % args.mini_r:
                raise ValueError(f"miss: mini_r={args.mini_r} must divide out_features={m}")
            cols = args.mini_r
        self.miss_block = nn.Parameter(torch.zeros(r, cols, device=base_layer.weight.device))
        self.dropout = nn.Dropout(args.dropout) if args.dropout > 0 else nn.Identity()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.miss_block)

    def _full_block(self) -> torch.Tensor:
        """D as (r, m) (the mini block tiled along the output)."""
        d = self.miss_block
        return d if self.args.mini_r is None else d.repeat(1, self.out_features // self.args.mini_r)

    def delta_weight(self) -> torch.Tensor:
        n, r = self.in_features, self.args.r
        cols = torch.arange(n, device=self.miss_block.device) % r
        return self._full_block().T[:, cols]  # ΔW[o, c] = D[c mod r, o]

    def apply(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        r = self.args.r
        x = self.dropout(x)
        pad = -x.shape[-1] % r
        if pad:
            x = F.pad(x, (0, pad))
        shards = x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(dim=-2)
        return base_out + shards @ self._full_block()

    @classmethod
    def num_trainable(cls, in_features: int, out_features: int, args: MiSSArgs) -> int:
        return args.r * (out_features if args.mini_r is None else args.mini_r)

    @classmethod
    def examples(cls) -> list[MiSSArgs]:
        # r=6 does not divide 32/64: exercises the zero-padded trailing shard
        return [MiSSArgs(r=8), MiSSArgs(r=6), MiSSArgs(r=8, mini_r=4)]

    @classmethod
    def peft_accepts(cls, config: dict[str, Any]) -> bool:
        return config.get("init_weights", True) != "bat"

    @classmethod
    def peft_config(cls, args: MiSSArgs) -> dict[str, Any]:
        return {"r": args.r, "init_weights": True if args.mini_r is None else "mini",
                "mini_r": 1 if args.mini_r is None else args.mini_r, "miss_dropout": args.dropout,
                "bias": "none", "exclude_modules": None, "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def args_from_peft(cls, config: dict[str, Any]) -> dict[str, Any]:
        init = config.get("init_weights", True)
        if init == "bat":
            raise ValueError("form 'miss' does not read MiSS adapters with init_weights='bat' (see 'bone')")
        if init not in (True, False, "mini"):
            raise ValueError(f"unknown MiSS init_weights={init!r}; expected true, false, 'bat' or 'mini'")
        _check_bias(config)
        # init_weights=false only changes PEFT's (test-only) random init; the tensors come from the file
        return {"r": int(config.get("r", 64)),
                "mini_r": int(config.get("mini_r", 1)) if init == "mini" else None,
                "dropout": float(config.get("miss_dropout", config.get("bone_dropout", 0.0)) or 0.0)}
