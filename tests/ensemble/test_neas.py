"""NEAS on adapters (lorakit.ensemble.neas): GradDivHeads, the shared trunk, slicing, shrinking, search, I/O."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from lorakit.core.inject import _saved_wrappers
from lorakit.core.layer import AdaptedLayer
from lorakit.ensemble.neas import (
    SHARED,
    Architecture,
    ArchitectureError,
    GradDivHeads,
    NEASConfig,
    NEASError,
    NEASSupernet,
    build_ensemble,
    default_logits,
    ensemble_logits,
    layer_stack,
    load_ensemble,
    path_name,
    retrain,
    search,
)
from lorakit.forms.base import Form
from lorakit.forms.lora import LoRA, LoRAArgs
from lorakit.models import tiny_llama

K = 2


def _bert(num_labels: int = 5, layers: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    torch.manual_seed(0)
    return BertForSequenceClassification(cfg).eval()


def _batch(n: int = 4, t: int = 7, vocab: int = 100, labels: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (n, t), generator=g)
    return {"input_ids": x, "attention_mask": torch.ones_like(x), "label_index": torch.randint(0, labels, (n,),
                                                                                                  generator=g)}


def _randomize(model, seed: int = 1, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Form):
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * std)


def _alone(model, arch: Architecture, k: int, batch, names=None) -> torch.Tensor:
    """Path k by a plain full forward (every block with its own adapter, no trunk reuse, no replay)."""
    for i, block in enumerate(layer_stack(model)):
        for m in block.modules():
            if isinstance(m, AdaptedLayer):
                r = arch.op(k, i)
                name = (SHARED if i < arch.split else path_name(k)) if names is None else names[k]
                m.active = (name,) if r and name in m.adapters else ()
                if r and names is None:
                    m.adapters[name].set_rank(r)
    for _, w in _saved_wrappers(model):
        w.active = (path_name(k) if names is None else names[k],)
    return default_logits(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)


ARCH = Architecture(split=2, shared=(4, 2), paths=((8, ), (2, )))


def test_grad_div_heads_closed_form():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = [torch.randn(3, 4, dtype=torch.float64) for _ in range(3)]
    y = GradDivHeads.apply(x, 3)
    assert torch.equal(y, x)
    sum((wk * y).sum() for wk in w).backward()
    assert torch.allclose(x.grad, sum(w) / 3, rtol=0, atol=1e-15)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_trunk_gradient_is_mean_of_path_gradients(kind):
    model = tiny_llama(layers=3) if kind == "llama" else _bert()
    cfg = NEASConfig(paths=K, targets=("q_proj", "v_proj") if kind == "llama" else ("query", "value"))
    sn = NEASSupernet(model, cfg)
    _randomize(model)
    batch = _batch(vocab=100)
    shared = [p for m in model.modules() if isinstance(m, AdaptedLayer) and SHARED in m.adapters
              for p in m.adapters[SHARED].parameters()]
    upper = [p for m in model.modules() if isinstance(m, AdaptedLayer) and path_name(0) in m.adapters
             for p in m.adapters[path_name(0)].parameters()]
    model.zero_grad()
    sn.loss(batch, ARCH).backward()
    got_shared = [_grad(p) for p in shared]
    got_upper = [_grad(p) for p in upper]
    ref_shared = [torch.zeros_like(p) for p in shared]
    ref_upper = None
    for k in range(K):
        model.zero_grad()
        F.cross_entropy(_alone(model, ARCH, k, batch), batch["label_index"]).backward()
        ref_shared = [a + _grad(p) for a, p in zip(ref_shared, shared)]
        if k == 0:
            ref_upper = [_grad(p) for p in upper]
    assert any(g.abs().sum() > 0 for g in got_shared)
    for g, r in zip(got_shared, ref_shared):
        torch.testing.assert_close(g, r / K, rtol=1e-5, atol=1e-7)  # the trunk gets the mean
    for g, r in zip(got_upper, ref_upper):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)  # a path's own adapters: unscaled


def test_trunk_runs_once_and_equals_full_runs_per_path():
    model = _bert(layers=4)
    sn = NEASSupernet(model, NEASConfig(paths=3, targets=("query", "value")))
    _randomize(model)
    arch = Architecture(split=2, shared=(8, 0), paths=((2, 4), (8, 0), (4, 8)))
    calls = [0] * 4
    blocks = list(layer_stack(model))
    handles = [b.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(blocks)]
    batch = _batch()
    with torch.no_grad():
        zs = sn.path_logits(batch, arch)
    assert calls == [1, 1, 3, 3]
    for h in handles:
        h.remove()
    with torch.no_grad():
        refs = [_alone(model, arch, k, batch) for k in range(3)]
    for z, r in zip(zs, refs):
        torch.testing.assert_close(z, r, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(refs[0], refs[1])
    torch.testing.assert_close(ensemble_logits(zs), torch.stack(refs).mean(0), rtol=1e-5, atol=1e-6)
    probs = torch.stack([r.softmax(-1) for r in refs]).mean(0)
    torch.testing.assert_close(ensemble_logits(zs, "mean_probs").exp(), probs, rtol=1e-5, atol=1e-6)
    with pytest.raises(NEASError, match="combine"):
        ensemble_logits(zs, "vote")
    assert all(b is blocks[i] for i, b in enumerate(layer_stack(model)))  # the replay modules are gone


def test_sliced_rank_equals_standalone_lora():
    model = tiny_llama(layers=2)
    NEASSupernet(model, NEASConfig(paths=1, alpha=8.0))
    _randomize(model)
    layer = model.model.layers[0].self_attn.q_proj
    form = layer.adapters[SHARED]
    x = torch.randn(3, 5, 32)
    base = layer.base_layer(x)
    for r in (2, 4, 8):
        form.set_rank(r)
        ref = LoRA(layer.base_layer, LoRAArgs(r=r, alpha=8.0))
        with torch.no_grad():
            ref.lora_A.copy_(form.lora_A[:r])
            ref.lora_B.copy_(form.lora_B[:, :r])
        torch.testing.assert_close(form.apply(x, base), ref.apply(x, base), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(form.delta_weight(), ref.lora_B @ ref.lora_A * (8.0 / r))


def test_budget_respected_by_search_and_unreachable_budget_refused():
    model = tiny_llama(layers=3)
    probe = NEASSupernet(tiny_llama(layers=3), NEASConfig(paths=K))
    full = Architecture(split=0, shared=(), paths=((8, 8, 8), (8, 8, 8)))
    limit = probe.params(full) * 0.4
    cfg = NEASConfig(paths=K, max_budget=limit, population=6, generations=3, seed=3)
    sn = NEASSupernet(model, cfg)
    result = search(sn, [], fitness=lambda a: sn.params(a) + a.split)  # rewards spending the budget
    assert sn.params(result.architecture) <= limit
    assert result.evaluated and all(sn.params(Architecture.from_json(j)) <= limit for j in result.evaluated)
    assert result.fitness == max(result.evaluated.values())
    assert search(sn, [], fitness=lambda a: sn.params(a) + a.split).architecture == result.architecture
    with pytest.raises(ArchitectureError, match="exceeds the budget"):
        sn.check(full)
    tight = NEASSupernet(tiny_llama(layers=3), NEASConfig(paths=K, choices=(2, 4), max_budget=1.0, max_tries=5))
    with pytest.raises(NEASError, match="no architecture within"):
        search(tight, [], fitness=lambda a: 0.0)


def test_flops_budget_closed_form():
    sn = NEASSupernet(tiny_llama(layers=2), NEASConfig(paths=K, budget="flops"))
    per_layer_base = 2 * sum(m.in_features * m.out_features for m in layer_stack(sn.model)[0].modules()
                             if isinstance(m, torch.nn.Linear))
    dims = sn.costs.dims[0]
    a = Architecture(split=1, shared=(4,), paths=((2,), (0,)))
    want = (per_layer_base + 2 * 4 * dims) + (per_layer_base + 2 * 2 * dims) + per_layer_base
    assert sn.flops_per_token(a) == want
    assert sn.params(a) == 4 * dims + 2 * dims


def _shrunk(seed: int):
    model = _bert()
    sn = NEASSupernet(model, NEASConfig(paths=K, targets=("query", "value"), shrink_samples=6, shrink_drop=1,
                                        shrink_min=2, seed=0))
    _randomize(model)
    batches = [_batch(seed=1), _batch(seed=2)]
    rng = random.Random(seed)
    rounds = [sn.shrink(batches, rng) for _ in range(3)]
    return sn, rounds


def test_shrinking_removes_choices_and_is_deterministic():
    a, rounds_a = _shrunk(5)
    b, rounds_b = _shrunk(5)
    assert a.choices == b.choices
    assert [r.removed for r in rounds_a] == [r.removed for r in rounds_b]
    assert all(len(c) == 2 for c in a.choices)  # 4 choices, one dropped per round, floor 2
    assert rounds_a[0].removed and all(len(v) == 1 for v in rounds_a[0].removed.values())
    assert rounds_a[2].removed == {}
    for i, removed in rounds_a[0].removed.items():  # the dropped choice had the lowest score
        scores = rounds_a[0].scores[i]
        assert scores[removed[0]] == min(scores.values())
    rng = random.Random(0)
    for _ in range(20):  # sampling never leaves the shrunk space
        arch = a.sample(rng)
        a.check(arch)
    dropped = next(iter(rounds_a[0].removed.items()))
    bad = Architecture.from_ops(0, [[dropped[1][0] if i == dropped[0] else a.choices[i][0] for i in range(3)]] * K)
    with pytest.raises(ArchitectureError, match="shrunk"):
        a.check(bad)


def test_supernet_training_with_shrinking_via_trainer():
    model = _bert()
    cfg = NEASConfig(paths=K, targets=("query", "value"), steps=6, batch_size=4, lr=5e-3, shrink_every=3,
                     shrink_samples=3, seed=0)
    sn = NEASSupernet(model, cfg)
    data = [_batch(n=1, seed=i) for i in range(16)]

    def collate(items):
        return {k: torch.cat([it[k] for it in items]) for k in items[0]}

    losses = sn.train(data, collate, val_batches=[_batch(seed=99)])
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert len(sn.shrink_history) == 1 and sum(len(c) for c in sn.choices) == 3 * 4 - 3
    assert all(not m.training for m in model.modules())


def test_architecture_json_round_trip(tmp_path):
    a = Architecture(split=1, shared=(4,), paths=((2, 0), (8, 4)))
    assert Architecture.from_json(a.to_json()) == a
    a.save(tmp_path / "arch.json")
    assert Architecture.load(tmp_path / "arch.json") == a
    assert a.ops(1) == (4, 8, 4) and a.num_layers == 3 and a.num_paths == 2


@pytest.mark.parametrize("patch, match", [
    ({"split": 2}, "split 2 but 1 shared"),
    ({"split": True}, "integer"),
    ({"shared": ["r4"]}, "integer rank"),
    ({"shared": [-1]}, "outside"),
    ({"shared": [1 << 40]}, "outside"),
    ({"paths": [[2, 0], [8]]}, "different lengths"),
    ({"paths": []}, "1..64 paths"),
    ({"paths": "x"}, "list of lists"),
    ({"format": "other"}, "not a"),
    ({"evil": 1}, "unknown field"),
])
def test_hostile_architecture_json_refused(patch, match):
    data = {**Architecture(split=1, shared=(4,), paths=((2, 0), (8, 4))).to_dict(), **patch}
    with pytest.raises(ArchitectureError, match=match):
        Architecture.from_json(json.dumps(data))


def test_hostile_architecture_files_refused(tmp_path):
    with pytest.raises(ArchitectureError, match="not valid JSON"):
        Architecture.from_json("{")
    with pytest.raises(ArchitectureError, match="larger"):
        Architecture.from_json(" " * (2 << 20))
    (tmp_path / "deep.json").write_text("[" * 100 + "]" * 100)
    with pytest.raises(ValueError):
        Architecture.load(tmp_path / "deep.json")
    (tmp_path / "nan.json").write_text('{"format": "lorakit-neas-arch", "version": 1, "split": NaN}')
    with pytest.raises(ValueError, match="finite"):
        Architecture.load(tmp_path / "nan.json")
    sn = NEASSupernet(tiny_llama(layers=2), NEASConfig(paths=K, choices=(0, 2, 4)))
    with pytest.raises(ArchitectureError, match="not in the"):
        sn.check(Architecture(split=0, shared=(), paths=((8, 2), (2, 2))))
    with pytest.raises(ArchitectureError, match="layers"):
        sn.check(Architecture(split=0, shared=(), paths=((2,), (2,))))
    with pytest.raises(ArchitectureError, match="paths"):
        sn.check(Architecture(split=0, shared=(), paths=((2, 2),)))


def test_config_refuses_bad_values():
    for bad in ({"paths": 0}, {"choices": (0, 0, 2)}, {"choices": (0,)}, {"choices": (2.5,)},
                {"budget": "joules"}, {"max_budget": float("nan")}, {"population": 1}):
        with pytest.raises(NEASError):
            NEASConfig(**bad)


def _collate(items):
    return {k: torch.cat([it[k] for it in items]) for k in items[0]}


@pytest.mark.parametrize("arch", [Architecture(split=2, shared=(4, 0), paths=((2,), (8,))),
                                  Architecture(split=3, shared=(2, 0, 4), paths=((), ())),  # NEAS-S: heads only
                                  Architecture(split=1, shared=(8,), paths=((0, 0), (2, 0)))])
def test_retrain_save_load_and_peft_reference(tmp_path, arch):
    from peft import PeftModel

    model = _bert()
    data = [_batch(n=1, seed=i) for i in range(8)]
    ens = retrain(model, arch, data, _collate, steps=3, batch_size=4, lr=1e-2, targets=("query", "value"))
    d = 2 * (32 + 32)  # q and value of one block: Σ (d_in + d_out); the head: 32·5 + 5
    lora = sum(r * d for r in arch.shared) + sum(r * d for p in arch.paths for r in p)
    assert ens.trainable_params() == lora + 2 * (32 * 5 + 5)  # a dormant head-only placeholder is not counted
    batch = _batch(seed=42)
    with torch.no_grad():
        got = ens.logits(batch)
    ens.save(tmp_path / "ens")
    info = json.loads((tmp_path / "ens" / "neas.json").read_text())
    assert info["paths"] == ["path_0", "path_1"] and Architecture.from_dict(info["architecture"]) == arch
    refs = []
    for k in range(2):  # independent reference: real peft, each path as a plain full-model adapter
        peft_model = PeftModel.from_pretrained(_bert(), str(tmp_path / "ens" / f"path_{k}")).eval()
        with torch.no_grad():
            refs.append(peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    assert not torch.allclose(refs[0], refs[1])
    torch.testing.assert_close(got, torch.stack(refs).mean(0), rtol=1e-5, atol=1e-5)
    again = load_ensemble(_bert(), tmp_path / "ens")
    with torch.no_grad():
        torch.testing.assert_close(again.logits(batch), got, rtol=1e-5, atol=1e-5)


def test_load_refuses_paths_that_disagree_below_the_split(tmp_path):
    from safetensors.torch import load_file, save_file

    arch = Architecture(split=1, shared=(4,), paths=((2, 2), (4, 0)))
    model = _bert()
    ens = build_ensemble(model, arch, targets=("query", "value"))
    _randomize(model)
    ens.save(tmp_path / "ens")
    f = tmp_path / "ens" / "path_1" / "adapter_model.safetensors"
    tensors = load_file(str(f))
    key = next(k for k in tensors if "layer.0." in k and "lora_A" in k)
    tensors[key] = tensors[key] + 1.0
    save_file(tensors, str(f))
    for extra in (tmp_path / "ens" / "path_1").glob("*"):
        if extra.name not in ("adapter_model.safetensors", "adapter_config.json"):
            extra.unlink()  # keep the PEFT files only, so the edited tensors are what loads
    with pytest.raises(NEASError, match="trunk cannot be shared"):
        load_ensemble(_bert(), tmp_path / "ens")
