"""Ensemble of adapters on one base: the batched mixed-adapter pass equals each adapter run alone (dense
reference: the adapter active, a plain forward), for LM label scoring and a sequence-classification head;
cost accounting; prefix reuse equals the full pass and skips the shared layers."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import randomize_adapter
from lorakit.ensemble import Ensemble, EnsembleError, combine_logits
from lorakit.ensemble.ensemble import first_adapted_layer, select_rows
from lorakit.models import tiny_llama
from lorakit.train.objectives import last_token_logits

LABEL_IDS = [5, 9, 17]


def _lm_model(layers: int = 2, targets=None, names=("a", "b")):
    model = tiny_llama(hidden=32, layers=layers, heads=4, kv_heads=2, vocab=128, seed=0)
    spec = lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, **({"targets": targets} if targets else {}))
    for i, name in enumerate(names):
        lorakit.attach(model, spec, name=name, seed=i)
        randomize_adapter(model, name, seed=10 + i)
    return model.eval()


def _lm_batch(n: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(4, 10, (n,), generator=g)
    ids = torch.zeros(n, int(lengths.max()), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths.tolist()):
        ids[i, :length] = torch.randint(3, 128, (length,), generator=g)
        mask[i, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "last_index": mask.sum(1) - 1,
            "label_index": torch.randint(0, 3, (n,), generator=g)}


def _alone(model, name, batch):
    lorakit.set_active(model, [name])
    with torch.no_grad():
        return last_token_logits(model, batch)[:, LABEL_IDS].double()


def test_batched_ensemble_equals_members_run_alone():
    model, batch = _lm_model(), _lm_batch()
    ref = torch.stack([_alone(model, n, batch) for n in ("a", "b")])
    for combine, expected in (("mean_logits", ref.mean(0)), ("mean_probs", ref.softmax(-1).mean(0).log())):
        ens = Ensemble(model, ["a", "b"], combine, label_token_ids=LABEL_IDS)
        pred = ens.predict(batch)
        torch.testing.assert_close(pred.member_logits.double(), ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pred.logits, expected, atol=1e-5, rtol=1e-5)
        assert pred.cost.passes == 1 and pred.cost.rows == {"a": 5, "b": 5}
    # one forward per member gives the same scores, in K passes
    per = Ensemble(model, ["a", "b"], label_token_ids=LABEL_IDS, batched=False).predict(batch)
    torch.testing.assert_close(per.member_logits.double(), ref, atol=1e-5, rtol=1e-5)
    assert per.cost.passes == 2


def test_combine_closed_forms():
    z = torch.tensor([[[1.0, 0.0]], [[0.0, 3.0]]])
    assert torch.allclose(combine_logits(z, "mean_logits"), torch.tensor([[0.5, 1.5]], dtype=torch.float64))
    p = (torch.tensor([1.0, 0.0]).softmax(0) + torch.tensor([0.0, 3.0]).softmax(0)).double() / 2
    assert torch.allclose(combine_logits(z, "mean_probs").exp(), p[None])
    with pytest.raises(EnsembleError, match="unknown combine"):
        combine_logits(z, "vote")


def test_seq_cls_head_ensemble():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64,
                                                     num_labels=3)).eval()
    spec = lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, targets=["query", "value"],
                               modules_to_save=["classifier"])
    for i, name in enumerate(("a", "b")):
        lorakit.attach(model, spec, name=name, seed=i)
        randomize_adapter(model, name, seed=20 + i)
        with torch.no_grad():  # each adapter's own head copy
            model.classifier.adapters[name].weight.add_(torch.randn(3, 32) * 0.5)
    batch = _lm_batch(6, seed=1)
    ref = []
    for name in ("a", "b"):
        lorakit.set_active(model, [name])
        with torch.no_grad():
            ref.append(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double())
    ref = torch.stack(ref)
    pred = Ensemble(model, ["a", "b"], "mean_logits").predict(batch)
    assert pred.member_logits.shape == (2, 6, 3)
    torch.testing.assert_close(pred.member_logits.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pred.logits, ref.mean(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ref[0], ref[1])


def test_flop_estimate_closed_form():
    model, batch = _lm_model(), _lm_batch()
    ens = Ensemble(model, ["a", "b"], label_token_ids=LABEL_IDS)
    _, cost = ens.run(batch, ["a"])
    h, inter, kv, vocab = 32, 64, 16, 128  # kv: 2 kv heads x head dim 8
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * inter  # q, o; k, v; gate, up, down
    # LoRA r=4 on the default targets of each layer: r·(in + out) per adapted linear
    adapter = sum(p.numel() for f in lorakit.core.inject.adapter_modules(model, "a").values() for p in f.parameters())
    tokens = int(batch["attention_mask"].sum())
    assert cost.flops == 2 * tokens * (2 * per_layer + adapter) + 2 * 5 * h * vocab


def test_prefix_reuse_equals_full_pass_and_skips_lower_layers():
    model = _lm_model(layers=3, targets=r"model\.layers\.[12]\..*(q_proj|v_proj)")
    ens = Ensemble(model, ["a", "b"], label_token_ids=LABEL_IDS)
    assert ens.prefix_layer == 1
    batch = _lm_batch(6, seed=2)
    full, _ = ens.run(batch, ["b"])
    captured: dict = {}
    ens.run(batch, ["a"], capture=captured)
    calls = []
    hook = model.model.layers[0].register_forward_hook(lambda *a: calls.append(1))
    rows = torch.tensor([0, 3, 4])
    sub, length = select_rows(batch, rows)
    resumed, cost = ens.run(sub, ["b"], prefix=captured["hidden"][rows][:, :length])
    hook.remove()
    assert calls == []  # layer 0 never ran in the resumed pass
    torch.testing.assert_close(resumed[0], full[0, rows], atol=1e-5, rtol=1e-5)
    both, _ = ens.run(sub, ["a", "b"], prefix=captured["hidden"][rows][:, :length])  # batched over members too
    torch.testing.assert_close(both[1], full[0, rows], atol=1e-5, rtol=1e-5)
    # the estimate counts the layers that ran: 2 of 3 (+ adapters and head)
    _, plain = ens.run(sub, ["b"])
    assert cost.flops < plain.flops
    assert model.model.layers[0].__class__.__name__ == "LlamaDecoderLayer"  # restored


def test_prefix_refused_when_layer0_is_adapted():
    model = _lm_model()
    assert first_adapted_layer(model, ["a", "b"]) == 0
    ens = Ensemble(model, ["a", "b"], label_token_ids=LABEL_IDS)
    with pytest.raises(EnsembleError, match="prefix reuse"):
        ens.run(_lm_batch(), ["a"], capture={})


def test_select_rows_drops_rows_and_trailing_padding():
    batch = _lm_batch(5)
    lengths = batch["attention_mask"].sum(1)
    rows = torch.tensor([int(lengths.argmin())])
    sub, length = select_rows(batch, rows)
    assert sub["input_ids"].shape == (1, int(lengths.min())) and length == int(lengths.min())
    assert sub["last_index"].tolist() == [int(lengths.min()) - 1]


def test_bad_inputs():
    model = _lm_model()
    with pytest.raises(EnsembleError, match="not on the model"):
        Ensemble(model, ["a", "zzz"], label_token_ids=LABEL_IDS)
    with pytest.raises(EnsembleError, match="label_token_ids"):
        Ensemble(model, ["a", "b"], head="lm")
    with pytest.raises(EnsembleError, match="repeat"):
        Ensemble(model, ["a", "a"], label_token_ids=LABEL_IDS)
    with pytest.raises(EnsembleError, match="not members"):
        Ensemble(model, ["a"], label_token_ids=LABEL_IDS).run(_lm_batch(), ["b"])
