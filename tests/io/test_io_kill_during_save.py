"""Saves killed at random points (issue 13, item 4): the folder is never one PEFT would load wrongly (new
tensors beside an old config), lorakit loads it consistently or refuses it, and the temp files and
``.step-*`` folders that killed writers leave are removed by the next save."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit import AdapterFileError, AdapterSpec
from lorakit.core import atomic
from lorakit.core.extract import extract_state
from lorakit.core.state import PEFT_CONFIG_FILE, TENSORS_FILE
from lorakit.io.peft import save_state
from lorakit.models import tiny_llama

KILLS = 24


def _state(alpha: float, fill: float) -> lorakit.AdapterState:
    """An adapter whose every tensor holds ``fill``; alpha tells the two apart in adapter_config.json."""
    model = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)
    lorakit.attach(model, AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 4, "alpha": alpha}), seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapters" in name:
                p.fill_(fill)
    return extract_state(model, "default")


PAIRS = {8.0: 1.0, 32.0: 2.0}  # alpha -> tensor value: any other combination is a torn save


def _check_folder(d: Path) -> str:
    """What a reader sees in ``d`` after a kill; fails on a folder PEFT or lorakit would load wrongly."""
    names = {p.name for p in d.iterdir() if not p.name.startswith(".")}
    if PEFT_CONFIG_FILE in names and TENSORS_FILE in names:
        alpha = json.loads((d / PEFT_CONFIG_FILE).read_text())["lora_alpha"]
        values = {float(t.flatten()[0]) for t in load_file(str(d / TENSORS_FILE)).values()}
        assert values == {PAIRS[float(alpha)]}, f"PEFT would load tensors {values} with lora_alpha {alpha}"
        peft_view = "consistent"
    else:
        peft_view = "refused"  # no config (or no tensors): PEFT cannot load it at all
    try:
        state = lorakit.load_state(d)
    except AdapterFileError:
        return f"peft {peft_view}, lorakit refused"
    values = {float(t.flatten()[0]) for t in state.tensors.values()}
    assert values == {PAIRS[float(state.spec.form_args["alpha"])]}, "lorakit loaded a torn save"
    return f"peft {peft_view}, lorakit consistent"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_kill_during_save_never_leaves_a_torn_folder(tmp_path: Path) -> None:
    states = [_state(8.0, 1.0), _state(32.0, 2.0)]
    d = tmp_path / "adapter"
    save_state(states[0], d)
    rng = random.Random(0)
    seen: dict[str, int] = {}
    for _ in range(KILLS):
        pid = os.fork()
        if pid == 0:  # child: save the two adapters in turn until killed
            try:
                i = 1
                while True:
                    save_state(states[i % 2], d)
                    i += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.002, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcome = _check_folder(d)
        seen[outcome] = seen.get(outcome, 0) + 1
    leftovers = [p.name for p in d.iterdir() if p.name.startswith(".")]
    save_state(states[0], d)  # the next save removes what the killed writers left
    assert [p.name for p in d.iterdir() if p.name.startswith(".")] == [], leftovers
    assert _check_folder(d) == "peft consistent, lorakit consistent"
    print(f"{KILLS} kills: {seen}; {len(leftovers)} temp files left by the kills, removed by the next save")


def test_save_without_a_peft_config_removes_the_old_one(tmp_path: Path) -> None:
    """A form PEFT cannot describe is saved without adapter_config.json: the previous one must not stay
    beside the new tensors (PEFT would read them with it)."""
    d = tmp_path / "adapter"
    save_state(_state(8.0, 1.0), d)
    assert (d / PEFT_CONFIG_FILE).exists()
    model = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)
    lorakit.attach(model, AdapterSpec(form="slora", targets=["q_proj"], form_args={"r": 2}), seed=0)
    lorakit.save(model, d)
    assert not (d / PEFT_CONFIG_FILE).exists()
    assert lorakit.load_state(d).spec.form == "slora"


def test_a_failed_save_keeps_the_old_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "adapter"
    save_state(_state(8.0, 1.0), d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.core.state.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_state(_state(32.0, 2.0), d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before


def test_stale_checkpoint_temp_dirs_are_removed(tmp_path: Path) -> None:
    from lorakit.train.checkpoint import save_checkpoint

    root = tmp_path / "checkpoints"
    root.mkdir()
    dead = root / ".step-0000010.999999999.abcd1234"  # a pid no process has
    old = root / ".step-0000020.k3j9x_ab"  # an older version's name (no pid), a day old
    mine = root / f".step-0000030.{os.getpid()}.zz"  # a live writer's (this process): kept
    for p in (dead, old, mine):
        p.mkdir()
        (p / "params.safetensors").write_bytes(b"partial")
    day_ago = time.time() - atomic.STALE_AFTER_S - 60
    os.utime(old, (day_ago, day_ago))
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([param], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(root, 40, params={"p": param}, optimizer=opt, scheduler=sched, trainer_state={"step": 40},
                    strategies={}, rng_per_rank=[])
    assert sorted(p.name for p in root.iterdir()) == sorted([mine.name, "step-0000040"])


def test_stale_temp_files_are_removed_by_the_next_write(tmp_path: Path) -> None:
    target = tmp_path / "summary.json"
    dead = tmp_path / ".summary.json.999999999.abc.tmp"
    live = tmp_path / f".summary.json.{os.getpid()}.abc.tmp"
    other = tmp_path / ".notes.txt.999999999.abc.tmp"  # another file's temp: not this write's business
    for p in (dead, live, other):
        p.write_text("x")
    atomic.write_json(target, {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, other.name, target.name])
