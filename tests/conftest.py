"""Shared fixtures: tiny seeded models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(1)


@pytest.fixture
def tiny_llama():
    from lorakit.models import tiny_llama

    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


@pytest.fixture
def tiny_gpt2():
    from lorakit.models import tiny_gpt2

    return tiny_gpt2(hidden=32, layers=2, heads=4, vocab=128, seed=0)


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 128, (3, 11), generator=g)


def randomize_adapter(model, name: str = "default", seed: int = 1, std: float = 0.2) -> None:
    """Give every tensor of adapter ``name`` random values (B = 0 at init would hide bugs)."""
    from lorakit.core.inject import adapter_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for form in adapter_modules(model, name).values():
            for p in form.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def save_tiny_model_dir(d, words: list[str]):
    """A tiny Llama and a word-level tokenizer over ``words`` saved as a local HF folder ``d`` (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lorakit.models import tiny_llama

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", ":", "Text", "Answer", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    tiny_llama(vocab=128, seed=0).save_pretrained(d)
    fast.save_pretrained(d)
    return d


def kill_at(step: int):
    """A strategy that raises KeyboardInterrupt at the end of ``step``: a simulated kill for resume tests."""
    from lorakit.strategies.base import Strategy

    class KillAt(Strategy):
        name = "kill_at"

        def on_step_end(self, trainer, s, logs):
            if s == step:
                raise KeyboardInterrupt("simulated kill")

    return KillAt()
