"""EVA: A = top principal directions of the masked, centred layer inputs (dense eigen-decomposition as the
reference), B = 0 (output unchanged), ranks redistributed by explained variance under the budget Σr,
same ranks and directions as real peft's EVA, padding honoured, save -> real peft load exact."""

from __future__ import annotations

from itertools import cycle, islice

import pytest
import torch

import lorakit
from lorakit.core.inject import adapter_modules, specs
from lorakit.inits.base import initialize
from lorakit.inits.eva import EVAInit, redistribute_ranks
from lorakit.models import tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(n=4, seed=0, pad_token=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (4, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[0, 18:] = 0  # right padding
        mask[2, 10:] = 0
        out.append({"input_ids": ids.masked_fill(mask == 0, pad_token), "attention_mask": mask})
    return out


BATCHES = _batches()
IDS = BATCHES[0]["input_ids"][:2]


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _spec(**init_args):
    return lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, init="eva", targets=TARGETS,
                               init_args={"progress": False, **init_args})


@pytest.fixture(scope="module")
def eva_model():
    return lorakit.attach(tiny_llama(seed=0), _spec(), batches=BATCHES)


def test_output_unchanged_at_init_and_budget_kept(eva_model):
    torch.testing.assert_close(_logits(eva_model), _logits(tiny_llama(seed=0)), rtol=0, atol=0)
    forms = adapter_modules(eva_model, "default")
    ranks = {p: f.lora_A.shape[0] for p, f in forms.items()}
    assert sum(ranks.values()) == 4 * 14  # the budget of uniform rank 4 over the 14 target layers
    assert len(set(ranks.values())) > 1 and max(ranks.values()) <= 8  # redistributed, capped at rho*r
    for form in forms.values():
        assert not form.lora_B.any()
        k = form.lora_A.shape[0]
        assert form.args.r == k and form.args.alpha == pytest.approx(8 * k / 4)  # s = alpha/r kept
        torch.testing.assert_close(form.lora_A @ form.lora_A.T, torch.eye(k), rtol=0, atol=1e-5)  # orthonormal
    spec = specs(eva_model)["default"]
    assert all(spec.args_for(p)["r"] == k for p, k in ranks.items())


def test_components_are_top_principal_directions_of_masked_inputs():
    path = "model.layers.1.self_attn.q_proj"  # in_features 32 = rho*r components: no truncation error
    model = tiny_llama(seed=0)
    rows = []
    hook = model.get_submodule(path).register_forward_pre_hook(lambda m, a: rows.append(a[0]))
    with torch.no_grad():
        for b in BATCHES[:3]:
            model(**b)
    hook.remove()
    kept = [x[b["attention_mask"].bool()] for x, b in zip(rows, BATCHES[:3])]
    for lowrank in (False, True):
        m = lorakit.attach(tiny_llama(seed=0), lorakit.AdapterSpec(form_args={"r": 16, "alpha": 8}, targets=[path]))
        init = EVAInit(rho=2, lowrank=lowrank, progress=False)
        initialize(m, "default", init, BATCHES[:3])
        assert init.batches_run > 3  # several passes over the data until convergence
        # reference: dense eigen-decomposition of the covariance of every (masked) row the PCA saw
        x = torch.cat(list(islice(cycle(kept), init.batches_run))).double()
        evals, evecs = torch.linalg.eigh(torch.cov(x.T))
        top = evecs.flip(1)[:, :16]
        a = adapter_modules(m, "default")[path].lora_A.detach().double()
        assert (a @ top).diagonal().abs().min() > 1 - 1e-4
        assert a.shape == (16, 32)


def test_redistribution_closed_form():
    ratios = {"a": torch.tensor([0.50, 0.30, 0.10, 0.05]), "b": torch.tensor([0.40, 0.20, 0.15, 0.01]),
              "c": torch.tensor([0.02, 0.01, 0.005, 0.001])}
    cap = dict.fromkeys(ratios, 4)
    # budget 3 layers x r=2 = 6: the six largest are a.5 b.4 a.3 b.2 b.15 a.1 -> a 3, b 3, c 0
    assert redistribute_ranks(ratios, 6, cap) == {"a": 3, "b": 3, "c": 0}
    assert redistribute_ranks(ratios, 2, cap) == {"a": 1, "b": 1, "c": 0}
    assert redistribute_ranks(ratios, 6, {"a": 2, "b": 2, "c": 2}) == {"a": 2, "b": 2, "c": 2}  # rho = 1
    # generic property on a random toy: the kept values are exactly the budget largest
    g = torch.Generator().manual_seed(0)
    toy = {f"l{i}": torch.rand(6, generator=g).sort(descending=True).values for i in range(5)}
    ranks = redistribute_ranks(toy, 15, dict.fromkeys(toy, 6))
    assert sum(ranks.values()) == 15
    threshold = torch.cat(list(toy.values())).sort(descending=True).values[14]
    assert ranks == {k: int((v >= threshold).sum()) for k, v in toy.items()}
    # a layer sharing another's PCA (same input): the PCA's layer gets the larger rank of the two
    shared = redistribute_ranks({"q": ratios["c"], "o": ratios["a"]}, 6, {"q": 4, "o": 4, "k": 4}, {"k": "q"})
    assert sum(shared.values()) == 6 and shared["o"] == 4 and shared["q"] >= shared["k"]


def test_matches_real_peft_eva(eva_model):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights="eva",
                             eva_config=peft.EvaConfig(rho=2, tau=0.99))
    theirs = peft.get_peft_model(tiny_llama(seed=0), config)
    peft.initialize_lora_eva_weights(theirs, BATCHES, show_progress_bar=False)
    their_a = {n.removeprefix("base_model.model."): m.lora_A["default"].weight.detach()
               for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    ours = {p: f.lora_A.detach() for p, f in adapter_modules(eva_model, "default").items()}
    assert {p: a.shape[0] for p, a in ours.items()} == {p: a.shape[0] for p, a in their_a.items()}
    for path, a in ours.items():
        cos = torch.nn.functional.cosine_similarity(a, their_a[path]).abs()
        assert cos.min() > 0.999, (path, cos)
    pc = theirs.peft_config["default"]
    assert {p: pytest.approx(v) for p, v in pc.alpha_pattern.items()} == {
        p: specs(eva_model)["default"].args_for(p)["alpha"] for p in pc.alpha_pattern}


def test_padding_and_label_masks_are_honoured():
    path = "model.layers.0.mlp.down_proj"
    spec = lorakit.AdapterSpec(form_args={"r": 2, "alpha": 4}, init="eva", targets=[path],
                               init_args={"progress": False, "rho": 1, "lowrank": False})

    def a_of(batches):
        m = lorakit.attach(tiny_llama(seed=0), spec, batches=batches)
        return adapter_modules(m, "default")[path].lora_A.detach()

    reference = a_of(_batches(pad_token=0))
    # other tokens at padded (right-side) positions: masked rows are ignored, so A is the same
    torch.testing.assert_close(a_of(_batches(pad_token=77)), reference, rtol=0, atol=1e-6)
    # without the attention mask the padded rows count, and A changes
    unmasked = [{"input_ids": b["input_ids"]} for b in _batches(pad_token=77)]
    assert (a_of(unmasked) - reference).abs().max() > 1e-3
    # labels = -100 at those positions act as the mask (use_label_mask), and are ignored when turned off
    labelled = [{"input_ids": b["input_ids"], "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)}
                for b in _batches(pad_token=77)]
    torch.testing.assert_close(a_of(labelled), reference, rtol=0, atol=1e-6)
    spec.init_args["use_label_mask"] = False
    torch.testing.assert_close(a_of(labelled), a_of(unmasked), rtol=0, atol=0)


def test_trained_eva_adapter_saves_and_loads_in_real_peft(tmp_path):
    peft = pytest.importorskip("peft")
    model = lorakit.attach(tiny_llama(seed=0), _spec(), batches=BATCHES)
    removed = lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, targets=TARGETS)  # ranks differ per module
    assert len(adapter_modules(model, "default")) <= len(lorakit.find_targets(tiny_llama(seed=0), removed))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = BATCHES[1]["input_ids"]
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = _logits(model)
    assert (trained - _logits(tiny_llama(seed=0))).abs().max() > 1e-4
    lorakit.save(model, tmp_path)
    again = lorakit.load(tiny_llama(seed=0), tmp_path)
    torch.testing.assert_close(_logits(again), trained, rtol=1e-5, atol=1e-6)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), trained, rtol=1e-5, atol=1e-6)
    ranks = {p: f.lora_A.shape[0] for p, f in adapter_modules(model, "default").items()}
    their_ranks = {n.removeprefix("base_model.model."): m.lora_A["default"].weight.shape[0]
                   for n, m in theirs.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert their_ranks == ranks


def test_rank_zero_removes_the_module_and_export_follows(tmp_path):
    peft = pytest.importorskip("peft")
    # r = 1, rho = 4: the budget goes to the layers with the largest explained variance, others get 0
    targets = ["q_proj", "o_proj", "up_proj", "down_proj"]
    spec = lorakit.AdapterSpec(form_args={"r": 1, "alpha": 4}, init="eva", targets=targets,
                               init_args={"progress": False, "rho": 4})
    model = lorakit.attach(tiny_llama(seed=0), spec, batches=BATCHES)
    kept = adapter_modules(model, "default")
    all_paths = lorakit.find_targets(tiny_llama(seed=0), lorakit.AdapterSpec(targets=targets))
    dropped = sorted(set(all_paths) - set(kept))
    new_spec = specs(model)["default"]
    assert dropped and sorted(new_spec.exclude) == dropped
    assert sum(f.lora_A.shape[0] for f in kept.values()) == len(all_paths)  # budget 1 x 8 layers
    assert sorted(lorakit.find_targets(tiny_llama(seed=0), new_spec)) == sorted(kept)
    for path in dropped:
        assert not hasattr(model.get_submodule(path), "adapters")  # plain Linear again
    lorakit.save(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(seed=0), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), _logits(model), rtol=1e-5, atol=1e-6)
