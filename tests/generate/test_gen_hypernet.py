"""Text-to-LoRA-style hypernetwork (arXiv 2506.06105): layout parsing, per-(layer, module) generation
mapped into the right slots, reconstruction and SFT training (gradients through functional_call),
save/load and refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.core.extract import extract_state
from lorakit.core.spec import AdapterSpec
from lorakit.core.state import AdapterState
from lorakit.generate import BankLayout, CheckpointBank, GeneratorError, load_generator
from lorakit.generate.hypernet import TextToLoRA, parse_lora_layout
from lorakit.models import tiny_llama

SPEC = AdapterSpec(form_args={"r": 2, "alpha": 4}, targets=["q_proj", "v_proj"])
SMALL = dict(latent_size=32, head_in_size=32, seed=0)


def _template(spec: AdapterSpec = SPEC, model=None) -> AdapterState:
    model = model or tiny_llama(seed=0)
    lorakit.attach(model, spec)
    return extract_state(model, "default")


def _toy_bank(tasks: int = 4, ckpts: int = 3) -> CheckpointBank:
    tmpl = _template()
    g = torch.Generator().manual_seed(0)
    entries = []
    for i in range(tasks):
        proto = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in tmpl.tensors.items()}
        states = [AdapterState(spec=tmpl.spec, base=tmpl.base, meta={},
                               tensors={k: p + 0.01 * torch.randn(p.shape, generator=g) for k, p in proto.items()})
                  for _ in range(ckpts)]
        entries.append((f"t{i}", f"task {i}", states))
    return CheckpointBank.from_states(entries)


def _fake_layout(keys_shapes: dict[str, tuple[int, ...]], form: str = "lora") -> BankLayout:
    spec = AdapterSpec(form=form, form_args={"r": 2, "alpha": 2} if form == "lora" else {})
    tensors = {k: torch.zeros(s) for k, s in keys_shapes.items()}
    return BankLayout.of(AdapterState(spec=spec, tensors=tensors))


def _lm_batches(pattern: list[int], n: int = 2) -> list[dict[str, torch.Tensor]]:
    ids = torch.tensor([[1] + pattern * 4] * 3)
    return [{"input_ids": ids} for _ in range(n)]


def test_parses_layers_and_module_types_from_slot_keys():
    types, sites, n_layers = parse_lora_layout(BankLayout.of(_template()))
    assert n_layers == 2 and [t.name for t in types] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert [(t.in_features, t.out_features, t.rank) for t in types] == [(32, 32, 2), (32, 16, 2)]
    assert sorted((s.layer, s.type_index) for s in sites) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    layout = _fake_layout({"enc.block.11.attn.q.lora_A.weight": (3, 5), "enc.block.11.attn.q.lora_B.weight": (4, 3),
                           "enc.block.2.attn.q.lora_A.weight": (3, 5), "enc.block.2.attn.q.lora_B.weight": (4, 3)})
    types, sites, n_layers = parse_lora_layout(layout)
    assert n_layers == 12 and [s.layer for s in sites] == [2, 11] and types[0].head_size == 3 * (5 + 4)


@pytest.mark.parametrize("keys, words", [
    ({"lm_head.lora_A.weight": (2, 4), "lm_head.lora_B.weight": (4, 2)}, "is not"),
    ({"m.layers.0.q.lora_A.weight": (2, 4)}, "lacks lora_B"),
    ({"m.layers.0.q.lora_A.weight": (2, 4), "m.layers.0.q.lora_B.weight": (4, 2),
      "m.layers.1.q.lora_A.weight": (3, 4), "m.layers.1.q.lora_B.weight": (4, 3)}, "different layers"),
    ({"m.layers.0.q.lora_A.weight": (2, 4), "m.layers.0.q.lora_B.weight": (4, 2),
      "v.layers.0.q.lora_A.weight": (2, 4), "v.layers.0.q.lora_B.weight": (4, 2)}, "more than one layer stack"),
    ({"m.layers.0.q.lora_A.weight": (2, 4), "m.layers.0.q.lora_B.weight": (4, 3)}, "rank"),
])
def test_unparsable_layouts_are_refused(keys, words):
    with pytest.raises(GeneratorError, match=words):
        TextToLoRA.build(_fake_layout(keys), 4, **SMALL)


@pytest.mark.parametrize("spec, words", [
    (AdapterSpec(form="dora", form_args={"r": 2}, targets=["q_proj"]), "form is 'dora'"),
    (AdapterSpec(form_args={"r": 2, "bias": True}, targets=["q_proj"]), "bias"),
])
def test_other_forms_and_lora_variants_are_refused(spec, words):
    with pytest.raises(GeneratorError, match=words):
        TextToLoRA.build(BankLayout.of(_template(spec)), 4, **SMALL)


def test_each_site_is_its_head_output_in_the_right_slots_and_depends_on_layer_and_type():
    """Dense reference: trunk(e, depth[l], type[m]) → head_m → A = out[:r·in].view(r, in),
    B = out[r·in:].view(r, out)ᵀ, compared with the unflattened generated adapter."""
    layout = BankLayout.of(_template())
    gen = TextToLoRA.build(layout, 4, head_init="default", dropout=0.0, **SMALL).eval()
    gen.fitted = True
    c = torch.randn(4, generator=torch.Generator().manual_seed(1))
    state = gen.generate(condition=c)
    with torch.no_grad():
        for layer in (0, 1):
            for ti, t in enumerate(gen.module_types):
                u = torch.cat([gen.task_encoder(c[None]), gen.depth_embedding(torch.tensor([layer])),
                               gen.type_embedding(torch.tensor([ti]))], -1)
                out = gen.heads[ti](gen.mlp3(gen.mlp2(gen.mlp1(gen.mixer(u)))))[0]
                a = out[:t.rank * t.in_features].view(t.rank, t.in_features)
                b = out[t.rank * t.in_features:].view(t.rank, t.out_features).T
                key = f"model.layers.{layer}.{t.name}"
                assert torch.allclose(state.tensors[f"{key}.lora_A.weight"], a, atol=1e-6)
                assert torch.allclose(state.tensors[f"{key}.lora_B.weight"], b, atol=1e-6)
    q0, q1 = (state.tensors[f"model.layers.{i}.self_attn.q_proj.lora_A.weight"] for i in (0, 1))
    assert (q0 - q1).abs().max() > 1e-4  # two depths, two outputs
    with torch.no_grad():  # equal depth embeddings ⇒ equal outputs: only (layer, type) embeddings differ
        gen.depth_embedding[0].weight[1] = gen.depth_embedding[0].weight[0]
    same = gen.generate(condition=c)
    assert torch.allclose(same.tensors["model.layers.0.self_attn.q_proj.lora_A.weight"],
                          same.tensors["model.layers.1.self_attn.q_proj.lora_A.weight"])


def test_lora_head_init_generates_the_lora_init_with_zero_B():
    layout = BankLayout.of(_template())
    gen = TextToLoRA.build(layout, 4, **SMALL).eval()
    gen.fitted = True
    s = gen.generate(condition=torch.randn(4))
    for key, t in s.tensors.items():
        if key.endswith("lora_B.weight"):
            assert not t.any()
        else:
            bound = 1 / t.shape[1] ** 0.5  # Kaiming-uniform(a=√5) bound of LoRA's A
            assert t.abs().max() <= bound and t.std() > 0.2 * bound


def test_reconstruction_fit_lowers_mse_below_the_mean_adapter():
    bank = _toy_bank()
    c = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    gen = TextToLoRA.build(bank.layout, 6, head_init="zero", steps=150, lr=3e-3, **SMALL)
    x, _ = bank.all_vectors()
    mean_adapter_mse = float(((x - x.mean(0)) ** 2).mean())
    info = gen.fit(bank, c)
    assert info["losses"][-1] < 0.2 * info["losses"][0]
    mse = gen.reconstruction_mse(bank, c)
    within = float(torch.cat([t.vectors - t.prototype for t in bank.tasks]).pow(2).mean())
    assert mse < 0.1 * mean_adapter_mse and mse < 3 * within


def test_sft_gradient_reaches_the_hypernetwork_and_matches_finite_differences():
    model = tiny_llama(seed=0)
    gen = TextToLoRA.for_model(model, SPEC, 4, head_init="default", dropout=0.0, **SMALL).double()
    model.double()
    batch = _lm_batches([5, 6, 7, 8], 1)[0]
    c = torch.randn(4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = gen.task_encoder[0].weight
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def double_ce(m, b):  # transformers' loss casts logits to float32; keep float64 for the difference quotient
        logits = m(input_ids=b["input_ids"]).logits
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["input_ids"][:, 1:].reshape(-1))

    with gen.bind(model, loss_fn=double_ce) as loss_of:
        loss, _ = loss_of(batch, c)
        assert loss.dtype == torch.float64
        loss.backward()
        assert w.grad is not None and w.grad.abs().sum() > 0 and gen.heads[1].weight.grad.abs().sum() > 0
        eps = 1e-3  # the base keeps float32 internals (rotary tables): smaller steps only add noise
        with torch.no_grad():
            w += eps * d
            up = loss_of(batch, c)[0].item()
            w -= 2 * eps * d
            down = loss_of(batch, c)[0].item()
            w += eps * d
    assert (w.grad * d).sum().item() == pytest.approx((up - down) / (2 * eps), rel=2e-3)
    assert not lorakit.specs(model) and all(p.requires_grad for p in model.parameters())  # model restored


def test_sft_lowers_the_task_loss_and_the_saved_adapter_reproduces_it(tmp_path):
    model = tiny_llama(seed=0)
    tasks = [_lm_batches([5, 6, 7, 8]), _lm_batches([9, 3, 9, 4])]
    c = torch.eye(4)[:2]
    gen = TextToLoRA.for_model(model, SPEC, 4, steps=40, lr=3e-3, **SMALL)

    def loss_with(state: AdapterState | None, batches) -> float:
        m = tiny_llama(seed=0)
        if state is not None:
            lorakit.apply_state(m, state)
        with torch.no_grad():
            return sum(m(input_ids=b["input_ids"], labels=b["input_ids"]).loss.item() for b in batches) / len(batches)

    before = [loss_with(None, t) for t in tasks]
    info = gen.fit_sft(model, tasks, c, task_ids=["a", "b"], descriptions=["up", "alt"])
    assert gen.task_ids == ["a", "b"] and len(info["task_losses"]) == 40
    after = [loss_with(gen.generate(condition=c[i]), tasks[i]) for i in range(2)]
    assert all(a < b - 0.1 for a, b in zip(after, before))
    with gen.bind(model) as loss_of, torch.no_grad():  # the functional path is the runtime's path
        assert loss_of(tasks[0][0], c[0])[0].item() == pytest.approx(loss_with(gen.generate(condition=c[0]),
                                                                               tasks[0][:1]), rel=1e-5)
    gen.save(tmp_path / "g")
    back = load_generator(tmp_path / "g")
    assert isinstance(back, TextToLoRA) and back.task_ids == ["a", "b"]
    assert torch.equal(back.sample(c[1], 1, seed=3), gen.sample(c[1], 1, seed=3))


def test_save_load_after_reconstruction_is_identical(tmp_path):
    bank = _toy_bank(3, 2)
    c = torch.randn(3, 6, generator=torch.Generator().manual_seed(5))
    gen = TextToLoRA.build(bank.layout, 6, steps=5, **SMALL)
    gen.fit(bank, c)
    gen.save(tmp_path / "g")
    back = load_generator(tmp_path / "g")
    assert back.args == gen.args and torch.equal(back.target_std, gen.target_std)
    for i in range(3):
        assert torch.equal(back.sample(c[i], 2, seed=0), gen.sample(c[i], 2, seed=0))
    assert torch.equal(back.sample(c[0] * 3, 1), gen.sample(c[0] * 3, 1))


def test_bad_inputs_are_refused():
    bank = _toy_bank(2, 2)
    c = torch.randn(2, 6)
    gen = TextToLoRA.build(bank.layout, 6, steps=1, **SMALL)
    with pytest.raises(GeneratorError, match="not fitted"):
        gen.sample(c[0])
    with pytest.raises(GeneratorError, match="fit_sft"):
        gen.fit(bank, c, mode="sft")
    with pytest.raises(GeneratorError, match="mode"):
        gen.fit(bank, c, mode="distill")
    with pytest.raises(GeneratorError, match="unknown option"):
        gen.fit(bank, c, epochs=3)
    with pytest.raises(GeneratorError, match="one condition per task"):
        gen.fit(bank, c[:1])
    gen.fit(bank, c)
    with pytest.raises(GeneratorError, match="cond_dim"):
        gen.sample(torch.zeros(5))
    with pytest.raises(GeneratorError, match="mode"):
        gen.sample(c[0], mode="x")
    model = tiny_llama(seed=0)
    with pytest.raises(GeneratorError, match="one non-empty list"):
        gen.fit_sft(model, [_lm_batches([5, 6])], c)
    with pytest.raises(GeneratorError, match="not the base"):
        gen.fit_sft(tiny_llama(seed=5), [_lm_batches([5, 6]), _lm_batches([7, 8])], c)
    lorakit.attach(model, SPEC, name="text_to_lora")
    with pytest.raises(GeneratorError, match="already has an adapter"):
        gen.fit_sft(model, [_lm_batches([5, 6]), _lm_batches([7, 8])], c)
    for bad in (dict(head_init="ones"), dict(dropout=1.0), dict(latent_size=2), dict(lr=0)):
        with pytest.raises(ValueError):
            TextToLoRA.build(bank.layout, 6, **bad)
