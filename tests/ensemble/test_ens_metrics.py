"""Selective-classification and OOD metrics against brute-force loops, closed forms, and the official
code's own construction (sklearn / scipy calls as in ``Guoxoug/window-early-exit`` ``utils/eval_utils.py``)."""

from __future__ import annotations

import numpy as np
import pytest

from lorakit.ensemble import metrics as M


def _data(n: int = 300, seed: int = 0, ties: bool = False):
    rng = np.random.default_rng(seed)
    conf = rng.random(n)
    if ties:
        conf = np.round(conf, 1)
    correct = rng.random(n) < 0.3 + 0.6 * conf  # more confident, more often right
    return correct, conf


def _brute_rc(correct, conf):
    order = sorted(range(len(conf)), key=lambda i: -conf[i])
    risk = [0.0] + [sum(not correct[j] for j in order[:k]) / k for k in range(1, len(conf) + 1)]
    return np.array(risk), np.array([k / len(conf) for k in range(len(conf) + 1)]), conf[order]


def test_risk_coverage_curve_and_aurc_brute_force():
    correct, conf = _data()
    risk, cov, thr = M.risk_coverage_curve(correct, conf)
    b_risk, b_cov, b_thr = _brute_rc(correct, conf)
    np.testing.assert_allclose(risk, b_risk)
    np.testing.assert_allclose(cov, b_cov)
    np.testing.assert_allclose(thr, b_thr)
    trap = sum((b_cov[k + 1] - b_cov[k]) * (b_risk[k + 1] + b_risk[k]) / 2 for k in range(len(conf)))
    assert M.aurc(correct, conf) == pytest.approx(trap)


def test_aurc_closed_forms():
    # all correct: zero risk everywhere
    assert M.aurc(np.ones(10, bool), np.arange(10.0)) == 0.0
    # all wrong: risk 1 from the first point on: area = 1 - 1/(2n)
    n = 8
    assert M.aurc(np.zeros(n, bool), np.arange(n, dtype=float)) == pytest.approx(1 - 1 / (2 * n))
    # one wrong sample ranked last: risk_k = 0 for k < n, risk_n = 1/n: area = (1/n)(1/n)/2
    correct = np.ones(n, bool)
    correct[0] = False
    conf = np.arange(n, dtype=float)  # sample 0 is the least confident
    assert M.aurc(correct, conf) == pytest.approx(1 / (2 * n * n))


def test_coverage_at_risk_and_risk_at_coverage_brute_force():
    correct, conf = _data(400, seed=1)
    b_risk, b_cov, b_thr = _brute_rc(correct, conf)
    for level in (0.05, 0.10, 0.2):
        for skip in (0, 4, 50):
            k = min(range(skip, len(b_risk)), key=lambda i: (abs(b_risk[i] - level), i))
            cov, thr = M.coverage_at_risk(correct, conf, level, skip=skip)
            assert cov == pytest.approx(b_cov[k]) and thr == pytest.approx(b_thr[min(k, len(b_thr) - 1)])
    for level in (0.5, 0.8):
        k = min(range(len(b_cov)), key=lambda i: (abs(b_cov[i] - level), i))
        risk, thr = M.risk_at_coverage(correct, conf, level)
        assert risk == pytest.approx(b_risk[k]) and thr == pytest.approx(b_thr[k])
    assert M.default_skip(400) == 4 and M.default_skip(10 ** 6) == M.OFFICIAL_SKIP
    with pytest.raises(M.MetricInputError, match="skip"):
        M.coverage_at_risk(correct, conf, 0.05, skip=500)


def _brute_fpr(conf_id, conf_ood, level):
    thresholds = sorted(set(conf_id) | set(conf_ood))
    best = min(thresholds, key=lambda t: (abs(np.mean(conf_id >= t) - level), t))  # first in increasing order
    return np.mean(conf_ood >= best)


@pytest.mark.parametrize("ties", [False, True])
def test_fpr_and_auroc_brute_force(ties):
    rng = np.random.default_rng(3)
    conf_id, conf_ood = rng.normal(1.0, 1.0, 120), rng.normal(0.0, 1.0, 90)
    if ties:
        conf_id, conf_ood = np.round(conf_id, 1), np.round(conf_ood, 1)
    for level in (0.8, 0.95):
        assert M.fpr_at_tpr(conf_id, conf_ood, level) == pytest.approx(_brute_fpr(conf_id, conf_ood, level))
    pairs = [(a > b) + 0.5 * (a == b) for a in conf_id for b in conf_ood]
    assert M.auroc(conf_id, conf_ood) == pytest.approx(np.mean(pairs))
    assert M.auroc([2.0, 3.0], [0.0, 1.0]) == 1.0 and M.auroc([0.0], [0.0]) == 0.5


def test_against_the_official_sklearn_and_scipy_calls():
    sk = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(4)
    conf_id, conf_ood = rng.normal(1.0, 1.0, 200), rng.normal(0.0, 1.0, 150)
    domain = np.concatenate([np.zeros(200), np.ones(150)])  # ID 0, OOD 1 as the code
    unc = -np.concatenate([conf_id, conf_ood])  # ood_detect: MSP-like scores are negated
    assert M.auroc(conf_id, conf_ood) == pytest.approx(sk.roc_auc_score(domain, unc))
    for level in (0.8, 0.95):  # fpr_at_recall, line by line
        labels, scores = ~domain.astype(bool), -unc
        _, recall, thresholds = sk.precision_recall_curve(labels, scores)
        t = thresholds[np.argmin(np.abs(recall - level))]
        official = np.sum(~labels * (scores >= t)) / np.sum(~labels)
        assert M.fpr_at_tpr(conf_id, conf_ood, level) == pytest.approx(official)
    for tau in (conf_id[3], 0.123, conf_id.max(), -10.0):
        assert M.percentile_of_score(conf_id, tau) == pytest.approx(stats.percentileofscore(conf_id, tau) / 100)
    tied = np.round(conf_id, 0)
    assert M.percentile_of_score(tied, 1.0) == pytest.approx(stats.percentileofscore(tied, 1.0) / 100)


def test_quantile_matches_torch():
    import torch

    x = np.random.default_rng(5).random(37)
    for q in (0.0, 0.13, 0.5, 1.0):
        assert M.quantile(x, q) == pytest.approx(torch.quantile(torch.tensor(x), q).item())
    assert M.quantile(x, -0.2) == x.min() and M.quantile(x, 1.3) == x.max()  # clamped levels


def test_tpr_threshold_is_nearest_rate():
    conf = np.random.default_rng(6).random(101)
    for level in (0.8, 0.95):
        t = M.tpr_threshold(conf, level)
        best = min(abs(np.mean(conf >= v) - level) for v in conf)
        assert abs(np.mean(conf >= t) - level) == pytest.approx(best)


def test_summary_and_errors():
    correct, conf = _data(200)
    s = M.summary(correct, conf, conf_ood=conf[:50] - 0.5)
    assert set(s) == {"accuracy", "AURC", *M.TARGETS, "AUROC"}
    assert s["accuracy"] == pytest.approx(correct.mean())
    assert "FPR@95" not in M.summary(correct, conf)
    assert M.higher_is_better("cov@5") and not M.higher_is_better("risk@80")
    with pytest.raises(M.MetricInputError, match="unknown target"):
        M.parse_target("cov@7")
    with pytest.raises(M.MetricInputError, match="entries"):
        M.aurc([True, False], [0.1])
    with pytest.raises(M.MetricInputError, match="empty"):
        M.auroc([], [0.1])
    with pytest.raises(M.MetricInputError, match="non-finite"):
        M.aurc([True], [float("nan")])
    with pytest.raises(M.MetricInputError, match="OOD"):
        M.target_metric("FPR@95", correct, conf)
