"""Generic federated code names no aggregator: methods come from the catalog, their settings are the
aggregator's frozen ``Args`` (filled from ``method_args`` / ``--method-arg``), behaviour follows
declared flags, and the server compares adapter specs by meaning."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from fed_helpers import client_states, make_csv, make_tiny_dir, template, updates_of
from typer.testing import CliRunner

import lorakit.federated as fed
from lorakit.cli import app
from lorakit.core import registry
from lorakit.core.catalog import CATALOG
from lorakit.core.state import AdapterState
from lorakit.federated import FedAvg, FedConfig, LoRAFAIR, Server
from lorakit.federated.base import AggregationError, Aggregator, module_scales
from lorakit.federated.client import make_aggregator
from lorakit.federated.run import adapters_equal, run_local

runner = CliRunner()
FED_DIR = Path(fed.__file__).parent
NAMES = registry.names("federated")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("fedgeneric")
    return make_tiny_dir(d / "model"), make_csv(d / "data.csv")


def tiny_cfg(tiny, tmp_path, **kw):
    model, data = tiny
    base = dict(model=str(model), data=str(data), clients=3, rounds=1, local_steps=2, batch_size=4, rank=2,
                alpha=4.0, lr=1e-2, n_eval=9, max_length=32, min_client_examples=4, min_clients=2,
                out=str(tmp_path / "out"))
    return FedConfig(**{**base, **kw})


# -- no method name in generic code ------------------------------------------------------------
def _spellings(name: str) -> set[str]:
    cls = registry.get("federated", name)
    return {name, name.replace("_", "-"), name.replace("_", ""), cls.__name__}


def test_no_generic_federated_file_names_an_aggregator():
    """Every federated module except the aggregators' own files (the catalog's targets) and the
    package index (``__init__.py`` re-exports the classes) must not contain any registered
    aggregator's name, in any spelling, case-insensitively, and that includes docstrings, comments and
    help text: generic text points at the catalog instead (`lorakit methods --axis federated`), so
    it stays true when aggregators are added. The one exception is a line importing from Flower, whose
    own averaging strategy class happens to be called FedAvg."""
    own = {e.target.partition(":")[0].rsplit(".", 1)[1] + ".py" for e in CATALOG if e.axis == "federated"}
    generic = sorted(p for p in FED_DIR.glob("*.py") if p.name not in own | {"__init__.py"})
    for required in ("config.py", "client.py", "run.py", "server.py", "flower.py", "cli.py", "base.py"):
        assert FED_DIR / required in generic
    words = sorted({w for n in NAMES for w in _spellings(n)}, key=len, reverse=True)
    pattern = re.compile(r"(?<![A-Za-z0-9])(" + "|".join(map(re.escape, words)) + r")(?![A-Za-z0-9])", re.I)
    found = []
    for path in generic:
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*from flwr[.\w]* import ", line):
                continue
            for m in pattern.finditer(line):
                found.append(f"{path.name}:{i}: {m.group(0)!r} in {line.strip()!r}")
    assert not found, "aggregator names in generic federated code:\n" + "\n".join(found)


# -- methods from the catalog --------------------------------------------------------------------
def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown federated method 'fedprox'") as e:
        FedConfig(method="fedprox")
    assert all(n in str(e.value) for n in NAMES) and len(NAMES) >= 4
    result = runner.invoke(app, ["fed", "simulate", "--engine", "local", "--method", "fedprox"])
    assert result.exit_code == 2 and all(n in result.output for n in NAMES), result.output


def test_default_method_is_the_first_catalog_aggregator_and_names_are_normalized():
    assert FedConfig().method == NAMES[0]
    spelled = NAMES[-1].replace("_", "-").upper()
    assert FedConfig(method=spelled).method == NAMES[-1]


def test_per_client_ranks_need_an_aggregator_declaring_heterogeneous_ranks():
    able = [n for n in NAMES if registry.get("federated", n).heterogeneous_ranks]
    unable = [n for n in NAMES if not registry.get("federated", n).heterogeneous_ranks]
    assert able and unable
    assert FedConfig(method=able[0], ranks="2,4", clients=3).client_ranks() == [2, 4, 2]
    with pytest.raises(ValueError, match="heterogeneous_ranks") as e:
        FedConfig(method=unable[0], ranks="2,4")
    assert all(n in str(e.value) for n in able)


def test_the_clients_form_is_the_aggregators_declaration():
    from lorakit.core.caps import Cap
    from lorakit.core.spec import AdapterSpec

    for name in NAMES:
        cls = registry.get("federated", name)
        form = FedConfig(method=name).form()
        assert form == (cls.form or AdapterSpec().form)
        assert Cap.FACTORED_AB in registry.get("form", form).caps
        cls().check_spec(AdapterSpec(form=form))  # its own form passes its own check


def test_an_aggregator_without_frozen_args_is_refused_at_definition():
    with pytest.raises(TypeError, match="frozen dataclass"):
        class NoArgs(Aggregator):  # noqa: F841
            name = "x"

    @dataclasses.dataclass
    class Mutable:
        k: int = 1

    with pytest.raises(TypeError, match="frozen dataclass"):
        class Loose(Aggregator):  # noqa: F841
            Args = Mutable

    @dataclasses.dataclass(frozen=True)
    class Empty:
        pass

    with pytest.raises(TypeError, match="needs fresh_adapters"):
        class Mixed(Aggregator):  # noqa: F841
            Args = Empty
            heterogeneous_ranks = True


# -- method args reach the aggregator --------------------------------------------------------------
def test_method_args_are_typed_and_reach_the_aggregator():
    cfg = FedConfig(method="lora_fair", method_args={"steps": "7", "lam": 1, "solver": "l2"})
    assert cfg.method_args == {"steps": 7, "lam": 1.0, "solver": "l2"}
    agg = make_aggregator(cfg)
    assert isinstance(agg, LoRAFAIR)
    assert agg.args == LoRAFAIR.Args(lam=1.0, solver="l2", steps=7)
    assert agg.args.lr == LoRAFAIR.Args().lr  # unspecified fields keep the paper's defaults
    # Flower's flattened run config, the TOML table of an app, and a round trip
    flat = FedConfig.from_mapping({"method": "lora-fair", "method-args.steps": 7, "method-args.solver": "l2",
                                   "method-args.lam": 1})
    nested = FedConfig.from_mapping({"method": "lora_fair", "method-args": {"steps": 7, "solver": "l2", "lam": 1.0}})
    assert flat == nested == cfg == FedConfig.from_mapping(cfg.to_run_config())
    assert cfg.to_run_config()["method-args.steps"] == 7


def test_a_method_arg_changes_the_aggregation_it_names():
    """LoRA-FAIR with steps=0 keeps ΔB = 0, i.e. it is FedAvg bit for bit; with steps it is not."""
    states = client_states(3, seed=5)
    init = FedAvg().init_state(template())
    ref = FedAvg().aggregate(init, updates_of(states))
    zero = LoRAFAIR.from_values({"steps": "0"}).aggregate(init, updates_of(states))
    assert adapters_equal(ref.state, zero.state) and zero.info["fair_rel_delta_B"] == 0.0
    moved = LoRAFAIR.from_values({"steps": "20"}).aggregate(init, updates_of(states))
    assert not adapters_equal(ref.state, moved.state) and moved.info["fair_rel_delta_B"] > 0.0


def test_method_args_reach_the_aggregator_in_a_whole_run(tiny, tmp_path):
    fedavg = run_local(tiny_cfg(tiny, tmp_path, method="fedavg"), progress=False, write=False)
    zero = run_local(tiny_cfg(tiny, tmp_path, method="lora_fair", method_args={"steps": 0}), progress=False,
                     write=False)
    assert adapters_equal(fedavg.state, zero.state)  # clients train alike; the server's solve did nothing
    # the closed-form solve always moves B̄ (one round from a shared A0 leaves the cosine solve at ΔB = 0)
    solved = run_local(tiny_cfg(tiny, tmp_path, method="lora_fair", method_args={"solver": "l2"}), progress=False)
    assert not adapters_equal(fedavg.state, solved.state) and solved.reports[0].info["fair_rel_delta_B"] > 0
    assert zero.reports[0].info["fair_rel_delta_B"] == 0.0
    summary = json.loads((tmp_path / "out" / "fed_summary.json").read_text())
    assert summary["method_args"] == dataclasses.asdict(LoRAFAIR.Args(solver="l2"))  # every field, defaults too
    assert summary["config"]["method_args"] == {"solver": "l2"}


def test_bad_method_args_give_a_clear_error(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"aggregator 'lora_fair': bad value for 'steps' \(int\)"):
        FedConfig(method="lora_fair", method_args={"steps": "many"})
    with pytest.raises(ValueError, match=r"unknown argument 'bogus'; known: \['lam', 'solver', 'steps', 'lr'\]"):
        FedConfig(method="lora_fair", method_args={"bogus": 1})
    with pytest.raises(ValueError, match="solver must be one of"):
        FedConfig(method="lora_fair", method_args={"solver": "newton"})
    with pytest.raises(ValueError, match=r"aggregator 'fedavg': unknown argument 'steps'; known: \[\]"):
        FedConfig(method="fedavg", method_args={"steps": 3})
    model, data = tiny
    base = ["fed", "simulate", "--engine", "local", "--model", str(model), "--data", str(data), "--method",
            "lora_fair"]
    result = runner.invoke(app, [*base, "--method-arg", "steps=many"])
    assert result.exit_code == 2 and "bad value for 'steps'" in result.output, result.output
    result = runner.invoke(app, [*base, "--method-arg", "steps"])
    assert result.exit_code == 2 and "--method-arg expects key=value" in result.output, result.output


def test_cli_method_args_reach_the_run(tiny, tmp_path):
    model, data = tiny
    out = tmp_path / "run"
    result = runner.invoke(app, ["fed", "simulate", "--engine", "local", "--clients", "3", "--rounds", "1",
                                 "--method", "lora-fair", "--method-arg", "solver=l2", "--method-arg", "lam=0.5",
                                 "--model", str(model), "--data", str(data), "--local-steps", "1",
                                 "--batch-size", "4", "--rank", "2", "--alpha", "4", "--n-eval", "9",
                                 "--max-length", "32", "-o", "min_client_examples=4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "lora_fair args: lam=0.5, solver='l2', steps=200, lr=0.05" in result.output
    summary = json.loads((out / "fed_summary.json").read_text())
    assert summary["method_args"] == {"lam": 0.5, "solver": "l2", "steps": 200, "lr": 0.05}
    shown = runner.invoke(app, ["fed", "show", str(out)])
    # fed_summary.json is written with sorted keys
    assert shown.exit_code == 0 and "lora_fair(lam=0.5, lr=0.05, solver='l2', steps=200)" in shown.output


def test_old_fair_options_still_work_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="use method_args.steps"):
        cfg = FedConfig.from_mapping({"method": "lora_fair", "fair-steps": "9", "fair_solver": "l2"})
    assert make_aggregator(cfg).args == LoRAFAIR.Args(steps=9, solver="l2")
    with pytest.warns(DeprecationWarning, match="ignored"):  # Flower apps of earlier releases carry them always
        cfg = FedConfig.from_mapping({"method": "fedavg", "fair_lambda": 0.01})
    assert cfg.method_args == {}
    with pytest.raises(ValueError, match="unknown federated option 'fair_nope'"):
        FedConfig.from_mapping({"fair_nope": 1})


# -- the scale comes from the form -----------------------------------------------------------------
def test_scales_are_read_from_the_form_and_fedavg_refuses_mixed_scales():
    a = client_states(1, alpha_per_r=2.0)[0]  # r = 4, α = 8
    b = client_states(1, alpha_per_r=3.0)[0]  # r = 4, α = 12
    assert set(module_scales(a).values()) == {2.0} and set(module_scales(b).values()) == {3.0}
    rs = AdapterState(spec=dataclasses.replace(a.spec, form_args={**a.spec.form_args, "rslora": True}),
                      tensors=a.tensors)
    assert set(module_scales(rs).values()) == {4.0}  # α/√r = 8/2, as the form computes it
    with pytest.raises(AggregationError, match=r"one scale for all clients: .* s=2.0 in update 0 and s=3.0"):
        FedAvg().aggregate(FedAvg().init_state(template()), updates_of([a, b]))


# -- the server compares specs by meaning -----------------------------------------------------------
def _respelled(state: AdapterState, **form_args) -> AdapterState:
    return AdapterState(spec=dataclasses.replace(state.spec, form_args=form_args), tensors=state.tensors)


def test_server_accepts_a_client_spec_equal_in_meaning():
    tmpl = template()  # form_args {'r': 4, 'alpha': 8.0}
    states = client_states(2)
    spelled_out = _respelled(states[0], r=4, alpha=8, dropout=0.0, rslora=False, bias=False, freeze_A=False)
    server = Server(FedAvg(), tmpl, min_clients=1)
    ups = updates_of([spelled_out, states[1]])
    report = server.round(ups)
    assert report.accepted == [0, 1] and not report.rejected
    reference = Server(FedAvg(), tmpl, min_clients=1)
    reference.round(updates_of(states))
    assert adapters_equal(server.state, reference.state)  # the same aggregation as with identical spellings
    other = Server(FedAvg(), tmpl, min_clients=1).round(updates_of([_respelled(states[0], r=4, alpha=9.0),
                                                                     states[1]]))
    assert list(other.rejected) == [0] and "alpha=9.0 (federation: 8.0)" in other.rejected[0]
    bad = Server(FedAvg(), tmpl, min_clients=1).round(updates_of([_respelled(states[0], r=4, alpah=8), states[1]]))
    assert "invalid adapter spec" in bad.rejected[0] and "alpah" in bad.rejected[0]
    assert torch.equal(server.state.adapter.tensors[next(iter(tmpl.tensors))],
                       reference.state.adapter.tensors[next(iter(tmpl.tensors))])
