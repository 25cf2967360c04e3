"""`transfer` and `transfer-discriminator` command functions end to end on two tiny models with different tokenizers."""

from __future__ import annotations

import copy
import json

import transfer_helpers
import typer
from typer.testing import CliRunner

import lorakit
from lorakit.core.spec import AdapterSpec
from lorakit.transfer.cli import transfer, transfer_discriminator

pair = transfer_helpers.pair  # fixtures (pytest finds them by name)


def test_cli_discriminator_then_transfer(pair, tmp_path):
    src, stok, tgt, ttok = pair
    (tmp_path / "src").mkdir()
    src.save_pretrained(tmp_path / "src")
    stok.save_pretrained(tmp_path / "src")
    tgt.save_pretrained(tmp_path / "tgt")
    ttok.save_pretrained(tmp_path / "tgt")
    teacher = copy.deepcopy(src)
    lorakit.attach(teacher, AdapterSpec(targets=["q_proj", "v_proj"], form_args={"r": 2, "alpha": 4}), seed=0)
    lorakit.save(teacher, tmp_path / "adapter")
    rows = [("good movie", "good"), ("bad food", "bad"), ("nice day", "good"), ("sad day", "bad"),
            ("love it", "good"), ("hate it", "bad")] * 3
    (tmp_path / "data.csv").write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in rows) + "\n")
    (tmp_path / "seeds.csv").write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in rows[:4]) + "\n")
    app = typer.Typer()
    app.command("transfer")(transfer)
    app.command("transfer-discriminator")(transfer_discriminator)
    runner = CliRunner()
    res = runner.invoke(app, ["transfer-discriminator", "--source-adapter", str(tmp_path / "adapter"), "--seeds",
                              str(tmp_path / "seeds.csv"), "--source-model", str(tmp_path / "src"), "--data",
                              str(tmp_path / "data.csv"), "--kind", "lora", "--n-real", "8", "--steps", "2",
                              "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "adapter" / "trans_lora_discriminator" / "discriminator.json").is_file()
    out = tmp_path / "target"
    res = runner.invoke(app, ["transfer", "--source-adapter", str(tmp_path / "adapter"), "--seeds",
                              str(tmp_path / "seeds.csv"), "--out", str(out), "--source-model", str(tmp_path / "src"),
                              "--target-model", str(tmp_path / "tgt"), "--data", str(tmp_path / "data.csv"),
                              "--n-candidates", "6", "--keep", "3", "--steps", "2", "--batch-size", "2",
                              "--max-new-tokens", "4"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["n_kept"] == 3 and "candidates" in res.output
    state = lorakit.load_state(out)
    assert len(state.modules) == 2 * tgt.config.num_hidden_layers  # q_proj and v_proj of the TARGET
    lorakit.apply_state(copy.deepcopy(tgt), state)  # fits the target model (its fingerprint and shapes)
    # a bad filter name is a clean exit 2, not a traceback
    res = runner.invoke(app, ["transfer", "--source-adapter", str(tmp_path / "adapter"), "--seeds",
                              str(tmp_path / "seeds.csv"), "--out", str(tmp_path / "x"), "--source-model",
                              str(tmp_path / "src"), "--target-model", str(tmp_path / "tgt"), "--data",
                              str(tmp_path / "data.csv"), "--filter", "bogus"])
    assert res.exit_code == 2 and "unknown filter" in res.output
