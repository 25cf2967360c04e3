"""Window cascade (Xia & Bouganis, arXiv 2303.08010): τ on val meets the target on val, the window holds
≈ 2·w of val rows, the shift guard moves it with the test scores, only windowed rows reach member 2 (counted
in its adapter), the run equals the offline cascade from cached logits, and the baselines' pass rates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lorakit
from conftest import randomize_adapter
from lorakit.core.inject import adapter_modules
from lorakit.data import Example, Task
from lorakit.data.collate import ClassificationCollator
from lorakit.ensemble import (
    CascadeError,
    Ensemble,
    RandomCascade,
    SingleThresholdCascade,
    WindowCascade,
    cascade_outputs,
    confidence,
    make_cascade,
)
from lorakit.ensemble import metrics as M
from lorakit.models import tiny_llama


def _val(n: int = 2000, seed: int = 0, classes: int = 4):
    """Synthetic member-1 val logits whose confidence predicts correctness."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    logits = torch.randn(n, classes, generator=g)
    strength = torch.rand(n, generator=g) * 5
    right = torch.rand(n, generator=g) < torch.sigmoid(2 * strength - 3)
    boost = torch.where(right, labels, (labels + 1) % classes)
    logits[torch.arange(n), boost] += strength
    return logits, labels


@pytest.mark.parametrize("target", ["cov@10", "cov@5", "risk@80", "risk@50", "FPR@95", "FPR@80"])
def test_tau_on_val_meets_the_target_on_val(target):
    logits, labels = _val()
    uncertainty = "energy" if target.startswith("FPR") else "msp"
    cas = WindowCascade(target=target, uncertainty=uncertainty).fit(logits, labels)
    conf = confidence(logits, uncertainty).numpy()
    correct = (logits.argmax(-1) == labels).numpy()
    kept = conf >= cas.tau
    curve, req, level = M.parse_target(target)
    if req == "risk":  # the selection {s ≥ τ} has selective risk ≈ r
        assert abs((~correct[kept]).mean() - level) < 0.01
    else:  # coverage c (RC) or TPR p (ROC) of {s ≥ τ}
        assert abs(kept.mean() - level) <= 2 / len(conf)


@pytest.mark.parametrize("w", [0.1, 0.05])
def test_window_holds_two_w_of_val_rows(w):
    logits, labels = _val()
    cas = WindowCascade(target="risk@50", window=w, shift_guard=False).fit(logits, labels)
    conf = confidence(logits)
    inside = cas.pass_mask(conf).double().mean().item()
    assert abs(inside - 2 * w) <= 2 / len(conf)
    q = M.percentile_of_score(conf, cas.tau)
    assert cas.window == (pytest.approx(float(torch.quantile(conf, q - w))),
                          pytest.approx(float(torch.quantile(conf, q + w))))


def test_window_clamps_at_the_edge():
    logits, labels = _val()
    cas = WindowCascade(target="risk@50", shift_guard=False).fit(logits, labels)
    conf = confidence(logits)
    cas.tau = float(torch.quantile(conf, 0.04))  # q_tau ≈ 0.04: the band is [Q(0), Q(0.14)]
    cas.window = cas.window_around(conf, cas.tau)
    assert cas.window[0] == pytest.approx(conf.min().item())
    assert abs(cas.pass_mask(conf).double().mean().item() - 0.14) < 0.01


def test_shift_guard_moves_the_window_with_test_scores():
    logits, labels = _val()
    guarded = WindowCascade(target="cov@10", shift_guard=True).fit(logits, labels)
    plain = WindowCascade(target="cov@10", shift_guard=False).fit(logits, labels)
    val_conf = confidence(logits)
    # unlabelled test pool: half ID, half a shifted (OOD-like, less confident) set
    test = torch.cat([val_conf[:1000], val_conf[1000:] * 0.6])
    plain.pass_mask(test, pool=test)
    guarded.pass_mask(test, pool=test)
    assert plain.last_window == plain.window  # no guard: the val window
    assert guarded.last_window != guarded.window
    assert guarded.last_window == pytest.approx(guarded.window_around(test, guarded.tau))
    assert guarded.pass_mask(test, pool=test).double().mean().item() == pytest.approx(0.2, abs=2 / len(test))
    assert guarded.pass_mask(val_conf, pool=val_conf).tolist() == plain.pass_mask(val_conf).tolist()


def test_single_and_random_cascades_match_the_pass_rate():
    logits, labels = _val()
    conf = confidence(logits)
    single = SingleThresholdCascade(pass_fraction=0.2).fit(logits, labels)
    assert abs(single.pass_mask(conf).double().mean().item() - 0.2) <= 1 / len(conf)
    for rate in (0.0, 0.17, 0.2, 1.0):
        mask = RandomCascade(pass_rate=rate, seed=3).pass_mask(conf)
        assert int(mask.sum()) == round(rate * len(conf))
    assert make_cascade("none").pass_mask(conf).sum() == 0 and make_cascade("all").pass_mask(conf).all()


def test_stage2_scores_both_variants():
    ml = torch.randn(2, 7, 3, dtype=torch.float64)
    passed = torch.tensor([1, 0, 1, 0, 0, 1, 1], dtype=torch.bool)
    mean_probs = ml.softmax(-1).mean(0)
    logits, conf = cascade_outputs(ml, passed, "mean_probs", "msp", "ens")
    torch.testing.assert_close(logits[passed].exp(), mean_probs[passed])
    torch.testing.assert_close(logits[~passed], ml[0][~passed])
    torch.testing.assert_close(conf[passed], mean_probs[passed].max(-1).values)
    torch.testing.assert_close(conf[~passed], ml[0].softmax(-1).max(-1).values[~passed])
    _, conf_mean = cascade_outputs(ml, passed, "mean_probs", "msp", "mean")
    torch.testing.assert_close(conf_mean[passed], ml.softmax(-1).max(-1).values.mean(0)[passed])
    _, energy = cascade_outputs(ml, passed, "mean_probs", "energy")
    torch.testing.assert_close(energy[passed], torch.logsumexp(ml, -1).mean(0)[passed])
    with pytest.raises(CascadeError, match="energy"):
        WindowCascade(uncertainty="energy", stage2_score="ens")
    with pytest.raises(CascadeError, match="not fitted"):
        WindowCascade().pass_mask(torch.rand(3))
    with pytest.raises(ValueError, match="unknown argument"):
        WindowCascade(windw=0.1)


# -- a real run on a tiny model --------------------------------------------------------------------------
WORDS = [f"w{i}" for i in range(60)]


def _setup(targets=None, layers: int = 2):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", ":", "Text", "Answer", "x", "y", "z",
                                         *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    rng = np.random.default_rng(0)
    examples = [Example(" ".join(rng.choice(WORDS, rng.integers(2, 9))), ["x", "y", "z"][i % 3])
                for i in range(90)]
    task = Task("toy", "classification", ["x", "y", "z"], examples[:10], examples, "synthetic", "CC0", "Pick")
    collate = ClassificationCollator(tokenizer, task, max_length=32)
    model = tiny_llama(hidden=32, layers=layers, heads=4, kv_heads=2, vocab=128, seed=0)
    spec = lorakit.AdapterSpec(form_args={"r": 4, "alpha": 8}, **({"targets": targets} if targets else {}))
    for i, name in enumerate(("m1", "m2")):
        lorakit.attach(model, spec, name=name, seed=i)
        randomize_adapter(model, name, seed=30 + i, std=0.5)
    ens = Ensemble(model.eval(), ["m1", "m2"], "mean_probs", label_token_ids=collate.label_token_ids)
    return ens, examples, collate


def _count_rows(model, name):
    """Rows each of adapter ``name``'s forms sees (wraps ``apply``, the path every forward takes)."""
    seen = {}
    for path, form in adapter_modules(model, name).items():
        seen[path] = 0
        original = form.apply

        def counted(x, out, _orig=original, _path=path):
            seen[_path] += x.shape[0]
            return _orig(x, out)
        form.apply = counted
    return seen


def test_run_sends_only_windowed_rows_to_member_2_and_equals_offline():
    ens, examples, collate = _setup()
    val, test = examples[:45], examples[45:]
    cas = WindowCascade(target="risk@50", window=0.15).fit_examples(ens, val, collate, batch_size=8)
    seen2, seen1 = _count_rows(ens.model, "m2"), _count_rows(ens.model, "m1")
    res = cas.run(ens, test, collate, batch_size=7)
    n_pass = int(res.passed.sum())
    assert 0 < n_pass < len(test)
    assert set(seen2.values()) == {n_pass}  # every m2 layer saw exactly the windowed rows
    assert set(seen1.values()) == {len(test)}  # member 1 ran once per row
    assert res.stage2.rows == {"m2": n_pass} and res.stage1.rows == {"m1": len(test)}
    assert res.pass_rate == pytest.approx(n_pass / len(test))
    assert 1 < res.cost_vs_single < 2
    full = ens.predict_examples(test, collate, batch_size=16)  # offline: all members on every row
    logits, conf = cascade_outputs(full.member_logits, res.passed, "mean_probs", "msp", "ens")
    torch.testing.assert_close(res.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.conf, conf, atol=1e-5, rtol=1e-5)
    # shift guard on by default: the window is the band around τ among these rows' member-1 scores
    assert res.window == pytest.approx(cas.window_around(confidence(full.member_logits[0]), cas.tau), abs=1e-5)


def test_run_with_prefix_reuse_matches_and_costs_less():
    ens, examples, collate = _setup(targets=r"model\.layers\.[12]\..*(q_proj|v_proj)", layers=3)
    assert ens.prefix_layer == 1
    val, test = examples[:45], examples[45:]
    plain = WindowCascade(target="risk@50", window=0.15).fit_examples(ens, val, collate)
    reuse = WindowCascade(target="risk@50", window=0.15, prefix_reuse=True).fit_examples(ens, val, collate)
    a, b = plain.run(ens, test, collate, batch_size=10), reuse.run(ens, test, collate, batch_size=10)
    assert a.passed.tolist() == b.passed.tolist()
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    assert b.stage2.flops < a.stage2.flops and b.stage1.flops == a.stage1.flops
    with pytest.raises(ValueError, match="prefix"):
        ens2, _, _ = _setup()
        WindowCascade(prefix_reuse=True, target="risk@50").fit_examples(ens2, val, collate).run(ens2, test, collate)
