"""Typed method arguments: ``parse_kv`` and the CLI's ``--form-arg/--init-arg/--strategy-arg`` (and YAML)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import save_tiny_model_dir
from lorakit.cli import app
from lorakit.core.spec import parse_kv

WORDS = ["good", "bad", "movie", "the", "was", "very"]


@dataclass(frozen=True)
class _Args:
    n: int = 1
    x: float = 0.5
    on: bool = False
    mode: str = "a"
    pair: tuple[float, float] = (0.9, 0.999)
    many: tuple[int, ...] = ()
    maybe: int | None = None
    layers: list[int] | str | None = None


def test_parse_kv_converts_to_each_fields_type():
    got = parse_kv(_Args, ["n=3", "x=1e-3", "on=true", "mode=b", "pair=0.8,0.9", "many=[1,2,3]", "maybe=none",
                           "layers=0,2"])
    assert got == {"n": 3, "x": 1e-3, "on": True, "mode": "b", "pair": (0.8, 0.9), "many": (1, 2, 3),
                   "maybe": None, "layers": [0, 2]}
    assert type(got["x"]) is float and type(got["n"]) is int
    assert parse_kv(_Args, ["maybe=7", "on=0", "layers=0;1"]) == {"maybe": 7, "on": False, "layers": "0;1"}
    # a YAML mapping arrives typed already; lists become tuples where the field is a tuple
    assert parse_kv(_Args, {"n": 2, "pair": [0.1, 0.2], "x": 3}) == {"n": 2, "pair": (0.1, 0.2), "x": 3.0}


@pytest.mark.parametrize("items, message", [
    (["nope=1"], "unknown argument 'nope'; known: ['n', 'x', 'on', 'mode', 'pair', 'many', 'maybe', 'layers']"),
    (["n=1.5"], "bad value for 'n' (int): expected an integer, got '1.5'"),
    (["on=maybe"], "bad value for 'on' (bool): expected a boolean"),
    (["pair=1"], "bad value for 'pair'"),
    (["x=fast"], "bad value for 'x' (float): expected a number"),
    (["n"], "expected key=value, got 'n'"),
])
def test_parse_kv_names_the_field_and_the_known_ones(items, message):
    with pytest.raises(ValueError) as e:
        parse_kv(_Args, items, owner="form 'demo'")
    assert str(e.value).startswith("form 'demo': ") and message in str(e.value)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = save_tiny_model_dir(tmp_path_factory.mktemp("tiny_model_args"), WORDS)
    rows = ["text,label"] + [f"the movie was very {('good', 'bad')[i % 2]},{('good', 'bad')[i % 2]}"
                             for i in range(12)]
    (d / "reviews.csv").write_text("\n".join(rows) + "\n")
    return d


def _train(tiny_dir: Path, out: Path, *extra: str):
    args = ["train", "--model", str(tiny_dir), "--data", str(tiny_dir / "reviews.csv"), "--steps", "2",
            "--batch-size", "2", "--max-length", "12", "--n-train", "6", "--n-eval", "2", *extra, "--out", str(out)]
    return CliRunner().invoke(app, args)


def test_form_arg_is_typed_and_wins_over_the_rank_shortcut(tiny_dir, tmp_path):
    out = tmp_path / "lora"
    r = _train(tiny_dir, out, "--rank", "4", "--form-arg", "r=2", "--form-arg", "rslora=true",
               "--form-arg", "alpha=3")
    assert r.exit_code == 0, r.output + repr(r.exception)
    form_args = json.loads((out / "summary.json").read_text())["spec"]["form_args"]
    assert form_args == {"r": 2, "alpha": 3.0, "rslora": True}


def test_shira_gets_no_alpha_and_an_explicit_alpha_is_refused(tiny_dir, tmp_path):
    r = _train(tiny_dir, tmp_path / "shira", "--form", "shira", "--rank", "2", "--form-arg", "mask=random")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert json.loads((tmp_path / "shira" / "summary.json").read_text())["spec"]["form_args"] == {
        "r": 2, "mask": "random"}
    r = _train(tiny_dir, tmp_path / "bad", "--form", "bone", "--alpha", "4")
    assert r.exit_code == 2
    assert "form 'bone' has no argument 'alpha' (set by --alpha); its arguments: ['r']" in r.output


@pytest.mark.parametrize("extra, message", [
    (["--form-arg", "rank=2"], "form 'lora': unknown argument 'rank'; known: ['r', 'alpha'"),
    (["--form-arg", "r=two"], "form 'lora': bad value for 'r' (int): expected an integer, got 'two'"),
    (["--init", "pissa", "--init-arg", "niter=x"], "init 'pissa': bad value for 'niter' (int)"),
    (["--init", "pissa", "--init-arg", "nope=1"], "init 'pissa': unknown argument 'nope'; known: ['niter']"),
    (["--strategy", "allora", "--strategy-arg", "lisa.gamma=1"], "strategy 'lisa' is not among --strategy"),
    (["--strategy", "allora", "--strategy-arg", "gamma=1"], "no strategy in ['allora'] has argument 'gamma'"),
    (["--strategy", "allora", "--strategy-arg", "eta=-1"], "allora: eta must be > 0, got -1.0"),
    (["--strategy-arg", "eta=1"], "no --strategy given"),
])
def test_bad_method_arguments_exit_2_with_a_clear_message(tiny_dir, tmp_path, extra, message):
    r = _train(tiny_dir, tmp_path / "x", *extra)
    assert r.exit_code == 2, r.output + repr(r.exception)
    assert message in r.output


def test_strategy_args_route_by_name_and_yaml_mappings_work(tiny_dir, tmp_path):
    out = tmp_path / "yaml"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("form_arg: {r: 2}\nstrategy: [allora, lora_pro]\n"
                   "strategy_arg: {allora: {eta: 2}, lora_pro: {mode: adjust, eps: 1.0e-6}}\n")
    r = _train(tiny_dir, out, "--config", str(cfg), "--strategy-arg", "granularity=tensor")
    # allora and lora_pro are exclusive: refused (exit 2) after both got their typed args
    assert r.exit_code == 2 and "strategy 'lora_pro' cannot be combined with ['allora']" in r.output, r.output
    # in YAML: {NAME: {k: v}} and bare keys (routed to the strategies that have them); one name as a string
    cfg.write_text("form_arg: {r: 2}\nstrategy: allora\nstrategy_arg: {allora: {eta: 2}, granularity: tensor}\n")
    r = _train(tiny_dir, out, "--config", str(cfg))
    assert r.exit_code == 0, r.output + repr(r.exception)
    spec = json.loads((out / "summary.json").read_text())["train_spec"]
    assert spec["strategies"] == [{"name": "allora", "args": {"eta": 2.0, "granularity": "tensor",
                                                               "on_conflict": "override"}}]
