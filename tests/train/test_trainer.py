"""Trainer: exact resume, accumulation, schedule, logs/plot, hooks, multi-process (gloo) agreement."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from conftest import kill_at
from lorakit.models import tiny_llama
from lorakit.strategies import Strategy
from lorakit.train import TrainConfig, Trainer
from lorakit.train.schedule import lr_multiplier

G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (10,), generator=G) for _ in range(40)]


def collate(items):
    return {"input_ids": torch.stack(items)}


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def make(out=None, strategies=(), dropout=0.1, **cfg):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8, "dropout": dropout}), seed=0)
    config = TrainConfig(**{"steps": 8, "batch_size": 4, "lr": 1e-2, "progress": False,
                            "out_dir": str(out) if out else None, **cfg})
    return model, Trainer(model, DATA, collate, lm_loss, config, strategies=strategies)


def adapter_tensors(model):
    return lorakit.extract_state(model).tensors


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    full_model, full = make(tmp_path / "a", save_every=3, grad_accum=2)
    full_result = full.train()
    model, trainer = make(tmp_path / "b", strategies=[kill_at(7)], save_every=3, grad_accum=2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    resumed_model, resumed = make(tmp_path / "b", save_every=3, grad_accum=2)
    result = resumed.train()
    assert result.resumed_from == 6
    assert result.losses == full_result.losses[6:]  # dropout RNG, data order, Adam and schedule restored
    for k, v in adapter_tensors(full_model).items():
        assert torch.equal(v, adapter_tensors(resumed_model)[k]), k
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "log.jsonl").read_text().splitlines())
             if "loss" in r]
    assert steps == list(range(1, 9))  # the log has no duplicated steps after the resume


def test_checkpoints_are_complete_and_pruned(tmp_path):
    _, trainer = make(tmp_path, save_every=2, keep_checkpoints=2)
    trainer.train()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-0000004", "step-0000006"]  # no temp folders, only the last two
    for name in ckpts:
        assert (tmp_path / "checkpoints" / name / "trainer_state.json").exists()
    assert (tmp_path / "log.jsonl").exists() and (tmp_path / "curves.png").stat().st_size > 1000


def test_gradient_accumulation_equals_bigger_batch():
    m1, t1 = make(dropout=0.0, batch_size=8, grad_accum=1, max_grad_norm=None)
    m2, t2 = make(dropout=0.0, batch_size=4, grad_accum=2, max_grad_norm=None)
    r1, r2 = t1.train(resume=False), t2.train(resume=False)
    assert r1.losses == pytest.approx(r2.losses, rel=1e-5)
    for k, v in adapter_tensors(m1).items():
        torch.testing.assert_close(v, adapter_tensors(m2)[k], rtol=1e-4, atol=1e-6)


def test_training_lowers_loss_and_only_adapter_changes():
    model, trainer = make(dropout=0.0, steps=15)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = trainer.train(resume=False)
    assert result.losses[-1] < result.losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".adapters.default." in n for n in changed)


def test_schedule_shapes():
    cos = lr_multiplier("cosine", warmup=2, total=10)
    assert [cos(0), cos(1)] == [0.5, 1.0]
    assert cos(2) == pytest.approx(1.0) and cos(10) == pytest.approx(0.0, abs=1e-12)
    lin = lr_multiplier("linear", warmup=0, total=10)
    assert lin(5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier("step", 0, 10)


def test_strategy_hooks_run_in_order():
    calls = []

    class Recorder(Strategy):
        name = "recorder"

        def on_train_start(self, trainer):
            calls.append("start")

        def on_step_start(self, trainer, step):
            calls.append("step_start")

        def on_loss(self, trainer, loss, batch):
            calls.append("loss")
            return loss

        def on_after_backward(self, ctx, step):
            assert any(p.grad is not None for g in ctx.param_groups for p in g["params"])
            calls.append("after_backward")

        def on_before_optimizer_step(self, trainer, step):
            calls.append("before_opt")

        def on_step_end(self, trainer, step, logs):
            calls.append("step_end")

    _, trainer = make(strategies=[Recorder()], steps=2, grad_accum=2)
    trainer.train(resume=False)
    one = ["step_start", "loss", "loss", "after_backward", "before_opt", "step_end"]
    assert calls == ["start", *one, *one]


def test_bad_setups_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="no trainable parameters"):
        for p in model.parameters():
            p.requires_grad_(False)
        Trainer(model, DATA, collate, lm_loss, TrainConfig(progress=False))
    with pytest.raises(ValueError, match="unknown schedule"):
        TrainConfig(schedule="exp")

    class Dup(Strategy):
        name = "dup"

    with pytest.raises(ValueError, match="twice"):
        make(strategies=[Dup(), Dup()])


def test_nan_loss_stops_with_clear_error():
    def nan_loss(model, batch):
        return lm_loss(model, batch) * float("nan")

    model, _ = make()
    trainer = Trainer(model, DATA, collate, nan_loss, TrainConfig(steps=2, batch_size=4, progress=False))
    with pytest.raises(FloatingPointError, match="loss is nan"):
        trainer.train(resume=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_data_parallel_agrees_across_ranks_and_with_one_process(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(worker), str(tmp_path / "ddp"), "4"]
    subprocess.run(cmd, check=True, env=env, timeout=300, capture_output=True)
    subprocess.run([sys.executable, str(worker), str(tmp_path / "one"), "8"], check=True, env=env, timeout=300,
                   capture_output=True)
    assert (tmp_path / "ddp" / "world2").exists()
    r0, r1 = (load_file(str(tmp_path / "ddp" / f"rank{r}.safetensors")) for r in (0, 1))
    single = load_file(str(tmp_path / "one" / "rank0.safetensors"))
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k  # DDP keeps ranks identical
        torch.testing.assert_close(r0[k], single[k], rtol=1e-4, atol=1e-6)  # = one process, 2x batch
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in r0.items() if "lora_B" in k)
