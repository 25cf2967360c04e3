"""Conformance over the catalog for hardware capabilities (issue 17): every form, init and strategy either
declares ``Cap.QUANTIZED_OK`` / ``Cap.LOW_PRECISION_OK`` and works there, or is refused with a message
naming the capability. Checks are chosen by declared capabilities, never by method name.

Quantized base: nf4 (bitsandbytes ``Linear4bit`` on CPU). The reference is the dense twin whose linears hold
the dequantized weights (what the quantized layer computes with): the same adapter, built under the same
seed from the same (dequantized) W, must give the same logits; gradients reach the adapter, never the base.
Reduced precision: bf16 autocast forward/backward against the fp32 run (bf16 tolerance); inits on a bf16 base.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch

import lorakit
from lorakit.core import registry
from lorakit.core.caps import Cap
from lorakit.core.quant import dequantize_model
from lorakit.models.loading import quantize_model, tiny_llama
from lorakit.train.trainer import TrainConfig, Trainer

pytest.importorskip("bitsandbytes")

FORMS = [e.name for e in registry.entries("form")]
INITS = [e.name for e in registry.entries("init")]
STRATEGIES = [e.name for e in registry.entries("strategy")]
FORM_CASES = [pytest.param(n, i, id=f"{n}-{i}") for n in FORMS for i in range(len(registry.get("form", n).examples()))]
TARGETS = ["q_proj", "v_proj", "down_proj"]
BASE = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)  # bnb's CPU kernels: in >= 64
QBASE = quantize_model(copy.deepcopy(BASE), "nf4")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    DENSE = dequantize_model(copy.deepcopy(QBASE))  # the reference: dense linears with the dequantized W
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
BATCHES = [torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(s)) for s in range(2)]
DATA = [torch.randint(3, 128, (10,), generator=torch.Generator().manual_seed(s)) for s in range(8)]


def _form_spec(name: str, index: int) -> lorakit.AdapterSpec:
    args = dataclasses.asdict(registry.get("form", name).examples()[index])
    return lorakit.AdapterSpec(form=name, form_args=args, targets=TARGETS)


def _perturb(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(ids).logits


def _collate(items):
    return torch.stack(items)


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


# -- forms -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,index", FORM_CASES)
def test_form_on_a_quantized_base_equals_the_dequantized_dense_reference(name, index):
    cls = registry.get("form", name)
    spec = _form_spec(name, index)
    if Cap.QUANTIZED_OK not in cls.caps:
        with pytest.raises(ValueError, match="QUANTIZED_OK"):
            lorakit.attach(copy.deepcopy(QBASE), spec, seed=0)
        return
    q = lorakit.attach(copy.deepcopy(QBASE), spec, seed=0)
    d = lorakit.attach(copy.deepcopy(DENSE), spec, seed=0)
    _perturb(q)
    _perturb(d)
    torch.testing.assert_close(_logits(q), _logits(d), rtol=1e-4, atol=1e-4)
    q.train()
    _loss(q, IDS).backward()
    trained = [p for p in q.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained)
    assert all(p.grad is None for p in q.parameters() if not p.requires_grad)


@pytest.mark.parametrize("name,index", FORM_CASES)
def test_form_in_bf16_autocast_matches_fp32_or_is_refused(name, index):
    cls = registry.get("form", name)
    spec = _form_spec(name, index)
    model = lorakit.attach(copy.deepcopy(BASE), spec, seed=0)
    if Cap.LOW_PRECISION_OK not in cls.caps:
        with pytest.raises(ValueError, match="LOW_PRECISION_OK"):
            Trainer(model, DATA, _collate, _loss, TrainConfig(steps=1, precision="bf16", progress=False))
        return
    _perturb(model)
    ref = _logits(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _logits(model)
    assert low.dtype == torch.bfloat16
    err = (low.float() - ref).abs().max() / ref.abs().max()
    # a routed form's top-k gates may pick other experts for near-tied scores in bf16: a looser bound
    bound = 0.15 if Cap.ROUTED in cls.caps else 0.05
    assert err < bound, f"bf16 autocast differs from fp32 by {err:.3g} (relative to the largest logit)"
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = _loss(model, IDS)
    loss.float().backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all() for p in trained)


# -- inits -------------------------------------------------------------------------------------------------

def _form_for(init_cls) -> str:
    ok = [f for f in FORMS if init_cls.requires in registry.get("form", f).caps]
    return "lora" if "lora" in ok else ok[0]


def _init_spec(name: str) -> lorakit.AdapterSpec:
    form = _form_for(registry.get("init", name))
    fields = {f.name for f in dataclasses.fields(registry.get("form", form).Args)}
    args = {k: v for k, v in {"r": 4, "alpha": 8.0}.items() if k in fields}
    return lorakit.AdapterSpec(form=form, form_args=args, init=name, targets=["q_proj", "v_proj"])


@pytest.mark.parametrize("name", INITS)
def test_init_on_a_quantized_base_reads_the_dequantized_weight_or_is_refused(name):
    cls = registry.get("init", name)
    spec = _init_spec(name)
    if Cap.QUANTIZED_OK not in cls.caps:
        q = copy.deepcopy(QBASE)
        with pytest.raises(ValueError, match="QUANTIZED_OK"):
            lorakit.attach(q, spec, seed=0, batches=BATCHES)
        assert not lorakit.specs(q)  # refused before any work: the model is unchanged
        return
    assert not cls.needs & (Cap.REWRITES_BASE | Cap.NEEDS_GRAD)  # a 4-bit W can neither be rewritten nor get grads
    q = lorakit.attach(copy.deepcopy(QBASE), spec, seed=0, batches=BATCHES)
    d = lorakit.attach(copy.deepcopy(DENSE), spec, seed=0, batches=BATCHES)
    for (n, a), (_, b) in zip(lorakit.extract_state(q).tensors.items(), lorakit.extract_state(d).tensors.items(),
                              strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=n)
    torch.testing.assert_close(_logits(q), _logits(d), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", INITS)
def test_init_on_a_bf16_base_runs_or_is_refused(name):
    cls = registry.get("init", name)
    spec = _init_spec(name)
    base = copy.deepcopy(BASE).to(torch.bfloat16)
    if Cap.LOW_PRECISION_OK not in cls.caps:
        with pytest.raises(ValueError, match="LOW_PRECISION_OK"):
            lorakit.attach(base, spec, seed=0, batches=BATCHES)
        return
    before = _logits(base).float()
    model = lorakit.attach(base, spec, seed=0, batches=BATCHES)
    state = lorakit.extract_state(model)
    assert all(torch.isfinite(t).all() for t in state.tensors.values() if t.is_floating_point())
    after = _logits(model).float()
    if Cap.REWRITES_BASE in cls.needs:  # the output is unchanged at init (W_res = W - ΔW0 rounded to bf16 once)
        assert (after - before).abs().max() <= 0.05 * before.abs().max()


# -- strategies --------------------------------------------------------------------------------------------

def _strategy_form(cls) -> str:
    ok = [f for f in FORMS if cls.requires in registry.get("form", f).caps
          and not registry.get("form", f).caps & cls.excludes]
    return "lora" if "lora" in ok else ok[0]


def _strategy_run(name: str, base, precision: str = "fp32"):
    cls = registry.get("strategy", name)
    form = _strategy_form(cls)
    model = lorakit.attach(copy.deepcopy(base), lorakit.AdapterSpec(form=form, targets=TARGETS), seed=0)
    cfg = TrainConfig(steps=2, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, eval_at_start=False,
                      precision=precision)
    return model, Trainer(model, DATA, _collate, _loss, cfg, strategies=[cls()])


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_on_a_quantized_base_trains_or_is_refused(name):
    cls = registry.get("strategy", name)
    if Cap.QUANTIZED_OK not in cls.caps:
        with pytest.raises(ValueError, match=f"strategy {name!r}.*QUANTIZED_OK"):
            _strategy_run(name, QBASE)
        return
    model, trainer = _strategy_run(name, QBASE)
    packed = {n: p.detach().clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    result = trainer.train(resume=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(torch.equal(p, packed[n]) for n, p in model.named_parameters() if n in packed)


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_in_bf16_trains_or_is_refused(name):
    cls = registry.get("strategy", name)
    if Cap.LOW_PRECISION_OK not in cls.caps:
        with pytest.raises(ValueError, match="LOW_PRECISION_OK"):
            _strategy_run(name, BASE, "bf16")
        return
    _, trainer = _strategy_run(name, BASE, "bf16")
    result = trainer.train(resume=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
