"""IncreLoRA: importance S = Σ|ΔW ⊙ ∂L/∂ΔW|/√numel; ranks grow at the scheduled steps to the budget, the
top-scored modules first; new tensors get their own optimizer group whose lr warms up; a grown adapter
saves and loads exactly; the rank trajectory PNG is written."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.forms.increlora import IncreLoRA, IncreLoRAArgs
from lorakit.models import tiny_llama
from lorakit.strategies import Strategy
from lorakit.strategies.increlora import IncreLoRARankGrowth
from lorakit.train import TrainConfig, Trainer

G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (10,), generator=G) for _ in range(32)]
SPEC = dict(form="increlora", form_args={"r": 1, "alpha": 4, "add_r": 1})


def collate(items):
    return {"input_ids": torch.stack(items)}


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def test_form_math_growth_and_importance():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5, bias=False)
    f = IncreLoRA(layer, IncreLoRAArgs(r=2, alpha=4, add_r=2))
    A, B, E = f.factors()
    assert A.shape == (4, 6) and B.shape == (5, 4) and E.shape == (4, 1)  # rank 2 + reserve 2
    assert torch.allclose(f.delta_weight(), B @ torch.diag(E[:, 0]) @ A * 4 / (2 + 1e-5))
    reserve_a = f.lora_A_res
    new = f.resize(4)
    assert f.rank == 4 and f.args.growths == 1 and f.lora_A_1 is reserve_a  # promoted, same tensor
    assert [tuple(p.shape) for p in new] == [(2, 1), (2, 6), (5, 2)]  # new e, new reserve a, b
    assert torch.allclose(f.lora_E_1.detach(), torch.full((2, 1), 1e-5))
    with pytest.raises(ValueError, match="steps of 2"):
        f.resize(5)
    # importance hook: S = Σ|ΔW ⊙ G| / √numel with G = ∂L/∂ΔW from the dense recomputation
    with torch.no_grad():
        for p in f.parameters():
            p.normal_()
    f.track_importance = True
    x = torch.randn(7, 6)
    ((f.apply(x, torch.zeros(7, 5)) ** 2).sum()).backward()
    W = f.delta_weight().detach().requires_grad_(True)
    ((x @ W.T) ** 2).sum().backward()
    expected = float((W.detach() * W.grad).abs().sum() / math.sqrt(W.numel()))
    assert f.importance == pytest.approx(expected, rel=1e-5)


class LrProbe(Strategy):
    name = "lr_probe"

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, step):
        self.lrs.append([g["lr"] for g in trainer.optimizer.param_groups])


def run(tmp_path, steps=10, **kw):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(**SPEC), seed=0)  # q_proj, v_proj × 2 layers = 4 modules
    strat = IncreLoRARankGrowth(**{"target_rank": 2, "top_h": 1, "init_warmup": 2, "interval": 2, **kw})
    probe = LrProbe()
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=2, schedule="constant",
                      progress=False, eval_at_start=False, out_dir=str(tmp_path))
    Trainer(model, DATA, collate, lm_loss, cfg, strategies=[strat, probe]).train(resume=False)
    return model, strat, probe


def test_ranks_grow_on_schedule_to_budget_following_importance(tmp_path):
    model, strat, _ = run(tmp_path, steps=12)
    assert strat.budget == 8
    grow_steps = [h["step"] for h in strat.history[1:]]
    assert grow_steps == [4, 6, 8, 10]  # t > init_warmup and t % interval == 0, until the budget
    totals = [sum(h["ranks"].values()) for h in strat.history]
    assert totals == [4, 5, 6, 7, 8]
    assert strat.done and strat.total_rank() == 8
    for prev, h in zip(strat.history, strat.history[1:]):
        (grown,) = h["grown"]
        assert h["ranks"][grown] == prev["ranks"][grown] + 1  # exactly the chosen module grew
    # the chosen module at the last round had the top score Ī·Ū
    assert strat.history[-1]["grown"][0] == max(strat.last_scores, key=strat.last_scores.get)
    for f in adapter_modules(model, "default").values():
        assert not f.track_importance and float(f.lora_E_res.abs().sum()) == 0  # reserves off at budget
    png = tmp_path / "increlora_ranks.png"
    assert png.exists() and png.stat().st_size > 1000
    assert json.loads((tmp_path / "increlora_ranks.json").read_text())["budget"] == 8


def test_new_groups_warm_up_their_own_lr(tmp_path):
    _, strat, probe = run(tmp_path, steps=12)
    assert len(probe.lrs[-1]) == 1 + 4  # the trainer's group + one group per growth
    first = strat.groups[0]  # created after step 4: its lr over steps 4, 5, 6, ...
    lrs = [row[first["index"]] for row in probe.lrs[first["start"]:]]
    assert lrs[:2] == pytest.approx([0.5e-2, 1e-2])  # warmup over 2 steps (the trainer's warmup)
    decay = [1e-2 * (12 - s) / (12 - 4 - 2) for s in range(6, 12)]
    assert lrs[2:] == pytest.approx(decay)  # then linear decay to 0 at the last step
    assert all(row[0] == pytest.approx(1e-2) for row in probe.lrs[2:])  # the main group is untouched


def test_grown_adapter_save_load_is_exact(tmp_path):
    model, strat, _ = run(tmp_path / "run", steps=8)
    ranks = strat.ranks()
    assert sorted(ranks.values()) != [1, 1, 1, 1]
    lorakit.save(model, tmp_path / "adapter")
    fresh = lorakit.load(tiny_llama(seed=0), tmp_path / "adapter")
    assert {p: f.rank for p, f in adapter_modules(fresh, "default").items()} == ranks
    a, b = lorakit.extract_state(model).tensors, lorakit.extract_state(fresh).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model.eval()
    x = DATA[0][None]
    assert torch.equal(model(input_ids=x).logits, fresh(input_ids=x).logits)


def test_needs_increlora_form():
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 2}), seed=0)
    cfg = TrainConfig(steps=1, batch_size=2, progress=False, eval_at_start=False)
    with pytest.raises(ValueError, match="rank_growth.*'increlora'"):
        Trainer(model, DATA, collate, lm_loss, cfg, strategies=[IncreLoRARankGrowth()]).train(resume=False)
