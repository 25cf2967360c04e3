"""`lorakit ensemble eval` on a tiny local model, two saved adapters and a CSV task (no downloads)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from typer.testing import CliRunner

import lorakit
from conftest import randomize_adapter, save_tiny_model_dir
from lorakit.ensemble.cli import ensemble_app

WORDS = ["good", "bad", "great", "awful", "fine", "nice", "terrible", "love", "hate",
         "movie", "food", "service", "the", "was", "is", "it", "very", "not"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens_cli")
    model_dir = save_tiny_model_dir(root / "model", WORDS)
    rows = ["text,label"]
    pos, neg = ["good", "great", "nice", "love", "fine"], ["bad", "awful", "terrible", "hate", "not"]
    rng = random.Random(0)
    for i in range(80):  # distinct texts (duplicates are dropped by the loader)
        words = " ".join(rng.choice(pos if i % 2 else neg) for _ in range(2 + i % 5))
        rows.append(f"the {rng.choice(WORDS[9:12])} was {words} {rng.choice(WORDS)} {i},"
                    f"{'good' if i % 2 else 'bad'}")
    csv = root / "reviews.csv"
    csv.write_text("\n".join(rows) + "\n")
    from lorakit.models import load_model

    adapters = []
    for i in range(2):
        model, _ = load_model(str(model_dir), progress=False)
        lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}), seed=i)
        randomize_adapter(model, "default", seed=40 + i, std=0.5)
        lorakit.save(model, root / f"ad{i}")
        adapters.append(str(root / f"ad{i}"))
    return model_dir, csv, adapters, root


def test_eval_window_cascade_writes_report(setup):
    model_dir, csv, adapters, root = setup
    out = root / "report.json"
    res = CliRunner().invoke(ensemble_app, ["eval", "--adapters", adapters[0], adapters[1], "--data", str(csv),
                                            "--model", str(model_dir), "--n-val", "30", "--n-test", "30",
                                            "--target", "risk@50", "--ood", str(csv), "--n-ood", "10",
                                            "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "window" in res.output and "member1" in res.output and "AUROC" in res.output
    report = json.loads(out.read_text())
    w = report["rows"]["window"]
    assert report["members"] == ["m1", "m2"] and report["n_test"] == 30 and report["n_ood"] == 10
    assert 0 <= w["pass_rate"] <= 1 and w["cost_vs_single"] == pytest.approx(
        1 + report["cost"]["stage2"]["flops"] / report["cost"]["stage1"]["flops"])
    assert report["rows"]["member1"]["cost_vs_single"] == 1.0
    assert report["cost"]["stage2"]["rows"].get("m2", 0) == round(w["pass_rate"] * 40)


@pytest.mark.parametrize("cascade", ["single", "random", "all", "none"])
def test_eval_baselines_and_repeated_option(setup, cascade):
    model_dir, csv, adapters, _ = setup
    res = CliRunner().invoke(ensemble_app, ["eval", "--adapters", adapters[0], "--adapters", adapters[1],
                                            "--data", str(csv), "--model", str(model_dir), "--n-val", "20",
                                            "--n-test", "20", "--cascade", cascade, "--target", "risk@80"])
    assert res.exit_code == 0, res.output
    expected = {"single": 0.2, "random": 0.2, "all": 1.0, "none": 0.0}[cascade]
    line = next(x for x in res.output.splitlines() if x.startswith(cascade))
    assert float(line.split()[5]) == pytest.approx(expected, abs=0.15)  # the pass_rate column


def test_eval_refuses_bad_input(setup):
    model_dir, csv, adapters, _ = setup
    res = CliRunner().invoke(ensemble_app, ["eval", "--adapters", adapters[0], "--data", str(csv),
                                            "--model", str(model_dir)])
    assert res.exit_code == 2 and "at least two adapters" in res.output
    res = CliRunner().invoke(ensemble_app, ["eval", "--adapters", adapters[0], adapters[1], "--data", str(csv),
                                            "--model", str(model_dir), "--n-val", "10", "--n-test", "10",
                                            "--target", "cov@7"])
    assert res.exit_code == 2 and "unknown target" in res.output
    torch.manual_seed(0)
