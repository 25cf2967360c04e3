"""One flat configuration for a federated run, shared by the plain loop, the Flower apps and the CLI.

Every field is a scalar so that it maps 1:1 onto Flower's run config (``[tool.flwr.app.config]`` in
the app's pyproject.toml, ``--run-config "rounds=5"``); Flower's keys use dashes, so both
``local_steps`` and ``local-steps`` are accepted. The one exception is ``method_args``, the
aggregator's own settings (the fields of its frozen ``Args``): a dict here, dotted keys
``method-args.<field>`` in the run config (a TOML table, which Flower flattens the same way).

This module names no aggregator: ``method`` is looked up in the catalog (axis ``federated``), and
everything that depends on the aggregator is read from the class' declarations (its ``Args``,
``form``, ``heterogeneous_ranks``, ``legacy_options``).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

AXIS = "federated"  # the catalog axis of aggregators


def aggregator_names() -> list[str]:
    """The registered aggregators, in catalog order (the first one is the default method)."""
    from lorakit.core import registry

    return registry.names(AXIS)


def aggregator_class(method: str) -> type:
    """The aggregator class registered as ``method``; ValueError listing the known ones."""
    from lorakit.core import registry

    try:
        return registry.get(AXIS, method)
    except registry.UnknownMethodError:
        raise ValueError(f"unknown federated method {method!r}; known: {', '.join(aggregator_names())}") from None


@dataclass
class FedConfig:
    method: str = ""  # the aggregator (catalog axis 'federated'); "": the first one in the catalog
    method_args: dict[str, Any] = field(default_factory=dict)  # the aggregator's Args fields (defaults: its paper's)
    clients: int = 10  # number of clients (= partitions of the training data)
    rounds: int = 3
    fraction: float = 1.0  # share of the clients asked to train each round
    min_clients: int = 2  # a round with fewer valid updates keeps the previous global model
    # data and model
    model: str = "smollm2"  # "smollm2" (embedded), or a local HF model dir / .gguf
    data: str = "sentiment"  # a bundled task name or a CSV/TSV/JSONL file
    n_train: int = 0  # 0: all training examples
    n_eval: int = 200  # server-side evaluation examples (0: the task's default eval split)
    max_length: int = 128
    dirichlet_alpha: float = 0.5  # non-IID label skew of the client split (smaller = more skewed)
    min_client_examples: int = 8
    # adapter
    targets: str = "q_proj,v_proj"
    rank: int = 8
    alpha: float = 16.0
    # client ranks, comma list cycled over clients ("16,8,4"); α scales with r. Only for aggregators
    # that declare heterogeneous_ranks
    ranks: str = ""
    adapter_seed: int = 0  # shared seed of the initial global adapter (and of tensors kept seeded)
    # local training
    local_steps: int = 5
    batch_size: int = 8
    lr: float = 1e-3
    optimizer: str = "adamw"  # adamw | sgd
    max_grad_norm: float = 1.0  # clipping without DP (0: off)
    # DP-SGD on every client (per-sample clipping + Gaussian noise, opacus)
    dp: bool = False
    dp_noise: float = 1.0  # noise multiplier σ (noise std = σ·C)
    dp_clip: float = 1.0  # per-sample gradient norm bound C
    dp_delta: float = 1e-5
    # run
    seed: int = 0
    threads: int = 1  # torch threads per training process
    eval_every: int = 1  # central evaluation every N rounds (0: only at the end)
    round_timeout: float = 600.0  # seconds the Flower server waits for replies in a round
    fail: str = ""  # simulated client failures, "client@round" list, e.g. "3@2,5@1" (testing)
    out: str = "runs/fed"

    def __post_init__(self) -> None:
        from lorakit.core import registry

        name = str(self.method).strip() or aggregator_names()[0]
        cls = aggregator_class(name)
        self.method = registry.entry(AXIS, name).name  # the catalog's spelling (dashes accepted for underscores)
        if not isinstance(self.method_args, Mapping):
            raise ValueError(f"method_args must be a mapping of {self.method!r}'s Args fields, "
                             f"got {self.method_args!r}")
        # typed and checked now, before any model is loaded; only the given keys are kept, so the
        # config compares and round-trips as it was written
        given = {str(k).replace("-", "_"): v for k, v in self.method_args.items()}
        args = cls.parse_args(given)
        self.method_args = {k: getattr(args, k) for k in given}
        if self.clients < 1 or self.rounds < 1 or self.local_steps < 1 or self.batch_size < 1:
            raise ValueError("clients, rounds, local_steps and batch_size must be >= 1")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.ranks and not cls.heterogeneous_ranks:
            able = [n for n in aggregator_names() if registry.get(AXIS, n).heterogeneous_ranks]
            raise ValueError(f"per-client ranks (ranks={self.ranks!r}) need an aggregator with heterogeneous_ranks "
                             f"({', '.join(able) or 'none registered'}); {self.method!r} needs one rank for all "
                             "clients")
        self.client_ranks()  # validates the list
        self.failures()

    # -- the aggregator ------------------------------------------------------------------------
    def aggregator_class(self) -> type:
        return aggregator_class(self.method)

    def aggregator_args(self) -> Any:
        """The aggregator's frozen ``Args``: its defaults, overridden by ``method_args``."""
        return self.aggregator_class().parse_args(self.method_args)

    def make_aggregator(self) -> Any:
        return self.aggregator_class()(self.aggregator_args())

    # -- derived -----------------------------------------------------------------------------
    def client_ranks(self) -> list[int]:
        if not self.ranks:
            return [self.rank] * self.clients
        try:
            ranks = [int(r) for r in str(self.ranks).replace(" ", "").split(",") if r]
        except ValueError:
            raise ValueError(f"ranks must be a comma list of integers, got {self.ranks!r}") from None
        if not ranks or min(ranks) < 1:
            raise ValueError(f"ranks must be positive integers, got {self.ranks!r}")
        return [ranks[k % len(ranks)] for k in range(self.clients)]

    def failures(self) -> set[tuple[int, int]]:
        out = set()
        for item in str(self.fail).replace(" ", "").split(","):
            if not item:
                continue
            client, sep, rnd = item.partition("@")
            if not sep:
                raise ValueError(f"fail expects client@round items, got {item!r}")
            out.add((int(client), int(rnd)))
        return out

    def target_list(self) -> str | list[str]:
        t = self.targets.strip()
        if t == "all-linear" or t.startswith("re:"):
            return t.removeprefix("re:")
        return [x.strip() for x in t.split(",") if x.strip()]

    def form(self) -> str:
        """The form clients train: the aggregator's declared ``form``, else AdapterSpec's default."""
        from lorakit.core.spec import AdapterSpec

        return self.aggregator_class().form or AdapterSpec().form

    def runtime_key(self) -> tuple:
        """What the loaded model, data and split depend on (a process caches one runtime per key)."""
        return (self.model, self.data, self.n_train, self.n_eval, self.max_length, self.seed, self.clients,
                self.dirichlet_alpha, self.min_client_examples)

    # -- conversions ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_run_config(self) -> dict[str, Any]:
        """Flower run-config keys (dashes) and scalar values; ``method_args`` as ``method-args.<field>``."""
        out = {k.replace("_", "-"): v for k, v in self.to_dict().items() if k != "method_args"}
        for k, v in self.method_args.items():
            out[f"method-args.{k}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> FedConfig:
        """From a run config or dict; unknown keys are refused by name; values coerced to the field type.

        ``method_args`` may come as a mapping (a dict, or the TOML table of a Flower app) or as
        dotted keys ``method_args.<field>`` / ``method-args.<field>`` (Flower's flattened run config,
        ``-o method_args.lam=0.1``); later keys win. An aggregator's ``legacy_options`` (old
        top-level keys of one of its fields) are accepted with a DeprecationWarning.
        """
        fields = {f.name: f for f in dataclasses.fields(cls)}
        scalar_defaults = {f.name: f.default for f in fields.values() if f.name != "method_args"}
        out: dict[str, Any] = {}
        method_args: dict[str, Any] = {}
        legacy: dict[str, Any] = {}
        for raw_key, value in {**values, **overrides}.items():
            k = str(raw_key).replace("-", "_")
            if k == "method_args":
                if not isinstance(value, Mapping):
                    raise ValueError(f"{raw_key}: expected a mapping of argument names to values, got {value!r}")
                method_args = {str(a).replace("-", "_"): v for a, v in value.items()}
            elif k.startswith("method_args."):
                method_args[k.split(".", 1)[1]] = value
            elif k in scalar_defaults:
                out[k] = _coerce(value, type(scalar_defaults[k]), raw_key)
            else:
                legacy[raw_key] = value
        if legacy:
            method_args = _apply_legacy(legacy, str(out.get("method", "")), method_args, sorted(fields))
        return cls(**out, method_args=method_args)


def _apply_legacy(items: dict[str, Any], method: str, method_args: dict[str, Any],
                  known: list[str]) -> dict[str, Any]:
    """Old top-level keys declared by aggregators' ``legacy_options``: kept for one release, with a warning."""
    from lorakit.core import registry

    owners: dict[str, tuple[str, str]] = {}  # old key -> (aggregator, Args field)
    for name in aggregator_names():
        for old, new in registry.get(AXIS, name).legacy_options.items():
            owners[old] = (name, new)
    try:
        chosen = registry.entry(AXIS, method or aggregator_names()[0]).name
    except registry.UnknownMethodError:
        chosen = None  # FedConfig refuses the name itself, with the known ones
    out = dict(method_args)
    for raw_key, value in items.items():
        k = raw_key.replace("-", "_")
        if k not in owners:
            raise ValueError(f"unknown federated option {raw_key!r}; known: {', '.join(known)} "
                             "(an aggregator's own settings go in method_args.<field>)")
        owner, new = owners[k]
        if owner != chosen:
            warnings.warn(f"federated option {raw_key!r} is deprecated and ignored: it belongs to aggregator "
                          f"{owner!r} (method_args.{new}), this run uses {chosen!r}", DeprecationWarning, stacklevel=3)
            continue
        warnings.warn(f"federated option {raw_key!r} is deprecated; use method_args.{new} "
                      f"(--method-arg {new}=...)", DeprecationWarning, stacklevel=3)
        out.setdefault(new, value)  # an explicit method_args value wins over the old spelling
    return out


def _coerce(value: Any, typ: type, name: str) -> Any:
    if typ is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"{name}: expected a boolean, got {value!r}")
        return bool(value)
    try:
        return typ(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected {typ.__name__}, got {value!r}") from None
