"""The one adapter runtime: per-forward context (ids, mixing weights), the batched-delta op and its
backend registry, stacked sources beside forms in one AdaptedLayer, and a routed composition served
by the engine with the logits of the routed module. References are dense recomputations."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.core.batched import BackendError, choose_backend, register_backend, stacked_delta
from lorakit.core.context import AdapterContext, ContextError, use_context
from lorakit.core.inject import adapter_modules
from lorakit.core.layer import AdaptedLayer
from lorakit.core.sources import StackedLoRA, add_source, remove_source
from lorakit.models import tiny_llama

try:
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter

IDS = torch.randint(3, 128, (3, 6), generator=torch.Generator().manual_seed(0))
NAMES = ("a", "b", "c")


def _three_adapters():
    model = tiny_llama(seed=0)
    for i, name in enumerate(NAMES):
        r = 2 + i
        lorakit.attach(model, lorakit.AdapterSpec(form_args={"r": r, "alpha": 2.0 * r}, targets=["q_proj", "v_proj"]),
                       name=name, seed=i)
        randomize_adapter(model, name=name, seed=10 + i, std=0.3)
    return model


def _dense_reference(model, weights: torch.Tensor):
    """A copy of the base whose q/v layers compute W0 x + Σ_e w_e ΔW_e x densely (w per row/token)."""
    forms = {n: adapter_modules(model, n) for n in NAMES}
    ref = copy.deepcopy(model)
    lorakit.unload(ref, merge_active=False)
    hooks = []
    for path in forms["a"]:
        deltas = torch.stack([forms[n][path].delta_weight().detach() for n in NAMES])  # [E, out, in]

        def hook(module, inputs, out, deltas=deltas):
            x = inputs[0]
            w = weights
            while w.dim() - 1 < x.dim() - 1:
                w = w[..., None, :]
            return out + torch.einsum("...e,eoi,...i->...o", w.expand(*x.shape[:-1], 3), deltas, x)

        hooks.append(ref.get_submodule(path).register_forward_hook(hook))
    return ref


@pytest.mark.parametrize("per_token", [False, True])
def test_mixing_weights_equal_dense_weighted_sum_of_delta_w(per_token):
    model = _three_adapters()
    g = torch.Generator().manual_seed(1)
    shape = (IDS.shape[0], IDS.shape[1], 3) if per_token else (IDS.shape[0], 3)
    weights = torch.rand(shape, generator=g) * 2 - 0.5
    with torch.no_grad(), lorakit.mixing(NAMES, weights):
        got = model(IDS).logits
    with torch.no_grad():
        want = _dense_reference(model, weights)(IDS).logits
        base = copy.deepcopy(model)
        with lorakit.disabled(base):
            plain = base(IDS).logits
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_one_hot_weights_equal_mixed_batch_and_ids():
    model = _three_adapters()
    rows = ["c", None, "a"]
    with torch.no_grad(), lorakit.mixed_batch(model, rows):
        mixed = model(IDS).logits
    ids = torch.tensor([2, -1, 0])
    with torch.no_grad(), use_context(AdapterContext(names=NAMES, ids=ids)):
        by_ids = model(IDS).logits
    onehot = torch.tensor([[0.0, 0, 1], [0, 0, 0], [1, 0, 0]])
    with torch.no_grad(), lorakit.mixing(NAMES, onehot):
        by_weights = model(IDS).logits
    torch.testing.assert_close(by_ids, mixed, rtol=0, atol=1e-6)
    torch.testing.assert_close(by_weights, mixed, rtol=0, atol=1e-5)


def test_bad_contexts_are_named():
    with pytest.raises(ContextError, match="3 adapter name"):
        AdapterContext(names=NAMES, weights=torch.ones(2, 2))
    with pytest.raises(ContextError, match="out of range"):
        AdapterContext(names=NAMES, ids=torch.tensor([0, 3]))
    with pytest.raises(ContextError, match="finite"):
        AdapterContext(names=NAMES, weights=torch.tensor([[float("nan"), 0, 0]]))
    model = _three_adapters()
    with pytest.raises(ContextError, match="do not match"), lorakit.mixing(NAMES, torch.ones(5, 3)):
        model(IDS)


def _stack(e=3, r=4, inp=8, out=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(e, r, inp, generator=g), torch.randn(e, out, r, generator=g), torch.randn(e, out, generator=g)


def test_stacked_delta_reference_paths_agree_and_train():
    A, B, bias = _stack()
    x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([1, -1, 0, 2])
    onehot = torch.nn.functional.one_hot(ids.clamp_min(0), 3).float() * (ids >= 0)[:, None]
    scale = torch.tensor([0.5, 2.0, 1.0])
    gathered = stacked_delta(x, A, B, ids=ids, bias=bias, scale=scale)
    weighted = stacked_delta(x, A, B, weights=onehot[:, None, :], bias=bias, scale=scale)
    dense = torch.stack([(x[n] @ (scale[i] * B[i] @ A[i]).T + scale[i] * bias[i]) if i >= 0 else torch.zeros(3, 5)
                         for n, i in enumerate(ids.tolist())])
    torch.testing.assert_close(gathered, dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weighted, dense, rtol=1e-5, atol=1e-5)
    # factors mode: (Σ w s B)(Σ w A) x, one mixture per row
    w = torch.rand(4, 3, generator=torch.Generator().manual_seed(3))
    got = stacked_delta(x, A, B, weights=w, scale=scale, mode="factors")
    want = torch.stack([x[n] @ (torch.einsum("e,eor->or", w[n] * scale, B) @ torch.einsum("e,eri->ri", w[n], A)).T
                        for n in range(4)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # autograd through the reference equals autograd through the dense form
    A1, B1 = A.clone().requires_grad_(), B.clone().requires_grad_()
    stacked_delta(x, A1, B1, ids=ids).square().sum().backward()
    A2, B2 = A.clone().requires_grad_(), B.clone().requires_grad_()
    torch.stack([x[n] @ (B2[i] @ A2[i]).T if i >= 0 else torch.zeros(3, 5)
                 for n, i in enumerate(ids.tolist())]).square().sum().backward()
    torch.testing.assert_close(A1.grad, A2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B1.grad, B2.grad, rtol=1e-5, atol=1e-5)


def test_backend_registry_picks_by_priority_and_names_unknown():
    A, B, _ = _stack()
    x = torch.randn(2, 8)
    calls = []

    def fake(x, A, B, **kw):
        calls.append(kw["mode"])
        return torch.zeros(x.shape[0], B.shape[1])

    register_backend("test-op", "slow", fake, priority=0)
    register_backend("test-op", "fast", fake, available=lambda x, *a, **k: x.shape[0] > 1, priority=5)
    assert choose_backend("test-op", "auto", x, A, B).name == "fast"
    assert choose_backend("test-op", "auto", x[:1], A, B).name == "slow"
    with pytest.raises(BackendError, match="known: fast, slow"):
        choose_backend("test-op", "nope", x, A, B)
    with pytest.raises(BackendError, match="known: torch"):
        stacked_delta(x, A, B, ids=torch.tensor([0, 1]), backend="nope")


def test_stacked_source_beside_forms_and_removal_restores_the_module():
    model = _three_adapters()
    lorakit.set_active(model, ["a"])
    path = "model.layers.0.mlp.down_proj"  # no form here: the source wraps the plain Linear
    original = model.get_submodule(path)
    lin = original
    A, B, _ = _stack(e=2, r=3, inp=lin.in_features, out=lin.out_features)
    source = StackedLoRA(A * 0.1, B * 0.1)
    add_source(model, path, "test", source)
    assert isinstance(model.get_submodule(path), AdaptedLayer)
    with torch.no_grad():
        x = torch.randn(3, 6, lin.in_features)
        plain = lin(x)
        # no context, or one addressing something else: the stack adds nothing
        torch.testing.assert_close(model.get_submodule(path)(x), plain)
        w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
        for other in (AdapterContext(weights=w), AdapterContext(weights=w, target="serving")):
            with use_context(other):
                torch.testing.assert_close(model.get_submodule(path)(x), plain)
        with use_context(AdapterContext(weights=w, target="test")):  # addressed by its key
            got = model.get_submodule(path)(x)
        want = plain + torch.stack([x[n] @ sum(w[n, e] * source.expert_delta(e) for e in range(2)).T
                                    for n in range(3)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        with lorakit.disabled(model):  # disabling the adapters disables the layer's sources too
            torch.testing.assert_close(model.get_submodule(path)(x), plain)
    assert remove_source(model, path, "test") is source
    assert model.get_submodule(path) is original


def test_routed_composition_is_served_with_the_routed_logits(tmp_path):
    from lorakit.compose.route import route
    from lorakit.serving import AdapterBank, Request, ServingEngine

    base = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)
    folders = []
    for i in range(4):  # MeteoRA over 4 LoRA adapters
        m = copy.deepcopy(base)
        lorakit.attach(m, lorakit.AdapterSpec(form_args={"r": 2 + i, "alpha": 4.0},
                                              targets=["q_proj", "v_proj", "o_proj"]), seed=i)
        randomize_adapter(m, seed=20 + i, std=0.3)
        lorakit.save(m, tmp_path / f"a{i}")
        folders.append(tmp_path / f"a{i}")
    routed = route(copy.deepcopy(base), folders, "meteora", top_k=2).eval()
    with torch.no_grad():
        for gate in routed.layers.values():  # input-dependent routing with teeth
            gate.gate.weight.copy_(torch.randn(gate.gate.weight.shape, generator=torch.Generator().manual_seed(5)))
    bank = AdapterBank.for_model(routed.model, budget_bytes=1 << 20)  # no bank adapters: rows use the router
    engine = ServingEngine(routed.model, bank)
    prompts = [[5, 9, 17, 33], [7, 8]]
    reqs = engine.generate([Request(prompt=p, max_new_tokens=4, return_logits=True) for p in prompts])
    with torch.no_grad():
        for req, prompt in zip(reqs, prompts):
            full = torch.tensor([list(prompt) + req.tokens[:-1]])
            want = routed(input_ids=full).logits[0, len(prompt) - 1:]
            got = torch.stack(req.logits)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
            with routed.disabled_routing():
                plain = routed(input_ids=full).logits[0, len(prompt) - 1:]
            assert (want - plain).abs().max() > 1e-2
