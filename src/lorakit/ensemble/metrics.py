"""Selective-classification and OOD-detection metrics as the window-cascade code defines them.

Xia & Bouganis, "Window-Based Early-Exit Cascades for Uncertainty Estimation: When Deep Ensembles are More
Efficient than Single Models" (ICCV 2023, arXiv 2303.08010); official code ``Guoxoug/window-early-exit``,
``utils/eval_utils.py`` (``risk_coverage_curve``, ``scod``, ``fpr_at_recall``, ``ood_detect``,
``get_threshold``) and scipy's ``percentileofscore`` as ``cascade_results.py`` calls it.

Every score here is a *confidence* s (higher = more confident / more in-distribution): MSP, or
−energy = logsumexp(logits). The official code stores energy as an uncertainty and flips its sign
before thresholding; the orderings are the same. Values are fractions in [0, 1]; the official code
reports coverage, risk, FPR and AUROC in percent (×100).

Risk–coverage curve (``risk_coverage_curve``): sort the n samples by s descending; for k = 0..n

    coverage_k = k / n,        risk_k = (1/k) Σ_{i ≤ k} [sample i is wrong]   (risk_0 = 0)

and thresholds_j = s_(j) (the j-th largest score, j = 0..n−1). As coded, coverage_k is paired with
thresholds_k, the (k+1)-th score (an off-by-one the code has and lorakit keeps, labelled [CODE]).

- AURC = trapezoid rule of risk over coverage (``torch.trapz(risk, coverage)``), including (0, 0).
- cov@r (coverage at risk r): k* = skip + argmin_{k ≥ skip} |risk_k − r| (the code skips the first 500
  points, "low coverage risk values are unstable"); returns (coverage_{k*}, thresholds_{k*}), k* clipped
  to n−1 for the threshold.
- risk@c (risk at coverage c): k* = argmin_k |coverage_k − c|; returns (risk_{k*}, thresholds_{k*}).
- FPR@p (``fpr_at_recall``, ID positive): over the distinct scores t in increasing order (sklearn's
  ``precision_recall_curve`` thresholds), recall(t) = #{ID: s ≥ t}/#ID; t* = the first t minimising
  |recall(t) − p|; FPR = #{OOD: s ≥ t*}/#OOD.
- AUROC (``roc_auc_score`` of OOD-vs-ID on the uncertainty): P(s_ID > s_OOD) + ½ P(s_ID = s_OOD).
- Threshold for FPR@p targets (``get_threshold(curve="ROC")``): the code builds a synthetic OOD set
  (ID scores + N(0, 1) noise) because the TPR does not depend on OOD data, and takes the ``roc_curve``
  threshold whose TPR is nearest p. lorakit's choice: the same quantity without the noise, the ID
  score t whose TPR #{ID: s ≥ t}/#ID is nearest p (ties: the higher t, ``roc_curve``'s first), which is
  deterministic.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

TARGETS = ("cov@5", "cov@10", "risk@50", "risk@80", "FPR@80", "FPR@95")
# [CODE] cascade_results.py::curve_reqs
_CURVE_REQS: dict[str, tuple[str, str, float]] = {
    "cov@5": ("RC", "risk", 0.05), "cov@10": ("RC", "risk", 0.10),
    "risk@50": ("RC", "coverage", 0.5), "risk@80": ("RC", "coverage", 0.8),
    "FPR@80": ("ROC", "tpr", 0.8), "FPR@95": ("ROC", "tpr", 0.95),
}
OFFICIAL_SKIP = 500  # [CODE] eval_utils.py::scod, get_threshold: risk[500:]


class MetricInputError(ValueError):
    """Scores/labels that do not fit a metric (empty, mismatched lengths, non-finite, unknown target)."""


def _arr(x: Any, name: str) -> np.ndarray:
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    a = a.reshape(-1)
    if a.size == 0:
        raise MetricInputError(f"{name} is empty")
    if not np.isfinite(a).all():
        raise MetricInputError(f"{name} has non-finite values")
    return a


def _pair(correct: Any, conf: Any) -> tuple[np.ndarray, np.ndarray]:
    c, s = _arr(correct, "correct").astype(bool), _arr(conf, "conf")
    if c.shape != s.shape:
        raise MetricInputError(f"correct has {c.size} entries, conf has {s.size}")
    return c, s


def parse_target(target: str) -> tuple[str, str, float]:
    """(curve, requirement, level) of a target name ("cov@10" -> ("RC", "risk", 0.1))."""
    if target not in _CURVE_REQS:
        raise MetricInputError(f"unknown target {target!r}; known: {', '.join(TARGETS)}")
    return _CURVE_REQS[target]


def default_skip(n: int) -> int:
    """Points skipped at the start of the RC curve for cov@r. The code skips 500 (1 % of ImageNet's
    50,000); lorakit's choice: the same 1 % fraction, min(500, ⌊n/100⌋), so small sets keep their curve."""
    return min(OFFICIAL_SKIP, n // 100)


def risk_coverage_curve(correct: Any, conf: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(risk [n+1], coverage [n+1], thresholds [n]) as ``risk_coverage_curve`` of the code."""
    c, s = _pair(correct, conf)
    order = np.argsort(-s, kind="stable")  # torch argsort(descending) has no stable tie order; ours does
    cost = (~c[order]).astype(np.float64)
    n = s.size
    risk = np.concatenate([[0.0], np.cumsum(cost) / np.arange(1, n + 1)])
    coverage = np.linspace(0.0, 1.0, n + 1)
    return risk, coverage, s[order]


def aurc(correct: Any, conf: Any) -> float:
    """Area under the risk–coverage curve (trapezoid rule, from (0, 0))."""
    risk, coverage, _ = risk_coverage_curve(correct, conf)
    return float(np.sum((coverage[1:] - coverage[:-1]) * (risk[1:] + risk[:-1]) / 2))


def coverage_at_risk(correct: Any, conf: Any, risk: float, skip: int | None = None) -> tuple[float, float]:
    """(coverage, threshold) where the selective risk is nearest ``risk`` (cov@5: risk=0.05)."""
    r, coverage, thresholds = risk_coverage_curve(correct, conf)
    skip = default_skip(thresholds.size) if skip is None else int(skip)
    if not 0 <= skip < r.size:
        raise MetricInputError(f"skip={skip} leaves no point of a curve with {r.size} points")
    k = int(np.argmin(np.abs(r[skip:] - risk))) + skip
    return float(coverage[k]), float(thresholds[min(k, thresholds.size - 1)])


def risk_at_coverage(correct: Any, conf: Any, coverage: float) -> tuple[float, float]:
    """(risk, threshold) at the coverage nearest ``coverage`` (risk@80: coverage=0.8)."""
    r, cov, thresholds = risk_coverage_curve(correct, conf)
    k = int(np.argmin(np.abs(cov - coverage)))
    return float(r[k]), float(thresholds[min(k, thresholds.size - 1)])


def fpr_at_tpr(conf_id: Any, conf_ood: Any, tpr: float) -> float:
    """FPR of OOD samples at the threshold whose ID recall is nearest ``tpr`` (``fpr_at_recall``)."""
    si, so = _arr(conf_id, "conf_id"), _arr(conf_ood, "conf_ood")
    thresholds = np.unique(np.concatenate([si, so]))  # increasing, as sklearn's PR thresholds
    recall = (si.size - np.searchsorted(np.sort(si), thresholds, side="left")) / si.size
    t = thresholds[int(np.argmin(np.abs(recall - tpr)))]  # first minimum: the smallest such threshold
    return float(np.mean(so >= t))


def auroc(conf_id: Any, conf_ood: Any) -> float:
    """AUROC of OOD detection: P(s_ID > s_OOD) + ½ P(s_ID = s_OOD) (Mann–Whitney, ties by midranks)."""
    si, so = _arr(conf_id, "conf_id"), _arr(conf_ood, "conf_ood")
    s = np.concatenate([si, so])
    order = np.argsort(s, kind="stable")
    ranks = np.empty(s.size)
    sorted_s = s[order]
    # midranks of tied groups
    starts = np.flatnonzero(np.concatenate([[True], sorted_s[1:] != sorted_s[:-1]]))
    ends = np.concatenate([starts[1:], [s.size]])
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    rank_sum_id = ranks[: si.size].sum()
    return float((rank_sum_id - si.size * (si.size + 1) / 2) / (si.size * so.size))


def tpr_threshold(conf_id: Any, tpr: float) -> float:
    """The ID score t whose TPR #{s ≥ t}/n is nearest ``tpr`` (ties: the higher t); see the module docstring."""
    s = np.sort(_arr(conf_id, "conf_id"))[::-1]
    values = np.unique(s)[::-1]  # decreasing, so the TPR grows along the array
    rates = np.searchsorted(-s, -values, side="right") / s.size
    return float(values[int(np.argmin(np.abs(rates - tpr)))])


def get_threshold(target: str, correct: Any, conf: Any, skip: int | None = None) -> float:
    """τ on validation data for ``target`` (``get_threshold`` of the code; see the module docstring)."""
    curve, req, level = parse_target(target)
    if curve == "ROC":
        return tpr_threshold(conf, level)
    if req == "risk":
        return coverage_at_risk(correct, conf, level, skip=skip)[1]
    return risk_at_coverage(correct, conf, level)[1]


def percentile_of_score(values: Any, score: float) -> float:
    """scipy's ``percentileofscore(values, score, kind="rank")`` / 100 (the code's q_τ)."""
    a = _arr(values, "values")
    left = int(np.count_nonzero(a < score))
    right = int(np.count_nonzero(a <= score))
    plus1 = left < right
    return (left + right + plus1) * (50.0 / a.size) / 100.0


def quantile(values: Any, q: float) -> float:
    """``torch.quantile`` (linear interpolation) of ``values`` at q ∈ [0, 1], in float64."""
    return float(np.quantile(_arr(values, "values"), min(max(q, 0.0), 1.0), method="linear"))


def target_metric(target: str, correct: Any, conf: Any, conf_ood: Any = None, skip: int | None = None) -> float:
    """The value of ``target`` on test data: cov@r → coverage, risk@c → risk, FPR@p → FPR (needs OOD)."""
    curve, req, level = parse_target(target)
    if curve == "ROC":
        if conf_ood is None:
            raise MetricInputError(f"target {target} is an OOD metric; give OOD scores")
        return fpr_at_tpr(conf, conf_ood, level)
    if req == "risk":
        return coverage_at_risk(correct, conf, level, skip=skip)[0]
    return risk_at_coverage(correct, conf, level)[0]


def higher_is_better(target: str) -> bool:
    """cov@r: higher is better; risk@c and FPR@p: lower is better."""
    return parse_target(target)[1] == "risk"


def summary(correct: Any, conf: Any, conf_ood: Any = None, skip: int | None = None) -> dict[str, float]:
    """Every metric of one method: accuracy, AURC, cov@5/10, risk@50/80 and, with OOD, AUROC, FPR@80/95."""
    c, s = _pair(correct, conf)
    out = {"accuracy": float(c.mean()), "AURC": aurc(c, s)}
    for t in TARGETS:
        if t.startswith("FPR") and conf_ood is None:
            continue
        out[t] = target_metric(t, c, s, conf_ood, skip=skip)
    if conf_ood is not None:
        out["AUROC"] = auroc(s, conf_ood)
    return out
