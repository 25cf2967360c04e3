"""`lorakit generate-adapter bank|fit|sample` end to end on a tiny bank, for every generator of the catalog."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.core import registry
from lorakit.core.extract import extract_state
from lorakit.core.spec import AdapterSpec
from lorakit.generate.conditions import register_text_encoder, unregister_text_encoder
from lorakit.io.peft import load_state, save_state
from lorakit.models import tiny_llama

runner = CliRunner()
WORDS = ["animals", "plants", "tools", "feelings", "places"]


def _encode(texts):
    """A deterministic bag-of-words encoder over WORDS (no MiniLM in fast tests)."""
    out = torch.zeros(len(texts), len(WORDS) + 1)
    for i, t in enumerate(texts):
        for j, w in enumerate(WORDS):
            out[i, j] = float(w in t)
        out[i, -1] = 0.1
    return torch.nn.functional.normalize(out, dim=1)


@pytest.fixture
def task_dirs(tmp_path):
    register_text_encoder("bow", _encode)
    dirs = []
    for t, word in enumerate(WORDS[:4]):
        d = tmp_path / f"task_{t}"
        for m in range(3):
            model = tiny_llama(seed=0)
            lorakit.attach(model, AdapterSpec(form_args={"r": 2, "alpha": 4}, targets=["q_proj", "v_proj"]))
            g = torch.Generator().manual_seed(100 * t + m)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_" in n:
                        p.copy_(0.5 * t + 0.05 * torch.randn(p.shape, generator=g))
            save_state(extract_state(model, "default"), d / f"step_{m}")
        (d / "task.json").write_text(json.dumps({"task_id": word, "description": f"nouns denoting {word}"}))
        dirs.append(d)
    yield dirs
    unregister_text_encoder("bow")


@pytest.mark.parametrize("method", registry.names("generate"))
def test_fit_then_sample_writes_a_peft_adapter(task_dirs, tmp_path, method):
    cls = registry.get("generate", method)
    from lorakit.generate.base import Generator

    if not (isinstance(cls, type) and issubclass(cls, Generator)):
        pytest.skip(f"{method} is not a parameter generator")  # e.g. a transfer pipeline on the same axis
    bank = tmp_path / "bank"
    r = runner.invoke(app, ["generate-adapter", "bank", *map(str, task_dirs), "--out", str(bank)])
    assert r.exit_code == 0, r.output
    assert "4 task(s), 12 checkpoint(s)" in r.output
    gen = tmp_path / "gen"
    args = ["generate-adapter", "fit", str(bank), "--method", method, "--encoder", "bow", "--out", str(gen),
            "--steps", "30", "--holdout", "plants"]
    if method == "icm_lora":
        args += ["--method-arg", "epochs=3", "--method-arg", "channels=[4,4]"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "fitted on 3 task(s)" in r.output and "generator" in r.output
    out = tmp_path / "adapter"
    r = runner.invoke(app, ["generate-adapter", "sample", str(gen), "--description", "nouns denoting plants",
                            "--mode", "mean", "--out", str(out)])
    assert r.exit_code == 0, r.output
    state = load_state(out)
    assert set(state.tensors) == set(load_state(task_dirs[0] / "step_0").tensors)
    model = tiny_llama(seed=0)
    lorakit.apply_state(model, state)  # the generated adapter fits the base it was generated for
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_bad_inputs_exit_2_with_a_message(task_dirs, tmp_path):
    r = runner.invoke(app, ["generate-adapter", "fit", str(task_dirs[0]), "--method", "nope", "--encoder", "bow",
                            "--out", str(tmp_path / "g")])
    assert r.exit_code == 2 and "unknown parameter generator 'nope'" in r.output
    r = runner.invoke(app, ["generate-adapter", "sample", str(tmp_path), "--description", "x",
                            "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "not a generator folder" in r.output
    r = runner.invoke(app, ["generate-adapter", "bank", str(tmp_path / "missing"), "--out", str(tmp_path / "b")])
    assert r.exit_code == 2 and "not a folder" in r.output
