"""What every federated aggregator shares: client updates, the server's global state, LoRA factors.

Notation (METHODS.md, "Federated LoRA"): a client k trains ΔW_k = s_k·B_k·A_k on each adapted
module, B_k ∈ R^{d×r_k}, A_k ∈ R^{r_k×k}, with s_k the form's own scale (α_k/r_k, α_k/√r_k with
rsLoRA; read from the form, never re-derived here), and reports n_k examples; its weight is
p_k = n_k / Σ_j n_j unless the caller gives weights. The *ideal* global update of a round is
Σ_k p_k·ΔW_k; an aggregator is exact when the new global model equals it.

Two readings of an update, both through the core's one factor reader (``lorakit.core.factors``):
:func:`lora_factors` gives the scale-folded factors (B ← s·B, so ΔW = B·A) for rules and metrics
that work on ΔW; :func:`module_tensors` gives the raw, unscaled ``lora_A``/``lora_B`` that rules
averaging the trained tensors themselves use (as their papers do), with :func:`module_scales`
reading s from the form built on a meta-device layer.

The server state (:class:`GlobalState`) has two parts: ``adapter``, the global adapter clients
start from (None for aggregators that declare ``fresh_adapters``: every client starts each round
from a fresh adapter), and ``base_delta``, a change merged into the base weights (summed over the
rounds), stored per module either as low-rank factors (``<path>.delta_B`` (d×R) and
``<path>.delta_A`` (R×k)) or dense (``<path>.delta_W`` (d×k)), whichever is smaller.

An aggregator declares what generic code needs to know about it as class attributes (never by its
name): ``Args`` (a frozen dataclass of its settings, defaults from its paper), ``form`` (the form its
clients train), ``fresh_adapters``, ``seeded_tensors``, ``heterogeneous_ranks`` and
``legacy_options`` (old configuration keys that meant one of its ``Args`` fields).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from lorakit.core.caps import Cap
from lorakit.core.factors import FactorError, LoRAFactors, factored_scale, state_factors
from lorakit.core.spec import AdapterSpec, build_args
from lorakit.core.state import AdapterState
from lorakit.federated.args import args_dict, parse_args

FACTOR_NAMES = ("lora_A", "lora_B", "lora_bias")
DELTA_SUFFIXES = ("delta_A", "delta_B", "delta_W")


class AggregationError(ValueError):
    """Updates that an aggregator cannot combine (wrong form, mixed ranks where they must agree...)."""


@dataclass
class ClientUpdate:
    """One client's result for one round: its adapter after local training, as it arrived.

    ``state.tensors`` holds what travelled (without the seeded tensors); the server completes it
    (:meth:`Aggregator.complete`) before aggregating.
    """

    client_id: int
    state: AdapterState
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class GlobalState:
    """The server's model between rounds (see the module docstring)."""

    adapter: AdapterState | None
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    round: int = 0
    spec: AdapterSpec = field(default_factory=AdapterSpec)  # the clients' adapter spec (before rank overrides)


@dataclass
class AggregationResult:
    state: GlobalState
    info: dict[str, Any] = field(default_factory=dict)
    # None: every client starts from the same download; else client_id -> its own initial tensors
    per_client_init: dict[int, dict[str, torch.Tensor]] | None = None


# -- helpers over adapter states ----------------------------------------------------------------
def check_factored(state: AdapterState, where: str = "adapter") -> None:
    cls = state.form_class()
    if Cap.FACTORED_AB not in cls.caps:
        raise AggregationError(f"{where}: form {cls.name!r} is not a B·A factored form; federated aggregation "
                               "supports the forms that declare Cap.FACTORED_AB")


def lora_factors(state: AdapterState, where: str = "adapter") -> dict[str, LoRAFactors]:
    """module path -> its factors with the scale folded in (ΔW = B·A), from the core's factor reader."""
    check_factored(state, where)
    try:
        return state_factors(state, label=where)
    except FactorError as e:
        raise AggregationError(str(e)) from e


def module_tensors(state: AdapterState, where: str = "adapter") -> dict[str, dict[str, torch.Tensor]]:
    """module path -> its raw (unscaled) ``lora_A``, ``lora_B`` (and ``lora_bias``), as fp32.

    For rules that average the trained tensors themselves; the shapes and names are checked by the
    factor reader (:func:`lora_factors`), so a malformed update fails here with the same message.
    """
    lora_factors(state, where)
    return {path: {n: t.float() for n, t in tensors.items()} for path, tensors in state.by_module().items()}


def module_scales(state: AdapterState, where: str = "adapter") -> dict[str, float]:
    """module path -> s of that module, as the form computes it (ΔW = s·B·A).

    Read by the factor model (``core.factors.factored_scale``: the form built on a meta-device layer),
    so this never restates the form's scaling rule.
    """
    cls = state.form_class()
    built: dict[tuple, float] = {}
    out: dict[str, float] = {}
    for path, tensors in module_tensors(state, where).items():
        args = build_args(cls.Args, state.spec.args_for(path), owner=f"{where}: form {cls.name!r}")
        in_f, out_f = tensors["lora_A"].shape[1], tensors["lora_B"].shape[0]
        sig = (args, in_f, out_f)  # one form per distinct (args, shape): modules usually share them
        if sig not in built:
            try:
                built[sig] = factored_scale(cls, args, in_f, out_f, label=where)
            except FactorError as e:
                raise AggregationError(str(e)) from e
        out[path] = built[sig]
    return out


def key(path: str, name: str, state: AdapterState) -> str:
    """The AdapterState key of tensor ``name`` on module ``path``."""
    return f"{path}.{state.form_class().tensor_key(name)}"


def with_tensors(template: AdapterState, tensors: dict[str, torch.Tensor], **spec_changes: Any) -> AdapterState:
    """A copy of ``template`` with new tensors (and optionally a changed spec)."""
    spec = dataclasses.replace(template.spec, **spec_changes) if spec_changes else template.spec
    return AdapterState(spec=spec, tensors=tensors, base=dict(template.base), meta=dict(template.meta))


def normalize_weights(weights: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """p_k = w_k / Σ w (float64 for the sums); weights must be finite, >= 0, with a positive sum."""
    w = torch.as_tensor(list(weights) if not isinstance(weights, torch.Tensor) else weights, dtype=torch.float64)
    if w.ndim != 1 or len(w) == 0:
        raise AggregationError("client weights: need a non-empty 1-D sequence")
    if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise AggregationError(f"client weights must be finite, >= 0 and not all 0; got {w.tolist()}")
    return w / w.sum()


def check_same_modules(states: Sequence[AdapterState]) -> list[str]:
    """The common module list; every state must adapt the same modules."""
    if not states:
        raise AggregationError("no client updates to aggregate")
    modules = states[0].modules
    for i, st in enumerate(states[1:], 1):
        if st.modules != modules:
            extra, missing = set(st.modules) - set(modules), set(modules) - set(st.modules)
            raise AggregationError(f"update {i} adapts other modules than update 0 (extra {sorted(extra)[:3]}, "
                                   f"missing {sorted(missing)[:3]})")
    return modules


def delta_weights(state: AdapterState) -> dict[str, torch.Tensor]:
    """module path -> ΔW = s·B·A of a factored adapter (relative to the original base)."""
    return {p: f.delta() for p, f in lora_factors(state).items()}


def base_delta_weights(base_delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense ΔW per module from a stored base delta (factors or dense)."""
    out: dict[str, torch.Tensor] = {}
    for k, t in base_delta.items():
        path, _, suffix = k.rpartition(".")
        if suffix == "delta_W":
            out[path] = t.float()
        elif suffix == "delta_B":
            out[path] = t.float() @ base_delta[f"{path}.delta_A"].float()
    return out


def add_to_base_delta(base_delta: Mapping[str, torch.Tensor], path: str, B: torch.Tensor,
                      A: torch.Tensor) -> dict[str, torch.Tensor]:
    """base_delta with B·A added on module ``path``: factors are concatenated while R(d+k) < d·k,
    then the module switches to one dense d×k matrix (whichever travels in fewer numbers)."""
    out = dict(base_delta)
    d, k = B.shape[0], A.shape[1]
    if f"{path}.delta_W" in out:
        out[f"{path}.delta_W"] = out[f"{path}.delta_W"] + B @ A
        return out
    if f"{path}.delta_B" in out:
        B = torch.cat([out.pop(f"{path}.delta_B"), B], dim=1)
        A = torch.cat([out.pop(f"{path}.delta_A"), A], dim=0)
    if B.shape[1] * (d + k) < d * k:
        out[f"{path}.delta_B"], out[f"{path}.delta_A"] = B.contiguous(), A.contiguous()
    else:
        out[f"{path}.delta_W"] = B @ A
    return out


def tensor_bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# -- the interface -------------------------------------------------------------------------------
def _is_frozen_dataclass(cls: Any) -> bool:
    return isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen


class Aggregator:
    """How client adapters become the next global model, and what travels each way.

    ``aggregate(global_state, updates)`` is a pure function of its inputs (no RNG, no I/O):
    the same updates give the same result bit for bit, whatever order they arrived in (updates
    are sorted by client id first). Subclasses set ``name``, ``Args`` and the flags below, and
    implement :meth:`combine`. An aggregator is built from an ``Args`` instance
    (``cls(cls.Args(field=value))``) or from loosely typed values
    (:meth:`from_values`, as the config and the CLI do).
    """

    name: ClassVar[str] = ""
    # the settings of the rule, a frozen dataclass with the paper's defaults (an empty one is fine)
    Args: ClassVar[type]
    # the form clients train; None: AdapterSpec's default form
    form: ClassVar[str | None] = None
    # clients start every round from a fresh, seeded adapter instead of the global one
    fresh_adapters: ClassVar[bool] = False
    # adapter tensors rebuilt by every client from the shared adapter seed; they never travel
    seeded_tensors: ClassVar[tuple[str, ...]] = ()
    # clients may use their own rank (the aggregator handles heterogeneous ranks exactly); a client
    # of another rank cannot start from the global adapter, so this needs fresh_adapters
    heterogeneous_ranks: ClassVar[bool] = False
    # old FedConfig keys that meant one of this aggregator's Args fields: {old key: field}; accepted
    # with a DeprecationWarning for one release
    legacy_options: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # checked when the class is defined, so a new aggregator cannot ship without these
        if not _is_frozen_dataclass(getattr(cls, "Args", None)):
            raise TypeError(f"aggregator {cls.__name__}: Args must be a frozen dataclass "
                            "(@dataclass(frozen=True); an empty one is fine)")
        if cls.heterogeneous_ranks and not cls.fresh_adapters:
            raise TypeError(f"aggregator {cls.__name__}: heterogeneous_ranks needs fresh_adapters (a client of "
                            "another rank cannot start from the global adapter)")
        fields = {f.name for f in dataclasses.fields(cls.Args)}
        stray = sorted(set(cls.legacy_options.values()) - fields)
        if stray:
            raise TypeError(f"aggregator {cls.__name__}: legacy_options name unknown Args fields {stray}")

    def __init__(self, args: Any = None) -> None:
        if args is None:
            args = self.Args()
        elif not isinstance(args, self.Args):
            raise TypeError(f"aggregator {self.name!r} takes a {self.Args.__name__} (or nothing for the defaults), "
                            f"got {type(args).__name__}; build one from plain values with "
                            f"{type(self).__name__}.from_values(...)")
        self.args = args

    @classmethod
    def from_values(cls, values: Mapping[str, Any] | None = None) -> Aggregator:
        """The aggregator with ``Args`` built from ``values`` (strings converted to the field types)."""
        return cls(cls.parse_args(values or {}))

    @classmethod
    def parse_args(cls, values: Mapping[str, Any]) -> Any:
        """This aggregator's ``Args`` from loosely typed values; clear errors for unknown keys and bad types."""
        return parse_args(cls.Args, values, owner=f"aggregator {cls.name!r}")

    @classmethod
    def examples(cls) -> list[Any]:
        """Small ``Args`` for the tests that run over every registered aggregator."""
        return [cls.Args()]

    # -- set-up ------------------------------------------------------------------------------
    def check_spec(self, spec: AdapterSpec) -> None:
        """Refuse adapter specs this aggregator cannot handle (called before any training)."""
        from lorakit.core import registry

        cls = registry.get("form", spec.form)
        if Cap.FACTORED_AB not in cls.caps:
            raise AggregationError(f"aggregator {self.name!r}: form {spec.form!r} is not B·A factored "
                                   "(federated aggregation needs a form that declares Cap.FACTORED_AB)")
        args = build_args(cls.Args, spec.form_args, owner=f"form {cls.name!r}")
        if getattr(args, "freeze_A", False) and "lora_A" not in self.seeded_tensors:
            keeping = [n for n in registry.names("federated")
                       if "lora_A" in registry.get("federated", n).seeded_tensors]
            raise AggregationError(f"aggregator {self.name!r} trains A; form {spec.form!r} freezes it "
                                   f"(aggregators that keep A seeded: {', '.join(keeping) or 'none'})")

    def init_state(self, template: AdapterState) -> GlobalState:
        """The round-0 global state from the adapter every client would build with the shared seed."""
        lora_factors(template, "initial adapter")
        adapter = None if self.fresh_adapters else template
        return GlobalState(adapter=adapter, base_delta={}, round=0, spec=template.spec)

    # -- what travels ------------------------------------------------------------------------
    def upload_names(self) -> tuple[str, ...]:
        """Tensor names a client sends back."""
        return tuple(n for n in FACTOR_NAMES if n not in self.seeded_tensors)

    def download(self, state: GlobalState) -> dict[str, torch.Tensor]:
        """Tensors sent to each client: the global adapter (minus seeded tensors) and the base delta."""
        out = dict(state.base_delta)
        if state.adapter is not None:
            cls = state.adapter.form_class()
            for k, t in state.adapter.tensors.items():
                if cls.split_key(k)[1] not in self.seeded_tensors:
                    out[k] = t
        return out

    def complete(self, update: AdapterState, state: GlobalState) -> AdapterState:
        """A received update with its seeded tensors filled in from the global adapter."""
        if not self.seeded_tensors or state.adapter is None:
            return update
        cls = state.adapter.form_class()
        tensors = dict(update.tensors)
        for k, t in state.adapter.tensors.items():
            if cls.split_key(k)[1] in self.seeded_tensors:
                tensors[k] = t
        return with_tensors(update, tensors)

    def expected_shapes(self, state: GlobalState, template: AdapterState) -> dict[str, tuple[int, ...]] | None:
        """Exact shapes of the uploaded tensors, or None when ranks may vary (checked per module)."""
        if self.heterogeneous_ranks:
            return None
        cls = template.form_class()
        names = set(self.upload_names())
        return {k: tuple(t.shape) for k, t in template.tensors.items() if cls.split_key(k)[1] in names}

    # -- the rule ------------------------------------------------------------------------------
    def aggregate(self, state: GlobalState, updates: Sequence[ClientUpdate],
                  weights: Sequence[float] | None = None) -> AggregationResult:
        """The next global state from the (validated) updates; ``weights`` default to n_k."""
        if not updates:
            raise AggregationError("no client updates to aggregate")
        order = sorted(range(len(updates)), key=lambda i: updates[i].client_id)
        ups = [updates[i] for i in order]
        w = [updates[i].num_examples for i in order] if weights is None else [list(weights)[i] for i in order]
        p = normalize_weights(w)
        states = [self.complete(u.state, state) for u in ups]
        result = self.combine(state, states, p)
        result.state.round = state.round + 1
        result.info.setdefault("clients", [u.client_id for u in ups])
        result.info.setdefault("weights", [float(x) for x in p])
        return result

    def combine(self, state: GlobalState, states: list[AdapterState], p: torch.Tensor) -> AggregationResult:
        raise NotImplementedError

    def describe(self) -> str:
        """``name(field=value, ...)`` with every ``Args`` field, defaults included."""
        return f"{self.name}({', '.join(f'{k}={v!r}' for k, v in args_dict(self.args).items())})"


def weighted_sum(tensors: Sequence[torch.Tensor], p: torch.Tensor) -> torch.Tensor:
    """Σ p_k·t_k, accumulated in float64 in client order, returned as float32."""
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64, device=tensors[0].device)
    for t, w in zip(tensors, p):
        acc += float(w) * t.double()
    return acc.float()
