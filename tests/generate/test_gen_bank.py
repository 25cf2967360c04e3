"""The checkpoint bank: flatten/unflatten is exact, per-tensor stats are torch's, misaligned banks are refused."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.core.extract import extract_state
from lorakit.core.spec import AdapterSpec
from lorakit.generate import BankError, BankLayout, CheckpointBank
from lorakit.io.peft import load_state, save_state
from lorakit.models import tiny_llama


def _state(rank: int = 2, seed: int = 0, targets=("q_proj", "v_proj"), model=None):
    model = model or tiny_llama(seed=0)
    lorakit.attach(model, AdapterSpec(form_args={"r": rank, "alpha": 2 * rank}, targets=list(targets)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return extract_state(model, "default")


def _bank(tasks=3, ckpts=4):
    return CheckpointBank.from_states(
        (f"t{i}", f"task number {i}", [_state(seed=10 * i + m) for m in range(ckpts)]) for i in range(tasks))


def test_flatten_unflatten_roundtrip_is_exact_and_saves_as_peft(tmp_path):
    s = _state(seed=3)
    layout = BankLayout.of(s)
    x = layout.flatten(s)
    assert x.shape == (layout.dim,) == (sum(t.numel() for t in s.tensors.values()),)
    back = layout.unflatten(x)
    assert set(back.tensors) == set(s.tensors)
    for k in s.tensors:
        assert torch.equal(back.tensors[k], s.tensors[k])
    save_state(back, tmp_path / "a")
    again = load_state(tmp_path / "a")
    model = tiny_llama(seed=0)
    lorakit.apply_state(model, again)
    ref = tiny_llama(seed=0)
    lorakit.apply_state(ref, s)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6)


def test_tensor_stats_and_normalize_match_torch_per_tensor():
    bank = _bank(2, 3)
    x, _ = bank.all_vectors()
    mean, std = bank.layout.tensor_stats(x)
    for i, slot in enumerate(bank.layout.slots):
        seg = x[:, slot.offset:slot.offset + slot.numel]
        assert torch.allclose(mean[i], seg.mean()) and torch.allclose(std[i], seg.std())  # unbiased, as ICM-LoRA
    z = bank.layout.normalize(x, (mean, std))
    slot = bank.layout.slots[1]
    seg = z[:, slot.offset:slot.offset + slot.numel]
    assert abs(seg.mean().item()) < 1e-5 and abs(seg.std().item() - 1) < 1e-4
    assert torch.allclose(bank.layout.denormalize(z, (mean, std)), x, atol=1e-6)


def test_prototype_variance_and_spread():
    bank = _bank(3, 4)
    t = bank.tasks[1]
    assert torch.allclose(t.prototype, t.vectors.mean(0))
    assert torch.allclose(t.variance, ((t.vectors - t.vectors.mean(0)) ** 2).mean(0))
    s = bank.spread()
    protos = bank.prototypes()
    d01 = (protos[0] - protos[1]).norm()
    d02, d12 = (protos[0] - protos[2]).norm(), (protos[1] - protos[2]).norm()
    assert s["between_task_mean"] == pytest.approx(float((d01 + d02 + d12) / 3), rel=1e-5)
    assert s["within_task_rms"] > 0


@pytest.mark.parametrize("other, words", [
    (dict(rank=4), "shape mismatch"),
    (dict(targets=("q_proj",)), "missing"),
    (dict(targets=("q_proj", "v_proj", "k_proj")), "extra"),
])
def test_misaligned_checkpoints_are_refused_by_name(other, words):
    with pytest.raises(BankError, match=words):
        CheckpointBank.from_states([("a", "", [_state()]), ("b", "", [_state(**other)])])


def test_other_base_is_refused():
    with pytest.raises(BankError, match="another base"):
        CheckpointBank.from_states([("a", "", [_state()]), ("b", "", [_state(model=tiny_llama(seed=5))])])


def test_save_load_roundtrip_and_corrupt_banks(tmp_path):
    bank = _bank(2, 3)
    bank.save(tmp_path / "bank")
    back = CheckpointBank.load(tmp_path / "bank")
    assert back.task_ids == bank.task_ids and back.descriptions == bank.descriptions
    assert torch.equal(back.all_vectors()[0], bank.all_vectors()[0])
    assert back.layout.slots == bank.layout.slots
    data = json.loads((tmp_path / "bank" / "bank.json").read_text())
    data["tasks"][0]["checkpoints"] = 7
    (tmp_path / "bank" / "bank.json").write_text(json.dumps(data))
    with pytest.raises(BankError, match="shape"):
        CheckpointBank.load(tmp_path / "bank")
    data["tasks"][0]["checkpoints"] = 3
    data["layout"]["slots"][0][1] = [-1, 3]
    (tmp_path / "bank" / "bank.json").write_text(json.dumps(data))
    with pytest.raises(BankError, match="slots"):
        CheckpointBank.load(tmp_path / "bank")
    (tmp_path / "bank" / "bank.safetensors").write_bytes(b"\x00" * 40)
    data["layout"]["slots"][0][1] = list(bank.layout.slots[0].shape)
    (tmp_path / "bank" / "bank.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="corrupt|safetensors"):
        CheckpointBank.load(tmp_path / "bank")
    with pytest.raises(BankError, match="not a bank"):
        CheckpointBank.load(tmp_path)


def test_bad_vectors_are_refused():
    bank = _bank(1, 1)
    with pytest.raises(BankError, match="last dimension"):
        bank.layout.unflatten(torch.zeros(bank.layout.dim + 1))
    with pytest.raises(BankError, match="NaN"):
        bank.layout.unflatten(torch.full((bank.layout.dim,), float("nan")))


def test_from_folders_sorts_checkpoints_by_number(tmp_path):
    states = [_state(seed=s) for s in range(3)]
    task = tmp_path / "task_a"
    for name, s in zip(["epoch_10", "epoch_2", "epoch_1"], states):
        save_state(s, task / name)
    (task / "task.json").write_text(json.dumps({"task_id": "a", "description": "animals"}))
    bank = CheckpointBank.from_folders([task])
    assert bank.task_ids == ["a"] and bank.descriptions == ["animals"]
    layout = bank.layout
    order = [layout.flatten(states[i]) for i in (2, 1, 0)]  # epoch_1, epoch_2, epoch_10
    assert torch.allclose(bank.tasks[0].vectors, torch.stack(order))
