"""ALLoRA: the update is AdamW's step times c = 1/sqrt(‖θ_i‖² + η⁻²) per row; B leaves 0 faster than LoRA."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.inject import adapter_modules, specs
from lorakit.models import tiny_llama
from lorakit.strategies.allora import ALLoRA
from lorakit.train import TrainConfig, Trainer

G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (10,), generator=G) for _ in range(32)]


def collate(items):
    return {"input_ids": torch.stack(items)}


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def make(alpha=4.0, dropout=0.0):
    model = tiny_llama(seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 4, "alpha": alpha, "dropout": dropout}), seed=0)
    return model


def b_norm(model):
    return sum(f.lora_B.detach().norm() ** 2 for f in adapter_modules(model, "default").values()) ** 0.5


def run(model, strategies, steps=5):
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-3, warmup_steps=0, schedule="constant",
                      max_grad_norm=None, progress=False, eval_at_start=False)
    Trainer(model, DATA, collate, lm_loss, cfg, strategies=strategies).train(resume=False)
    return model


def test_one_step_equals_adamw_update_times_row_coefficient():
    torch.manual_seed(0)
    model = make()
    forms = adapter_modules(model, "default")
    with torch.no_grad():  # B != 0 so the row norms differ
        for f in forms.values():
            f.lora_B.normal_(0, 0.3)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = [p.detach().clone().requires_grad_(True) for p in params]
    eta = 2.0
    s = ALLoRA(eta=eta)
    s.param_groups(model, params)
    opt = s.wrap_optimizer(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01))
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.01)
    batch = collate(DATA[:4])
    lm_loss(model, batch).backward()
    for p, q in zip(params, ref):
        q.grad = p.grad.clone()
    old = [p.detach().clone() for p in params]
    opt.step()
    ref_opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    for p, q, o in zip(params, ref, old):
        row_c = 1 / torch.sqrt((o ** 2).sum(-1, keepdim=True) + eta ** -2)  # the formula, per row
        expected = o + row_c * (q.detach() - o)
        assert torch.allclose(p.detach(), expected, atol=1e-7), names[id(p)]
        assert not torch.allclose(p.detach(), q.detach())  # the coefficient did something


def test_B_leaves_zero_faster_than_lora():
    lora = run(make(alpha=4.0), [])  # plain LoRA, same scale 1 and no dropout
    lora_drop = run(make(alpha=8.0, dropout=0.1), [])  # the usual LoRA setting
    allora = run(make(alpha=4.0), [ALLoRA()])
    assert b_norm(allora) > 1.5 * b_norm(lora)
    assert b_norm(allora) > b_norm(lora_drop)


def test_override_folds_scale_and_drops_dropout():
    model = make(alpha=8.0, dropout=0.1)  # scale 2
    with torch.no_grad():
        for f in adapter_modules(model, "default").values():
            f.lora_B.normal_(0, 0.1)
    before = {p: f.delta_weight().clone() for p, f in adapter_modules(model, "default").items()}
    with pytest.warns(UserWarning, match="allora"):
        ALLoRA().prepare(model)
    for p, f in adapter_modules(model, "default").items():
        assert f.scaling == 1.0 and f.args.dropout == 0.0 and isinstance(f.dropout, torch.nn.Identity)
        assert torch.allclose(f.delta_weight(), before[p], atol=1e-7)  # ΔW unchanged
    assert specs(model)["default"].form_args["alpha"] == 4 and specs(model)["default"].form_args["dropout"] == 0


def test_override_survives_save_load(tmp_path):
    model = run(make(alpha=8.0, dropout=0.1), [ALLoRA()], steps=2)
    lorakit.save(model, tmp_path)
    fresh = tiny_llama(seed=0)
    lorakit.load(fresh, tmp_path)
    x = DATA[0][None]
    model.eval()
    assert torch.allclose(model(input_ids=x).logits, fresh(input_ids=x).logits, atol=1e-5)


def test_error_mode_names_the_fix():
    with pytest.raises(ValueError, match="--dropout 0 --alpha"):
        ALLoRA(on_conflict="error").prepare(make(alpha=8.0, dropout=0.1))
    with pytest.raises(ValueError, match="granularity"):
        ALLoRA(granularity="col")
