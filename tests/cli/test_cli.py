"""The `lorakit` CLI on a tiny local model + tokenizer and a user CSV (no downloads)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import save_tiny_model_dir
from lorakit.cli import app

WORDS = ["good", "bad", "great", "awful", "fine", "nice", "terrible", "love", "hate",
         "movie", "food", "service", "the", "was", "is", "it", "very", "not"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama and a word-level tokenizer saved as a local HF folder."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"), WORDS)


@pytest.fixture(scope="module")
def csv_file(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    rows = ["text,label"]
    pos, neg = ["good", "great", "nice", "love", "fine"], ["bad", "awful", "terrible", "hate", "not"]
    for i in range(60):
        word = (pos if i % 2 else neg)[i % 5]
        rows.append(f"the movie was very {word},{'good' if i % 2 else 'bad'}")
    path = d / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


runner = CliRunner()


def test_methods_lists_catalog_with_arxiv():
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0, result.output
    assert "lora" in result.output and "2106.09685" in result.output and "gaussian" in result.output


def test_train_eval_inspect_end_to_end(tiny_dir, csv_file, tmp_path):
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("steps: 4\nbatch_size: 4\nrank: 2\nalpha: 4\nlr: 0.01\nn_eval: 10\n")
    result = runner.invoke(app, ["train", "--model", str(tiny_dir), "--data", str(csv_file), "--config", str(cfg),
                                 "--steps", "3", "--targets", "all-linear", "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    for key in ("metric_name", "metric_before", "metric_after", "train_seconds", "trainable_params"):
        assert key in summary
    assert summary["steps"] == 3  # the command line wins over the YAML file
    assert summary["spec"]["form_args"]["r"] == 2  # ... and the YAML fills the rest
    assert {"adapter_model.safetensors", "adapter_config.json", "lorakit.json", "log.jsonl", "curves.png"} <= {
        p.name for p in out.iterdir()}

    result = runner.invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0 and "form:     lora" in result.output, result.output

    result = runner.invoke(app, ["eval", "--model", str(tiny_dir), "--data", str(csv_file), "--adapter", str(out),
                                 "--n-eval", "10"])
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.output[result.output.index("{"):])
    assert metrics["accuracy"] == pytest.approx(summary["metric_after"])


def test_unknown_form_and_bad_adapter_give_clear_errors(tiny_dir, csv_file, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    run = lambda *args: subprocess.run([sys.executable, "-m", "lorakit.cli", *args], capture_output=True,
                                       text=True, env=env, timeout=120)
    bad = run("train", "--model", str(tiny_dir), "--data", str(csv_file), "--form", "nope", "--out",
              str(tmp_path / "x"))
    assert bad.returncode == 2 and "unknown form 'nope'" in bad.stderr and "lora" in bad.stderr
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text("{not json")
    bad = run("inspect", str(tmp_path / "broken"))
    assert bad.returncode == 2 and "adapter_config.json" in bad.stderr and "not valid JSON" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_readme_method_table_lists_every_catalog_entry():
    from lorakit.core.registry import entries

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [e.name for e in entries() if f"`{e.name}`" not in readme]
    assert not missing, f"README method table lacks {missing}; regenerate with `lorakit methods --markdown`"


def test_generate_with_and_without_adapter(tiny_dir, csv_file, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", str(tiny_dir), "--data", str(csv_file), "--steps", "2",
                                 "--rank", "2", "--n-eval", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for extra in ([], ["--adapter", str(out)]):
        result = runner.invoke(app, ["generate", "the movie was", "--model", str(tiny_dir), "--no-chat",
                                     "--max-new-tokens", "5", *extra])
        assert result.exit_code == 0, result.output
