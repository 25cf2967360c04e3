"""End to end on the embedded MiniLM encoder (all-MiniLM-L6-v2, 22.7M): `lorakit train --model minilm` makes it
a 3-class tweet classifier (LoRA on query/value + a new ``classifier`` head in ``modules_to_save``) that beats
the majority class after 60 steps (~15 s of training on one core), loads in real `peft` as SEQ_CLS with the
same logits, and `lorakit eval` rebuilds it from the adapter folder (slow: real model, real data)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from typer.testing import CliRunner

pytestmark = pytest.mark.slow


def test_minilm_classifier_beats_the_majority_class_and_loads_in_peft(tmp_path):
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import lorakit
    from lorakit.cli import app
    from lorakit.models import load_model, minilm_path

    out = tmp_path / "minilm"
    r = CliRunner().invoke(app, ["train", "--model", "minilm", "--head", "seq_cls", "--data", "sentiment",
                                 "--targets", "query,value", "--modules-to-save", "classifier", "--steps", "60",
                                 "--n-eval", "300", "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric_after"] > summary["majority_baseline"] + 0.05
    assert summary["metric_after"] > summary["metric_before"] + 0.1
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"

    base, tok = load_model("minilm", num_labels=3, progress=False)
    batch = dict(tok(["I love this airline!", "Worst delay ever.", "Flight 42 lands at 5pm."], padding=True,
                     return_tensors="pt"))
    ours = lorakit.load(base, out).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = AutoModelForSequenceClassification.from_pretrained(str(minilm_path()), num_labels=3,
                                                                   local_files_only=True)
        theirs = PeftModel.from_pretrained(plain, str(out)).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, theirs(**batch).logits, rtol=0, atol=1e-5)

    r = CliRunner().invoke(app, ["eval", "--adapter", str(out), "--data", "sentiment", "--n-eval", "300"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    metrics = json.loads(r.output[r.output.index("{"):])
    assert metrics["accuracy"] == pytest.approx(summary["metric_after"])
