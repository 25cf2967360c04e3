"""DyLoRA: one r_max adapter serves at every rank b as ΔW_b = (α/b)·B[:, :b]·A[:b]; rank sampling makes
small ranks good; the sampled ranks are reproducible from the seed and across a resume."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lorakit
from conftest import kill_at
from lorakit.core.inject import adapter_modules
from lorakit.forms.dylora import DyLoRA, set_rank
from lorakit.models import tiny_llama
from lorakit.strategies.dylora import DyLoRARankSampling
from lorakit.train import TrainConfig, Trainer

R_MAX, ALPHA = 6, 12.0
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def _dylora_model(**form_args):
    model = tiny_llama(seed=0)
    args = {"r": R_MAX, "alpha": ALPHA, **form_args}
    lorakit.attach(model, lorakit.AdapterSpec(form="dylora", form_args=args,
                                              targets=["q_proj", "v_proj", "down_proj"]), seed=0)
    return model


def _train_with_strategy(model, strategy, steps=6, lr=5e-2):
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    trainer = SimpleNamespace(model=model)
    strategy.on_train_start(trainer)
    for step in range(steps):
        strategy.on_step_start(trainer, step)
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        strategy.on_step_end(trainer, step, {})


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_trained_adapter_at_every_rank_equals_dense_truncation(tmp_path):
    model = _dylora_model()
    _train_with_strategy(model, DyLoRARankSampling(seed=0))
    forms = adapter_modules(model, "default")
    assert all(f.lora_B.abs().sum() > 0 for f in forms.values())  # it trained
    g = torch.Generator().manual_seed(1)
    for b in range(1, R_MAX + 1):
        set_rank(model, b)
        for form in forms.values():
            a, bm = form.lora_A.detach(), form.lora_B.detach()
            dense = (ALPHA / b) * bm[:, :b] @ a[:b]  # the paper's ΔW_b, recomputed from the raw tensors
            torch.testing.assert_close(form.delta_weight(), dense, rtol=1e-6, atol=1e-7)
            x = torch.randn(5, form.in_features, generator=g)
            base_out = torch.randn(5, form.out_features, generator=g)
            with torch.no_grad():
                torch.testing.assert_close(form.apply(x, base_out), base_out + x @ dense.T,
                                           rtol=1e-5, atol=1e-6)
        # merging at b gives the same model as serving at b, and unmerging removes exactly that ΔW_b
        unmerged = _logits(model)
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
        lorakit.merge(model)
        torch.testing.assert_close(_logits(model), unmerged, rtol=1e-4, atol=1e-5)
        set_rank(model, max(1, b - 1))  # moving the rank while merged must not corrupt the unmerge
        lorakit.unmerge(model)
        for n, p in model.named_parameters():
            if n in weights:
                torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    # the serving rank is saved with the full r_max tensors and comes back on load
    set_rank(model, 2)
    lorakit.save(model, tmp_path / "a")
    fresh = lorakit.load(tiny_llama(seed=0), tmp_path / "a")
    fresh_forms = adapter_modules(fresh, "default")
    assert all(f.rank == 2 and f.lora_A.shape[0] == R_MAX for f in fresh_forms.values())
    # (the base weights of `model` went through merge/unmerge cycles: equal up to rounding)
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=1e-5, atol=1e-6)
    set_rank(fresh, R_MAX)
    set_rank(model, R_MAX)
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=1e-5, atol=1e-6)


def test_frozen_mode_trains_only_the_bth_component():
    model = _dylora_model(frozen=True)
    with torch.no_grad():
        for form in adapter_modules(model, "default").values():
            form.lora_B.normal_(0, 0.1)  # B = 0 would hide A's gradient
    set_rank(model, 3)
    model.train()
    model(IDS, labels=IDS).loss.backward()
    for form in adapter_modules(model, "default").values():
        ga, gb = form.lora_A.grad, form.lora_B.grad
        assert ga[2].abs().sum() > 0 and gb[:, 2].abs().sum() > 0  # the 3rd component learns
        assert ga[:2].abs().sum() == 0 and gb[:, :2].abs().sum() == 0  # lower ones are detached
        assert ga[3:].abs().sum() == 0 and gb[:, 3:].abs().sum() == 0  # higher ones are unused


# -- the toy of METHODS.md: 64×64 target with a 2^-i spectrum ------------------------------------
N, R_TOY = 64, 8


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(N, N, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x):
        return self.proj(x)


def _target() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(N, N, generator=g))
    v, _ = torch.linalg.qr(torch.randn(N, N, generator=g))
    return u @ torch.diag(2.0 ** -torch.arange(N, dtype=torch.float32)) @ v.T


def _fit(form: str, strategy: DyLoRARankSampling | None, target: torch.Tensor, steps=400, lr=1e-2):
    model = _Toy()
    lorakit.attach(model, lorakit.AdapterSpec(form=form, form_args={"r": R_TOY, "alpha": R_TOY},
                                              targets=["proj"]), seed=0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    x, trainer = torch.eye(N), SimpleNamespace(model=model)
    for step in range(steps):
        if strategy is not None:
            strategy.on_step_start(trainer, step)
        loss = ((model(x) - target.T) ** 2).mean()  # whitened inputs: the loss is ‖ΔW − T‖²/N²
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if strategy is not None:
            strategy.on_step_end(trainer, step, {})
    return adapter_modules(model, "default")["proj"]


def test_rank_sampling_beats_truncated_lora_at_small_ranks():
    target = _target()
    dy = _fit("dylora", DyLoRARankSampling(seed=0), target)
    lora = _fit("lora", None, target)

    def err(delta):
        return float((delta - target).norm() / target.norm())

    with torch.no_grad():
        dy_err = [err(dy.delta_weight_at(b)) for b in range(1, R_TOY + 1)]
        # a plain LoRA r_max adapter truncated to b (plain drop, its own α/r_max scale)
        lora_err = [err(lora.lora_B[:, :b] @ lora.lora_A[:b] * lora.scaling) for b in range(1, R_TOY + 1)]
    spectrum = 2.0 ** -torch.arange(N, dtype=torch.float64)
    best = [float(spectrum[b:].norm() / spectrum.norm()) for b in range(1, R_TOY + 1)]  # Eckart–Young floor
    for b in (1, 2):
        assert dy_err[b - 1] < 0.8 * lora_err[b - 1], (b, dy_err, lora_err)
        assert dy_err[b - 1] >= best[b - 1] - 1e-4
    assert lora_err[-1] < 0.1  # the LoRA baseline did fit at full rank: it is a fair comparison


# -- the strategy ----------------------------------------------------------------------------------
def test_sampled_ranks_are_reproducible_and_resume_exactly():
    def draws(s, n):
        return [s.sample(8) for _ in range(n)]

    full = draws(DyLoRARankSampling(seed=7), 60)
    assert full == draws(DyLoRARankSampling(seed=7), 60)
    assert full != draws(DyLoRARankSampling(seed=8), 60)
    assert set(full) == set(range(1, 9))  # uniform over 1..r_max: every rank shows up
    first = DyLoRARankSampling(seed=7)
    head = draws(first, 25)
    state = first.state_dict()
    second = DyLoRARankSampling(seed=7)
    second.load_state_dict(state)
    assert head + draws(second, 35) == full
    with pytest.raises(ValueError, match="seed"):
        DyLoRARankSampling(seed=1).load_state_dict(state)
    assert set(draws(DyLoRARankSampling(seed=0, r_min=3, r_max=5), 40)) == {3, 4, 5}


def test_one_rank_model_wide_and_serving_rank_restored_between_steps():
    model = tiny_llama(seed=0)
    spec = lorakit.AdapterSpec(form="dylora", form_args={"r": 8, "alpha": 8, "serve_rank": 5},
                               targets=["q_proj", "v_proj"],
                               module_args={"v_proj": {"r": 2, "serve_rank": 2}})
    lorakit.attach(model, spec, seed=0)
    forms = list(adapter_modules(model, "default").values())
    strategy, trainer = DyLoRARankSampling(seed=3), SimpleNamespace(model=model)
    seen = set()
    for step in range(12):
        strategy.on_step_start(trainer, step)
        b = strategy.last_rank
        seen.add(b)
        assert all(f.rank == min(b, f.r_max) for f in forms)  # one b for the whole model, clamped
        logs: dict = {}
        strategy.on_step_end(trainer, step, logs)
        assert logs["dylora_rank"] == b
        assert [f.rank for f in forms] == [5 if f.r_max == 8 else 2 for f in forms]  # serving ranks back
    assert len(seen) > 3


def _trainer(out, extra=()):
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(3, 128, (8,), generator=g) for _ in range(16)]
    model = _dylora_model()
    config = TrainConfig(steps=6, batch_size=4, lr=1e-2, progress=False, out_dir=str(out), save_every=2)
    trainer = Trainer(model, data, lambda items: {"input_ids": torch.stack(items)},
                      lambda m, batch: m(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss,
                      config, strategies=[DyLoRARankSampling(seed=11), *extra])
    return model, trainer


def _logged_ranks(out):
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["dylora_rank"] for r in records if "loss" in r]


def test_trainer_resume_draws_the_same_ranks(tmp_path):
    full_model, full = _trainer(tmp_path / "a")
    full.train()
    _, killed = _trainer(tmp_path / "b", extra=[kill_at(5)])
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    resumed_model, resumed = _trainer(tmp_path / "b")
    assert resumed.train().resumed_from == 4
    ranks = _logged_ranks(tmp_path / "a")
    assert len(ranks) == 6 and all(1 <= b <= R_MAX for b in ranks)
    assert _logged_ranks(tmp_path / "b") == ranks
    a, b = lorakit.extract_state(full_model).tensors, lorakit.extract_state(resumed_model).tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    forms = adapter_modules(full_model, "default").values()
    assert all(isinstance(f, DyLoRA) and f.rank == R_MAX for f in forms)  # serving rank after training


def test_strategy_refuses_a_model_without_rank_mutable_forms():
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form="lora", form_args={"r": 2, "alpha": 2}), seed=0)
    with pytest.raises(ValueError, match="rank-mutable"):
        DyLoRARankSampling().on_train_start(SimpleNamespace(model=model))
