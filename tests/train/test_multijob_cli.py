"""`lorakit train-many CONFIG.yaml` on a tiny local model: a learning-rate sweep and two tasks as one run;
config expansion and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import save_tiny_model_dir
from lorakit.train.multijob_cli import ManyConfigError, expand_jobs, train_many

WORDS = ["good", "bad", "great", "awful", "fine", "movie", "the", "was", "very", "not", "a", "cat", "sat"]

app = typer.Typer(add_completion=False)
app.command("train-many")(train_many)
app.command("noop")(lambda: None)  # two commands: invoked by name as under `lorakit`


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model_many"), WORDS)
    rows = ["text,label"] + [f"the movie was very {('good', 'bad')[i % 2]},{('good', 'bad')[i % 2]}"
                             for i in range(24)]
    (d / "reviews.csv").write_text("\n".join(rows) + "\n")
    lines = [json.dumps({"text": " ".join(["a cat sat"] * (1 + i % 4))}) for i in range(20)]
    (d / "cats.jsonl").write_text("\n".join(lines) + "\n")
    return d


def test_lr_sweep_and_two_tasks_one_run(tiny_dir, tmp_path):
    out = tmp_path / "many"
    cfg = tmp_path / "sweep.yaml"
    cfg.write_text(f"""
model: {tiny_dir}
out_dir: {out}
token_cap: 200
max_length: 16
n_eval: 4
defaults: {{steps: 3, batch_size: 4, r: 4}}
jobs:
  - {{name: reviews, data: {tiny_dir / 'reviews.csv'}}}
  - {{name: cats, data: {tiny_dir / 'cats.jsonl'}, form: dora}}
sweep: {{lr: [1e-3, 3e-3]}}
""")
    result = CliRunner().invoke(app, ["train-many", str(cfg), "--quiet"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((out / "summary.json").read_text())
    names = [r["job"] for r in summary["jobs"]]
    assert names == ["reviews-lr1e-3", "reviews-lr3e-3", "cats-lr1e-3", "cats-lr3e-3"]
    assert all(r["steps"] == 3 and r["status"] == "finished" for r in summary["jobs"])
    assert summary["steps"] == 3  # four jobs, three shared steps
    assert {r["metric"] for r in summary["jobs"]} == {"accuracy", "perplexity"}
    for n in names:
        assert (out / n / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / n / "log.jsonl").is_file()
    assert "reviews-lr1e-3" in result.output and "padding" in result.output


def test_expand_and_refuse():
    jobs = expand_jobs({"defaults": {"data": "sentiment"}, "sweep": {"lr": [1e-4, 2e-4]}})
    assert [j["name"] for j in jobs] == ["sentiment-lr0_0001", "sentiment-lr0_0002"]
    with pytest.raises(ManyConfigError, match="unknown config key"):
        expand_jobs({"jobz": []})
    with pytest.raises(ManyConfigError, match="unknown key"):
        expand_jobs({"jobs": [{"name": "a", "learning_rate": 1}]})
    with pytest.raises(ManyConfigError, match="duplicate"):
        expand_jobs({"jobs": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ManyConfigError, match="needs a name"):
        expand_jobs({"jobs": [{"data": "x"}]})


def test_cli_exit_2_on_bad_config(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("jobs: 3\n")
    result = CliRunner().invoke(app, ["train-many", str(cfg)])
    assert result.exit_code == 2 and "jobs" in result.output


def test_lorakit_objectives_curves_equal_trainer(tiny_dir):
    """The real Objective path (label-token classification, causal LM) against the plain Trainer."""
    import dataclasses as dc

    import lorakit
    from lorakit.models import load_model
    from lorakit.train import TrainConfig, Trainer
    from lorakit.train.multijob import Job, MultiJobTrainer
    from lorakit.train.objectives import make_objective
    from lorakit.train.run import load_data

    def setup():
        model, tok = load_model(str(tiny_dir), progress=False)
        jobs = []
        for i, data in enumerate(("reviews.csv", "cats.jsonl")):
            task = load_data(str(tiny_dir / data), seed=0)
            obj = make_objective(task, tok, max_length=16)
            cfg = TrainConfig(steps=3, batch_size=3, lr=5e-3 * (i + 1), seed=i, progress=False, eval_at_start=False)
            jobs.append(Job(f"j{i}", task.train, obj, cfg, lorakit.AdapterSpec(form_args={"r": 4})))
        return model, jobs

    model, jobs = setup()
    together = MultiJobTrainer(model, jobs, token_cap=40).run()
    for job in jobs:
        ref_model, _ = load_model(str(tiny_dir), progress=False)
        lorakit.attach(ref_model, job.spec, job.name, seed=job.config.seed)
        ref = Trainer(ref_model, job.data, job.objective.collate, job.objective.loss,
                      dc.replace(job.config, out_dir=None)).train(resume=False)
        got = together[job.name].losses
        assert max(abs(a - b) / abs(b) for a, b in zip(got, ref.losses, strict=True)) <= 1e-6, job.name
