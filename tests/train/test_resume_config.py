"""Resume refuses a changed config (listing the differences) unless allowed; an allowed change is recorded
and takes effect; a resumed run reports the eval before training from the log."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from conftest import kill_at
from lorakit.models import tiny_llama
from lorakit.train import TrainConfig, Trainer
from lorakit.train.trainer import ResumeConfigError, spec_differences

G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (10,), generator=G) for _ in range(24)]


def collate(items):
    return {"input_ids": torch.stack(items)}


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def make(out, strategies=(), **cfg):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}), seed=0)
    config = TrainConfig(**{"steps": 6, "batch_size": 4, "lr": 1e-2, "progress": False, "save_every": 2,
                            "out_dir": str(out), **cfg})
    return model, Trainer(model, DATA, collate, lm_loss, config, strategies=strategies,
                          eval_fn=lambda m: {"acc": 0.25})


def killed_run(out, **cfg):
    _, trainer = make(out, strategies=[kill_at(5)], **cfg)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()


def test_changed_config_is_refused_with_every_difference(tmp_path):
    killed_run(tmp_path)
    before = (tmp_path / "train_spec.json").read_text()
    _, trainer = make(tmp_path, seed=1, lr=3e-3, schedule="linear", batch_size=2, steps=9)
    with pytest.raises(ResumeConfigError) as e:
        trainer.train()
    msg = str(e.value)
    for field in ("seed: 0 -> 1", "lr: 0.01 -> 0.003", "schedule: 'cosine' -> 'linear'", "batch_size: 4 -> 2",
                  "steps: 6 -> 9", "allow_config_change"):
        assert field in msg, (field, msg)
    assert (tmp_path / "train_spec.json").read_text() == before  # the record is not overwritten by a refusal


def test_strategy_change_is_a_difference_and_cadence_is_not():
    old = {"strategies": [{"name": "dylora", "args": {"r_min": 2}}], "trainer": {"lr": 1.0, "eval_every": 0},
           "seed": 0}
    new = {"strategies": [], "trainer": {"lr": 1.0, "eval_every": 5, "progress": False}, "seed": 0}
    diff = spec_differences(old, new)
    assert diff == {"strategies": [["dylora"], []]}  # a removed strategy is reported once, not per field
    changed = {**new, "strategies": [{"name": "dylora", "args": {"r_min": 3}}]}
    assert spec_differences(old, changed) == {"strategy.dylora.r_min": [2, 3]}


def test_same_config_with_other_cadence_resumes(tmp_path):
    killed_run(tmp_path)
    _, trainer = make(tmp_path, eval_every=3, keep_checkpoints=5)
    result = trainer.train()
    assert result.resumed_from == 4
    assert result.eval_before == {"acc": 0.25}  # read from the log's step-0 record, not empty


def test_allowed_change_is_recorded_and_takes_effect(tmp_path):
    killed_run(tmp_path)
    _, trainer = make(tmp_path, lr=5e-3, steps=8, schedule="constant", warmup_steps=0, allow_config_change=True)
    result = trainer.train()
    assert result.resumed_from == 4 and result.steps == 8
    spec = json.loads((tmp_path / "train_spec.json").read_text())
    history = spec["trainer"]["config_changes"]
    assert history[0]["step"] == 4
    assert history[0]["changes"]["lr"] == [0.01, 0.005] and history[0]["changes"]["steps"] == [6, 8]
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "log.jsonl").read_text().splitlines()) if "lr" in r]
    assert lrs[-4:] == pytest.approx([5e-3] * 4)  # the new lr and (constant) schedule from the resumed step
    # a later resume with the changed config compares with the changed record and keeps the history
    killed_dir = tmp_path
    _, again = make(killed_dir, lr=5e-3, steps=8, schedule="constant", warmup_steps=0)
    again.train()
    assert json.loads((tmp_path / "train_spec.json").read_text())["trainer"]["config_changes"] == history


def test_cli_resume_refuses_then_allows_a_change_and_summary_keeps_history(tmp_path):
    from typer.testing import CliRunner

    from conftest import save_tiny_model_dir
    from lorakit.cli import app

    d = save_tiny_model_dir(tmp_path / "model", ["good", "bad", "movie", "the", "was", "very"])
    rows = ["text,label"] + [f"the movie was very {('good', 'bad')[i % 2]},{('good', 'bad')[i % 2]}"
                             for i in range(12)]
    (d / "reviews.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    base = ["train", "--model", str(d), "--data", str(d / "reviews.csv"), "--steps", "4", "--batch-size", "2",
            "--max-length", "12", "--n-train", "6", "--n-eval", "2", "--save-every", "2", "--out", str(out)]
    r = CliRunner().invoke(app, base)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step-0000002"]  # a rerun resumes there
    r = CliRunner().invoke(app, base + ["--lr", "5e-3", "--seed", "3"])
    assert r.exit_code == 2, r.output + repr(r.exception)
    assert "lr: 0.001 -> 0.005" in r.output and "seed: 0 -> 3" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, base + ["--lr", "5e-3", "--seed", "3", "--allow-config-change"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["metric_before"] is not None
    changes = summary["train_spec"]["trainer"]["config_changes"]
    assert changes[0]["step"] == 2 and changes[0]["changes"]["lr"] == [1e-3, 5e-3]
    assert json.loads((out / "train_spec.json").read_text()) == summary["train_spec"]
