"""TrainSpec: a run's strategies (with their full Args), trainer config, init, seed and data, saved as
``train_spec.json`` and in ``summary.json``, and shown by ``lorakit inspect``."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import lorakit
from conftest import save_tiny_model_dir
from lorakit.cli import app
from lorakit.core import registry
from lorakit.core.spec import TrainSpec
from lorakit.models import tiny_llama
from lorakit.train import TrainConfig, Trainer

G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (8,), generator=G) for _ in range(8)]


def test_round_trip_keeps_every_field_and_refuses_unknown_ones():
    dylora = registry.get("strategy", "dylora")(r_min=2, seed=3)
    spec = TrainSpec.for_run([dylora], TrainConfig(steps=5, lr=3e-3, betas=(0.8, 0.9)), init="pissa",
                             init_args={"niter": 2}, data="sentiment")
    d = spec.to_dict()
    assert d["strategies"] == [{"name": "dylora", "args": {"seed": 3, "r_min": 2, "r_max": None, "frozen": None}}]
    assert d["trainer"]["steps"] == 5 and d["trainer"]["betas"] == [0.8, 0.9]  # JSON-ready (tuple -> list)
    assert d["seed"] == 0 and d["init"] == "pissa" and d["init_args"] == {"niter": 2} and d["data"] == "sentiment"
    assert d["lorakit_version"] == lorakit.__version__
    back = TrainSpec.from_dict(json.loads(json.dumps(d)))
    assert back == spec and back.to_dict() == d
    with pytest.raises(ValueError, match=r"unknown TrainSpec field\(s\) \['strategy'\]"):
        TrainSpec.from_dict({**d, "strategy": []})


def test_trainer_writes_its_spec_atomically_into_the_run_dir(tmp_path):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form="dylora", form_args={"r": 4, "alpha": 8}), seed=0)
    config = TrainConfig(steps=2, batch_size=2, lr=1e-2, progress=False, seed=7, out_dir=str(tmp_path))
    strategy = registry.get("strategy", "dylora")(r_min=2)
    Trainer(model, DATA, lambda items: torch.stack(items),
            lambda m, b: m(input_ids=b, labels=b).loss, config, strategies=[strategy]).train()
    saved = json.loads((tmp_path / "train_spec.json").read_text())
    assert saved["strategies"] == [{"name": "dylora", "args": {"seed": 0, "r_min": 2, "r_max": None,
                                                                "frozen": None}}]
    assert saved["trainer"]["steps"] == 2 and saved["seed"] == 7 and saved["init"] is None
    assert not list(tmp_path.glob(".train_spec.json.*"))  # no temp file left behind


def test_cli_run_records_the_spec_and_inspect_shows_it(tmp_path):
    d = save_tiny_model_dir(tmp_path / "model", ["good", "bad", "movie", "the", "was", "very"])
    rows = ["text,label"] + [f"the movie was very {('good', 'bad')[i % 2]},{('good', 'bad')[i % 2]}"
                             for i in range(12)]
    (d / "reviews.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--model", str(d), "--data", str(d / "reviews.csv"), "--form", "dylora",
                                 "--strategy", "dylora", "--strategy-arg", "dylora.r_min=2", "--steps", "2",
                                 "--batch-size", "2", "--max-length", "12", "--n-train", "6", "--n-eval", "2",
                                 "--seed", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    summary = json.loads((out / "summary.json").read_text())
    file_spec = json.loads((out / "train_spec.json").read_text())
    assert summary["train_spec"] == file_spec
    assert file_spec["strategies"][0]["args"]["r_min"] == 2 and file_spec["seed"] == 5
    assert file_spec["init"] == "default" and file_spec["data"] == str(d / "reviews.csv")
    assert file_spec["trainer"]["out_dir"] == str(out) and file_spec["trainer"]["steps"] == 2

    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "strategy: dylora  args={'frozen': None, 'r_max': None, 'r_min': 2, 'seed': 0}" in r.output
    assert "init=default {}" in r.output and "seed=5" in r.output and "steps=2" in r.output

    (out / "train_spec.json").write_text("{broken")
    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert r.exit_code == 2 and "train_spec.json: not a valid training spec" in r.output
