"""LISA: only the γ sampled blocks + embeddings/norm/head change within a K-step window; sampling is
reproducible from the seed; the AdamW state of frozen blocks is released; the output is a full checkpoint."""

from __future__ import annotations

import contextlib

import torch

import lorakit
from conftest import kill_at
from lorakit.models import tiny_llama
from lorakit.strategies import Strategy
from lorakit.strategies.lisa import LISA, optimizer_state_bytes
from lorakit.train import TrainConfig, Trainer

G = torch.Generator().manual_seed(0)
DATA = [torch.randint(3, 128, (10,), generator=G) for _ in range(32)]


def collate(items):
    return {"input_ids": torch.stack(items)}


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss


def trainer_for(model, strategies, steps, out=None):
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, progress=False, eval_at_start=False,
                      warmup_steps=0, schedule="constant", out_dir=str(out) if out else None)
    return Trainer(model, DATA, collate, lm_loss, cfg, strategies=strategies)


def block_of(name):
    parts = name.split(".")
    return int(parts[2]) if parts[:2] == ["model", "layers"] else None


def test_only_sampled_blocks_and_embeddings_head_change_in_a_window():
    model = tiny_llama(layers=6, seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lisa = LISA(gamma=2, interval=3, seed=7)
    trainer_for(model, [lisa], steps=3).train(resume=False)
    assert len(lisa.history) == 1
    active = set(lisa.history[0][1])
    assert len(active) == 2
    for n, p in model.named_parameters():
        changed = not torch.equal(p.detach(), before[n])
        b = block_of(n)
        if b is None:  # embedding, final norm, LM head: always trained
            assert changed, n
        elif b in active:
            assert changed or "norm" in n, n  # every sampled block's projections train
        else:
            assert not changed, n


def test_sampling_is_reproducible_from_seed():
    def draws(seed):
        s = LISA(gamma=2, interval=1, seed=seed)
        return [s.sample(8) for _ in range(10)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)
    assert all(len(set(d)) == 2 for d in draws(3))
    # and a training run's schedule follows it: one draw per K steps
    model = tiny_llama(layers=4, seed=0)
    lisa = LISA(gamma=1, interval=2, seed=3)
    trainer_for(model, [lisa], steps=6).train(resume=False)
    ref = LISA(gamma=1, interval=2, seed=3)
    assert lisa.history == [(k, ref.sample(4)) for k in (0, 2, 4)]


class Probe(Strategy):
    """Records optimizer-state bytes at one step's start (place before/after LISA in the stack)."""

    def __init__(self, name, at):
        self.name, self.at, self.bytes, self.keys = name, at, None, None

    def on_step_start(self, trainer, step):
        if step == self.at:
            self.bytes = optimizer_state_bytes(trainer.optimizer)
            self.keys = {id(p) for p in trainer.optimizer.state}


def test_frozen_block_state_is_released():
    model = tiny_llama(layers=6, seed=0)
    before, after = Probe("probe_before", 4), Probe("probe_after", 4)
    lisa = LISA(gamma=1, interval=4, seed=0)  # draws block 2, then block 3
    trainer = trainer_for(model, [before, lisa, after], steps=5)
    trainer.train(resume=False)
    old, new = lisa.history[0][1], lisa.history[1][1]
    names = dict(model.named_parameters())
    outside = [p for n, p in names.items() if block_of(n) is None]
    in_block = {b: [p for n, p in names.items() if block_of(n) == b] for b in range(6)}

    def adam_bytes(ps):  # exp_avg + exp_avg_sq in fp32 + the scalar step (fp32) per tensor
        return sum(2 * p.numel() * 4 + 4 for p in ps)

    assert before.bytes == adam_bytes(outside + in_block[old[0]])
    assert old != new
    assert after.bytes == adam_bytes(outside)  # the switch freed the old block's moments
    assert not any(id(p) in after.keys for p in in_block[old[0]])
    full = adam_bytes(list(names.values()))
    assert before.bytes < 0.6 * full  # vs full fine-tuning's Adam state


def test_full_checkpoint_written_and_loadable(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_llama(layers=3, seed=0)
    lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": 2, "alpha": 4}), seed=0)  # as the CLI does
    trainer_for(model, [LISA(gamma=1, interval=2)], steps=3, out=tmp_path).train(resume=False)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full_model")
    x = DATA[0][None]
    model.eval()
    assert torch.allclose(model(input_ids=x).logits, loaded(input_ids=x).logits, atol=1e-5)
    base = tiny_llama(layers=3, seed=0)
    assert not torch.allclose(base(input_ids=x).logits, loaded(input_ids=x).logits)  # it did train


def test_resume_is_exact(tmp_path):
    def make(out, extra=()):
        model = tiny_llama(layers=4, seed=0)
        cfg = TrainConfig(steps=5, batch_size=4, lr=1e-2, progress=False, eval_at_start=False, save_every=2,
                          out_dir=str(out))
        return model, Trainer(model, DATA, collate, lm_loss, cfg, strategies=[LISA(gamma=1, interval=3), *extra])

    full_model, full = make(tmp_path / "a")
    ref = full.train()
    _, t = make(tmp_path / "b", [kill_at(3)])
    with contextlib.suppress(KeyboardInterrupt):
        t.train()
    model, t = make(tmp_path / "b")
    res = t.train()
    assert res.resumed_from == 2
    assert res.losses == ref.losses[2:]
    for (n, p), q in zip(full_model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n
