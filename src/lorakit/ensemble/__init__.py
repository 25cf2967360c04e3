"""Ensembles of adapters on one base (the ``ensemble`` axis): :class:`Ensemble` (K members in one batched
forward, mean of logits or of probabilities, cost per prediction), window-based early-exit cascades
(:class:`WindowCascade`, Xia & Bouganis, ICCV 2023, arXiv 2303.08010) with their baselines, and the
selective-classification / OOD metrics of the cascade code (``lorakit.ensemble.metrics``)."""

from lorakit.ensemble.cascade import (
    CascadeError,
    CascadePolicy,
    CascadeResult,
    FixedCascade,
    RandomCascade,
    SingleThresholdCascade,
    WindowCascade,
    cascade_outputs,
    confidence,
    make_cascade,
)
from lorakit.ensemble.ensemble import Cost, Ensemble, EnsembleError, Prediction, combine_logits

__all__ = [
    "CascadeError", "CascadePolicy", "CascadeResult", "Cost", "Ensemble", "EnsembleError", "FixedCascade",
    "Prediction", "RandomCascade", "SingleThresholdCascade", "WindowCascade", "cascade_outputs", "combine_logits",
    "confidence", "make_cascade",
]
