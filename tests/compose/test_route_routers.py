"""Routers over a bank of frozen adapters: one-hot gates reproduce that adapter (real `peft` as the
oracle), MeteoRA gate training routes two toy tasks, LoRA-Mixer's loss on a hand-computed example,
RecLoRA's mixtures against dense recomputation, and exact save/load."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit.api import extract_state
from lorakit.compose.route import load_routed, route
from lorakit.compose.route.lora_mixer import rsl_loss
from lorakit.core.spec import AdapterSpec
from lorakit.models import tiny_llama

try:
    from tests.conftest import randomize_adapter
except ModuleNotFoundError:
    from conftest import randomize_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]
IDS = torch.randint(3, 128, (3, 9), generator=torch.Generator().manual_seed(0))


def base():
    return tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2, vocab=128, seed=0)


def make_state(r: int, seed: int, bias: bool = False):
    model = base()
    args = {"r": r, "alpha": float(2 * r)}
    if bias:
        args["bias"] = True
    lorakit.attach(model, AdapterSpec(form="lora", form_args=args, targets=TARGETS), seed=seed)
    randomize_adapter(model, seed=seed + 100, std=0.2)
    return extract_state(model)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bank")
    out = []
    for i, (r, bias) in enumerate([(2, False), (4, False), (3, True)]):
        d = root / f"task{i}"
        lorakit.save_state(make_state(r, i, bias), d)
        out.append(d)
    return out


def logits(model, **kw):
    with torch.no_grad():
        return model(input_ids=IDS, **kw).logits


def peft_logits(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = PeftModel.from_pretrained(base(), str(folder)).eval()
    return logits(m)


ROUTERS = {"meteora": {}, "lora_mixer": {}, "reclora": {"user_dim": 5}, "reclora-delta": {"user_dim": 5,
                                                                                         "mix": "delta"}}


@pytest.mark.parametrize("case", list(ROUTERS))
@pytest.mark.parametrize("e", [0, 1, 2])
def test_one_hot_weights_reproduce_that_adapter_in_peft(folders, case, e):
    routed = route(base(), folders, case.split("-")[0], **ROUTERS[case]).eval()
    routed.set_weights(torch.nn.functional.one_hot(torch.tensor(e), 3).float())
    theirs = peft_logits(folders[e])
    assert (theirs - logits(base())).abs().max() > 1e-3
    torch.testing.assert_close(logits(routed), theirs, rtol=0, atol=1e-5)


def test_router_own_gates_one_hot(folders):
    """Each router's own gating mechanism, driven to one-hot, reproduces the adapter in peft."""
    theirs = peft_logits(folders[1])
    mixer = route(base(), folders, "lora_mixer").eval()  # hard routing of labelled tokens
    torch.testing.assert_close(logits(mixer, task_ids=torch.tensor([1, 1, 1])), theirs, rtol=0, atol=1e-5)
    rec = route(base(), folders, "reclora", user_dim=4, top_k=1).eval()  # hard top-1 from the user MLP
    with torch.no_grad():
        last = rec.user_gate[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
    torch.testing.assert_close(logits(rec, user=torch.randn(3, 4)), theirs, rtol=0, atol=1e-5)
    met = route(base(), folders, "meteora", top_k=1).eval()  # top-1: w = softmax(one value) = 1
    out = logits(met)
    for la in met.layers.values():
        assert set(la.last["logits"].argmax(-1).unique().tolist()) <= {0, 1, 2}
    # per-token reference: each token gets the expert its gate picked, computed densely per layer
    x = torch.randn(2, 5, 32)
    layer = met.layers["model.layers.0.self_attn.q_proj"]  # the router's gate on that layer
    with torch.no_grad():
        y = met.model.get_submodule("model.layers.0.self_attn.q_proj")(x)
        pick = layer.gate(x).argmax(-1)
        ref = layer.base_layer(x).clone()
        for i in range(2):
            for t in range(5):
                e = int(pick[i, t])
                ref[i, t] += layer.stack.expert_delta(e) @ x[i, t]
                if layer.stack.bias is not None:
                    ref[i, t] += layer.stack.bias[e]
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-5)
    assert torch.isfinite(out).all()


def test_meteora_gate_training_routes_two_tasks(folders):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)

    def batch():  # two tasks with their own vocabularies (tokens 3..14 vs 64..75), per-sequence labels
        t = torch.randint(0, 2, (8,), generator=g)
        ids = torch.where(t[:, None] == 0, torch.randint(3, 15, (8, 12), generator=g),
                          torch.randint(64, 76, (8, 12), generator=g))
        return {"input_ids": ids, "task_ids": t}

    routed = route(base(), folders[:2], "meteora", top_k=1)
    train = [batch() for _ in range(4)]
    losses = routed.train_gates(train, steps=80, lr=2e-2)
    assert losses[-1] < losses[0]
    test = batch()
    with torch.no_grad():
        routed(input_ids=test["input_ids"])
    assert routed.gate_accuracy(test["task_ids"]) > 0.9
    assert all(not p.requires_grad for la in routed.layers.values() for p in la.stack.expert_parameters())


def test_lora_mixer_rsl_hand_computed():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    # p̄ = (0.45, 0.35, 0.2); argmax → experts 0, 1: f̄ = (0.5, 0.5, 0); Σ p̄ f̄ = 0.4
    h = -(p * p.log()).sum(-1).mean()  # H1 = 0.80182, H2 = 1.02965 → 0.915735
    assert abs(float(h) - 0.915735) < 1e-5
    got = rsl_loss(p, balance_coef=1.0, entropy_coef=0.1, entropy_sign=-1.0)
    assert abs(float(got) - (0.4 - 0.0915735)) < 1e-5
    got = rsl_loss(p, balance_coef=1.0, entropy_coef=0.1, entropy_sign=1.0)
    assert abs(float(got) - (0.4 + 0.0915735)) < 1e-5
    # top-2 shares: rows pick {0,1} and {1,2}: f̄ = (1/4, 2/4, 1/4); Σ p̄ f̄ = 0.1125 + 0.175 + 0.05 = 0.3375
    got = rsl_loss(p, balance_coef=1.0, entropy_coef=0.0, f_def="topk", top_k=2)
    assert abs(float(got) - 0.3375) < 1e-6
    # the sign matters for the gradient: with sign −1, descent raises the entropy
    logits = torch.tensor([[2.0, 0.0, -1.0]], requires_grad=True)
    rsl_loss(torch.softmax(logits, -1), balance_coef=0.0, entropy_coef=1.0, entropy_sign=-1.0).backward()
    stepped = torch.softmax(logits.detach() - 0.1 * logits.grad, -1)
    before = torch.softmax(logits.detach(), -1)
    assert -(stepped * stepped.log()).sum() > -(before * before.log()).sum()


def test_lora_mixer_regimes_and_sparse_inference(folders):
    mixer = route(base(), folders, "lora_mixer", top_k=2)
    mixer.train()
    with torch.no_grad():
        mixer(input_ids=IDS)
    probs = next(iter(mixer.router_probs().values()))
    layer = next(iter(mixer.layers.values()))
    mixer.eval()
    w = mixer.compute_weights(layer, torch.randn(4, 32) if layer.stack.A.shape[2] == 32 else torch.randn(4, 64))
    assert ((w > 0).sum(-1) == 2).all() and torch.allclose(w.sum(-1), torch.ones(4))
    assert probs.shape[-1] == 3
    assert all(p.requires_grad is False for la in mixer.layers.values() for p in la.stack.expert_parameters())
    joint = route(base(), folders, "lora_mixer", regime="joint")
    joint.train()
    out = joint(input_ids=IDS, labels=IDS)
    loss = out.loss + joint.aux_loss()
    loss.backward()
    assert all(p.grad is not None for p in joint.trainable_parameters())
    with torch.no_grad():
        next(iter(joint.layers.values())).stack.A.add_(0.1)
    joint(input_ids=IDS)
    assert joint.aux_loss() > 0


@pytest.mark.parametrize("mix", ["factors", "delta"])
def test_reclora_mixture_matches_dense(folders, mix):
    rec = route(base(), folders, "reclora", user_dim=6, mix=mix).eval()
    user = torch.randn(2, 6, generator=torch.Generator().manual_seed(3))
    alpha = rec.user_weights(user)
    assert torch.allclose(alpha.sum(-1), torch.ones(2))
    x = torch.randn(2, 4, 32)
    path = "model.layers.1.self_attn.q_proj"
    layer = rec.layers[path]
    rec.prepare({"user": user})
    with torch.no_grad():
        y = rec.model.get_submodule(path)(x) - layer.base_layer(x)
    s = layer.stack
    for b in range(2):
        if mix == "delta":
            dw = sum(alpha[b, e] * s.expert_delta(e) for e in range(3))
        else:  # (Σ α s B)(Σ α A): the official code's product of weighted sums
            dw = sum(alpha[b, e] * s.scale[e] * s.B[e] for e in range(3)) @ sum(alpha[b, e] * s.A[e] for e in range(3))
        bias = 0 if s.bias is None else (alpha[b] * s.scale) @ s.bias  # adapter 2 has a lora_bias
        torch.testing.assert_close(y[b], x[b] @ dw.T + bias, rtol=0, atol=1e-5)
    if mix == "factors":  # cross terms: not the weighted sum of ΔW
        dsum = sum(alpha[0, e] * s.expert_delta(e) for e in range(3))
        assert (y[0] - x[0] @ dsum.T).abs().max() > 1e-4
    B_u, A_u = rec.user_adapter(user[0])[path]
    bias = 0 if s.bias is None else (alpha[0] * s.scale) @ s.bias
    torch.testing.assert_close(x[0] @ (B_u @ A_u).T + bias, y[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", ["meteora", "lora_mixer", "reclora", "reclora-layer"])
def test_router_save_load_exact(folders, tmp_path, case):
    args = {"reclora": {"user_dim": 5}, "reclora-layer": {"user_dim": 5, "per_layer_gate": True}}.get(case, {})
    method = case.split("-")[0]
    routed = route(base(), folders, method, **args).eval()
    with torch.no_grad():  # non-trivial router tensors
        for p in routed.gate_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    kw = {"user": torch.randn(3, 5, generator=torch.Generator().manual_seed(9))} if method == "reclora" else {}
    before = logits(routed, **kw)
    assert (before - logits(base())).abs().max() > 1e-3
    routed.save(tmp_path)
    assert (tmp_path / "lorakit_router.json").exists()
    again = load_routed(base(), tmp_path).eval()
    assert type(again) is type(routed) and again.args == routed.args
    assert torch.equal(logits(again, **kw), before)
    for k, v in routed.router_state().items():
        assert torch.equal(again.router_state()[k], v)


def test_router_errors(folders, tmp_path):
    from lorakit.compose.route import RouterError

    with pytest.raises(RouterError, match="at least one"):
        route(base(), [], "meteora")
    rec = route(base(), folders, "reclora", user_dim=5)
    with pytest.raises(RouterError, match="user representation"):
        rec(input_ids=IDS)
    with pytest.raises(RouterError, match="not a router folder"):
        load_routed(base(), tmp_path)
    model = base()
    routed = route(model, folders, "meteora")
    with pytest.raises(RouterError, match="already routed"):
        route(model, folders, "meteora")
    routed.unroute()
    torch.testing.assert_close(logits(model), logits(base()), rtol=0, atol=0)
