"""Device handling without a GPU: adapters are built where the base computes (checked on the 'meta'
device, where any tensor silently created on the CPU shows up), the serving bank's device pool follows the
model, and device names are parsed strictly (no silent CPU fallback for a CUDA request)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import lorakit
from lorakit.core import registry
from lorakit.models import tiny_llama
from lorakit.train.trainer import parse_device

CASES = [pytest.param(e.name, i, id=f"{e.name}-{i}") for e in registry.entries("form")
         for i in range(len(registry.get("form", e.name).examples()))]


@pytest.mark.parametrize("name,index", CASES)
def test_adapters_live_on_the_base_device(name, index):
    model = tiny_llama(hidden=64).to("meta")
    args = dataclasses.asdict(registry.get("form", name).examples()[index])
    try:
        lorakit.attach(model, lorakit.AdapterSpec(form=name, form_args=args, targets=["q_proj", "v_proj"]), seed=0)
    except (NotImplementedError, RuntimeError) as e:  # a construction that reads W's values (LU, masks)
        assert "meta" in str(e)
        return
    devices = {t.device.type for n, t in [*model.named_parameters(), *model.named_buffers()] if ".adapters." in n}
    assert devices == {"meta"}
    out = model(torch.zeros(1, 4, dtype=torch.long, device="meta")).logits
    assert out.device.type == "meta"


def test_serving_bank_pool_follows_the_model_device():
    from lorakit.serving.bank import AdapterBank

    bank = AdapterBank.for_model(tiny_llama(hidden=64).to("meta"), budget_bytes=1 << 20)
    assert bank.device.type == "meta"
    assert all(layer.A_pool.device.type == "meta" for layer in bank.layers.values())
    assert AdapterBank.for_model(tiny_llama(hidden=64), budget_bytes=1 << 20, device="cpu").device.type == "cpu"


def test_device_names():
    assert parse_device("auto") is None
    assert parse_device("cpu") == torch.device("cpu")
    for bad in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(ValueError, match="device"):
            parse_device(bad)
    if not torch.cuda.is_available():
        for want in ("cuda", "cuda:1"):
            with pytest.raises(ValueError, match="no CUDA device"):
                parse_device(want)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_refuses_a_cuda_device_this_machine_lacks(tmp_path):
    from typer.testing import CliRunner

    from lorakit.cli import app

    for argv in (["serve", "--device", "cuda"], ["train", "--device", "cuda:0", "--out", str(tmp_path / "r")],
                 ["train", "--device", "gpu", "--out", str(tmp_path / "r")]):
        result = CliRunner().invoke(app, argv)
        assert result.exit_code == 2, (argv, result.output)
        assert "device" in result.output
    assert not (tmp_path / "r").exists()  # refused before any model loads
