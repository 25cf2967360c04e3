"""CUDA checks (issue 17), run by ``scripts/gpu_check.sh`` on a machine with a GPU: every catalog form's
forward/backward in bf16 autocast on CUDA against fp32 on CUDA, a QLoRA (nf4) training step on CUDA equal
to the dequantized dense reference, the serving kernels on CUDA (Triton path against the torch reference),
and short timings (train step vs PEFT, decode vs the base model) written to ``$LORAKIT_GPU_OUT``."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.core import registry
from lorakit.core.caps import Cap
from lorakit.models.loading import quantize_model, tiny_llama

# every test here needs CUDA (a conftest.py here would shadow tests/conftest.py for `from conftest import ...`)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda")
FORM_CASES = [pytest.param(e.name, i, id=f"{e.name}-{i}") for e in registry.entries("form")
              for i in range(len(registry.get("form", e.name).examples()))]
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
TIMINGS: dict[str, float] = {}


def _out() -> Path:
    return Path(os.environ.get("LORAKIT_GPU_OUT", "bench/gpu_check/results"))


def _perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * 0.3).to(p.device))


@pytest.mark.parametrize("name,index", FORM_CASES)
def test_form_forward_backward_on_cuda_in_bf16(name, index):
    cls = registry.get("form", name)
    if Cap.LOW_PRECISION_OK not in cls.caps:
        pytest.skip(f"form {name!r} does not declare Cap.LOW_PRECISION_OK")
    args = dataclasses.asdict(cls.examples()[index])
    model = tiny_llama(hidden=64).to(CUDA)
    lorakit.attach(model, lorakit.AdapterSpec(form=name, form_args=args, targets=["q_proj", "v_proj", "down_proj"]),
                   seed=0)
    assert all(p.device.type == "cuda" for p in model.parameters())  # adapters built where the base is
    _perturb(model)
    ids = IDS.to(CUDA)
    with torch.no_grad():
        ref = model(ids).logits
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(ids).logits
    bound = 0.15 if Cap.ROUTED in cls.caps else 0.05
    assert (low.float() - ref).abs().max() / ref.abs().max() < bound
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.float().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_qlora_step_on_cuda_equals_the_dequantized_reference():
    pytest.importorskip("bitsandbytes")
    from lorakit.core.quant import dequantize_model

    base = tiny_llama(hidden=64)
    q = quantize_model(copy.deepcopy(base).to(CUDA), "nf4", compute_dtype=torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        d = dequantize_model(copy.deepcopy(q), torch.bfloat16)
    spec = lorakit.AdapterSpec(targets="all-linear", form_args={"r": 8, "alpha": 16})
    for m in (q, d):
        lorakit.attach(m, spec, seed=0)
        _perturb(m)
    ids = IDS.to(CUDA)
    with torch.no_grad():
        torch.testing.assert_close(q(ids).logits, d(ids).logits, rtol=2e-2, atol=2e-2)
    from lorakit.train.trainer import TrainConfig, Trainer

    data = [torch.randint(3, 128, (16,), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    packed = {n: p.detach().clone() for n, p in q.named_parameters() if p.dtype == torch.uint8}
    cfg = TrainConfig(steps=3, batch_size=4, lr=1e-2, warmup_steps=0, progress=False, eval_at_start=False,
                      precision="bf16", gradient_checkpointing=True, device="cuda")
    result = Trainer(q, data, torch.stack, lambda m, b: m(input_ids=b.to(CUDA), labels=b.to(CUDA)).loss,
                     cfg).train(resume=False)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(torch.equal(p, packed[n]) for n, p in q.named_parameters() if n in packed)


def test_serving_kernels_on_cuda_triton_vs_torch_reference(tmp_path):
    from peft import LoraConfig, get_peft_model

    from lorakit.serving import AdapterBank, batched_lora
    from lorakit.serving.kernels import triton_available

    base = tiny_llama(hidden=64)
    dirs = {}
    for i, r in enumerate((4, 16, 8)):
        torch.manual_seed(i)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=8,
                                                                     target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.2)
        dirs[f"a{i}"] = tmp_path / f"a{i}"
        peft_model.save_pretrained(dirs[f"a{i}"])
    bank = AdapterBank.for_model(copy.deepcopy(base).to(CUDA), budget_bytes=8 << 20)
    assert bank.device.type == "cuda"  # the pool follows the model
    for n, d in dirs.items():
        bank.add(n, d)
    slots = bank.slots(["a0", None, "a1", "a2", "a0", None, "a1", "a2"])
    x = torch.randn(8, 3, 64, device=CUDA)
    base_out = torch.randn(8, 3, 64, device=CUDA)
    backends = ["torch"] + (["triton"] if triton_available() else [])
    for layer in bank.layers.values():
        want = batched_lora(x, base_out.clone(), layer, slots, backend="torch")
        for backend in backends:
            for path in ("sgmv", "bgmv"):
                got = batched_lora(x, base_out.clone(), layer, slots, backend=backend, path=path)
                assert got.device.type == "cuda"
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    TIMINGS["triton_available"] = float(triton_available())


def _timed(fn, repeat=10) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


def test_timing_train_step_vs_peft_and_decode_vs_base():
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(hidden=256, layers=4, heads=8, kv_heads=4, vocab=1024, max_positions=512)
    ids = torch.randint(3, 1024, (8, 256), device=CUDA)

    def step_fn(model, opt):
        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    ours = lorakit.attach(copy.deepcopy(base).to(CUDA), lorakit.AdapterSpec(targets="all-linear",
                                                                             form_args={"r": 16, "alpha": 32}))
    theirs = get_peft_model(copy.deepcopy(base).to(CUDA), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    for m in (ours, theirs):
        m.train()
    t_ours = _timed(step_fn(ours, torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)))
    t_peft = _timed(step_fn(theirs, torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad],
                                                        lr=1e-4)))
    plain = copy.deepcopy(base).to(CUDA).eval()
    ours.eval()
    prompt = ids[:1, :16]

    def decode(model):
        def run():
            with torch.no_grad():
                model.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)
        return run

    t_base = _timed(decode(plain), repeat=3)
    t_adapted = _timed(decode(ours), repeat=3)
    TIMINGS.update(train_step_lorakit_s=t_ours, train_step_peft_s=t_peft, train_ratio=t_ours / t_peft,
                   decode_base_s=t_base, decode_lorakit_s=t_adapted, decode_ratio=t_adapted / t_base,
                   device=torch.cuda.get_device_name(0))
    out = _out()
    out.mkdir(parents=True, exist_ok=True)
    (out / "timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")
    print(f"gpu timings: train step lorakit/peft = {t_ours * 1e3:.1f}/{t_peft * 1e3:.1f} ms "
          f"({t_ours / t_peft:.2f}x); decode 32 tokens adapted/base = {t_adapted * 1e3:.0f}/{t_base * 1e3:.0f} ms")
    assert t_ours / t_peft < 3.0  # a gross regression only; the numbers are the point
