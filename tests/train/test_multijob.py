"""MultiJobTrainer invariants: each job's loss curve and gradients equal training it alone (the plain
Trainer / plain autograd as the independent reference), dropout on the LoRA input with one keyed mask,
join/leave, per-job resume, admission."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.core.context import AdapterContext, use_context
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_llama
from lorakit.train import TrainConfig, Trainer
from lorakit.train.multijob import (
    AdmissionError,
    Job,
    KeyedDropout,
    MultiJobError,
    MultiJobTrainer,
    RowObjective,
    classification_row_losses,
    lm_row_losses,
)
from lorakit.train.objectives import last_token_logits

REL = 1e-6


def lm_collate(items):
    width = max(len(x) for x in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for i, x in enumerate(items):
        ids[i, :len(x)] = torch.tensor(x)
        mask[i, :len(x)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def cls_collate(items):
    batch = lm_collate([x for x, _ in items])
    del batch["labels"]
    batch["last_index"] = batch["attention_mask"].sum(1) - 1
    batch["label_ids"] = torch.tensor([y for _, y in items])
    return batch


LM = RowObjective(lm_collate, lm_row_losses, "all")
CLS = RowObjective(cls_collate, classification_row_losses, "last")


def lm_loss(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def cls_loss(model, batch):
    return F.cross_entropy(last_token_logits(model, batch).float(), batch["label_ids"])


def make_data(seed, n, lo, hi, cls=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        out.append((ids, int(torch.randint(3, 13, (1,), generator=g))) if cls else ids)
    return out


def model():
    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


def jobs(dropout=0.0, steps=5, out=None):
    cfg = dict(steps=steps, progress=False, eval_at_start=False, warmup_steps=1)
    return [
        Job("a", make_data(1, 12, 3, 9), LM, TrainConfig(batch_size=3, lr=2e-2, seed=1, **cfg),
            lorakit.AdapterSpec(form="lora", form_args={"r": 4, "alpha": 8, "dropout": dropout})),
        Job("b", make_data(2, 10, 4, 12, cls=True), CLS,
            TrainConfig(batch_size=2, lr=1e-2, seed=2, schedule="linear", **cfg),
            lorakit.AdapterSpec(form="dora", form_args={"r": 4, "alpha": 8, "dropout": dropout})),
        Job("c", make_data(3, 16, 2, 6), LM, TrainConfig(batch_size=4, lr=3e-2, seed=3, schedule="constant", **cfg),
            lorakit.AdapterSpec(form="lora", form_args={"r": 8, "alpha": 16, "dropout": dropout})),
    ]


def rel(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def alone_with_trainer(job):
    m = model()
    lorakit.attach(m, job.spec, job.name, seed=job.config.seed)
    loss = lm_loss if job.objective is LM else cls_loss
    t = Trainer(m, job.data, job.objective.collate, loss, dataclasses.replace(job.config, out_dir=None))
    result = t.train(resume=False)
    return result.losses, {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def adapter_params(m, name):
    ids = {id(p) for f in adapter_modules(m, name).values() for p in f.parameters()}
    return {n: p.detach().clone() for n, p in m.named_parameters() if id(p) in ids}


def test_loss_curves_and_params_equal_single_job_trainer():
    js = jobs()
    m = model()
    results = MultiJobTrainer(m, js, token_cap=40).run()
    for job in js:
        ref_losses, ref_params = alone_with_trainer(job)
        got = results[job.name]
        assert got.status == "finished" and got.steps == job.config.steps
        assert rel(got.losses, ref_losses) <= REL, (job.name, got.losses, ref_losses)
        mine = adapter_params(m, job.name)
        assert set(mine) == set(ref_params)
        for n in mine:
            assert rel(mine[n], ref_params[n]) <= 1e-5, n
    # the losses moved: the test compares training, not a constant
    assert results["a"].losses[-1] < results["a"].losses[0]


def _randomize(m, name, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in adapter_modules(m, name).values():
            for p in f.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_gradients_equal_alone_by_autograd():
    js = jobs()
    m = model()
    trainer = MultiJobTrainer(m, js, token_cap=30)
    for i, job in enumerate(js):
        _randomize(m, job.name, 10 + i)
    stats = trainer.accumulate()
    assert stats.micro_batches > 1  # the jobs' rows really are spread over several packed micro-batches
    for i, job in enumerate(js):
        ref = model()
        lorakit.attach(ref, job.spec, job.name, seed=job.config.seed)
        _randomize(ref, job.name, 10 + i)
        batch = job.objective.collate([job.data[k] for k in trainer.running[job.name].sample_indices()])
        loss = (lm_loss if job.objective is LM else cls_loss)(ref, batch)
        loss.backward()
        assert abs(stats.losses[job.name] - loss.item()) <= REL * abs(loss.item())
        got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None and f".{job.name}." in n}
        want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        assert set(got) == set(want) and want
        flat_g = torch.cat([got[n].flatten() for n in sorted(got)])
        flat_w = torch.cat([want[n].flatten() for n in sorted(want)])
        assert rel(flat_g, flat_w) <= REL
        assert all(rel(got[n], want[n]) <= 1e-5 for n in want if want[n].norm() > 0)


def test_packing_choice_does_not_change_curves():
    curves = {}
    for planner, cap in (("ffd", 30), ("ffd", 200), ("pad_to_max", None)):
        r = MultiJobTrainer(model(), jobs(steps=3), token_cap=cap, planner=planner).run()
        curves[(planner, cap)] = [x for j in "abc" for x in r[j].losses]
    first = curves[("ffd", 30)]
    assert all(rel(c, first) <= REL for c in curves.values())


def test_dropout_curves_independent_of_coscheduling():
    together = MultiJobTrainer(model(), jobs(dropout=0.3, steps=3), token_cap=30).run()
    for job in jobs(dropout=0.3, steps=3):
        alone = MultiJobTrainer(model(), [job], token_cap=1000, planner="pad_to_max").run()[job.name]
        assert rel(together[job.name].losses, alone.losses) <= REL
    no_dropout = MultiJobTrainer(model(), jobs(steps=3), token_cap=30).run()
    assert rel(together["a"].losses, no_dropout["a"].losses) > 1e-4  # dropout is really on


def test_dropout_on_lora_input_only_one_mask_forward_and_backward():
    m = model()
    p = 0.5
    lorakit.attach(m, lorakit.AdapterSpec(form="lora", form_args={"r": 4, "alpha": 8, "dropout": p}), "a", seed=0)
    MultiJobTrainer(m, [Job("a", make_data(1, 4, 3, 5), LM, TrainConfig(steps=1, progress=False))])
    path, form = next(iter(adapter_modules(m, "a").items()))
    layer = m.get_submodule(path)
    assert isinstance(form.dropout, KeyedDropout)
    _randomize(m, "a", 5)
    m.train()
    x = torch.randn(2, 7, 32, requires_grad=True)
    keys = [123, 456]
    ctx = AdapterContext(names=("a",), ids=torch.zeros(2, dtype=torch.long), extras={"dropout_keys": {"a": keys}})
    with use_context(ctx):
        y = layer(x)
    mask = form.dropout.mask(x.shape, keys, x.device).float()
    assert 0.3 < float(mask.mean()) < 0.7
    W, A, B, s = layer.base_layer.weight, form.lora_A, form.lora_B, form.scaling
    xd = x.detach() * mask / (1 - p)
    expect = x.detach() @ W.T + s * (xd @ A.detach().T) @ B.detach().T  # the base sees the undropped x
    assert torch.allclose(y, expect, atol=1e-6)
    dy = torch.randn_like(y)
    y.backward(dy)
    dS = s * dy @ B.detach()  # the split at the rank-r tensor: dS, then dA and dx through the same mask
    assert torch.allclose(A.grad, (dS.reshape(-1, 4).T @ xd.reshape(-1, 32)), atol=1e-5)
    assert torch.allclose(B.grad, s * dy.reshape(-1, 32).T @ (xd @ A.detach().T).reshape(-1, 4), atol=1e-5)
    assert torch.allclose(x.grad, dy @ W + (dS @ A.detach()) * mask / (1 - p), atol=1e-5)
    # the mask depends on the row key only: a longer padded row keeps the same prefix, another key differs
    longer = form.dropout.mask(torch.Size([2, 9, 32]), keys, x.device)
    assert torch.equal(longer[:, :7].float(), mask)
    assert not torch.equal(form.dropout.mask(x.shape, [124, 456], x.device)[0].float(), mask[0])


def test_join_and_leave():
    a, b, c = jobs(steps=5)

    def on_step(trainer, stats):
        if trainer.step_count == 2:
            assert trainer.add_job(c) == "running"
        if trainer.step_count == 3:
            trainer.remove_job("b")

    tr = MultiJobTrainer(model(), [a, b], token_cap=40)
    results = tr.run(on_step=on_step)
    assert results["b"].status == "removed" and results["b"].steps == 3
    assert results["c"].steps == 5 and results["a"].steps == 5
    for job, n in ((a, 5), (b, 3), (c, 5)):
        ref, _ = alone_with_trainer(job)
        assert rel(results[job.name].losses, ref[:n]) <= REL, job.name
    with pytest.raises(MultiJobError, match="already running"):
        tr2 = MultiJobTrainer(model(), [jobs()[0]], token_cap=40)
        tr2.add_job(jobs()[0])


def test_one_job_resumes_from_its_checkpoint(tmp_path):
    def with_out(d):
        a, b, _ = jobs(steps=6)
        a = dataclasses.replace(a, config=dataclasses.replace(a.config, out_dir=str(d / "a"), save_every=2))
        return a, b

    full = MultiJobTrainer(model(), list(with_out(tmp_path / "full")), token_cap=40).run()
    a, b = with_out(tmp_path / "cut")
    MultiJobTrainer(model(), [a, b], token_cap=40).run(max_steps=3)  # killed after step 3; checkpoint at 2
    a, b = with_out(tmp_path / "cut")
    b = dataclasses.replace(b, config=dataclasses.replace(b.config, steps=2))  # another partner this time
    resumed = MultiJobTrainer(model(), [a, b], token_cap=40).run()
    assert resumed["a"].resumed_from == 2
    assert rel(resumed["a"].losses, full["a"].losses) <= REL
    assert (tmp_path / "cut" / "a" / "adapter").is_dir()
    logged = [r["loss"] for r in lorakit.train.plots.read_log(tmp_path / "cut" / "a" / "log.jsonl") if "loss" in r]
    assert rel(logged, full["a"].losses) <= REL and len(logged) == 6
    # a changed config refuses to resume into the same run
    a_bad = dataclasses.replace(a, config=dataclasses.replace(a.config, lr=1.0, steps=8))
    with pytest.raises(ValueError, match="another config"):
        MultiJobTrainer(model(), [a_bad], token_cap=40)


def test_memory_admission_queues_and_refuses():
    a, b, c = jobs(steps=2)
    m = model()
    probe = MultiJobTrainer(m, [], token_cap=40, act_bytes_per_token=100)
    need_a = probe.estimate_job_bytes(a)
    params_a = 2 * (4 * (32 + 32) + 4 * (32 + 16))  # lora r4 on q (32→32), v (32→16) of 2 layers: r·(in+out)
    assert need_a == 16 * params_a + 100 * min(40, 3 * max(len(x) for x in a.data[:64]))
    budget = need_a + probe.estimate_job_bytes(c) - 1  # each fits alone, not both
    tr = MultiJobTrainer(model(), [], token_cap=40, act_bytes_per_token=100, memory_budget=budget)
    assert tr.add_job(a) == "running"
    assert tr.add_job(c) == "queued"
    results = tr.run()
    assert results["a"].steps == 2 and results["c"].steps == 2 and results["c"].status == "finished"
    strict = MultiJobTrainer(model(), [a], token_cap=40, act_bytes_per_token=100, memory_budget=budget,
                             admission="refuse")
    with pytest.raises(AdmissionError, match="exceeds the budget"):
        strict.add_job(c)
    limited = MultiJobTrainer(model(), [a, b], token_cap=40, max_concurrent=1)
    assert [r["status"] for r in limited.status()] == ["running", "queued"]


def test_segment_path_equals_gather_path():
    m = model()
    for i, name in enumerate(("x", "y")):
        lorakit.attach(m, lorakit.AdapterSpec(form_args={"r": 4}), name, seed=i)
        _randomize(m, name, i)
    ids = torch.randint(3, 128, (5, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with lorakit.mixed_batch(m, ["x", "x", None, "y", "y"]):  # contiguous: sliced segments
            seg = m(input_ids=ids).logits
        with lorakit.mixed_batch(m, ["x", "y", None, "y", "x"]):  # interleaved: gather/scatter path
            perm = m(input_ids=ids[[0, 3, 2, 4, 1]]).logits
    assert torch.allclose(seg[[0, 3, 2, 4, 1]], perm, atol=1e-6)
    ctx = AdapterContext(names=("x", "y"), ids=torch.tensor([0, 0, -1, 1, 1]))
    assert ctx.row_segments() == [("x", 0, 2), (None, 2, 3), ("y", 3, 5)]
    assert AdapterContext(names=("x", "y"), ids=torch.tensor([0, 1, 0])).row_segments() is None


def test_bad_input():
    with pytest.raises(MultiJobError, match="unknown planner"):
        MultiJobTrainer(model(), [], planner="nope")
    with pytest.raises(MultiJobError, match="no spec"):
        MultiJobTrainer(model(), [Job("zz", [[3, 4]], LM, TrainConfig(steps=1))])
    with pytest.raises(MultiJobError, match="fp32"):
        MultiJobTrainer(model(), [Job("a", [[3, 4]], LM, TrainConfig(steps=1, precision="bf16"),
                                      lorakit.AdapterSpec())])


def test_head_split_used_for_mixed_micro_batches():
    from lorakit.train.multijob import _split_head

    assert _split_head(model()) is not None  # the mixed-loss path of the tests above ran decoder → head
