"""Two tiny Llama models with DIFFERENT tokenizers (word-level, small in-process BPE) for Trans-LoRA.

Fixtures the test modules import (not a conftest.py: a second one shadows tests/conftest.py's helpers)."""

from __future__ import annotations

import pytest

from lorakit.data.tasks import Task

WORDS = ["good", "great", "fine", "nice", "love", "happy", "bad", "awful", "sad", "hate", "poor", "terrible", "the",
         "a", "movie", "food", "day", "was", "is", "it", "very", "so", "not", "and", "this", "that", "zzz", "qqq",
         "xxx"]
CORPUS = [f"{a} {b} {c}" for a in WORDS for b in WORDS[:12] for c in ("movie", "day", "food")]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", ":", "Text", "Answer", "\n", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def bpe_tokenizer():
    """A byte-level BPE with few merges: label words split into several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS[::7] + ["Text: Answer:\n"] * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def tiny_task(train=(), evals=()) -> Task:
    return Task(name="toy", kind="classification", labels=["good", "bad"], train=list(train), eval=list(evals),
                source="test", license="n/a", instruction="Say good or bad.")


@pytest.fixture
def toy_task() -> Task:
    return tiny_task()


@pytest.fixture(scope="module")
def pair():
    """(source model, source tokenizer, target model, target tokenizer): different vocab sizes and tokenizers."""
    from lorakit.models import tiny_llama

    stok, ttok = word_tokenizer(), bpe_tokenizer()
    src = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=len(stok), seed=0)
    tgt = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=len(ttok), seed=1)
    return src, stok, tgt, ttok
