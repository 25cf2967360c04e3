"""One flat configuration for a federated run, shared by the plain loop, the Flower apps and the CLI.

Every field is a scalar so that it maps 1:1 onto Flower's run config (``[tool.flwr.app.config]`` in
the app's pyproject.toml, ``--run-config "method='flora' rounds=5"``); Flower's keys use dashes,
so both ``local_steps`` and ``local-steps`` are accepted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

METHODS = ("fedavg", "flora", "ffa", "lora_fair")


@dataclass
class FedConfig:
    method: str = "fedavg"  # aggregator: fedavg | flora | ffa | lora_fair
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
    ranks: str = ""  # flora only: client ranks, comma list cycled over clients ("16,8,4"); α scales with r
    adapter_seed: int = 0  # shared seed of the initial global adapter (FFA-LoRA's frozen A0)
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
    # aggregator options
    fair_lambda: float = 0.01
    fair_solver: str = "cosine"
    fair_steps: int = 200
    # run
    seed: int = 0
    threads: int = 1  # torch threads per training process
    eval_every: int = 1  # central evaluation every N rounds (0: only at the end)
    round_timeout: float = 600.0  # seconds the Flower server waits for replies in a round
    fail: str = ""  # simulated client failures, "client@round" list, e.g. "3@2,5@1" (testing)
    out: str = "runs/fed"

    def __post_init__(self) -> None:
        self.method = self.method.strip().lower().replace("-", "_")
        if self.method not in METHODS:
            raise ValueError(f"unknown federated method {self.method!r}; known: {', '.join(METHODS)}")
        if self.clients < 1 or self.rounds < 1 or self.local_steps < 1 or self.batch_size < 1:
            raise ValueError("clients, rounds, local_steps and batch_size must be >= 1")
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if self.ranks and self.method != "flora":
            raise ValueError(f"per-client ranks need method 'flora' (it stacks mixed ranks exactly); "
                             f"{self.method!r} needs one rank for all clients")
        self.client_ranks()  # validates the list
        self.failures()

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
        return "ffa" if self.method == "ffa" else "lora"

    def runtime_key(self) -> tuple:
        """What the loaded model, data and split depend on (a process caches one runtime per key)."""
        return (self.model, self.data, self.n_train, self.n_eval, self.max_length, self.seed, self.clients,
                self.dirichlet_alpha, self.min_client_examples)

    # -- conversions ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_run_config(self) -> dict[str, Any]:
        """Flower run-config keys (dashes) and values."""
        return {k.replace("_", "-"): v for k, v in self.to_dict().items()}

    @classmethod
    def from_mapping(cls, values: dict[str, Any], **overrides: Any) -> FedConfig:
        """From a run config or dict; unknown keys are refused by name; values coerced to the field type."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        defaults = cls()
        out: dict[str, Any] = {}
        for raw_key, value in {**values, **overrides}.items():
            k = raw_key.replace("-", "_")
            if k not in fields:
                raise ValueError(f"unknown federated option {raw_key!r}; known: {', '.join(sorted(fields))}")
            out[k] = _coerce(value, type(getattr(defaults, k)), raw_key)
        return cls(**out)


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
