"""Merging: several LoRA adapters (same base and targets, any ranks) -> one plain LoRA adapter.

    from lorakit.compose.merge import merge
    state = merge(["runs/a", "runs/b"], "lego", k=16)        # AdapterStates or adapter folders
    lorakit.save_state(state, "runs/merged")                 # PEFT format: loads in PeftModel
    print(state.meta["merge"])                               # method, rank, truncation error, seconds

Methods (catalog axis "merge"): linear, cat, svd, ties, dare_linear, dare_ties, magnitude_prune, lego,
lorahub (which also searches its weights on few-shot data: ``LoraHubMerge().search(model, states, ...)``).
The shared parts (scale folding, pooling, sparsification, sign consensus, SVD truncation) live in
``parts.py``; each method is one small file that composes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lorakit.compose.merge.parts import LoRAFactors, MergeInputError, Merger, ModuleResult, summary
from lorakit.core.state import AdapterState


def merge(states: Sequence[AdapterState | str | Path], method: str, weights: Sequence[float] | None = None, *,
          progress: bool = False, **args: Any) -> AdapterState:
    """Merge ``states`` with catalog method ``method`` (args: the method's ``Args`` fields)."""
    from lorakit.core import registry

    return registry.get("merge", method)(**args).merge(states, weights, progress=progress)


def methods() -> list[str]:
    from lorakit.core import registry

    return registry.names("merge")


__all__ = ["LoRAFactors", "MergeInputError", "Merger", "ModuleResult", "merge", "methods", "summary"]
