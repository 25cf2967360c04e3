"""Helpers for the federated tests: seeded heterogeneous client adapter states on tiny Llama shapes,
a tiny model folder and a small CSV task."""

from __future__ import annotations

import torch

import lorakit
from lorakit.core.state import AdapterState
from lorakit.federated.base import ClientUpdate
from lorakit.models import tiny_llama

SEED = 123


def client_states(n: int = 4, *, form: str = "lora", ranks: list[int] | None = None, alpha_per_r: float = 2.0,
                  spread: float = 0.5, seed: int = 0) -> list[AdapterState]:
    """``n`` adapters on the same tiny model that moved differently from one shared start (the
    global adapter of seed SEED): A_k = A0 + spread·noise_k (A frozen for ffa), B_k random."""
    states = []
    for k in range(n):
        r = ranks[k % len(ranks)] if ranks else 4
        model = tiny_llama(seed=0)
        spec = lorakit.AdapterSpec(form=form, form_args={"r": r, "alpha": alpha_per_r * r})
        lorakit.attach(model, spec, seed=SEED if not ranks else SEED + k)
        g = torch.Generator().manual_seed(1000 * seed + k)
        state = lorakit.extract_state(model)
        tensors = {}
        for key, t in state.tensors.items():
            if key.endswith("lora_B.weight"):
                tensors[key] = torch.randn(t.shape, generator=g) * 0.1
            elif form != "ffa":
                tensors[key] = t + spread * torch.randn(t.shape, generator=g) * t.std()
            else:
                tensors[key] = t
        states.append(AdapterState(spec=state.spec, tensors=tensors, base=state.base, meta=state.meta))
    return states


def updates_of(states: list[AdapterState], sizes: list[int] | None = None) -> list[ClientUpdate]:
    sizes = sizes or [10 * (k + 1) for k in range(len(states))]
    return [ClientUpdate(client_id=k, state=s, num_examples=n) for k, (s, n) in enumerate(zip(states, sizes))]


def template(form: str = "lora", r: int = 4) -> AdapterState:
    """The round-0 adapter every client builds from the shared seed."""
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form=form, form_args={"r": r, "alpha": 2.0 * r}), seed=SEED)
    return lorakit.extract_state(model)


WORDS = ["good", "bad", "great", "awful", "fine", "nice", "terrible", "love", "hate", "okay", "meh",
         "movie", "food", "service", "the", "was", "is", "it", "very", "not", "so"]


def make_tiny_dir(path):
    """A tiny Llama and a word-level tokenizer saved as a local HF folder (no downloads)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", ":", "Text", "Label", "Classify", "as",
                                         "one", "of", ",", ".", "text", *WORDS, "positive", "negative", "neutral"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    tiny_llama(vocab=128, seed=0).save_pretrained(path)
    fast.save_pretrained(path)
    return path


def make_csv(path, n: int = 150):
    """A 3-label sentiment CSV (positive / negative / neutral) of short word sentences."""
    import random

    rng = random.Random(0)
    pools = {"positive": ["good", "great", "nice", "love"], "negative": ["bad", "awful", "terrible", "hate"],
             "neutral": ["fine", "okay", "meh", "so"]}
    rows = ["text,label"]
    labels = sorted(pools)
    for i in range(n):
        label = labels[i % 3]
        words = [rng.choice(["the", "movie", "food", "service"]), rng.choice(["was", "is"]),
                 rng.choice(["very", "not", "it"]), rng.choice(pools[label]), str(i)]
        rows.append(f"{' '.join(words)},{label}")
    path.write_text("\n".join(rows) + "\n")
    return path
