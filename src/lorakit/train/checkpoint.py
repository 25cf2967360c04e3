"""Training checkpoints: trainable tensors (safetensors), optimizer/scheduler/RNG/strategy state.

A checkpoint is a folder ``step-NNNNNNN`` written under a temp name and renamed when complete, so a
run killed mid-save never leaves a checkpoint that looks complete. Optimizer state is saved with
``torch.save`` and read back with ``weights_only=True`` (tensors and plain containers only).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lorakit.core import atomic

COMPLETE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def save_checkpoint(root: Path, step: int, *, params: dict[str, torch.Tensor], optimizer: Any,
                    scheduler: Any, trainer_state: dict[str, Any], strategies: dict[str, Any],
                    rng_per_rank: list[dict[str, Any]], keep: int = 2) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_checkpoints(root)
    final = root / f"step-{step:07d}"
    # the pid in the name lets a later run tell a killed save's leftovers from a live one's
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}.", dir=root))
    try:
        os.chmod(tmp, atomic.dir_mode())  # mkdtemp makes 0700; a checkpoint is a normal folder
        save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, str(tmp / "params.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "strategies": strategies}, tmp / "optim.pt")
        torch.save(rng_per_rank, tmp / "rng.pt")
        (tmp / COMPLETE).write_text(json.dumps(trainer_state, indent=2, default=str))
        for f in tmp.iterdir():  # safetensors' save_file creates 0600 files whatever the umask
            os.chmod(f, atomic.file_mode())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale_checkpoints(root: Path) -> list[Path]:
    """Remove the ``.step-*`` temp folders that killed runs left in ``root`` (their writer's pid is gone,
    or they are older than ``atomic.STALE_AFTER_S``); the removed paths."""
    if not root.is_dir():
        return []
    names = tuple(sorted({p.name[1:].split(".")[0] for p in root.glob(".step-*")}))
    return atomic.remove_stale(root, names) if names else []


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / COMPLETE).exists())


def load_checkpoint(path: Path) -> dict[str, Any]:
    optim = torch.load(path / "optim.pt", map_location="cpu", weights_only=True)
    return {
        "params": load_file(str(path / "params.safetensors")),
        "optimizer": optim["optimizer"],
        "scheduler": optim["scheduler"],
        "strategies": optim.get("strategies", {}),
        "rng": torch.load(path / "rng.pt", weights_only=True),
        "trainer_state": json.loads((path / COMPLETE).read_text()),
    }
