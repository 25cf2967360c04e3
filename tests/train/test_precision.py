"""Mixed precision in the trainer: bf16/fp16 autocast, fp32 master weights, fp16 loss scaling + exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import lorakit
from conftest import kill_at, save_tiny_model_dir
from lorakit.cli import app
from lorakit.models import tiny_llama
from lorakit.train import TrainConfig, Trainer
from lorakit.train.trainer import _autocasts

G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (10,), generator=G) for _ in range(40)]
FP16_CPU = _autocasts("cpu", torch.float16) and hasattr(torch.amp, "GradScaler")


def collate(items):
    return {"input_ids": torch.stack(items)}


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def make(out=None, strategies=(), **cfg):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8, "dropout": 0.0}), seed=0)
    config = TrainConfig(**{"steps": 3, "batch_size": 4, "lr": 1e-2, "progress": False, "eval_at_start": False,
                            "out_dir": str(out) if out else None, **cfg})
    return model, Trainer(model, DATA, collate, lm_loss, config, strategies=strategies)


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_unknown_precision_refused():
    with pytest.raises(ValueError, match="unknown precision 'fp8'.*fp32"):
        TrainConfig(precision="fp8")


def test_bf16_three_steps_finite_fp32_masters_close_to_fp32():
    _, ref = make()
    model, trainer = make(precision="bf16")
    assert all(p.dtype == torch.float32 for p in adapter_params(model).values())
    ref_losses, losses = ref.train().losses, trainer.train().losses
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert abs(losses[0] - ref_losses[0]) < 0.05 * abs(ref_losses[0])
    assert all(p.dtype == torch.float32 for p in adapter_params(model).values())
    assert trainer.train_spec.to_dict()["trainer"]["precision"] == "bf16"
    assert trainer.scaler is None


def test_low_precision_refuses_non_fp32_masters():
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}), seed=0)
    for p in adapter_params(model).values():
        p.data = p.data.to(torch.bfloat16)
    with pytest.raises(ValueError, match="master.*fp32"):
        Trainer(model, DATA, collate, lm_loss, TrainConfig(steps=1, precision="bf16", progress=False))


def test_fp16_unsupported_is_a_clear_error(monkeypatch):
    real = torch.autocast

    def no_fp16(device_type, dtype=None, **kw):  # a build whose CPU autocast lacks fp16 (real on old torch)
        if dtype == torch.float16:
            raise RuntimeError("CPU autocast does not support float16")
        return real(device_type, dtype=dtype, **kw)

    monkeypatch.setattr(torch, "autocast", no_fp16)
    with pytest.raises(ValueError, match=r"'fp16' is not supported on device 'cpu'.*use one of: fp32, bf16"):
        make(precision="fp16")


@pytest.mark.skipif(not FP16_CPU, reason="this torch build cannot autocast fp16 on CPU")
def test_fp16_scaler_checkpoint_and_bit_identical_resume(tmp_path):
    cfg = {"steps": 6, "save_every": 2, "precision": "fp16"}
    full_model, full = make(tmp_path / "a", **cfg)
    full_result = full.train()
    assert all(torch.isfinite(torch.tensor(full_result.losses)))
    assert all(p.dtype == torch.float32 for p in adapter_params(full_model).values())
    state = json.loads((tmp_path / "a" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    assert set(state["grad_scaler"]) >= {"scale", "_growth_tracker"}
    assert state["train_spec"]["trainer"]["precision"] == "fp16"

    _, killed = make(tmp_path / "b", strategies=[kill_at(5)], **cfg)
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    saved = json.loads((tmp_path / "b" / "checkpoints" / "step-0000004" / "trainer_state.json").read_text())
    resumed_model, resumed = make(tmp_path / "b", **cfg)
    result = resumed.train()
    assert result.resumed_from == 4
    assert resumed.scaler.state_dict() == full.scaler.state_dict()
    assert saved["grad_scaler"] == state["grad_scaler"]
    assert result.losses == full_result.losses[4:]
    for n, p in adapter_params(full_model).items():
        assert torch.equal(p, adapter_params(resumed_model)[n]), n


@pytest.mark.skipif(not FP16_CPU, reason="this torch build cannot autocast fp16 on CPU")
def test_fp16_inf_gradient_step_is_skipped():
    model, trainer = make(steps=1, precision="fp16", max_grad_norm=None)
    before = {n: p.detach().clone() for n, p in adapter_params(model).items()}
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127)  # the scaled loss overflows fp32: inf grads
    trainer.train()
    assert trainer.scaler.get_scale() < 2.0 ** 127  # backed off
    for n, p in adapter_params(model).items():
        assert torch.equal(p, before[n]), n  # the step with inf grads was skipped


def test_cli_precision_and_checkpointing_reach_train_config(tmp_path):
    tiny = save_tiny_model_dir(tmp_path / "m", ["the", "movie", "was", "good", "bad", "great", "awful"])
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\n" + "".join(f"the movie was {w},{'good' if w in ('good', 'great') else 'bad'}\n"
                                            for w in ["good", "bad", "great", "awful"] * 6))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(tiny), "--data", str(csv), "--steps", "2", "--rank", "2",
                                      "--n-eval", "4", "--out", str(out), "--precision", "bf16",
                                      "--gradient-checkpointing"])
    assert result.exit_code == 0, result.output
    trainer = json.loads((out / "train_spec.json").read_text())["trainer"]
    assert trainer["precision"] == "bf16" and trainer["gradient_checkpointing"] is True


def test_cli_unknown_precision_exits_2_without_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    result = CliRunner().invoke(app, ["train", "--precision", "fp8", "--steps", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "precision" in result.output and "Traceback" not in result.output
