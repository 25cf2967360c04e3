"""`lorakit train --model <tiny local HF dir> --form F --steps 2` for every form in the catalog.

The CLI's ``--rank/--alpha`` defaults (8 and 16) reach only the forms whose ``Args`` have ``r``/``alpha``
(SHiRA, Bone and MiSS have no ``alpha``): each run must succeed, save its adapter and train spec, and
record the form's args as set.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import save_tiny_model_dir
from lorakit import methods
from lorakit.cli import app
from lorakit.core import registry

WORDS = ["good", "bad", "movie", "the", "was", "very"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model_forms"), WORDS)
    rows = ["text,label"] + [f"the movie was very {('good', 'bad')[i % 2]},{('good', 'bad')[i % 2]}"
                             for i in range(12)]
    (d / "reviews.csv").write_text("\n".join(rows) + "\n")
    return d


FORMS = [e.name for e in methods("form")]  # the catalog, never a hand list


@pytest.mark.parametrize("form", FORMS)
def test_cli_trains_every_form_for_two_steps(form, tiny_dir, tmp_path):
    out = tmp_path / form
    args = ["train", "--model", str(tiny_dir), "--data", str(tiny_dir / "reviews.csv"), "--form", form,
            "--steps", "2", "--batch-size", "2", "--max-length", "12", "--n-train", "6", "--n-eval", "2",
            "--lr", "0.01", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["trainable_params"] > 0
    fields = {f.name for f in dataclasses.fields(registry.get("form", form).Args)}
    form_args = summary["spec"]["form_args"]
    # the rank/alpha shortcuts are set exactly where the form has those fields
    assert ("r" in form_args) == ("r" in fields) and ("alpha" in form_args) == ("alpha" in fields)
    assert form_args.get("r", 8) == 8 and form_args.get("alpha", 16.0) == 16.0
    assert (out / "adapter_model.safetensors").exists() and (out / "lorakit.json").exists()
    assert json.loads((out / "train_spec.json").read_text())["trainer"]["steps"] == 2
