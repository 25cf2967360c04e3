"""IncreLoRA exact resume: a run that grew ranks before its checkpoint and grows again after it, killed and
resumed from the checkpoint, matches the uninterrupted run bit for bit (losses, adapter tensors, optimizer
state, per-group learning rates, the saved spec's growths, the rank trajectory)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import kill_at
from lorakit.core.inject import specs
from lorakit.models import tiny_llama
from lorakit.strategies import Strategy
from lorakit.strategies.increlora import IncreLoRARankGrowth
from lorakit.train import TrainConfig, Trainer

G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (10,), generator=G) for _ in range(32)]
# dropout > 0 so the resumed run also needs the RNG state; 4 modules (q, v × 2 layers), budget 8:
# growths after steps 4, 6, 8, 10; checkpoints at steps 5 and 10 (the second one after the budget is met)
SPEC = dict(form="increlora", form_args={"r": 1, "alpha": 4, "add_r": 1, "dropout": 0.1})


def collate(items):
    return {"input_ids": torch.stack(items)}


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


class LrProbe(Strategy):
    name = "lr_probe"

    def __init__(self):
        self.lrs = {}

    def on_before_optimizer_step(self, trainer, step):
        self.lrs[step] = [g["lr"] for g in trainer.optimizer.param_groups]


def make(out, extra=()):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(**SPEC), seed=0)
    strat = IncreLoRARankGrowth(target_rank=2, top_h=1, init_warmup=2, interval=2, plot=False)
    probe = LrProbe()
    cfg = TrainConfig(steps=12, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2, schedule="linear",
                      save_every=5, keep_checkpoints=3, progress=False, eval_at_start=False, out_dir=str(out))
    return model, strat, probe, Trainer(model, DATA, collate, lm_loss, cfg, strategies=[strat, probe, *extra])


def optimizer_state(trainer):
    sd = trainer.optimizer.state_dict()
    return sd["state"], [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    model, strat, probe, trainer = make(tmp_path_factory.mktemp("full"))
    return model, strat, probe, trainer, trainer.train(resume=False)


@pytest.mark.parametrize("kill, resumed_from", [(8, 5), (11, 10)])
def test_resume_after_growth_is_bit_identical(tmp_path, full, kill, resumed_from):
    full_model, full_strat, full_probe, full_trainer, full_result = full
    assert [h["step"] for h in full_strat.history[1:]] == [4, 6, 8, 10]
    _, _, _, trainer = make(tmp_path, extra=[kill_at(kill)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    model, strat, probe, resumed = make(tmp_path)  # a fresh process: the initial (ungrown) adapter
    result = resumed.train()
    assert result.resumed_from == resumed_from
    if resumed_from == 5:  # grew once before the checkpoint and grows three times after it
        assert [g["start"] for g in strat.groups] == [4, 6, 8, 10]
    assert result.losses == full_result.losses[resumed_from:]
    a, b = lorakit.extract_state(full_model).tensors, lorakit.extract_state(model).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert specs(model)["default"].module_args == specs(full_model)["default"].module_args  # saved growths
    assert strat.ranks() == full_strat.ranks() and strat.history == full_strat.history and strat.done
    assert strat.ipt == full_strat.ipt and strat.unc == full_strat.unc
    for step in range(resumed_from, 12):
        assert probe.lrs[step] == full_probe.lrs[step]  # every group's lr, the restarted warmups included
    (s1, g1), (s2, g2) = optimizer_state(full_trainer), optimizer_state(resumed)
    assert g1 == g2 and s1.keys() == s2.keys()
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])
    for name, f in lorakit.core.inject.adapter_modules(model, "default").items():  # reserves switched off
        assert float(f.lora_E_res.abs().sum()) == 0, name
    model.eval()
    full_model.eval()
    x = DATA[0][None]
    assert torch.equal(model(input_ids=x).logits, full_model(input_ids=x).logits)


def test_resume_without_the_strategy_is_refused_clearly(tmp_path, full):
    _, _, _, trainer = make(tmp_path, extra=[kill_at(6)])
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(**SPEC), seed=0)
    cfg = TrainConfig(steps=12, batch_size=4, grad_accum=2, lr=1e-2, save_every=5, progress=False,
                      eval_at_start=False, out_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"strategies: \['increlora'\] -> \[\]"):  # the resume check names it
        Trainer(model, DATA, collate, lm_loss, cfg).train()
