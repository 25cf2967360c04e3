"""`lorakit train --strategy NAME --strategy-arg k=v` for diffora, loraprune and loram on a tiny local model
(the same flow as the embedded model, without downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lorakit.cli import app

WORDS = ["good", "bad", "great", "awful", "fine", "movie", "the", "was", "very", "not"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lorakit.models import tiny_llama

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", ":", "Text", "Answer", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    d = tmp_path_factory.mktemp("tiny_model_issue5b")
    tiny_llama(vocab=128, seed=0).save_pretrained(d)
    fast.save_pretrained(d)
    rows = ["text,label"] + [f"the movie was very {('good', 'bad')[i % 2]},{('good', 'bad')[i % 2]}"
                             for i in range(24)]
    (d / "reviews.csv").write_text("\n".join(rows) + "\n")
    return d


CASES = {
    "diffora": (["--strategy-arg", "search_steps=2", "--strategy-arg", "select=2"], []),
    "loraprune": (["--targets", "all-linear", "--strategy-arg", "prune_freq=1"], []),
    "loram": (["--targets", "all-linear", "--strategy-arg", "layers=0,1"],
              ["recovered_adapter/adapter_model.safetensors"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_cli_train_with_pruning_or_selection_strategy(name, tiny_dir, tmp_path):
    extra, files = CASES[name]
    out = tmp_path / name
    args = ["train", "--model", str(tiny_dir), "--data", str(tiny_dir / "reviews.csv"), "--steps", "4",
            "--batch-size", "4", "--max-length", "16", "--n-eval", "4", "--strategy", name, *extra, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((out / "summary.json").read_text())["steps"] == 4
    for f in files:
        assert (out / f).exists(), f
