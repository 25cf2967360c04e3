"""`lorakit fed simulate|app|show` on a tiny local model and a CSV task (no downloads)."""

from __future__ import annotations

import json

import pytest
from fed_helpers import make_csv, make_tiny_dir
from typer.testing import CliRunner

from lorakit.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("fedcli")
    return make_tiny_dir(d / "model"), make_csv(d / "data.csv")


def test_fed_simulate_local_engine_writes_summary_and_show_prints_rounds(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "run"
    result = runner.invoke(app, ["fed", "simulate", "--engine", "local", "--clients", "3", "--rounds", "2",
                                 "--method", "flora", "--ranks", "1,2", "--model", str(model), "--data", str(data),
                                 "--local-steps", "1", "--batch-size", "4", "--rank", "2", "--alpha", "4",
                                 "--n-eval", "9", "--max-length", "32", "-o", "min_client_examples=4",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "flora on local" in result.output and "aggregation gap" in result.output
    summary = json.loads((out / "fed_summary.json").read_text())
    assert summary["method"] == "flora" and len(summary["rounds"]) == 2
    assert summary["rounds"][0]["info"]["client_ranks"] == [1, 2, 1]
    assert max(summary["gap_by_round"]) < 1e-5
    shown = runner.invoke(app, ["fed", "show", str(out)])
    assert shown.exit_code == 0 and shown.output.count("\n") >= 3, shown.output


def test_fed_simulate_refuses_bad_options(tiny, tmp_path):
    result = runner.invoke(app, ["fed", "simulate", "--engine", "local", "--method", "fedprox"])
    assert result.exit_code == 2 and "unknown federated method" in result.output
    result = runner.invoke(app, ["fed", "simulate", "--engine", "local", "--method", "fedavg", "--ranks", "2,4"])
    assert result.exit_code == 2 and "need an aggregator with heterogeneous_ranks (flora)" in result.output
    result = runner.invoke(app, ["fed", "simulate", "--engine", "local", "-o", "bogus=1"])
    assert result.exit_code == 2 and "unknown federated option" in result.output


def test_fed_app_writes_a_flower_app(tmp_path):
    pytest.importorskip("flwr")
    result = runner.invoke(app, ["fed", "app", str(tmp_path / "app"), "--method", "ffa", "--dp", "--clients", "3"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "app" / "pyproject.toml").read_text()
    assert 'serverapp = "lorakit.federated.flower:server_app"' in text and 'method = "ffa"' in text
    assert "dp = true" in text and "flower-supernode" in result.output
    result = runner.invoke(app, ["fed", "app", str(tmp_path / "fair"), "--method", "lora_fair", "--method-arg",
                                 "steps=12", "--method-arg", "lam=0.2"])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "fair" / "pyproject.toml").read_text()
    assert "method-args.steps = 12" in text and "method-args.lam = 0.2" in text
    result = runner.invoke(app, ["fed", "app", str(tmp_path / "bad"), "--method", "ffa", "--method-arg", "steps=1"])
    assert result.exit_code == 2 and "aggregator 'ffa': unknown argument 'steps'" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["local", "flower"])
def test_fed_simulate_on_the_embedded_model(tmp_path, engine):
    """The issue's command on SmolLM2 with non-IID splits of the bundled task (small budget)."""
    from lorakit.models import default_model_path

    try:
        default_model_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    if engine == "flower":
        pytest.importorskip("flwr")
    out = tmp_path / engine
    result = runner.invoke(app, ["fed", "simulate", "--engine", engine, "--clients", "10", "--rounds", "3",
                                 "--method", "flora", "--local-steps", "1", "--batch-size", "4", "--max-length", "48",
                                 "--n-train", "1000", "--n-eval", "32", "--num-cpus", "2",
                                 "--targets", r"re:.*\.layers\.(2[0-9])\.self_attn\.(q_proj|v_proj)",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "fed_summary.json").read_text())
    assert len(summary["rounds"]) == 3 and all(not r["skipped"] for r in summary["rounds"]), summary["rounds"]
    assert max(summary["gap_by_round"]) < 1e-5 and summary["metric_final"] is not None
