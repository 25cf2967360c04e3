"""LoRA-GA: output unchanged at init; the first SGD step is the exact closed form and, to first order,
∝ the best rank-2r approximation of the gradient (dense SVD); variant="peft" matches real peft's LoRA-GA
init on the same calibration batches; trained adapters load on the ORIGINAL base in real peft."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.inject import adapter_modules
from lorakit.models import tiny_gpt2, tiny_llama

GEN = torch.Generator().manual_seed(0)
IDS = torch.randint(3, 128, (2, 9), generator=GEN)
BATCHES = [torch.randint(3, 128, (2, 9), generator=GEN) for _ in range(3)]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _dense_grads(make, batches, paths):
    """Mean over batches of dL/dW (out, in) of the ORIGINAL model, by plain autograd."""
    model = make(seed=0)
    weights = {p: model.get_submodule(p).weight for p in paths}
    for w in weights.values():
        w.requires_grad_(True)
    for b in batches:
        model(b, labels=b).loss.backward()
    conv = make is tiny_gpt2
    return {p: (w.grad.T if conv else w.grad) / len(batches) for p, w in weights.items()}


def test_output_unchanged_and_first_sgd_step_is_rank_2r_gradient():
    r, alpha, lr = 4, 8.0, 1.0
    spec = lorakit.AdapterSpec(form_args={"r": r, "alpha": alpha, "rslora": True}, init="lora_ga",
                               init_args={"svd": "exact"}, targets=TARGETS)
    base = _logits(tiny_llama(seed=0))
    model = lorakit.attach(tiny_llama(seed=0), spec, batches=[IDS])
    torch.testing.assert_close(_logits(model), base, rtol=1e-4, atol=1e-5)
    forms = adapter_modules(model, "default")
    grads = _dense_grads(tiny_llama, [IDS], forms)
    before = {p: (f.lora_A.detach().clone(), f.lora_B.detach().clone(), f.delta_weight().detach().clone())
              for p, f in forms.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    s = alpha / r ** 0.5
    for path, form in forms.items():
        a0, b0, d0 = before[path]
        g = grads[path]
        m = g.shape[0]
        c2 = m ** 0.5 / 16.0  # (m^{1/4}/√γ)²
        # the factors: c·(orthonormal singular vectors)
        torch.testing.assert_close(a0 @ a0.T, c2 * torch.eye(r), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b0.T @ b0, c2 * torch.eye(r), rtol=1e-4, atol=1e-5)
        step = form.delta_weight().detach() - d0
        # exact: −η s² (G A0ᵀA0 + B0B0ᵀG) + η² s³ G A0ᵀ B0ᵀ G
        first = -lr * s**2 * (g @ a0.T @ a0 + b0 @ b0.T @ g)
        exact = first + lr**2 * s**3 * (g @ a0.T @ b0.T @ g)
        scale = exact.abs().max()
        torch.testing.assert_close(step, exact, rtol=1e-3, atol=1e-3 * scale)
        # first order = −η s² c² · (best rank-2r approximation of G), from a dense SVD
        u, sv, vh = torch.linalg.svd(g)
        best = (u[:, :2 * r] * sv[:2 * r]) @ vh[:2 * r]
        torch.testing.assert_close(first, -lr * s**2 * c2 * best, rtol=1e-3, atol=1e-4 * scale)


def test_lowrank_svd_is_seeded_and_leaves_global_rng_alone():
    spec = lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, init="lora_ga", targets=TARGETS)
    torch.manual_seed(123)
    one = lorakit.attach(tiny_llama(seed=0), spec, batches=BATCHES)
    after = torch.rand(1)
    torch.manual_seed(123)
    two = lorakit.attach(tiny_llama(seed=0), spec, batches=BATCHES)
    assert torch.equal(after, torch.rand(1))
    for path, form in adapter_modules(one, "default").items():
        assert torch.equal(form.lora_A, adapter_modules(two, "default")[path].lora_A)


@pytest.mark.parametrize("make,targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn"])])
def test_peft_variant_matches_real_peft(monkeypatch, make, targets):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.loraga import preprocess_loraga

    r, alpha = 4, 8
    spec = lorakit.AdapterSpec(form_args={"r": r, "alpha": alpha}, init="lora_ga",
                               init_args={"variant": "peft", "seed": 7}, targets=targets)
    ours = lorakit.attach(make(seed=0), spec, batches=BATCHES)

    # real peft on the same batches; its svd_lowrank draws from the global RNG: seed it like lorakit
    original_svd = torch.svd_lowrank

    def seeded_svd(*args, **kwargs):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            return original_svd(*args, **kwargs)

    theirs = make(seed=0)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(), fan_in_fan_out=make is tiny_gpt2)

    def train_step():
        theirs.eval()  # peft switches to train mode; GPT-2's dropout would change the gradients
        for b in BATCHES:
            theirs(b, labels=b).loss.backward()

    preprocess_loraga(theirs, config, train_step)
    monkeypatch.setattr(torch, "svd_lowrank", seeded_svd)
    theirs = peft.get_peft_model(theirs, config)
    monkeypatch.undo()
    for path, form in adapter_modules(ours, "default").items():
        layer = theirs.base_model.model.get_submodule(path)
        delta = layer.get_delta_weight("default")  # PEFT's is in the stored layout ((in, out) for Conv1D)
        torch.testing.assert_close(form.delta_weight(), delta.T if make is tiny_gpt2 else delta, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(form.lora_B, layer.lora_B["default"].weight, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(ours.get_submodule(path).base_layer.weight, layer.base_layer.weight,
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["official", "peft"])
@pytest.mark.parametrize("make,targets", [(tiny_llama, TARGETS), (tiny_gpt2, ["c_attn"])])
def test_trained_adapter_loads_on_the_original_base(tmp_path, make, targets, variant):
    peft = pytest.importorskip("peft")
    spec = lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8, "rslora": variant == "official"}, init="lora_ga",
                               init_args={"variant": variant}, targets=targets)
    model = lorakit.attach(make(seed=0), spec, batches=BATCHES)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = model(IDS, labels=IDS).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = _logits(model)
    lorakit.save(model, tmp_path)
    again = lorakit.load(make(seed=0), tmp_path, trainable=True)
    torch.testing.assert_close(_logits(again), trained, rtol=1e-4, atol=1e-5)
    theirs = peft.PeftModel.from_pretrained(make(seed=0), str(tmp_path)).eval()
    torch.testing.assert_close(_logits(theirs), trained, rtol=1e-4, atol=1e-5)
    assert lorakit.load_state(tmp_path).spec.init == "lora_ga"


def test_rank_too_large_for_2r_vectors_is_refused():
    spec = lorakit.AdapterSpec(form_args={"r": 12, "alpha": 8}, init="lora_ga", targets=["v_proj"])
    with pytest.raises(ValueError, match="2r = 24 singular vectors"):
        lorakit.attach(tiny_llama(seed=0), spec, batches=BATCHES)
