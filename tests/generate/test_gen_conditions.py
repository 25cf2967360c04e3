"""Condition providers: SG-LoRA's semantic prior against brute force, the text-encoder registry, ICM-LoRA's
hidden-state task vector against a manual forward."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.core.spec import AdapterSpec
from lorakit.generate.conditions import (
    ConditionError,
    hidden_state_condition,
    register_text_encoder,
    semantic_prior,
    text_encoder,
    top_k_tasks,
    unregister_text_encoder,
)
from lorakit.models import tiny_llama


def _toy(n=6, e=5, d=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(e, generator=g), torch.randn(n, e, generator=g), torch.randn(n, d, generator=g),
            torch.rand(n, d, generator=g) * 0.3)


def test_semantic_prior_matches_closed_form_and_mixture_samples():
    q, embs, protos, var = _toy()
    mu, v, w = semantic_prior(q, embs, protos, var, k=3, tau=0.5)
    sim = torch.tensor([float(q @ e / (q.norm() * e.norm())) for e in embs])
    top = sorted(range(6), key=lambda i: -sim[i])[:3]
    ex = torch.exp(sim[top] / 0.5)
    alpha = torch.zeros(6)
    alpha[top] = ex / ex.sum()
    assert torch.allclose(w, alpha, atol=1e-6) and (w > 0).sum() == 3 and abs(w.sum().item() - 1) < 1e-6
    ref_mu = sum(alpha[i] * protos[i] for i in range(6))
    assert torch.allclose(mu, ref_mu, atol=1e-6)
    # the variance of the mixture Σ α_n N(μ_n, σ_n²), estimated from samples (law of total variance)
    g = torch.Generator().manual_seed(1)
    comp = torch.multinomial(alpha, 400_000, replacement=True, generator=g)
    samples = protos[comp] + var[comp].sqrt() * torch.randn(400_000, 7, generator=g)
    assert torch.allclose(samples.mean(0), mu, atol=0.01)
    assert torch.allclose(samples.var(0), v, rtol=0.02, atol=1e-3)
    exact = sum(alpha[i] * (var[i] + protos[i] ** 2) for i in range(6)) - ref_mu ** 2  # E[x²] − E[x]²
    assert torch.allclose(v, exact, atol=1e-5)


def test_top_k_leave_out_and_clipping():
    q, embs, protos, var = _toy()
    embs[2] = q * 3  # cos = 1: the nearest
    sim, top = top_k_tasks(q, embs, 2)
    assert top[0] == 2 and sim[2] == pytest.approx(1.0, abs=1e-6)
    _, _, w = semantic_prior(q, embs, protos, var, k=2, leave_out=2)
    assert w[2] == 0 and (w > 0).sum() == 2
    _, _, w = semantic_prior(q, embs, protos, var, k=100)  # K clipped to N
    assert (w > 0).sum() == 6
    # τ → 0 puts all weight on the nearest; K = 1 is the nearest expert exactly
    mu, v, _ = semantic_prior(q, embs, protos, var, k=1)
    assert torch.allclose(mu, protos[2]) and torch.allclose(v, var[2])


@pytest.mark.parametrize("kw, words", [
    (dict(k=0), "k must"), (dict(tau=0.0), "tau"), (dict(leave_out=9), "leave_out"),
])
def test_semantic_prior_refuses_bad_arguments(kw, words):
    q, embs, protos, var = _toy()
    with pytest.raises(ConditionError, match=words):
        semantic_prior(q, embs, protos, var, **kw)


def test_semantic_prior_refuses_bad_shapes():
    q, embs, protos, var = _toy()
    with pytest.raises(ConditionError, match="query_emb"):
        semantic_prior(q[:3], embs, protos, var)
    with pytest.raises(ConditionError, match="prototypes"):
        semantic_prior(q, embs, protos[:4], var)
    with pytest.raises(ConditionError, match="non-negative"):
        semantic_prior(q, embs, protos, -var)
    with pytest.raises(ConditionError, match="besides"):
        semantic_prior(q, embs[:1], protos[:1], var[:1], leave_out=0)


def test_text_encoder_registry_and_cache():
    calls = []

    def fn(texts):
        calls.append(len(texts))
        return torch.tensor([[float(len(t)), 1.0] for t in texts])

    register_text_encoder("toy-len", fn)
    try:
        enc = text_encoder("toy-len")
        assert text_encoder("toy-len") is enc  # cached per process
        assert torch.equal(enc.encode(["ab", "abcd"]), torch.tensor([[2.0, 1.0], [4.0, 1.0]]))
        assert calls == [2]
    finally:
        unregister_text_encoder("toy-len")
    with pytest.raises(ConditionError, match="unknown text encoder"):
        text_encoder("toy-len")
    h = text_encoder("hash").encode(["nouns denoting animals", "animals", "animals"])
    assert h.shape == (3, 64) and torch.equal(h[1], h[2])  # deterministic, shared words match
    assert torch.allclose(h[0], h[1] + text_encoder("hash").encode(["nouns denoting"])[0], atol=1e-5)
    register_text_encoder("toy-fn", lambda texts: torch.zeros(len(texts), 2))
    try:
        with pytest.raises(ConditionError, match="list of strings"):
            text_encoder("toy-fn").encode("one string")  # a bare string is not a list of texts
    finally:
        unregister_text_encoder("toy-fn")


@pytest.mark.slow
def test_minilm_mean_pooling_is_normalised_and_semantic():
    enc = text_encoder("minilm")
    e = enc.encode(["nouns denoting animals", "words for creatures like dogs and cats", "stock market prices"])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.1
    # batching does not change the embedding (padding is masked out of the mean)
    assert torch.allclose(enc.encode(["nouns denoting animals"])[0], e[0], atol=1e-5)


class _CharTok:
    """A minimal tokenizer: characters → ids 3.., right padding with 0 (as lorakit's loaders pad)."""

    pad_token_id = 0
    eos_token_id = 2

    def __call__(self, texts, return_tensors="pt", padding=False, truncation=False, max_length=512):
        single = isinstance(texts, str)
        rows = [[3 + (ord(c) % 100) for c in t][:max_length] for t in ([texts] if single else texts)]
        n = max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        return _Enc(input_ids=ids, attention_mask=mask)


class _Enc(dict):
    def to(self, device):
        return self


def test_hidden_state_condition_matches_a_manual_hook():
    model = tiny_llama(seed=0)
    tok = _CharTok()
    texts = ["a cat", "the dog runs", "bird"]
    got = hidden_state_condition(model, tok, texts, batch_size=2)
    rec = []
    h = model.model.layers[-1].register_forward_hook(lambda m, i, o: rec.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for t in texts:  # one text at a time, no padding: the last position is the last token
            model(input_ids=tok(t)["input_ids"])
    h.remove()
    ref = torch.stack([r[0, -1] for r in rec]).mean(0)
    assert got.shape == (32,) and torch.allclose(got, ref, atol=1e-5)
    mean = hidden_state_condition(model, tok, texts, reduce="mean")
    assert torch.allclose(mean, torch.stack([r[0].mean(0) for r in rec]).mean(0), atol=1e-5)
    # in-context prompts: chunks of k texts joined by newlines
    ic = hidden_state_condition(model, tok, texts, in_context=2)
    rec.clear()
    h = model.model.layers[-1].register_forward_hook(lambda m, i, o: rec.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for p in ["a cat\nthe dog runs", "bird"]:
            model(input_ids=tok(p)["input_ids"])
    h.remove()
    assert torch.allclose(ic, torch.stack([r[0, -1] for r in rec]).mean(0), atol=1e-5)


def test_hidden_state_condition_adapter_vs_base_and_generate_steps():
    model = tiny_llama(seed=0)
    tok = _CharTok()
    texts = ["a cat", "the dog runs"]
    base = hidden_state_condition(model, tok, texts)
    lorakit.attach(model, AdapterSpec(form_args={"r": 2, "alpha": 4}, targets=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(hash(n) % 1000))
    tuned = hidden_state_condition(model, tok, texts, adapter="default")
    assert not torch.allclose(tuned, base, atol=1e-4)
    assert torch.allclose(hidden_state_condition(model, tok, texts, adapter=None), base, atol=1e-6)
    # generate_steps: the prompt's last position plus one row per decoding step, averaged
    steps = hidden_state_condition(model, tok, texts, adapter="default", generate_steps=3)
    rec = []
    h = model.model.layers[-1].register_forward_hook(lambda m, i, o: rec.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"]
            for _ in range(3):  # the prompt, then 2 more forwards for 3 new tokens (no KV cache here)
                logits = model(input_ids=ids).logits
                ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    h.remove()
    assert torch.allclose(steps, torch.stack([r[0, -1] for r in rec]).mean(0), atol=1e-4)
    with pytest.raises(ConditionError, match="no adapter"):
        hidden_state_condition(model, tok, texts, adapter="other")
    with pytest.raises(ConditionError, match="reduce"):
        hidden_state_condition(model, tok, texts, reduce="max")
