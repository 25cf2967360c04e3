"""Conformance of every parameter generator of the catalog's ``generate`` axis (skips by type, not by name).

Each generator, fitted on the same tiny bank: samples live in the bank's layout, ``mode="mean"`` is
deterministic, a sample for a seen task is closer to that task's checkpoints than to the others' (the
condition matters), ``generate`` returns an AdapterState the base accepts, and save → load gives the same
output; bad conditions are refused.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core import registry
from lorakit.core.extract import extract_state
from lorakit.core.spec import AdapterSpec
from lorakit.generate import CheckpointBank, Generator, GeneratorError, load_generator
from lorakit.models import tiny_llama

GENERATORS = [n for n in registry.names("generate")
              if isinstance(registry.get("generate", n), type) and issubclass(registry.get("generate", n), Generator)]
FAST_ARGS = {"icm_lora": {"epochs": 60, "channels": [4, 4], "latent_dim": 8, "lr": 3e-3}}
FIT = {"sg_lora": {"steps": 300}, "text_to_lora": {"steps": 300}}


@pytest.fixture(scope="module")
def bank():
    entries = []
    for t in range(3):
        states = []
        for m in range(4):
            model = tiny_llama(hidden=16, layers=2, heads=2, kv_heads=1, vocab=64, seed=0)
            lorakit.attach(model, AdapterSpec(form_args={"r": 2, "alpha": 4}, targets=["q_proj", "v_proj"]))
            g = torch.Generator().manual_seed(10 * t + m)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_" in n:  # task t: a constant offset per task plus a little checkpoint noise
                        p.copy_(torch.full(p.shape, 0.3 * (t - 1)) + 0.02 * torch.randn(p.shape, generator=g))
            states.append(extract_state(model, "default"))
        entries.append((f"task{t}", f"description {t}", states))
    return CheckpointBank.from_states(entries)


def _embs(n: int = 3) -> torch.Tensor:
    return torch.eye(n, 4) + 0.05


@pytest.mark.parametrize("name", GENERATORS)
def test_generator_contract(bank, name, tmp_path):
    cls = registry.get("generate", name)
    gen = cls.for_embeddings(bank.layout, 4, None, **FAST_ARGS.get(name, {}))
    torch.manual_seed(0)
    gen.fit(bank, _embs(), **FIT.get(name, {}))
    gen.eval()
    c = gen.condition(_embs()[1])
    x = gen.sample(c, 2, seed=0)
    assert x.shape == (2, bank.layout.dim) and torch.isfinite(x).all()
    mean1, mean2 = gen.sample(c, 1, mode="mean"), gen.sample(c, 1, mode="mean")
    assert torch.equal(mean1, mean2)
    protos = bank.prototypes()
    dist = ((protos - mean1) ** 2).sum(1)
    assert int(dist.argmin()) == 1, f"{name}: the sample for task 1 is nearest to task {int(dist.argmin())}"
    state = gen.generate(embedding=_embs()[1], mode="mean")
    lorakit.apply_state(tiny_llama(hidden=16, layers=2, heads=2, kv_heads=1, vocab=64, seed=0), state)
    gen.save(tmp_path / "gen")
    back = load_generator(tmp_path / "gen")
    assert torch.allclose(back.sample(back.condition(_embs()[1]), 1, mode="mean"), mean1, atol=1e-6)
    with pytest.raises((GeneratorError, ValueError)):
        gen.sample(torch.zeros(gen.cond_dim + 1), 1)
