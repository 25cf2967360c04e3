"""Merged adapters are PEFT adapters: `PeftModel.from_pretrained` loads them with lorakit's logits;
and the `lorakit merge` command writes such a folder."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from merge_testutil import base_model, logits, make_state
from peft import PeftModel
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.compose.merge import merge

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))

METHODS = {
    "linear": {}, "linear-k": {"k": 3}, "cat": {}, "svd": {"k": 4}, "ties": {"k": 5}, "dare_linear": {"k": 5},
    "dare_ties": {}, "magnitude_prune": {"k": 2}, "lego": {"k": 4}, "lego-canonical": {"k": 3, "canonicalize": "both"},
    "lorahub-delta": {"composition": "delta"},
}


@pytest.fixture(scope="module")
def adapters():
    return [make_state(r=2, alpha=4, seed=0), make_state(r=4, alpha=8, seed=1, rslora=True, bias=True),
            make_state(r=3, alpha=3, seed=2, module_args={"v_proj": {"r": 2, "alpha": 5}})]


def peft_logits(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base_model(), str(folder))
    return logits(model.eval(), IDS), model


@pytest.mark.parametrize("case", list(METHODS))
def test_merged_adapter_loads_in_peft_with_lorakit_logits(tmp_path, adapters, case):
    method = case.split("-")[0]
    merged = merge(adapters, method, [0.7, 1.0, 0.4], **METHODS[case])
    lorakit.save_state(merged, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    ours = base_model()
    lorakit.load(ours, tmp_path)
    mine = logits(ours, IDS)
    assert (mine - logits(base_model(), IDS)).abs().max() > 1e-3  # the merge does something
    theirs, peft_model = peft_logits(tmp_path)
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-5)
    ranks = {p: merged.tensors[f"{p}.lora_A.weight"].shape[0] for p in merged.modules}
    theirs_ranks = {n.removeprefix("base_model.model."): m.r["default"] for n, m in peft_model.named_modules()
                    if hasattr(m, "r") and isinstance(getattr(m, "r", None), dict) and "default" in m.r}
    assert theirs_ranks == ranks


def test_gpt2_conv1d_merge_loads_in_peft(tmp_path):
    from lorakit.api import extract_state
    from lorakit.models import tiny_gpt2

    try:
        from tests.conftest import randomize_adapter
    except ModuleNotFoundError:
        from conftest import randomize_adapter

    def make():
        return tiny_gpt2(hidden=32, layers=2, heads=4, vocab=128, seed=0)

    states = []
    for seed, r in enumerate([2, 3]):
        m = make()
        spec = lorakit.AdapterSpec(targets=["c_attn", "c_fc"], form_args={"r": r, "alpha": 2 * r})
        lorakit.attach(m, spec, seed=seed)
        randomize_adapter(m, seed=seed + 5)
        states.append(extract_state(m))
    merged = merge(states, "lego", k=3)
    assert merged.meta["fan_in_fan_out"] is True
    lorakit.save_state(merged, tmp_path)
    ours = make()
    lorakit.load(ours, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(make(), str(tmp_path)).eval()
    torch.testing.assert_close(logits(theirs, IDS), logits(ours, IDS), rtol=0, atol=1e-5)


def test_peft_written_inputs_merge(tmp_path, adapters):
    """Inputs read back from PEFT folders (no lorakit.json, no fingerprint) merge the same way."""
    for i, s in enumerate(adapters[:2]):
        lorakit.save_state(s, tmp_path / str(i))
        (tmp_path / str(i) / "lorakit.json").unlink()
    from_peft = merge([tmp_path / "0", tmp_path / "1"], "linear")
    direct = merge(adapters[:2], "linear")
    for key, t in direct.tensors.items():
        torch.testing.assert_close(from_peft.tensors[key], t)


runner = CliRunner()


def test_cli_merge_writes_a_peft_adapter(tmp_path, adapters):
    dirs = []
    for i, s in enumerate(adapters):
        lorakit.save_state(s, tmp_path / f"in{i}")
        dirs.append(str(tmp_path / f"in{i}"))
    out = tmp_path / "merged"
    result = runner.invoke(app, ["merge", "--method", "lego", "--k", "3", *dirs, "--out", str(out),
                                 "--weights", "0.5,1,0.25", "--method-arg", "canonicalize=both",
                                 "--method-arg", "seed=2"])
    assert result.exit_code == 0, result.output
    assert "lego: merged 3 adapters" in result.output and "rank 3" in result.output
    saved = lorakit.load_state(out)
    assert saved.meta["merge"]["args"]["canonicalize"] == "both" and saved.meta["merge"]["weights"] == [0.5, 1, 0.25]
    theirs, _ = peft_logits(out)
    ours = base_model()
    lorakit.load(ours, out)
    torch.testing.assert_close(theirs, logits(ours, IDS), rtol=0, atol=1e-5)

    result = runner.invoke(app, ["merge", "--method", "svd", "--k", "2", *dirs, "--out", str(tmp_path / "svd")])
    assert result.exit_code == 0, result.output
    assert "relative truncation error" in result.output


@pytest.mark.parametrize("argv,message", [
    (["--weights", "1,2"], "2 weight(s) given for 3 adapter(s)"),
    (["--weights", "1,x,2"], "--weights expects comma-separated numbers"),
    (["--method", "nope"], "unknown merge 'nope'"),
    (["--method", "cat", "--k", "3"], "unknown argument(s) ['k']"),
    (["--method-arg", "density"], "expects key=value"),
])
def test_cli_merge_bad_input(tmp_path, adapters, argv, message):
    dirs = []
    for i, s in enumerate(adapters):
        lorakit.save_state(s, tmp_path / f"in{i}")
        dirs.append(str(tmp_path / f"in{i}"))
    result = runner.invoke(app, ["merge", *dirs, "--out", str(tmp_path / "o"), *argv])
    assert result.exit_code == 2
    assert message in result.output
