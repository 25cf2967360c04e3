"""Bone (block-affine) and MiSS (shared shard): block math, exact unmerge, and real-PEFT cross-checks.

References are independent of the forms: a per-block loop for bat's ΔW, an explicit shard loop for
MiSS, and the real ``peft`` MissConfig (both directions) for files and logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_llama

TARGETS = ["q_proj", "k_proj", "down_proj"]  # 32×32, 16×32, 32×64 (out×in)
IDS = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
# peft variant -> (lorakit form, lorakit form_args, MissConfig kwargs)
VARIANTS = {
    "bat": ("bone", {"r": 8}, {"r": 8, "init_weights": "bat"}),
    "default": ("miss", {"r": 6}, {"r": 6}),  # 6 ∤ 32: padded trailing shard
    "mini": ("miss", {"r": 8, "mini_r": 4}, {"r": 8, "init_weights": "mini", "mini_r": 4}),
}


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _randomize(params, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _peft_model(kwargs, tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(seed=0), peft.MissConfig(target_modules=TARGETS, **kwargs))
    _randomize([p for n, p in model.named_parameters() if "miss_block" in n])
    model.eval()
    model.save_pretrained(tmp_path)
    return model


def test_bat_delta_matches_per_block_reference_and_unmerge_is_exact():
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form="bone", form_args={"r": 8}, targets=TARGETS), seed=0)
    # std 0.1 (‖Bn‖ ≈ 0.6): I + Bn well-conditioned, as trained blocks are
    _randomize([p for p in model.parameters() if p.requires_grad], std=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    for form in adapter_modules(model, "default").values():
        w, bn, r = form.base_weight.detach(), form.miss_block.detach(), 8
        ref = torch.zeros_like(w)
        for a in range(w.shape[0] // r):
            for b in range(w.shape[1] // r):
                blk = w[a * r:(a + 1) * r, b * r:(b + 1) * r]
                ref[a * r:(a + 1) * r, b * r:(b + 1) * r] = blk @ bn[a] + bn[a]  # ΔW_ab = W_ab·Bn_a + Bn_a
        torch.testing.assert_close(form.delta_weight(), ref, rtol=0, atol=1e-6)
    unmerged = _logits(model)
    lorakit.merge(model)
    torch.testing.assert_close(_logits(model), unmerged, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)  # W = (W' − Bn)(I + Bn)^{-1} per block
    worst = max((p - before[n]).abs().max().item() for n, p in model.named_parameters() if n in before)
    assert worst <= 1e-6, worst


def test_miss_delta_is_shared_shard_sum():
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form="miss", form_args={"r": 6}, targets=["q_proj"]), seed=0)
    _randomize([p for p in model.parameters() if p.requires_grad])
    form = next(iter(adapter_modules(model, "default").values()))
    d = form.miss_block.detach()  # (r, out)
    x = torch.randn(5, 32)
    shard_sum = torch.zeros(5, 6)
    for j in range(0, 32, 6):  # shards of 6, the last one (32 = 5·6 + 2) zero-padded
        chunk = x[:, j:j + 6]
        shard_sum[:, :chunk.shape[1]] += chunk
    base = torch.randn(5, 32)
    torch.testing.assert_close(form.apply(x, base), base + shard_sum @ d, rtol=1e-6, atol=1e-6)
    delta = torch.stack([d[c % 6] for c in range(32)], dim=1)  # ΔW[o, c] = D[c mod r, o]
    torch.testing.assert_close(form.delta_weight(), delta, rtol=0, atol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_peft_file_loads_with_equal_logits_and_merged_weights(variant, tmp_path):
    form_name, _, kwargs = VARIANTS[variant]
    theirs = _peft_model(kwargs, tmp_path)
    ours = lorakit.load(tiny_llama(seed=0), tmp_path)
    assert lorakit.specs(ours)["default"].form == form_name  # bat -> bone, default/mini -> miss
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    # the merged weights agree too (PEFT merge vs lorakit merge)
    merged_theirs = theirs.merge_and_unload().state_dict()
    merged_ours = lorakit.unload(ours, merge_active=True).state_dict()
    for key, value in merged_theirs.items():
        torch.testing.assert_close(merged_ours[key], value, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_lorakit_file_loads_in_peft_with_equal_logits(variant, tmp_path):
    peft = pytest.importorskip("peft")
    form_name, form_args, kwargs = VARIANTS[variant]
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form=form_name, form_args=form_args, targets=TARGETS), seed=0)
    _randomize([p for p in model.parameters() if p.requires_grad])
    lorakit.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MISS" and config["init_weights"] == kwargs.get("init_weights", True)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), _logits(model), rtol=1e-5, atol=1e-5)
    # and PEFT's unmerge of a bat merge lands on the same base weights as lorakit's
    if form_name == "bone":
        theirs.merge_adapter()
        theirs.unmerge_adapter()
        fresh = tiny_llama(seed=0).state_dict()
        for name, p in theirs.base_model.model.named_parameters():
            key = name.replace(".base_layer", "")
            if key in fresh:
                torch.testing.assert_close(p, fresh[key], rtol=0, atol=1e-5)


def test_bone_era_peft_file_loads_as_miss(tmp_path):
    """peft_type "BONE" with ``bone_block`` tensors (PEFT's BoneConfig, before the MiSS rename)."""
    theirs = _peft_model(VARIANTS["bat"][2], tmp_path / "miss")
    legacy = tmp_path / "bone"
    legacy.mkdir()
    config = json.loads((tmp_path / "miss" / "adapter_config.json").read_text())
    for key in ("mini_r", "miss_dropout"):
        config.pop(key)
    config["peft_type"] = "BONE"
    (legacy / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(tmp_path / "miss" / "adapter_model.safetensors"))
    save_file({k.replace(".miss_block", ".bone_block"): v for k, v in tensors.items()},
              str(legacy / "adapter_model.safetensors"))
    state = lorakit.load_state(legacy)
    assert state.spec.form == "bone" and all(k.endswith(".miss_block") for k in state.tensors)
    ours = lorakit.load(tiny_llama(seed=0), legacy)
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=1e-5, atol=1e-5)
    lorakit.save(ours, tmp_path / "resaved")  # written back as MISS
    assert json.loads((tmp_path / "resaved" / "adapter_config.json").read_text())["peft_type"] == "MISS"


def test_bad_shapes_are_refused():
    model = tiny_llama(seed=0)
    with pytest.raises(ValueError, match="r×r blocks"):
        lorakit.attach(model, lorakit.AdapterSpec(form="bone", form_args={"r": 12}, targets=["q_proj"]))
    with pytest.raises(ValueError, match="mini_r=3 must divide"):
        lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(form="miss", form_args={"r": 4, "mini_r": 3},
                                                                targets=["q_proj"]))


@pytest.mark.parametrize("form_name,form_args", [("bone", {"r": 8}), ("miss", {"r": 6})])
def test_conv1d_layout(form_name, form_args):
    """GPT-2 Conv1D stores (in, out); ΔW and merge work on the (out, in) view (PEFT's MiSS cannot)."""
    from lorakit.models import tiny_gpt2

    model = tiny_gpt2(seed=0)
    spec = lorakit.AdapterSpec(form=form_name, form_args=form_args, targets=["c_attn", "c_fc"])
    lorakit.attach(model, spec, seed=0)
    _randomize([p for p in model.parameters() if p.requires_grad])
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    for form in adapter_modules(model, "default").values():
        x, base = torch.randn(3, form.in_features), torch.randn(3, form.out_features)
        dense = base + x @ form.delta_weight().T
        torch.testing.assert_close(form.apply(x, base), dense, rtol=1e-5, atol=1e-5)
    unmerged = _logits(model)
    lorakit.merge(model)
    torch.testing.assert_close(_logits(model), unmerged, rtol=1e-5, atol=1e-5)
    lorakit.unmerge(model)
    for n, p in model.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
