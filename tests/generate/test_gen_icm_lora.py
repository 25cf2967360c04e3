"""ICM-LoRA (arXiv 2501.17635): the multi-task conv1d CVAE reconstructs its training tasks, samples vary
with z, both de-normalisations are the closed form, the unconditional VAE ignores c, padding is right,
save/load is exact and bad input is refused."""

from __future__ import annotations

import math

import pytest
import torch

import lorakit
from lorakit.core.extract import extract_state
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState
from lorakit.generate import BankError, BankLayout, CheckpointBank, GeneratorError, load_generator
from lorakit.generate.icm_lora import ICMLoRA
from lorakit.models import tiny_llama

TASKS, CKPTS, COND = 4, 6, 8
FAST = dict(channels=(8, 16, 16, 8), latent_dim=16, batch_size=TASKS * CKPTS, lr=1e-2, epochs=300, seed=0)


def _template() -> AdapterState:
    model = tiny_llama(seed=0)
    lorakit.attach(model, AdapterSpec(form_args={"r": 2, "alpha": 4}, targets=["q_proj", "v_proj"]))
    return extract_state(model, "default")


def _toy_bank(tasks: int = TASKS, ckpts: int = CKPTS, spread: float = 0.03) -> CheckpointBank:
    """Task n: prototype μ_n ~ N(0, 0.1²) per entry, checkpoints μ_n + N(0, spread²) (late-training cloud)."""
    tmpl = _template()
    g = torch.Generator().manual_seed(0)
    entries = []
    for i in range(tasks):
        proto = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in tmpl.tensors.items()}
        states = [AdapterState(spec=tmpl.spec, base=tmpl.base, meta={},
                               tensors={k: p + spread * torch.randn(p.shape, generator=g) for k, p in proto.items()})
                  for _ in range(ckpts)]
        entries.append((f"t{i}", f"task {i}", states))
    return CheckpointBank.from_states(entries)


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    bank = _toy_bank()
    c = torch.randn(TASKS, COND, generator=torch.Generator().manual_seed(1))
    gen = ICMLoRA.build(bank.layout, COND, **FAST)
    info = gen.fit(bank, c)
    return bank, c, gen, info


def _slot_denorm(layout: BankLayout, x: torch.Tensor, means: list[float], stds: list[float]) -> torch.Tensor:
    out = x.clone()
    for s, m, sd in zip(layout.slots, means, stds):
        out[..., s.offset:s.offset + s.numel] = x[..., s.offset:s.offset + s.numel] * sd + m
    return out


def test_generated_adapters_reconstruct_training_checkpoints_within_5pct_of_within_task_spread(fitted):
    """rel_n = ‖x̂_n − μ_n‖² / mean_m ‖x_n^m − μ_n‖²: ≤ 0.05 for z = 0 and ≤ 0.2 averaged over z ~ N(0, I);
    every output is nearest to its own task's prototype."""
    bank, c, gen, info = fitted
    assert info["final_recon"] < 0.2 and math.isfinite(info["final_kld"])
    protos = bank.prototypes()
    for i, task in enumerate(bank.tasks):
        within = ((task.vectors - task.prototype) ** 2).sum(1).mean()
        x = gen.sample(c[i], 1, mode="mean")[0]
        assert ((x - task.prototype) ** 2).sum() / within <= 0.05
        xs = gen.sample(c[i], 8, seed=i)
        assert (((xs - task.prototype) ** 2).sum(1).mean() / within) <= 0.2
        assert (torch.cdist(xs, protos).argmin(1) == i).all()
    state = gen.generate(condition=c[0], mode="mean")
    assert set(state.tensors) == {s.key for s in bank.layout.slots}
    assert state.meta["generated_by"] == "icm_lora"


def test_output_changes_with_z_and_is_seeded(fitted):
    _, c, gen, _ = fitted
    a, b = gen.sample(c[1], 1, seed=1), gen.sample(c[1], 1, seed=2)
    assert torch.equal(a, gen.sample(c[1], 1, seed=1))
    assert (a - b).norm() > 1e-4 * a.norm()
    assert torch.equal(gen.sample(c[1], 2, mode="mean")[0], gen.sample(c[1], 2, mode="mean")[1])


def test_bank_denorm_is_the_task_mean_of_checkpoint_stats_and_pooled_for_unseen(fitted):
    bank, c, gen, _ = fitted
    task = bank.tasks[2]
    stats = [[(v[s.offset:s.offset + s.numel].mean().item(), v[s.offset:s.offset + s.numel].std().item())
              for s in bank.layout.slots] for v in task.vectors]
    means = [sum(st[j][0] for st in stats) / len(stats) for j in range(len(bank.layout.slots))]
    stds = [sum(st[j][1] for st in stats) / len(stats) for j in range(len(bank.layout.slots))]
    z = gen.sample_normalized(c[2], 1, seed=4)
    assert torch.allclose(gen.sample(c[2], 1, seed=4), _slot_denorm(bank.layout, z, means, stds), atol=1e-5)
    x_all, _ = bank.all_vectors()
    pooled_m = [x_all[:, s.offset:s.offset + s.numel].mean(1).mean().item() for s in bank.layout.slots]
    pooled_s = [x_all[:, s.offset:s.offset + s.numel].std(1).mean().item() for s in bank.layout.slots]
    unseen = c[2] + 0.5
    assert gen.seen_task(unseen) is None and gen.seen_task(c[2]) == 2
    z = gen.sample_normalized(unseen, 1, seed=4)
    assert torch.allclose(gen.sample(unseen, 1, seed=4), _slot_denorm(bank.layout, z, pooled_m, pooled_s), atol=1e-5)


def test_reference_checkpoint_denorm_is_that_checkpoints_stats_and_needs_it(fitted):
    bank, c, gen, _ = fitted
    ref_gen = ICMLoRA.build(bank.layout, COND, **{**FAST, "denorm": "reference_checkpoint"})
    ref_gen.prepare_for_load(TASKS)
    ref_gen.load_state_dict(gen.state_dict())
    ref_gen.fitted = True
    ref_gen.eval()
    ref = bank.state(bank.tasks[3].vectors[-1])
    v = bank.tasks[3].vectors[-1]
    means = [v[s.offset:s.offset + s.numel].mean().item() for s in bank.layout.slots]
    stds = [v[s.offset:s.offset + s.numel].std().item() for s in bank.layout.slots]
    z = gen.sample_normalized(c[3], 1, seed=7)
    want = _slot_denorm(bank.layout, z, means, stds)
    assert torch.allclose(ref_gen.sample(c[3], 1, seed=7, reference=ref), want, atol=1e-5)
    assert torch.allclose(ref_gen.sample(c[3], 1, seed=7, reference=v), want, atol=1e-5)
    out = ref_gen.generate(condition=c[3], seed=7, reference=ref)
    assert torch.allclose(bank.layout.flatten(out), want[0], atol=1e-5)
    with pytest.raises(GeneratorError, match="not zero-shot"):
        ref_gen.generate(condition=c[3], seed=7)
    with pytest.raises(GeneratorError, match="only with denorm"):
        gen.sample(c[3], 1, reference=ref)
    with pytest.raises(BankError, match="last dimension"):
        ref_gen.sample(c[3], 1, reference=torch.zeros(5))


def test_stats_head_fits_training_tasks_stats(tmp_path):
    bank = _toy_bank(3, 3)
    c = torch.randn(3, COND, generator=torch.Generator().manual_seed(2))
    gen = ICMLoRA.build(bank.layout, COND, **{**FAST, "epochs": 0, "unseen_stats": "head", "ridge": 1e-6})
    gen.fit(bank, c)
    m, s = gen.stats_for(c[1] + 1e-3)  # not a training condition: the head
    assert gen.seen_task(c[1] + 1e-3) is None
    assert torch.allclose(m, gen.task_mean[1], atol=1e-3) and torch.allclose(s, gen.task_std[1], rtol=1e-2)
    back = load_generator(gen.save(tmp_path / "g"))
    assert torch.equal(back.stats_for(c[1] + 1e-3)[1], s)
    assert torch.equal(back.sample(c[0] + 1, 1, seed=2), gen.sample(c[0] + 1, 1, seed=2))


def test_unconditional_vae_ignores_the_condition():
    bank = _toy_bank(2, 3)
    c = torch.randn(2, COND, generator=torch.Generator().manual_seed(3))
    gen = ICMLoRA.build(bank.layout, COND, **{**FAST, "epochs": 3, "conditional": False})
    gen.fit(bank, c)
    assert gen.net.fc_mu.in_features == gen.args.latent_dim  # no c in the network
    assert torch.equal(gen.sample(c[0], 2, seed=5), gen.sample(c[1], 2, seed=5))
    assert torch.equal(gen.sample(c[0], 1, seed=5), gen.sample(torch.randn(COND), 1, seed=5))


@pytest.mark.parametrize("channels, padded", [((4, 4, 4), 24), ((4, 8, 8, 8, 4), 32)])
def test_conv_shapes_and_zero_padding_for_a_dimension_that_is_not_a_power_of_two(channels, padded):
    spec = AdapterSpec(form_args={"r": 1, "alpha": 1})
    g = torch.Generator().manual_seed(0)
    states = [AdapterState(spec=spec, tensors={"a.lora_A.weight": torch.randn(3, 5, generator=g),
                                               "a.lora_B.weight": torch.randn(7, generator=g)}) for _ in range(4)]
    bank = CheckpointBank.from_states([("x", "", states[:2]), ("y", "", states[2:])])
    assert bank.layout.dim == 22
    gen = ICMLoRA.build(bank.layout, 3, channels=channels, latent_dim=4, epochs=2, batch_size=4)
    net = gen.net
    assert net.padded == padded and net.last_len == padded // 2 ** len(channels)
    x = torch.randn(2, 22)
    padded_x = net.pad(x)
    assert padded_x.shape == (2, padded) and torch.equal(padded_x[:, :22], x) and not padded_x[:, 22:].any()
    assert net.encoder(padded_x[:, None]).shape == (2, channels[-1], net.last_len)
    assert net.decode(torch.zeros(2, 4), torch.zeros(2, 3)).shape == (2, padded)
    gen.fit(bank, torch.eye(3)[:2])
    assert gen.sample(torch.eye(3)[0], 3, seed=0).shape == (3, 22)


def test_save_load_generator_gives_identical_outputs(fitted, tmp_path):
    bank, c, gen, _ = fitted
    gen.save(tmp_path / "g")
    back = load_generator(tmp_path / "g")
    assert isinstance(back, ICMLoRA) and back.task_ids == bank.task_ids and back.args == gen.args
    for i in range(TASKS):
        assert torch.equal(back.sample(c[i], 2, seed=11), gen.sample(c[i], 2, seed=11))
    assert torch.equal(back.sample(c[0] + 1, 1, seed=1), gen.sample(c[0] + 1, 1, seed=1))
    assert gen.nbytes() > 0


def test_bad_inputs_are_refused(fitted):
    bank, c, gen, _ = fitted
    with pytest.raises(GeneratorError, match="cond_dim"):
        gen.sample(torch.zeros(COND + 1))
    with pytest.raises(GeneratorError, match="mode"):
        gen.sample(c[0], mode="median")
    with pytest.raises(GeneratorError, match="positive"):
        gen.sample(c[0], 0)
    fresh = ICMLoRA.build(bank.layout, COND, **FAST)
    with pytest.raises(GeneratorError, match="not fitted"):
        fresh.sample(c[0])
    with pytest.raises(GeneratorError, match="same condition"):
        fresh.fit(bank, torch.stack([c[0], c[0], c[1], c[2]]))
    with pytest.raises(GeneratorError, match="one condition per task"):
        fresh.fit(bank, c[:2])
    with pytest.raises(GeneratorError, match="unknown option"):
        fresh.fit(bank, c, steps=3)
    one = CheckpointBank(bank.layout, [bank.tasks[0].__class__("a", "", bank.tasks[0].vectors[:1])])
    with pytest.raises(GeneratorError, match="at least 2 checkpoints"):
        fresh.fit(one, c[:1])
    for bad in (dict(kernel_size=4), dict(denorm="task"), dict(unseen_stats="nearest"), dict(channels=())):
        with pytest.raises(ValueError):
            ICMLoRA.build(bank.layout, COND, **bad)
    with pytest.raises(ValueError, match="unknown argument"):
        ICMLoRA.build(bank.layout, COND, latent=3)
