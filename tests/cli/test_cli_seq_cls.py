"""`lorakit train --head seq_cls`: an encoder (a tiny BERT folder saved like the embedded MiniLM, a plain
``BertModel`` + WordPiece tokenizer) becomes a 3-class classifier with LoRA on query/value and a new
``classifier`` head in ``modules_to_save``; the adapter loads in real `peft` (task_type SEQ_CLS) with the
same logits, and `lorakit eval` rebuilds the classifier from what the adapter folder records."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lorakit.cli import app

TOL = 1e-5
WORDS = ["the", "flight", "was", "crew", "seat", "is", "ok", "great", "love", "awesome", "bad", "awful", "late",
         "hate", "fine", "on", "time", "today", "my", "bag"]
LABELS = {"positive": ["great", "love", "awesome"], "negative": ["bad", "awful", "hate", "late"],
          "neutral": ["ok", "fine", "on time"]}


def save_tiny_bert_dir(d: Path, words: list[str], seed: int = 0) -> Path:
    """A tiny ``BertModel`` (pooler included, no classifier: as all-MiniLM-L6-v2 ships) and a WordPiece
    tokenizer over ``words`` saved as a local HF folder (no downloads)."""
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        BertModel(config).save_pretrained(d)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    return save_tiny_bert_dir(tmp_path_factory.mktemp("tiny_bert"), WORDS)


@pytest.fixture(scope="module")
def tweets(tmp_path_factory) -> Path:
    rows = ["text,label"]
    for i in range(48):
        label = list(LABELS)[i % 3]
        word = LABELS[label][i % len(LABELS[label])]
        rows.append(f"the {('flight', 'crew', 'seat', 'bag')[i % 4]} was {word} {('today', 'my')[i % 2]},{label}")
    path = tmp_path_factory.mktemp("data") / "tweets.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _train(bert_dir: Path, data: Path | str, out: Path, *extra: str):
    args = ["train", "--model", str(bert_dir), "--head", "seq_cls", "--data", str(data), "--targets", "query,value",
            "--steps", "4", "--batch-size", "8", "--lr", "0.02", "--max-length", "16", "--n-eval", "12",
            "--rank", "4", "--alpha", "8", *extra, "--out", str(out)]
    return CliRunner().invoke(app, args)


def _batch(bert_dir: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
    return dict(tok(["the flight was great today", "my bag was late", "the seat is fine"], padding=True,
                    return_tensors="pt"))


def test_seq_cls_run_round_trips_with_real_peft_and_evals(bert_dir, tweets, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    import lorakit
    from lorakit.models import load_model

    out = tmp_path / "run"
    r = _train(bert_dir, tweets, out, "--modules-to-save", "classifier")
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "accuracy:" in r.output and "majority class" in r.output

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert sorted(config["target_modules"]) == ["query", "value"]
    meta = json.loads((out / "lorakit.json").read_text())["meta"]["head"]
    assert meta == {"head": "seq_cls", "model": str(bert_dir.resolve()), "max_length": 16, "num_labels": 3,
                    "labels": ["negative", "neutral", "positive"], "seed": 0}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["head"] == "seq_cls" and summary["metric_name"] == "accuracy" and summary["steps"] == 4
    assert summary["spec"]["modules_to_save"] == ["classifier"]
    assert summary["train_spec"]["trainer"]["objective"] == meta
    assert json.loads((out / "train_spec.json").read_text())["trainer"]["objective"]["head"] == "seq_cls"
    # trainable: LoRA on 2 layers x (query, value) at r=4 (A 4x32 + B 32x4) + the head copy (3x32 + 3)
    assert summary["trainable_params"] == 2 * 2 * (4 * 32 + 32 * 4) + 3 * 32 + 3

    batch = _batch(bert_dir)
    ours_model = lorakit.load(load_model(bert_dir, head="seq_cls", num_labels=3, progress=False)[0], out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForSequenceClassification.from_pretrained(str(bert_dir), num_labels=3, local_files_only=True)
        theirs_model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        ours, theirs = ours_model.eval()(**batch).logits, theirs_model(**batch).logits
        plain = load_model(bert_dir, head="seq_cls", num_labels=3, progress=False)[0](**batch).logits
    assert (ours - theirs).abs().max() <= TOL
    assert (ours - plain).abs().max() > 1e-3  # the adapter and the trained head changed the outputs

    r = CliRunner().invoke(app, ["eval", "--adapter", str(out), "--data", str(tweets), "--n-eval", "12"])
    assert r.exit_code == 0, r.output + repr(r.exception)
    metrics = json.loads(r.output[r.output.index("{"):])
    assert metrics["head"] == "seq_cls" and metrics["n_eval"] == 12
    assert metrics["accuracy"] == pytest.approx(summary["metric_after"])
    assert metrics["loss"] == pytest.approx(summary["eval_after"]["loss"], abs=1e-6)


def test_seq_cls_training_learns_the_tiny_task(bert_dir, tweets, tmp_path):
    r = _train(bert_dir, tweets, tmp_path / "learn", "--steps", "60", "--lr", "0.05", "--seed", "1")
    assert r.exit_code == 0, r.output + repr(r.exception)
    summary = json.loads((tmp_path / "learn" / "summary.json").read_text())
    assert summary["spec"]["modules_to_save"] == ["classifier"]  # the head, by default with --head seq_cls
    # a new head starts near uniform (loss ln 3, chance accuracy); seeded: 1.099 -> 0.20, 0.33 -> 1.0
    assert summary["eval_before"]["loss"] == pytest.approx(1.0990, abs=1e-3)
    assert summary["metric_before"] == pytest.approx(1 / 3)
    assert summary["eval_after"]["loss"] < 0.3 and summary["metric_after"] == 1.0


@pytest.mark.parametrize("extra, message", [
    (["--modules-to-save", "cls_head"], "modules_to_save 'cls_head' matches no module of the model"),
    (["--head", "regression"], "unknown --head 'regression'; known: lm, seq_cls"),
])
def test_bad_head_or_modules_to_save_exit_2(bert_dir, tweets, tmp_path, extra, message):
    r = _train(bert_dir, tweets, tmp_path / "x", *extra)
    assert r.exit_code == 2, r.output + repr(r.exception)
    assert message in r.output


def test_seq_cls_on_a_text_task_exits_2(bert_dir, tmp_path):
    text = tmp_path / "notes.jsonl"
    text.write_text("".join(json.dumps({"text": f"the flight was ok {i}"}) + "\n" for i in range(30)))
    r = _train(bert_dir, text, tmp_path / "x")
    assert r.exit_code == 2, r.output + repr(r.exception)
    assert "head 'seq_cls' needs a classification task (text + label); 'notes' is a 'lm' task" in r.output


def test_encoder_without_head_and_minilm_as_lm_are_refused(bert_dir, tweets, tmp_path):
    r = CliRunner().invoke(app, ["train", "--model", str(bert_dir), "--data", str(tweets), "--targets", "query",
                                 "--steps", "1", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "cannot load a causal LM from it" in r.output and "head 'seq_cls'" in r.output
    r = CliRunner().invoke(app, ["train", "--model", "minilm", "--head", "lm", "--steps", "1",
                                 "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--model minilm" in r.output and "use --head seq_cls" in r.output


def test_eval_refuses_data_with_other_labels(bert_dir, tweets, tmp_path):
    out = tmp_path / "run"
    assert _train(bert_dir, tweets, out, "--steps", "2").exit_code == 0
    other = tmp_path / "other.csv"
    other.write_text("text,label\n" + "".join(f"the flight {i},{('yes', 'no', 'maybe')[i % 3]}\n" for i in range(12)))
    r = CliRunner().invoke(app, ["eval", "--adapter", str(out), "--data", str(other)])
    assert r.exit_code == 2, r.output + repr(r.exception)
    assert "the adapter's classes are ['negative', 'neutral', 'positive'], the data's are ['maybe', 'no', 'yes']" \
        in r.output


def test_a_causal_lm_gets_a_score_head_and_inspect_shows_the_objective(tweets, tmp_path):
    from conftest import save_tiny_model_dir

    llama = save_tiny_model_dir(tmp_path / "llama", WORDS)
    out = tmp_path / "run"
    r = CliRunner().invoke(app, ["train", "--model", str(llama), "--head", "seq_cls", "--data", str(tweets),
                                 "--steps", "2", "--batch-size", "4", "--n-eval", "6", "--out", str(out)])
    assert r.exit_code == 0, r.output + repr(r.exception)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]  # LlamaForSequenceClassification
    r = CliRunner().invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "objective={'head': 'seq_cls'" in r.output and "'num_labels': 3" in r.output
