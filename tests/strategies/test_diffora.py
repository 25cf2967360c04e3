"""DiffoRA: on a toy where only 2 of 6 candidate modules can reduce the loss, the relaxed module selection
(architecture weights trained alternately with the LoRA weights) picks exactly those two; after the
discretisation only they carry the adapter (and the adapter's spec lists only them) and training goes on."""

from __future__ import annotations

import json

import torch
from torch import nn

import lorakit
from lorakit.core.inject import adapter_modules, specs
from lorakit.core.spec import AdapterSpec
from lorakit.strategies.diffora import DiffoRA
from lorakit.train import TrainConfig, Trainer

N, D, PLANTED = 6, 4, ("m1", "m4")


class Toy(nn.Module):
    """y = Σ_i L_i(x_i): candidate module i only sees its own input chunk x_i."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        for i in range(N):
            setattr(self, f"m{i}", nn.Linear(D, D, bias=False))

    def forward(self, x):
        return sum(getattr(self, f"m{i}")(x[:, i * D:(i + 1) * D]) for i in range(N))


def make_data(n=256):
    teacher = Toy()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # the target differs from the base only in the planted modules
        for name in PLANTED:
            getattr(teacher, name).weight.add_(torch.randn(D, D, generator=g))
        x = torch.randn(n, N * D, generator=g)
        y = teacher(x)
    return [(x[i], y[i]) for i in range(n)]


def collate(items):
    return torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])


def mse(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def run(strategy, steps=120, out=None):
    model = Toy()
    lorakit.attach(model, AdapterSpec(form_args={"r": 4, "alpha": 4}, targets=[f"m{i}" for i in range(N)]), seed=0)
    data = make_data()
    cfg = TrainConfig(steps=steps, batch_size=32, lr=2e-2, progress=False, eval_at_start=False, warmup_steps=0,
                      schedule="constant", max_grad_norm=None, out_dir=str(out) if out else None)
    res = Trainer(model, data, collate, mse, cfg, strategies=[strategy] if strategy else []).train(resume=False)
    return model, res


def test_selection_recovers_planted_modules(tmp_path):
    s = DiffoRA(search_steps=80, select=2, arch_lr=5e-2)
    model, res = run(s, out=tmp_path / "run")
    assert s.selected == sorted(PLANTED)
    top = sorted(s.gates, key=s.gates.get)[-2:]
    assert sorted(top) == sorted(PLANTED)
    assert min(s.gates[p] for p in PLANTED) > max(v for p, v in s.gates.items() if p not in PLANTED)
    assert sorted(adapter_modules(model, "default")) == sorted(PLANTED)
    assert res.losses[-1] < 0.05 * res.losses[0]
    assert specs(model)["default"].targets == sorted(PLANTED)
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert any(r.get("diffora_selected") == 2 for r in logged)


def test_fold_keeps_function_and_joint_schedule_also_recovers():
    s = DiffoRA(search_steps=60, select=2, arch_lr=5e-2, schedule="joint")
    model = Toy()
    lorakit.attach(model, AdapterSpec(form_args={"r": 4, "alpha": 4}, targets=[f"m{i}" for i in range(N)]), seed=0)
    data = make_data()
    cfg = TrainConfig(steps=60, batch_size=32, lr=2e-2, progress=False, eval_at_start=False, warmup_steps=0,
                      schedule="constant", max_grad_norm=None)
    trainer = Trainer(model, data, collate, mse, cfg, strategies=[s])
    x = torch.stack([a for a, _ in data[:8]])
    seen = {}
    orig = s.discretize

    def spy(m):  # the relaxed model restricted to the selected modules == the discretised model
        with torch.no_grad():
            keep = {p for p, v in sorted(s.gate_values().items(), key=lambda kv: -kv[1])[:2]}
            for p, f in adapter_modules(m, "default").items():
                if p not in keep:
                    f.lora_B.zero_()
            seen["relaxed"] = m(x)
        out = orig(m)
        with torch.no_grad():
            seen["discrete"] = m(x)
        return out

    s.discretize = spy
    trainer.train(resume=False)
    assert s.selected == sorted(PLANTED)
    torch.testing.assert_close(seen["discrete"], seen["relaxed"])
