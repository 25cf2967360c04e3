"""End to end on the embedded SmolLM2-135M: a short quickstart improves accuracy and its adapter
loads in real `peft` with the same logits (slow: loads the 135M model and trains it)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

pytestmark = pytest.mark.slow


def test_quickstart_improves_and_adapter_loads_in_peft(tmp_path):
    pytest.importorskip("peft")
    from lorakit.cli import app
    from lorakit.models import load_model

    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--steps", "30", "--out", str(out), "--n-eval", "120"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric_name"] == "accuracy"
    assert summary["metric_after"] > summary["metric_before"] + 0.05

    from peft import PeftModel

    import lorakit

    base, tok = load_model()
    ids = tok(["I love this airline!", "Worst delay ever."], return_tensors="pt", padding=True)
    ours = lorakit.load(load_model(progress=False)[0], out)
    peft_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        a = ours.eval()(**ids).logits
        b = peft_model(**ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)
