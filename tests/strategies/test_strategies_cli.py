"""`lorakit train --strategy NAME --strategy-arg k=v` for every strategy on a tiny local model (the same
flow as the embedded model, without downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import save_tiny_model_dir
from lorakit.cli import app

WORDS = ["good", "bad", "great", "awful", "fine", "movie", "the", "was", "very", "not"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model_strategies"), WORDS)
    rows = ["text,label"] + [f"the movie was very {('good', 'bad')[i % 2]},{('good', 'bad')[i % 2]}"
                             for i in range(24)]
    (d / "reviews.csv").write_text("\n".join(rows) + "\n")
    return d


# strategy -> (extra CLI args, files the run must write besides summary.json)
CASES = {
    "allora": (["--strategy-arg", "eta=2"], []),
    "lora_pro": (["--strategy-arg", "mode=adam"], []),
    "lisa": (["--strategy-arg", "gamma=1", "--strategy-arg", "interval=2"], ["full_model/model.safetensors"]),
    "increlora": (["--form", "increlora", "--rank", "1", "--alpha", "4", "--strategy-arg", "init_warmup=1",
                   "--strategy-arg", "interval=2", "--strategy-arg", "top_h=1"], ["increlora_ranks.png"]),
    "diffora": (["--strategy-arg", "search_steps=2", "--strategy-arg", "select=2"], []),
    "loraprune": (["--targets", "all-linear", "--strategy-arg", "prune_freq=1"], []),
    "loram": (["--targets", "all-linear", "--strategy-arg", "layers=0,1"],
              ["recovered_adapter/adapter_model.safetensors"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_train_with_strategy(name, tiny_dir, tmp_path):
    extra, files = CASES[name]
    out = tmp_path / name
    args = ["train", "--model", str(tiny_dir), "--data", str(tiny_dir / "reviews.csv"), "--steps", "4",
            "--batch-size", "4", "--max-length", "16", "--n-eval", "4", "--strategy", name, *extra, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    for f in files:
        assert (out / f).exists(), f
