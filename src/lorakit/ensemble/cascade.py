"""Window-based early-exit cascades of adapter ensembles, and the cascades they are compared with.

Xia & Bouganis, "Window-Based Early-Exit Cascades for Uncertainty Estimation: When Deep Ensembles are More
Efficient than Single Models", ICCV 2023, arXiv 2303.08010; official code ``Guoxoug/window-early-exit``
(``cascade_results.py``, ``utils/cascade_utils.py``, ``utils/eval_utils.py``), which fixes what the paper
leaves open. Members are adapters on one base (:class:`~lorakit.ensemble.ensemble.Ensemble`); stage 1 is
the first member.

Scores (confidences, higher = more confident; ``uncertainty``): ``"msp"`` s = max_c softmax(z)_c, ``"energy"``
s = logsumexp_c z_c (the code's energy −logsumexp, negated). For a sample that goes on to stage 2 the
prediction is the ensemble's (``Ensemble.combine``; the code: log of the mean of the softmaxes,
``"mean_probs"``) and its score is (``stage2_score``):

- ``"ens"``: the score of the combined prediction, MSP of the averaged probabilities (the code's
  ``confidence_ens``, ``add_adjusted_uncs``; its plots use it for MSP);
- ``"mean"``: the mean of the members' scores (the code's ``av_unc_metrics``; used for energy and
  max-logit). Energy has no ``"ens"`` variant (the code computes ``_ens`` for softmax scores only).

Window cascade (:class:`WindowCascade`) [CODE ``cascade_results.py`` main, ``window_threshold_strategy``]:

1. τ from member 1 on the validation split for the target (``metrics.get_threshold``): cov@r, risk@c on
   the risk–coverage curve of member 1's val correctness; FPR@p at ID TPR p.
2. q_τ = percentileofscore(val scores, τ)/100, window [a, b] = [Q(q_τ − w), Q(q_τ + w)] of the val scores,
   clamped quantile levels (w = ``window``, 0.1: about 2w = 20 % of ID samples go on).
3. A sample exits at member 1 if s₁ > b or s₁ < a, else it goes on; only those rows are run through the
   other members (dropped from the batch, not masked).
4. Shift guard (the code's ``adj`` columns): with unlabelled test data, [a, b] is recomputed as the
   ±w-quantile band around τ's quantile among the test scores of member 1; τ is kept. The code evaluates
   it on a 1:1 ID:OOD mixture; here the pool is whatever rows are run together (the caller's test set).

Baselines [CODE ``STRAT_FUNCS``]: :class:`SingleThresholdCascade` (exit if s₁ > the ``pass_fraction``
quantile of the val scores; the code's 20 %), :class:`RandomCascade` (lorakit's: exactly round(p·N) rows
chosen at random, p matched to another cascade's pass rate; the code sends each sample on with
probability ½), ``"none"`` (member 1 alone) and ``"all"`` (the full ensemble on every row).

Cost: per-sample cost = C₁ + [goes on]·Σ_{k>1} C_k (the code's MACs), reported as FLOP estimates and wall
time; relative to a single model = 1 + pass rate for two equal members. With ``prefix_reuse`` (lorakit's,
LATER-ROWS §5.3): when every member adapts only layers ≥ L, stage 2 resumes from member 1's input to
layer L and costs (n_layers − L)/n_layers of a pass in the layer stack.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorakit.core.spec import build_args
from lorakit.ensemble import metrics as M
from lorakit.ensemble.ensemble import Cost, Ensemble, EnsembleError, combine_logits, select_rows

UNCERTAINTIES = ("msp", "energy")
STAGE2_SCORES = ("ens", "mean")
CASCADES = ("window", "single", "random", "none", "all")


class CascadeError(ValueError):
    """A cascade that cannot be set up or run (unfitted, bad arguments, energy with "ens" scores...)."""


def confidence(logits: torch.Tensor, uncertainty: str = "msp") -> torch.Tensor:
    """Per-row confidence of class scores [..., C] in float64: MSP or logsumexp (= −energy)."""
    z = logits.double()
    if uncertainty == "msp":
        return z.softmax(-1).max(-1).values
    if uncertainty == "energy":
        return torch.logsumexp(z, -1)
    raise CascadeError(f"unknown uncertainty {uncertainty!r}; known: {', '.join(UNCERTAINTIES)}")


def ensemble_confidence(member_logits: torch.Tensor, combined: torch.Tensor, uncertainty: str,
                        stage2_score: str) -> torch.Tensor:
    """The stage-2 score of rows run through the whole ensemble (see the module docstring)."""
    if stage2_score == "ens":
        if uncertainty != "msp":
            raise CascadeError("stage2_score 'ens' is the MSP of the averaged prediction; energy uses 'mean' "
                               "(the mean of the members' scores), as the official code")
        return confidence(combined, "msp")
    if stage2_score == "mean":
        return confidence(member_logits, uncertainty).mean(0)
    raise CascadeError(f"unknown stage2_score {stage2_score!r}; known: {', '.join(STAGE2_SCORES)}")


def default_stage2_score(uncertainty: str) -> str:
    """The official code's pairing: ``"ens"`` for MSP, ``"mean"`` for energy."""
    return "ens" if uncertainty == "msp" else "mean"


def cascade_outputs(member_logits: torch.Tensor, passed: torch.Tensor, combine: str = "mean_probs",
                    uncertainty: str = "msp", stage2_score: str | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(class scores [N, C], confidences [N]) of a cascade from all members' scores [K, N, C] and the rows
    that went on (``passed``): member 1's for exited rows, the ensemble's for the others. An offline
    evaluation from cached logits, as the official code evaluates; :meth:`CascadePolicy.run` computes the
    same from the rows that went on only."""
    stage2_score = stage2_score or default_stage2_score(uncertainty)
    passed = torch.as_tensor(passed, dtype=torch.bool)
    first = member_logits[0].double()
    combined = combine_logits(member_logits, combine)
    logits = torch.where(passed[:, None], combined, first)
    conf = torch.where(passed, ensemble_confidence(member_logits, combined, uncertainty, stage2_score),
                       confidence(first, uncertainty))
    return logits, conf


@dataclass
class CascadeResult:
    """Predictions of a cascade run, which rows went on, the window used and the cost of each stage."""

    logits: torch.Tensor  # [N, C] float64
    conf: torch.Tensor  # [N] float64, higher = more confident
    passed: torch.Tensor  # [N] bool
    stage1: Cost
    stage2: Cost
    window: tuple[float, float] | None = None
    member1_logits: torch.Tensor | None = None

    @property
    def pass_rate(self) -> float:
        return float(self.passed.double().mean()) if self.passed.numel() else 0.0

    @property
    def cost(self) -> Cost:
        return self.stage1.add(self.stage2)

    @property
    def cost_vs_single(self) -> float:
        """Estimated FLOPs relative to member 1 alone on the same rows."""
        return (self.stage1.flops + self.stage2.flops) / self.stage1.flops if self.stage1.flops else float("nan")


class CascadePolicy:
    """Which rows go on to stage 2, from member 1's confidences; :meth:`run` executes a cascade."""

    name = "policy"

    def __init__(self, uncertainty: str = "msp", stage2_score: str | None = None, prefix_reuse: bool = False
                 ) -> None:
        if uncertainty not in UNCERTAINTIES:
            raise CascadeError(f"unknown uncertainty {uncertainty!r}; known: {', '.join(UNCERTAINTIES)}")
        self.uncertainty = uncertainty
        self.stage2_score = stage2_score or default_stage2_score(uncertainty)
        if self.stage2_score not in STAGE2_SCORES:
            raise CascadeError(f"unknown stage2_score {self.stage2_score!r}; known: {', '.join(STAGE2_SCORES)}")
        if self.stage2_score == "ens" and uncertainty != "msp":
            raise CascadeError("stage2_score 'ens' exists for MSP only; energy uses 'mean' (the official code)")
        self.prefix_reuse = prefix_reuse
        self.last_window: tuple[float, float] | None = None
        self.fit_cost = Cost()  # member 1's passes over the validation split (fit_examples)

    def fit(self, val_logits: torch.Tensor, val_labels: torch.Tensor) -> CascadePolicy:
        """Set the policy's operating point from member 1's val class scores [N, C] and labels [N]."""
        return self

    def pass_mask(self, conf: torch.Tensor, pool: torch.Tensor | None = None) -> torch.Tensor:
        """[N] bool: rows that go on, from member 1's confidences ``conf`` (``pool``: unlabelled test scores)."""
        raise NotImplementedError

    # -- execution --------------------------------------------------------------------------------------
    def fit_examples(self, ensemble: Ensemble, examples: Sequence[Any], collate: Callable, batch_size: int = 32,
                     labels: torch.Tensor | None = None) -> CascadePolicy:
        """:meth:`fit` on member 1's predictions for validation ``examples`` (labels from the batches'
        ``label_index`` unless given)."""
        logits, cost = [], Cost()
        found = []
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size])
            out, c = ensemble.run(batch, ensemble.members[:1])
            logits.append(out[0])
            found.append(batch.get("label_index"))
            cost = cost.add(c)
        if labels is None:
            if any(x is None for x in found):
                raise CascadeError("validation batches carry no label_index; give labels")
            labels = torch.cat(found)
        self.fit_cost = cost
        return self.fit(torch.cat(logits), labels)

    @torch.no_grad()
    def run(self, ensemble: Ensemble, examples: Sequence[Any], collate: Callable, batch_size: int = 32,
            *, pool: bool = True) -> CascadeResult:
        """Stage 1 (member 1) on every example; stage 2 (the other members) only on the rows that go on,
        which are cut out of their batches; the ensemble's prediction for those, member 1's for the rest.
        ``pool``: give the policy the stage-1 scores of all ``examples`` as the unlabelled test pool."""
        if batch_size < 1:
            raise CascadeError(f"batch_size must be >= 1, got {batch_size}")
        if not examples:
            raise CascadeError("no examples to run")
        first, rest = ensemble.members[0], ensemble.members[1:]
        use_prefix = self.prefix_reuse and bool(rest) and ensemble.prefix_layer > 0
        if self.prefix_reuse and rest and not use_prefix:
            raise EnsembleError("prefix_reuse: the members adapt layer 0 (or a module before the layer stack); "
                                "there is no shared prefix to reuse")
        batches, hidden, parts, stage1 = [], [], [], Cost()
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size])
            captured: dict[str, torch.Tensor] | None = {} if use_prefix else None
            out, c = ensemble.run(batch, [first], capture=captured)
            batches.append(batch)
            hidden.append(captured["hidden"] if captured is not None else None)
            parts.append(out[0])
            stage1 = stage1.add(c)
        logits1 = torch.cat(parts)
        conf1 = confidence(logits1, self.uncertainty)
        passed = self.pass_mask(conf1, pool=conf1 if pool else None).bool()
        logits, conf = logits1.double().clone(), conf1.clone()
        stage2, offset = Cost(), 0
        for batch, h in zip(batches, hidden, strict=True):
            n = int(batch["input_ids"].shape[0])
            rows = passed[offset:offset + n].nonzero().flatten()
            if rows.numel() and rest:
                sub, length = select_rows(batch, rows)
                prefix = h.index_select(0, rows.to(h.device))[:, :length] if h is not None else None
                out, c = ensemble.run(sub, rest, prefix=prefix)
                stage2 = stage2.add(c)
                members = torch.cat([logits1[offset + rows][None], out])
                combined = combine_logits(members, ensemble.combine)
                logits[offset + rows] = combined
                conf[offset + rows] = ensemble_confidence(members, combined, self.uncertainty, self.stage2_score)
            offset += n
        return CascadeResult(logits, conf, passed, stage1, stage2, self.last_window, logits1)


@dataclass(frozen=True)
class WindowArgs:
    """Arguments of :class:`WindowCascade` (``--method-arg`` keys)."""

    tau_from: str = "val"
    target: str = "cov@10"
    window: float = 0.1
    shift_guard: bool = True
    uncertainty: str = "msp"
    stage2_score: str | None = None  # None: "ens" for msp, "mean" for energy (the official pairing)
    skip: int | None = None  # RC points skipped for cov@r (None: metrics.default_skip)
    prefix_reuse: bool = False


class WindowCascade(CascadePolicy):
    """The window-based early-exit cascade (module docstring; arXiv 2303.08010)."""

    name = "window_cascade"
    Args = WindowArgs

    def __init__(self, **kwargs: Any) -> None:
        args = build_args(WindowArgs, kwargs, owner="window_cascade")
        if args.tau_from != "val":
            raise CascadeError(f"tau_from must be 'val' (τ is set on a validation split), got {args.tau_from!r}")
        M.parse_target(args.target)
        if not 0 < args.window <= 0.5:
            raise CascadeError(f"window must be in (0, 0.5] (a quantile half-width), got {args.window}")
        super().__init__(args.uncertainty, args.stage2_score, args.prefix_reuse)
        self.args = dataclasses.replace(args, stage2_score=self.stage2_score)
        self.tau: float | None = None
        self.window: tuple[float, float] | None = None
        self.val_conf: torch.Tensor | None = None

    def fit(self, val_logits: torch.Tensor, val_labels: torch.Tensor) -> WindowCascade:
        conf = confidence(val_logits, self.uncertainty)
        correct = val_logits.argmax(-1).cpu() == torch.as_tensor(val_labels).cpu()
        self.tau = M.get_threshold(self.args.target, correct, conf, skip=self.args.skip)
        self.val_conf = conf
        self.window = self.window_around(conf, self.tau)
        return self

    def window_around(self, conf: torch.Tensor, tau: float) -> tuple[float, float]:
        """[Q(q_τ − w), Q(q_τ + w)] over ``conf``, q_τ = percentileofscore(conf, τ)/100."""
        q = M.percentile_of_score(conf, tau)
        return M.quantile(conf, q - self.args.window), M.quantile(conf, q + self.args.window)

    def pass_mask(self, conf: torch.Tensor, pool: torch.Tensor | None = None) -> torch.Tensor:
        if self.tau is None or self.window is None:
            raise CascadeError("window_cascade is not fitted: call fit (or fit_examples) on validation data")
        window = self.window_around(pool, self.tau) if self.args.shift_guard and pool is not None else self.window
        self.last_window = window
        conf = conf.double()
        return (conf >= window[0]) & (conf <= window[1])  # exit iff s > b or s < a [CODE]


class SingleThresholdCascade(CascadePolicy):
    """Exit when s₁ > the ``pass_fraction`` quantile of member 1's val scores (the code: 20 %)."""

    name = "single_threshold"

    def __init__(self, pass_fraction: float = 0.2, uncertainty: str = "msp", stage2_score: str | None = None,
                 prefix_reuse: bool = False) -> None:
        if not 0 <= pass_fraction <= 1:
            raise CascadeError(f"pass_fraction must be in [0, 1], got {pass_fraction}")
        super().__init__(uncertainty, stage2_score, prefix_reuse)
        self.pass_fraction = pass_fraction
        self.threshold: float | None = None

    def fit(self, val_logits: torch.Tensor, val_labels: torch.Tensor) -> SingleThresholdCascade:
        self.threshold = M.quantile(confidence(val_logits, self.uncertainty), self.pass_fraction)
        return self

    def pass_mask(self, conf: torch.Tensor, pool: torch.Tensor | None = None) -> torch.Tensor:
        if self.threshold is None:
            raise CascadeError("single_threshold is not fitted: call fit on validation data")
        return ~(conf.double() > self.threshold)


class RandomCascade(CascadePolicy):
    """round(p·N) rows chosen uniformly at random (seeded) go on (lorakit's: matched pass rate)."""

    name = "random"

    def __init__(self, pass_rate: float = 0.2, seed: int = 0, uncertainty: str = "msp",
                 stage2_score: str | None = None, prefix_reuse: bool = False) -> None:
        if not 0 <= pass_rate <= 1:
            raise CascadeError(f"pass_rate must be in [0, 1], got {pass_rate}")
        super().__init__(uncertainty, stage2_score, prefix_reuse)
        self.pass_rate, self.seed = pass_rate, seed

    def pass_mask(self, conf: torch.Tensor, pool: torch.Tensor | None = None) -> torch.Tensor:
        n = conf.shape[0]
        g = torch.Generator().manual_seed(self.seed)
        mask = torch.zeros(n, dtype=torch.bool)
        mask[torch.randperm(n, generator=g)[:round(self.pass_rate * n)]] = True
        return mask


class FixedCascade(CascadePolicy):
    """``"none"``: member 1 alone (no row goes on); ``"all"``: the full ensemble on every row."""

    def __init__(self, every: bool, uncertainty: str = "msp", stage2_score: str | None = None,
                 prefix_reuse: bool = False) -> None:
        super().__init__(uncertainty, stage2_score, prefix_reuse)
        self.every = every
        self.name = "all" if every else "none"

    def pass_mask(self, conf: torch.Tensor, pool: torch.Tensor | None = None) -> torch.Tensor:
        return torch.full((conf.shape[0],), self.every, dtype=torch.bool)


def make_cascade(kind: str, *, target: str = "cov@10", uncertainty: str = "msp", stage2_score: str | None = None,
                 pass_rate: float = 0.2, shift_guard: bool = True, window: float = 0.1, seed: int = 0,
                 prefix_reuse: bool = False) -> CascadePolicy:
    """A cascade by name (``CASCADES``): window, single (threshold), random, none (member 1), all (ensemble)."""
    common = {"uncertainty": uncertainty, "stage2_score": stage2_score, "prefix_reuse": prefix_reuse}
    if kind == "window":
        return WindowCascade(target=target, window=window, shift_guard=shift_guard, **common)
    if kind == "single":
        return SingleThresholdCascade(pass_fraction=pass_rate, **common)
    if kind == "random":
        return RandomCascade(pass_rate=pass_rate, seed=seed, **common)
    if kind in ("none", "all"):
        return FixedCascade(kind == "all", **common)
    raise CascadeError(f"unknown cascade {kind!r}; known: {', '.join(CASCADES)}")
