"""Quantized bases (bitsandbytes on CPU): loading, the adapted layer over Linear4bit/Linear8bitLt, refusals
of merges and base rewrites, dequantize-then-merge, QLoRA training through the Trainer, finetune and the CLI.

References: the dense model whose linears hold the dequantized weights (what the quantized layer computes
with), and transformers' own ``from_pretrained(quantization_config=...)``.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import lorakit
from lorakit.core.inject import adapted_layers
from lorakit.core.quant import (
    QuantizedBaseError,
    dequantize_model,
    dequantized_weight,
    is_quantized,
    quant_type,
    quantized_bytes,
)
from lorakit.models.loading import load_model, quantize_model, tiny_llama
from lorakit.train.trainer import TrainConfig, Trainer

try:
    from tests.conftest import save_tiny_model_dir
except ModuleNotFoundError:
    from conftest import save_tiny_model_dir

pytest.importorskip("bitsandbytes")

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
BASE = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)  # in_features >= 64 (bnb block)
SPEC = lorakit.AdapterSpec(targets="all-linear", form_args={"r": 4, "alpha": 8})


def logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def randomize(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("quant", ["nf4", "fp4", "int8"])
def test_adapted_quantized_layer_equals_dense_dequantized_reference(quant):
    q = quantize_model(copy.deepcopy(BASE), quant)
    layers = [m for m in q.modules() if is_quantized(m)]
    assert len(layers) == 14 and {quant_type(m) for m in layers} == {quant}
    assert not is_quantized(q.lm_head)
    with pytest.warns(UserWarning, match="dequantized 14"):
        dense = dequantize_model(copy.deepcopy(q))
    assert not any(is_quantized(m) for m in dense.modules())
    for a, b in ((q, dense),):
        lorakit.attach(a, SPEC, seed=0)
        lorakit.attach(b, SPEC, seed=0)
        randomize(a)
        randomize(b)
    # the adapted quantized layer = quantized base + adapter delta; its dequantized W is what it computes with
    tol = 1e-5 if quant != "int8" else 5e-2  # int8 quantizes activations too (LLM.int8())
    torch.testing.assert_close(logits(q), logits(dense), rtol=tol, atol=tol)
    layer = q.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64)
    ref = x @ dequantized_weight(layer.base_layer).float().T + layer.adapters["default"].apply(x, torch.zeros(3, 64))
    torch.testing.assert_close(layer(x), ref, rtol=tol, atol=tol)


def test_nf4_base_bytes_are_under_a_third_of_fp32_for_the_linear_layers():
    fp32 = sum(m.weight.numel() * 4 for m in BASE.modules() if type(m) is nn.Linear and m is not BASE.lm_head)
    q = quantize_model(copy.deepcopy(BASE), "nf4")
    head_and_rest = quantized_bytes(BASE) - fp32
    nf4 = quantized_bytes(q) - head_and_rest
    assert nf4 <= 0.3 * fp32  # 4 bits + one fp32 absmax per 64 values = 0.141 of fp32


def test_merge_refuses_on_a_quantized_base_and_works_after_dequantizing():
    q = lorakit.attach(quantize_model(copy.deepcopy(BASE), "nf4"), SPEC, seed=0)
    randomize(q)
    adapted = logits(q)
    with pytest.raises(QuantizedBaseError, match="dequantize the base first"):
        lorakit.merge(q)
    with pytest.raises(QuantizedBaseError):
        lorakit.unload(q)  # unload merges by default
    assert all(not layer.merged for _, layer in adapted_layers(q))  # the refusal changed nothing
    torch.testing.assert_close(logits(q), adapted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dequantize_model(q)
    lorakit.merge(q)  # exact into the dense (dequantized) base
    torch.testing.assert_close(logits(q), adapted, rtol=1e-5, atol=1e-5)
    plain = lorakit.unload(q)
    assert not list(adapted_layers(plain))
    torch.testing.assert_close(logits(plain), adapted, rtol=1e-5, atol=1e-5)


def test_unload_without_merge_keeps_the_quantized_base():
    q = lorakit.attach(quantize_model(copy.deepcopy(BASE), "nf4"), SPEC, seed=0)
    base = lorakit.unload(q, merge_active=False)
    assert is_quantized(base.model.layers[0].self_attn.q_proj)
    torch.testing.assert_close(logits(base), logits(quantize_model(copy.deepcopy(BASE), "nf4")))


@pytest.mark.parametrize("init", ["pissa", "ldu"])
def test_base_rewriting_inits_refuse_a_quantized_base(init):
    q = quantize_model(copy.deepcopy(BASE), "nf4")
    spec = lorakit.AdapterSpec(targets=["q_proj"], form_args={"r": 4, "alpha": 8}, init=init)
    with pytest.raises(ValueError, match="QUANTIZED_OK"):
        lorakit.attach(q, spec, seed=0)
    assert not list(adapted_layers(q))  # a refused init leaves the model as it was


def _collate(items):
    return torch.stack(items)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("precision,checkpointing", [("fp32", False), ("bf16", True)])
def test_qlora_training_step_moves_only_the_adapter(precision, checkpointing):
    q = lorakit.attach(quantize_model(copy.deepcopy(BASE), "nf4"), SPEC, seed=0)
    packed = {n: p.detach().clone() for n, p in q.named_parameters() if p.dtype == torch.uint8}
    before = {n: p.detach().clone() for n, p in q.named_parameters() if p.requires_grad}
    data = [torch.randint(3, 128, (12,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    cfg = TrainConfig(steps=3, batch_size=4, lr=5e-2, warmup_steps=0, progress=False, eval_at_start=False,
                      precision=precision, gradient_checkpointing=checkpointing, quantize="nf4")
    result = Trainer(q, data, _collate, _loss, cfg).train(resume=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert any(not torch.equal(p, before[n]) for n, p in q.named_parameters() if n in before)
    assert all(p.dtype == torch.float32 for n, p in q.named_parameters() if n in before)  # fp32 masters
    for n, p in q.named_parameters():
        if n in packed:
            assert torch.equal(p, packed[n]), n  # the 4-bit base never changes


def test_strategies_that_train_base_weights_refuse_a_quantized_base():
    from lorakit.strategies.lisa import LISA

    q = lorakit.attach(quantize_model(copy.deepcopy(BASE), "nf4"), SPEC, seed=0)
    with pytest.raises(ValueError, match="strategy 'lisa'.*QUANTIZED_OK"):
        Trainer(q, [IDS[0]], _collate, _loss, TrainConfig(steps=1, progress=False), strategies=[LISA()])


def test_unknown_quantize_and_device_are_refused():
    with pytest.raises(ValueError, match="unknown quantize 'nf3'"):
        TrainConfig(quantize="nf3")
    with pytest.raises(ValueError, match="unknown quantize"):
        load_model("/nonexistent", quantize="int4")
    with pytest.raises(ValueError, match="device"):
        TrainConfig(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            TrainConfig(device="cuda:0")


WORDS = ["good", "bad", "fine", "film", "plot", "was", "great", "awful", "the", "a"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny"), WORDS)


def test_load_model_quantizes_through_transformers_like_quantize_model(tmp_path):
    d = tmp_path / "m"
    BASE.save_pretrained(d)
    from transformers import AutoTokenizer  # noqa: F401  (load_model needs a tokenizer in the folder)

    save_tiny_model_dir(tmp_path / "t", WORDS)
    for f in (tmp_path / "t").glob("*token*"):
        (d / f.name).write_bytes(f.read_bytes())
    model, tok = load_model(d, quantize="nf4", progress=False)
    assert is_quantized(model.model.layers[0].mlp.down_proj) and not is_quantized(model.lm_head)
    torch.testing.assert_close(logits(model), logits(quantize_model(copy.deepcopy(BASE), "nf4")))
    # an adapter trained on the quantized base loads onto it again (the fingerprint reads dequantized W)
    lorakit.attach(model, SPEC, seed=0)
    randomize(model)
    lorakit.save(model, tmp_path / "a")
    again, _ = load_model(d, quantize="nf4", progress=False)
    torch.testing.assert_close(logits(lorakit.load(again, tmp_path / "a")), logits(model))


def test_cli_train_quantize_writes_a_peft_adapter(model_dir, tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    data = tmp_path / "d.jsonl"
    rows = [{"text": f"the film was {w}", "label": w} for w in ["good", "bad"] * 12]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--model", str(model_dir), "--data", str(data), "--steps", "2",
                                      "--batch-size", "4", "--quantize", "nf4", "--device", "cpu",
                                      "--targets", "q_proj,v_proj", "--out", str(out), "--n-eval", "4"])
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "train_spec.json").read_text())
    assert spec["trainer"]["quantize"] == "nf4" and spec["trainer"]["device"] == "cpu"
    assert (out / "adapter_model.safetensors").is_file()
    bad = CliRunner().invoke(app, ["train", "--model", str(model_dir), "--data", str(data), "--quantize", "q3",
                                   "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "unknown quantize" in bad.output


@pytest.mark.slow
def test_embedded_smollm2_trains_on_an_nf4_base_from_the_cli(tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--quantize", "nf4", "--precision", "bf16", "--gradient-checkpointing",
                                      "--device", "cpu", "--steps", "2", "--batch-size", "4", "--n-train", "16",
                                      "--n-eval", "8", "--max-length", "48", "--targets", "all-linear",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_config"]["quantize"] == "nf4" and summary["steps"] == 2
    model, _ = load_model(quantize="nf4", progress=False)
    assert sum(is_quantized(m) for m in model.modules()) == 210  # every linear layer but the (tied) head
    ids = torch.randint(3, 1000, (1, 12))
    adapted = lorakit.load(model, out)
    with torch.no_grad():
        assert torch.isfinite(adapted(ids).logits).all()
